//! Router settings: the YAML file given to `scorefront serve --config`.
//!
//! ```yaml
//! listen:
//!   http: 127.0.0.1:8080      # data plane (HTTP/1.1 and h2c); default 0.0.0.0:8080 unless
//!                             # only https is set
//!   https: 127.0.0.1:8443     # data plane over TLS (HTTP/1.1 and h2 by ALPN); needs `tls`
//!   admin: 127.0.0.1:9090     # /healthz /readyz /metrics
//! tls:
//!   certFile: server.crt      # PEM chain, leaf first; watched and reloaded
//!   keyFile: server.key       # PEM: PKCS#8, SEC1 or PKCS#1
//!   handshakeTimeoutMs: 10000
//! auth:
//!   leewaySeconds: 60         # clock skew allowed on exp and nbf
//!   tokenIssuer:              # the built-in issuer (endpoints trust it as `scorefront`)
//!     signingKeyFile: token-signing.pem   # ES256 or Ed25519, PKCS#8 PEM
//!     ttlSeconds: 3600
//!     issuer: scorefront      # the `iss` claim
//!   oidc:                     # external issuers, by name
//!     - name: entra
//!       issuer: https://login.microsoftonline.com/TENANT/v2.0
//!       audiences: [api://scorefront]
//!       jwksUri: https://login.microsoftonline.com/TENANT/discovery/v2.0/keys
//!       # jwksFile: keys.json  (instead of jwksUri)
//!       # caFile: ca.pem       (extra CAs for an https jwksUri)
//!       refreshSeconds: 600
//!       minRefetchSeconds: 30 # refetch on an unknown kid at most this often
//! endpoints:                  # exactly one of file and kubernetes
//!   file: endpoints.yaml      # relative to this file
//!   # kubernetes:             # ScoringEndpoint objects in a cluster
//!   #   namespaces: [models]  # default: every namespace
//!   #   kubeconfig: kubeconfig.yaml  # default: in-cluster config, then the usual kubeconfig
//! readiness:
//!   requireReadyReplicas: false  # true: /readyz also needs a ready replica per endpoint
//! clusterPurpose: FastProd    # DevTest: no autoscaling anywhere (as in azureml)
//! autoscaler:
//!   dryRun: false             # true: decide, log and export, change nothing
//! maxRequestBodyBytes: 104857600
//! shutdownGracePeriodSeconds: 30
//! reloadIntervalMs: 1000
//! upstream:
//!   connectTimeoutMs: 3000    # then the request is retried on another replica, or 502
//!   idleTimeoutMs: 1000       # pooled replica connections idle longer are not reused
//!   outlierDetection:         # replicas failing in transport are ejected for a while
//!     consecutiveFailures: 5  # 0: never eject
//!     baseEjectionTimeMs: 30000   # times the replica's ejections in a row
//!     maxEjectionTimeMs: 300000
//! clients:
//!   maxConnections: 10000     # open data plane connections; at the limit, accepting pauses
//!   headerReadTimeoutMs: 30000  # a request head (or the h2c preface) must arrive within
//!   idleTimeoutMs: 60000      # connections with no request for this long are closed
//!   sendTimeoutMs: 60000      # a client not reading its response for this long is cut
//!   requestBufferBytes: 65536 # request body prefix read before a replica slot is taken
//!   bodyReadTimeoutMs: 30000  # that prefix must arrive within this long, else 408
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde::Deserialize;

use crate::spec::BUILTIN_ISSUER;

