//! The file source: an endpoints file of `ScoringEndpoint` documents, and the watcher that
//! re-reads it (and the router config that names it) when either changes or on SIGHUP.
//!
//! Only a whole valid file is ever applied; an invalid one is logged with every error and
//! the last good table stays in force.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use super::index::Event;
use crate::{
    config::RouterConfig,
    proxy::Proxy,
    server::tls::{CertStore, LoadedCert},
    spec,
    token::issuer::Signer,
};

/// Reads and validates an endpoints file. Errors name the file, the document (1-based, and
/// its name when it has one) and the field.
pub fn load_endpoints(path: &Path) -> Result<Vec<spec::Endpoint>, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    parse_endpoints(&text, path)
}

pub fn parse_endpoints(text: &str, path: &Path) -> Result<Vec<spec::Endpoint>, Vec<String>> {
    let file = path.display();
    let mut endpoints: Vec<spec::Endpoint> = Vec::new();
    let mut errors = Vec::new();
    // Each document is read untyped first. A YAML error (bad syntax, an unknown alias)
    // leaves the reader inside the stream: it would then report that error again for every
    // further document, endlessly, or hand out fragments on which serde_yaml_ng panics. So
    // the first such error ends the file, and only documents read whole are deserialized.
    let mut typed = serde_yaml_ng::Deserializer::from_str(text);
    for (i, untyped) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let Some(de) = typed.next() else { break };
        if let Err(e) = serde::de::IgnoredAny::deserialize(untyped) {
            errors.push(format!("{file}: document {n}: {e}"));
            break;
        }
        match Option::<spec::EndpointDocument>::deserialize(de) {
            Ok(None) => {}
            Ok(Some(doc)) => match spec::validate_document(&doc) {
                Ok(ep) if endpoints.iter().any(|e| e.name == ep.name) => errors.push(format!(
                    "{file}: document {n} ({}): metadata.name: another document already defines this endpoint",
                    ep.name
                )),
                Ok(ep) => endpoints.push(ep),
                Err(errs) => errors.extend(errs.into_iter().map(|e| {
                    format!("{file}: document {n} ({}): {e}", doc.metadata.name)
                })),
            },
            Err(e) => errors.push(format!("{file}: document {n}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(endpoints)
    } else {
        Err(errors)
    }
}

/// Loads both files as `serve` and `token` do; the error lists every problem found.
pub fn load_all(config: &Path) -> anyhow::Result<(RouterConfig, Vec<spec::Endpoint>)> {
    let invalid = |errors: Vec<String>| {
        anyhow::anyhow!("configuration is invalid:\n  {}", errors.join("\n  "))
    };
    let cfg = RouterConfig::load(config).map_err(|e| invalid(vec![format!("{e:#}")]))?;
    let endpoints = load_endpoints_for(&cfg).map_err(invalid)?;
    Ok((cfg, endpoints))
}

/// Loads the endpoints file `cfg` names (none in Kubernetes mode) and checks that every
/// token issuer an endpoint trusts is configured in `cfg`.
pub fn load_endpoints_for(cfg: &RouterConfig) -> Result<Vec<spec::Endpoint>, Vec<String>> {
    let Some(path) = &cfg.endpoints.file else {
        return Ok(Vec::new());
    };
    let endpoints = load_endpoints(path)?;
    let known = super::known_issuers(&cfg.auth);
    let errors: Vec<String> = endpoints
        .iter()
        .flat_map(|ep| {
            super::unknown_issuers(ep, &known)
                .map(|e| format!("{}: endpoint {}: {e}", path.display(), ep.name))
        })
        .collect();
    if errors.is_empty() {
        Ok(endpoints)
    } else {
        Err(errors)
    }
}

/// Watches the router config, the endpoints file and the TLS certificate and key until
/// `stop` turns true.
///
/// Polls the files every `reloadIntervalMs` (comparing contents, so a Kubernetes-style
/// symlink swap is seen too; a change applies once two polls in a row read it the same)
/// and re-reads them on SIGHUP. A valid endpoints change goes to the index; the body limit
/// applies at once; a new certificate and key that load and match go to `certs`; listener,
/// TLS path and auth changes need a restart.
pub struct Watcher {
    pub config_path: PathBuf,
    pub config: RouterConfig,
    pub proxy: Arc<Proxy>,
    pub events: mpsc::UnboundedSender<Event>,
    /// The https listener's certificate, when there is one.
    pub certs: Option<Arc<CertStore>>,
}

type TlsFiles = [Option<Vec<u8>>; 2];

/// The contents of the watched files (`None`: unreadable, or not configured).
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    /// The router config and the endpoints file.
    config: [Option<Vec<u8>>; 2],
    /// The https certificate and key.
    tls: TlsFiles,
    /// The built-in issuer's signing key.
    signing_key: Option<Vec<u8>>,
}

impl Watcher {
    /// Must be called right after the files were loaded (in a runtime): the files are
    /// snapshotted and the SIGHUP handler installed by this call, not when the returned
    /// future first runs, so a change or a SIGHUP in between is not lost.
    pub fn run(mut self, mut stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = self.read_all();
        async move {
            let mut tick = tokio::time::interval(self.config.reload_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A file rewritten in place (truncate, then write) can be read empty or half
            // written, which may well parse (an empty file is zero endpoints). So a change
            // is applied only once it reads the same on two polls in a row.
            let mut settling = None;
            let mut refused_tls = None;
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { hangup.as_mut()?.recv().await } => true,
                    () = crate::until_true(&mut stop) => return,
                };
                let now = self.read_all();
                if !forced && now == seen {
                    settling = None;
                    continue;
                }
                if !forced && settling.as_ref() != Some(&now) {
                    settling = Some(now);
                    continue;
                }
                settling = None;
                if forced || now.config != seen.config {
                    self.reload(forced);
                }
                let mut now = now;
                // A refused pair is tried again on every change of poll (a certificate
                // not valid yet becomes valid by itself), but reported once.
                if (forced || now.tls != seen.tls) && !self.reload_certs(&mut refused_tls, &now) {
                    now.tls = seen.tls.clone();
                }
                if forced || now.signing_key != seen.signing_key {
                    self.reload_signing_key();
                }
                seen = now;
                // The config may name another endpoints file now: compare against it.
                seen.config[1] = self.config.endpoints.file.as_deref().and_then(read);
            }
        }
    }

    fn read_all(&self) -> Contents {
        let tls = self.config.tls.as_ref();
        Contents {
            config: [
                read(&self.config_path),
                self.config.endpoints.file.as_deref().and_then(read),
            ],
            tls: [
                tls.and_then(|t| read(&t.cert_file)),
                tls.and_then(|t| read(&t.key_file)),
            ],
            signing_key: (self.config.auth.token_issuer.as_ref())
                .and_then(|t| read(&t.signing_key_file)),
        }
    }

    /// A new built-in signing key verifies tokens at once; the old one keeps verifying the
    /// tokens it signed until they expire.
    fn reload_signing_key(&self) {
        let Some(ti) = &self.config.auth.token_issuer else {
            return;
        };
        match Signer::load(&ti.signing_key_file, ti.issuer.clone(), ti.ttl_seconds) {
            Ok(signer) => {
                if self.proxy.tokens().rotate_builtin(signer.public) {
                    tracing::info!(
                        key = %ti.signing_key_file.display(),
                        "token signing key changed; tokens of the previous key pass until they expire"
                    );
                }
            }
            Err(e) => {
                tracing::error!("token signing key not reloaded, keeping the current one: {e:#}")
            }
        }
    }

    /// Swaps in the certificate and key of `now` if they load and check out. A refusal
    /// is logged as an error once per content (`refused` remembers the last one).
    fn reload_certs(&self, refused: &mut Option<TlsFiles>, now: &Contents) -> bool {
        let (Some(store), Some(tls)) = (&self.certs, &self.config.tls) else {
            return true;
        };
        match LoadedCert::load(&tls.cert_file, &tls.key_file, std::time::SystemTime::now()) {
            Ok(cert) => {
                tracing::info!(
                    cert = %tls.cert_file.display(),
                    not_after = cert.not_after,
                    "TLS certificate reloaded; new connections get it"
                );
                self.proxy.metrics().set_cert_expiry(cert.not_after);
                store.replace(cert);
                *refused = None;
                true
            }
            Err(e) if refused.as_ref() == Some(&now.tls) => {
                tracing::debug!("TLS certificate still refused: {e}");
                false
            }
            Err(e) => {
                tracing::error!(
                    "TLS certificate not reloaded, keeping the current one (retrying while \
                     the files stay as they are): {e}"
                );
                *refused = Some(now.tls.clone());
                false
            }
        }
    }

    fn reload(&mut self, forced: bool) {
        tracing::info!(forced, "reloading configuration");
        match RouterConfig::load(&self.config_path) {
            Ok(cfg) => {
                if cfg.listen != self.config.listen {
                    tracing::warn!("listen addresses changed; they take effect after a restart");
                }
                if cfg.max_request_body_bytes != self.config.max_request_body_bytes {
                    self.proxy.set_max_body(cfg.max_request_body_bytes);
                }
                if cfg.reload_interval_ms != self.config.reload_interval_ms
                    || cfg.shutdown_grace_period_seconds
                        != self.config.shutdown_grace_period_seconds
                    || cfg.upstream != self.config.upstream
                    || cfg.tls != self.config.tls
                    || cfg.auth != self.config.auth
                {
                    tracing::warn!(
                        "reloadIntervalMs, shutdownGracePeriodSeconds, upstream, tls and auth \
                         take effect after a restart (certificate contents reload by themselves)"
                    );
                }
                if cfg.endpoints.kubernetes != self.config.endpoints.kubernetes
                    || cfg.endpoints.file.is_some() != self.config.endpoints.file.is_some()
                {
                    tracing::warn!(
                        "endpoints.kubernetes, and a switch between file and kubernetes, take \
                         effect after a restart"
                    );
                }
                let endpoints = match self.config.endpoints.file {
                    Some(_) if cfg.endpoints.file.is_some() => cfg.endpoints.clone(),
                    _ => self.config.endpoints.clone(),
                };
                self.config = RouterConfig {
                    endpoints,
                    listen: self.config.listen.clone(),
                    reload_interval_ms: self.config.reload_interval_ms,
                    shutdown_grace_period_seconds: self.config.shutdown_grace_period_seconds,
                    upstream: self.config.upstream,
                    tls: self.config.tls.clone(),
                    auth: self.config.auth.clone(),
                    ..cfg
                };
            }
            Err(e) => {
                tracing::error!("router config not reloaded, keeping the last good one: {e:#}");
            }
        }
        if self.config.endpoints.file.is_none() {
            return; // the Kubernetes source sends the endpoints
        }
        match load_endpoints_for(&self.config) {
            Ok(endpoints) => {
                let _ = self.events.send(Event::Endpoints(endpoints));
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!("{e}");
                }
                tracing::error!(
                    errors = errors.len(),
                    "endpoints file not applied; the last good routing table stays in force"
                );
            }
        }
    }
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_document_and_field() {
        let text = "
apiVersion: scorefront.io/v1
kind: ScoringEndpoint
metadata: {name: good}
spec: {authMode: none, versions: [{name: a, replicas: ['127.0.0.1:1']}]}
---
apiVersion: scorefront.io/v1
kind: ScoringEndpoint
metadata: {name: bad}
spec: {authMode: none, versions: [{name: a, trafficPercentile: 101, replicas: ['127.0.0.1:1']}]}
---
apiVersion: scorefront.io/v1
kind: ScoringEndpoint
metadata: {name: good}
spec: {authMode: none, versions: [{name: a, replicas: ['127.0.0.1:1']}], extra: 1}
---
";
        let errs = parse_endpoints(text, Path::new("eps.yaml")).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs[0].starts_with("eps.yaml: document 2 (bad): spec.versions[0].trafficPercentile"),
            "{}",
            errs[0]
        );
        assert!(errs[1].contains("add up to 101"), "{}", errs[1]);
        assert!(
            errs[2].starts_with("eps.yaml: document 3: spec: unknown field `extra`"),
            "{}",
            errs[2]
        );
    }

    #[test]
    fn duplicate_endpoint_names_are_refused() {
        let one = "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: x}\n\
                   spec: {authMode: none}\n";
        let errs = parse_endpoints(&format!("{one}---\n{one}"), Path::new("f")).unwrap_err();
        assert!(
            errs[0].contains("document 2 (x): metadata.name"),
            "{errs:?}"
        );
    }
}