/// Default `maxRequestBodyBytes`: 100 MiB, as azureml.
pub const DEFAULT_MAX_BODY: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterConfig {
    #[serde(default)]
    pub listen: Listen,
    pub endpoints: EndpointsSource,
    /// Larger request bodies get 413. Default 100 MiB.
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: u64,
    /// How long in-flight requests may take to finish after SIGTERM. Default 30.
    #[serde(default = "default_grace")]
    pub shutdown_grace_period_seconds: u64,
    /// How often both files are checked for changes. Default 1000.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub clients: ClientsConfig,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub readiness: ReadinessConfig,
    /// `DevTest` turns the autoscaler off everywhere, as in azureml. Default `FastProd`.
    #[serde(default)]
    pub cluster_purpose: ClusterPurpose,
    #[serde(default)]
    pub autoscaler: AutoscalerConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ClusterPurpose {
    #[default]
    FastProd,
    DevTest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalerConfig {
    /// Decide, log and export the counts, and change nothing. Default false.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `/readyz` requires besides a synced routing table and not draining.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadinessConfig {
    /// Every endpoint must have a version with at least one ready replica, so that a
    /// router in front of its own model (a sidecar) gets traffic only once the model
    /// answers. Fixed replica addresses are then probed with `GET /` like local replicas.
    /// Default false.
    #[serde(default)]
    pub require_ready_replicas: bool,
}

/// The certificate of the https listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// A client that has not finished its handshake within this long is disconnected.
    /// Default 10000.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
}

impl TlsConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Token issuers that `authMode: token` endpoints may trust.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Clock skew allowed when checking `exp` and `nbf`. Default 60.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    pub token_issuer: Option<TokenIssuerConfig>,
    #[serde(default)]
    pub oidc: Vec<OidcConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            leeway_seconds: default_leeway(),
            token_issuer: None,
            oidc: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenIssuerConfig {
    pub signing_key_file: PathBuf,
    /// Lifetime of minted tokens. Default 3600.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u64,
    /// The `iss` claim. Default `scorefront`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcConfig {
    pub name: String,
    /// The `iss` claim its tokens carry.
    pub issuer: String,
    /// A token's `aud` must name one of these.
    pub audiences: Vec<String>,
    /// Where the issuer publishes its keys (http or https); or `jwks_file`.
    pub jwks_uri: Option<String>,
    /// A JWKS document on disk, re-read like a fetched one.
    pub jwks_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for an https `jwksUri`, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Default 600.
    #[serde(default = "default_jwks_refresh")]
    pub refresh_seconds: u64,
    /// Default 30.
    #[serde(default = "default_min_refetch")]
    pub min_refetch_seconds: u64,
}

/// Connections to replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A replica that has not accepted a connection within this long counts as
    /// unreachable: the request, not yet sent, is retried on another replica. Default 3000.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections to replicas are not reused after this long, so that a
    /// request is never written into a connection the replica is closing (servers
    /// commonly close idle connections after 2 to 5 s). Default 1000.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout_ms: default_connect_ms(),
            idle_timeout_ms: default_idle_ms(),
            outlier_detection: OutlierDetection::default(),
        }
    }
}

/// Passive outlier detection, as Envoy's `consecutive_gateway_failure`: a replica whose
/// attempts fail in transport (no connection, or the connection lost before a response
/// head) that many times in a row gets no new requests for a while. A response of the
/// model's own, whatever its status, is a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject a replica; 0 turns ejection off. Default 5.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// A replica's n-th ejection in a row (no success in between) lasts n times this.
    /// Default 30000.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_time_ms: u64,
    /// No ejection lasts longer. Default 300000.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_time_ms: u64,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time_ms: default_base_ejection_ms(),
            max_ejection_time_ms: default_max_ejection_ms(),
        }
    }
}

impl OutlierDetection {
    /// How long the `nth` ejection in a row lasts (`nth` from 1).
    pub fn ejection_time(&self, nth: u32) -> Duration {
        let ms = (self.base_ejection_time_ms)
            .saturating_mul(u64::from(nth))
            .min(self.max_ejection_time_ms);
        Duration::from_millis(ms)
    }
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// Connections from scoring clients on the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientsConfig {
    /// Open client connections per data listener; at the limit the listener stops
    /// accepting (new connections wait in the kernel's backlog) until one closes.
    /// Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A client must send a request head (on the plain port, first the h2c preface or the
    /// start of a head) within this long. For HTTP/1.1 the timer also runs while a
    /// keep-alive connection waits for its next request. Default 30000.
    #[serde(default = "default_header_read_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection that carries no request for this long is closed (h2: with a GOAWAY).
    /// Default 60000.
    #[serde(default = "default_client_idle_ms")]
    pub idle_timeout_ms: u64,
    /// A connection the router cannot write to for this long (the client stopped reading)
    /// is closed, and its requests release their replica slots. Default 60000.
    #[serde(default = "default_send_ms")]
    pub send_timeout_ms: u64,
    /// Up to this much of a request body is read before a replica slot is taken, so a
    /// slow upload holds no replica capacity; larger bodies stream on after it. 0: none.
    /// Default 65536.
    #[serde(default = "default_request_buffer")]
    pub request_buffer_bytes: u64,
    /// The buffered part of a request body must arrive within this long, else 408.
    /// Default 30000.
    #[serde(default = "default_body_read_ms")]
    pub body_read_timeout_ms: u64,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        ClientsConfig {
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_ms(),
            idle_timeout_ms: default_client_idle_ms(),
            send_timeout_ms: default_send_ms(),
            request_buffer_bytes: default_request_buffer(),
            body_read_timeout_ms: default_body_read_ms(),
        }
    }
}

impl ClientsConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Data plane address. Default `0.0.0.0:8080` unless `https` is set alone.
    pub http: Option<SocketAddr>,
    /// Data plane address over TLS; needs `tls`.
    pub https: Option<SocketAddr>,
    /// Admin address (health, readiness, metrics). Default `0.0.0.0:9090`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

/// Where endpoints come from: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsSource {
    /// The endpoints file; a relative path is relative to the router config file's
    /// folder (as named, symlinks not followed).
    pub file: Option<PathBuf>,
    /// `ScoringEndpoint` objects in a Kubernetes cluster.
    pub kubernetes: Option<KubernetesSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSource {
    /// The namespaces watched. Default (empty): every namespace.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// A kubeconfig file. Default: the in-cluster service account, then `KUBECONFIG` and
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: None,
            https: None,
            admin: default_admin(),
        }
    }
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_handshake_ms() -> u64 {
    10_000
}
fn default_leeway() -> u64 {
    60
}
fn default_ttl() -> u64 {
    3600
}
fn default_issuer() -> String {
    BUILTIN_ISSUER.into()
}
fn default_jwks_refresh() -> u64 {
    600
}
fn default_min_refetch() -> u64 {
    30
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY
}
fn default_grace() -> u64 {
    30
}
fn default_reload_ms() -> u64 {
    1000
}
fn default_connect_ms() -> u64 {
    3000
}
fn default_idle_ms() -> u64 {
    1000
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    30_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_ms() -> u64 {
    30_000
}
fn default_client_idle_ms() -> u64 {
    60_000
}
fn default_send_ms() -> u64 {
    60_000
}
fn default_request_buffer() -> u64 {
    64 * 1024
}
fn default_body_read_ms() -> u64 {
    30_000
}

impl RouterConfig {
    /// Reads and checks the router config; the endpoints path comes back absolute.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read router config {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut cfg: RouterConfig = serde_yaml_ng::from_str(text)
            .with_context(|| format!("{}: invalid router config", path.display()))?;
        for (field, value) in [
            ("reloadIntervalMs", cfg.reload_interval_ms),
            ("upstream.connectTimeoutMs", cfg.upstream.connect_timeout_ms),
            (
                "upstream.outlierDetection.baseEjectionTimeMs",
                cfg.upstream.outlier_detection.base_ejection_time_ms,
            ),
            ("clients.maxConnections", cfg.clients.max_connections as u64),
            (
                "clients.headerReadTimeoutMs",
                cfg.clients.header_read_timeout_ms,
            ),
            ("clients.idleTimeoutMs", cfg.clients.idle_timeout_ms),
            ("clients.sendTimeoutMs", cfg.clients.send_timeout_ms),
            (
                "clients.bodyReadTimeoutMs",
                cfg.clients.body_read_timeout_ms,
            ),
        ] {
            if value == 0 {
                anyhow::bail!("{}: {field} must be at least 1", path.display());
            }
        }
        let outliers = &cfg.upstream.outlier_detection;
        if outliers.max_ejection_time_ms < outliers.base_ejection_time_ms {
            anyhow::bail!(
                "{}: upstream.outlierDetection.maxEjectionTimeMs must be at least \
                 baseEjectionTimeMs ({})",
                path.display(),
                outliers.base_ejection_time_ms
            );
        }
        let file = path.display();
        if cfg.listen.http.is_none() && cfg.listen.https.is_none() {
            cfg.listen.http = Some(default_http());
        }
        if cfg.listen.https.is_some() && cfg.tls.is_none() {
            anyhow::bail!("{file}: listen.https needs tls.certFile and tls.keyFile");
        }
        // Relative to the config's folder as given, made absolute now: a bare file name
        // has an empty parent, which would make replica commands run nowhere. Symlinks
        // are not followed, so files of one ConfigMap volume stay on its stable paths.
        let absolute = std::path::absolute(path)
            .with_context(|| format!("{file}: cannot make the path absolute"))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match (&mut cfg.endpoints.file, &mut cfg.endpoints.kubernetes) {
            (Some(f), None) => resolve(f),
            (None, Some(k)) => {
                if let Some(kc) = &mut k.kubeconfig {
                    resolve(kc);
                }
                for (i, ns) in k.namespaces.iter().enumerate() {
                    if !crate::spec::valid_name(ns) {
                        anyhow::bail!(
                            "{file}: endpoints.kubernetes.namespaces[{i}]: '{ns}' is not a \
                             namespace name"
                        );
                    }
                }
            }
            _ => anyhow::bail!(
                "{file}: endpoints: give exactly one of file (an endpoints file) and \
                 kubernetes (ScoringEndpoint objects in a cluster)"
            ),
        }
        if let Some(tls) = &mut cfg.tls {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
        }
        if let Some(ti) = &mut cfg.auth.token_issuer {
            resolve(&mut ti.signing_key_file);
            if ti.ttl_seconds == 0 {
                anyhow::bail!("{file}: auth.tokenIssuer.ttlSeconds must be at least 1");
            }
        }
        let mut names = vec![BUILTIN_ISSUER.to_owned()];
        for (i, o) in cfg.auth.oidc.iter_mut().enumerate() {
            let at = format!("{file}: auth.oidc[{i}] ({})", o.name);
            if names.contains(&o.name) {
                anyhow::bail!(
                    "{at}: name is taken (`{}` is the built-in issuer's)",
                    BUILTIN_ISSUER
                );
            }
            names.push(o.name.clone());
            if o.audiences.is_empty() {
                anyhow::bail!("{at}: audiences must list at least one");
            }
            match (&o.jwks_uri, &mut o.jwks_file) {
                (Some(uri), None) => {
                    let parsed: http::Uri = uri
                        .parse()
                        .with_context(|| format!("{at}: jwksUri is not a URL"))?;
                    if !matches!(parsed.scheme_str(), Some("http" | "https"))
                        || parsed.host().is_none()
                    {
                        anyhow::bail!("{at}: jwksUri must be an http:// or https:// URL");
                    }
                }
                (None, Some(f)) => resolve(f),
                _ => anyhow::bail!("{at}: set exactly one of jwksUri and jwksFile"),
            }
            if let Some(ca) = &mut o.ca_file {
                resolve(ca);
            }
            if o.refresh_seconds == 0 || o.min_refetch_seconds == 0 {
                anyhow::bail!(
                    "{at}: refreshSeconds and minRefetchSeconds must be at least 1 (an unknown \
                     kid must not make every request fetch the issuer's keys)"
                );
            }
        }
        Ok(cfg)
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_period_seconds)
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let cfg = RouterConfig::parse(
            "endpoints: {file: eps.yaml}",
            Path::new("/etc/sf/router.yaml"),
        )
        .unwrap();
        assert_eq!(
            cfg.endpoints.file.as_deref(),
            Some(Path::new("/etc/sf/eps.yaml"))
        );
        assert_eq!(cfg.max_request_body_bytes, 100 * 1024 * 1024);
        assert_eq!(cfg.grace_period(), Duration::from_secs(30));
        assert_eq!(cfg.listen.http.unwrap().port(), 8080);
        assert_eq!(cfg.listen.https, None);
        assert_eq!(cfg.clients, ClientsConfig::default());
        assert_eq!(cfg.clients.max_connections, 10_000);
        let err = RouterConfig::parse(
            "endpoints: {file: x}\nclients: {maxConnections: 0}",
            Path::new("r.yaml"),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("clients.maxConnections"), "{err}");
        let err = RouterConfig::parse(
            "endpoints: {file: x}\nlisten: {htp: 1}",
            Path::new("r.yaml"),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `htp`"),
            "{err:#}"
        );
    }

    #[test]
    fn endpoints_come_from_exactly_one_source() {
        let cfg = RouterConfig::parse(
            "endpoints: {kubernetes: {namespaces: [models], kubeconfig: kc.yaml}}",
            Path::new("/etc/sf/router.yaml"),
        )
        .unwrap();
        let k = cfg.endpoints.kubernetes.unwrap();
        assert_eq!(k.namespaces, ["models"]);
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/etc/sf/kc.yaml")));
        for bad in ["endpoints: {}", "endpoints: {file: e.yaml, kubernetes: {}}"] {
            let err = RouterConfig::parse(bad, Path::new("r.yaml")).unwrap_err();
            assert!(format!("{err}").contains("exactly one of file"), "{err}");
        }
        let err = RouterConfig::parse(
            "endpoints: {kubernetes: {namespaces: [Models]}}",
            Path::new("r.yaml"),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("namespaces[0]"), "{err}");
    }

    #[test]
    fn outlier_detection_defaults_and_bounds() {
        let parse = |extra: &str| {
            RouterConfig::parse(
                &format!("endpoints: {{file: x}}\n{extra}"),
                Path::new("r.yaml"),
            )
        };
        let d = parse("").unwrap().upstream.outlier_detection;
        assert_eq!(d.consecutive_failures, 5);
        assert_eq!(d.ejection_time(1), Duration::from_secs(30));
        assert_eq!(d.ejection_time(3), Duration::from_secs(90));
        assert_eq!(d.ejection_time(11), Duration::from_secs(300), "capped");
        let err = parse("upstream: {outlierDetection: {baseEjectionTimeMs: 0}}").unwrap_err();
        assert!(format!("{err:#}").contains("baseEjectionTimeMs must be at least 1"));
        let err = parse("upstream: {outlierDetection: {baseEjectionTimeMs: 400000}}").unwrap_err();
        assert!(
            format!("{err:#}").contains("maxEjectionTimeMs must be at least baseEjectionTimeMs"),
            "{err:#}"
        );
    }
}
