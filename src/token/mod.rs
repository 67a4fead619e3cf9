//! Token (JWT) authentication: the built-in issuer and external OIDC issuers, verified
//! offline on the request path.
//!
//! A token is accepted for an endpoint when, in this order: it parses; its `alg` is on the
//! allow-list; its `iss` is an issuer the endpoint trusts; a key of that issuer (the one its
//! `kid` names, or any fitting key when it names none) verifies the signature; `exp` is
//! present and not past and `nbf` not ahead (both with the configured leeway); and its
//! `aud` names the endpoint (built-in issuer) or one of the issuer's audiences (OIDC).
//!
//! Verified tokens are cached by their exact bytes, with the endpoint, their validity
//! window and the generation of the keys that verified them, so a repeat costs a hash
//! lookup and a key rotation or expiry is never served from the cache.

pub mod issuer;
pub mod jwk;
pub mod jwks;
pub mod jws;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{sync::watch, task::JoinHandle};
use tokio_rustls::TlsConnector;

use crate::config::AuthConfig;
use issuer::Signer;
use jwk::PublicKey;
use jwks::{Jwks, KeySet, Source};
use jws::Jws;

/// The name by which endpoints refer to the built-in issuer in `tokenIssuers`.
pub const BUILTIN: &str = crate::spec::BUILTIN_ISSUER;

/// Why a credential was refused: the `reason` label of `scorefront_auth_failures_total`
/// and the log line. Never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Missing,
    InvalidKey,
    Malformed,
    UnsupportedAlg,
    UntrustedIssuer,
    UnknownKid,
    BadSignature,
    MissingExp,
    Expired,
    NotYetValid,
    WrongAudience,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::InvalidKey => "invalid_key",
            Reason::Malformed => "malformed",
            Reason::UnsupportedAlg => "unsupported_alg",
            Reason::UntrustedIssuer => "untrusted_issuer",
            Reason::UnknownKid => "unknown_kid",
            Reason::BadSignature => "bad_signature",
            Reason::MissingExp => "missing_exp",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongAudience => "wrong_audience",
        }
    }
}

enum Keys {
    /// The built-in issuer's public key, and replaced ones until their tokens expire.
    Builtin {
        keys: ArcSwap<KeySet>,
        ttl_seconds: u64,
    },
    Jwks(Arc<Jwks>),
}

enum Audiences {
    /// The token's `aud` must be the endpoint's name.
    Endpoint,
    Listed(Vec<String>),
}

struct Issuer {
    /// What endpoints list in `tokenIssuers`.
    name: String,
    /// The `iss` claim.
    iss: String,
    audiences: Audiences,
    keys: Keys,
}

impl Issuer {
    /// The generation of the keys held now, read without taking a reference to them.
    fn generation(&self) -> u64 {
        match &self.keys {
            Keys::Builtin { keys, .. } => keys.load().generation,
            Keys::Jwks(j) => j.generation(),
        }
    }

    fn keys(&self) -> Arc<KeySet> {
        match &self.keys {
            Keys::Builtin { keys, .. } => keys.load_full(),
            Keys::Jwks(j) => j.current(),
        }
    }
}

/// All configured issuers. Built once at start; shared by every request.
pub struct Verifier {
    issuers: Vec<Issuer>,
    leeway: u64,
    cache: Cache,
}

impl Verifier {
    /// Issuers from the router config; relative paths are resolved against `base`.
    /// Loads the built-in signing key; OIDC keys arrive once [`Verifier::spawn_refresh`] runs.
    pub fn from_config(cfg: &AuthConfig) -> anyhow::Result<Verifier> {
        let mut issuers = Vec::new();
        if let Some(ti) = &cfg.token_issuer {
            let signer = Signer::load(&ti.signing_key_file, ti.issuer.clone(), ti.ttl_seconds)?;
            issuers.push(Issuer {
                name: BUILTIN.into(),
                iss: ti.issuer.clone(),
                audiences: Audiences::Endpoint,
                keys: Keys::Builtin {
                    keys: ArcSwap::from_pointee(KeySet {
                        keys: vec![signer.public],
                        generation: 0,
                    }),
                    ttl_seconds: ti.ttl_seconds,
                },
            });
        }
        for o in &cfg.oidc {
            let source = match (&o.jwks_uri, &o.jwks_file) {
                (Some(uri), _) => {
                    let uri: http::Uri = uri.parse()?;
                    let tls = match uri.scheme_str() {
                        Some("https") => {
                            Some(tls_client(o.ca_file.as_deref()).with_context(|| {
                                format!("auth.oidc {}: TLS client for jwksUri", o.name)
                            })?)
                        }
                        _ => None,
                    };
                    Source::Uri { uri, tls }
                }
                (None, Some(path)) => Source::File(path.clone()),
                (None, None) => anyhow::bail!("auth.oidc {}: no jwksUri or jwksFile", o.name),
            };
            issuers.push(Issuer {
                name: o.name.clone(),
                iss: o.issuer.clone(),
                audiences: Audiences::Listed(o.audiences.clone()),
                keys: Keys::Jwks(Arc::new(Jwks::new(
                    o.name.clone(),
                    source,
                    Duration::from_secs(o.refresh_seconds),
                    Duration::from_secs(o.min_refetch_seconds),
                ))),
            });
        }
        Ok(Verifier {
            issuers,
            leeway: cfg.leeway_seconds,
            cache: Cache::default(),
        })
    }

    /// Fetches every OIDC issuer's keys once (so tokens verify from the first request),
    /// then keeps refreshing them in tasks that end when `stop` turns true.
    pub async fn spawn_refresh(&self, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let all: Vec<Arc<Jwks>> = (self.issuers.iter())
            .filter_map(|i| match &i.keys {
                Keys::Jwks(jwks) => Some(jwks.clone()),
                Keys::Builtin { .. } => None,
            })
            .collect();
        // The first fetches run side by side: start waits for the slowest, not the sum.
        let mut first = tokio::task::JoinSet::new();
        for jwks in &all {
            let jwks = jwks.clone();
            first.spawn(async move { jwks.fetch_now().await });
        }
        first.join_all().await;
        all.into_iter()
            .map(|jwks| tokio::spawn(jwks.run(stop.clone())))
            .collect()
    }

    /// Makes `key` the built-in issuer's signing key. The key it replaces keeps verifying
    /// for one token lifetime (plus leeway), so tokens it signed pass until they expire.
    /// False when `key` is the current key already, or there is no built-in issuer.
    pub fn rotate_builtin(&self, key: PublicKey) -> bool {
        let Some(Keys::Builtin { keys, ttl_seconds }) = self
            .issuers
            .iter()
            .map(|i| &i.keys)
            .find(|k| matches!(k, Keys::Builtin { .. }))
        else {
            return false;
        };
        let old = keys.load();
        if old.keys.first() == Some(&key) {
            return false;
        }
        let now = unix_now();
        let retire = now + ttl_seconds + self.leeway;
        let mut next = vec![key];
        for k in &old.keys {
            if k.usable_at(now) && k.kid != next[0].kid {
                let mut k = k.clone();
                k.retire_at = Some(k.retire_at.map_or(retire, |t| t.min(retire)));
                next.push(k);
            }
        }
        keys.store(Arc::new(KeySet {
            keys: next,
            generation: old.generation + 1,
        }));
        true
    }

    /// Checks `token` for `endpoint`, which trusts the issuers named in `trusted`.
    pub async fn verify(
        &self,
        endpoint: &str,
        trusted: &[String],
        token: &[u8],
    ) -> Result<(), Reason> {
        let now = unix_now();
        if let Some((index, generation)) = self.cache.get(endpoint, token, now) {
            let issuer = &self.issuers[index];
            if trusted.contains(&issuer.name) && issuer.generation() == generation {
                return Ok(());
            }
        }
        let jws = Jws::parse(token)?;
        let iss = jws.claims.iss.as_deref().ok_or(Reason::UntrustedIssuer)?;
        let (index, issuer) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.iss == iss && trusted.contains(&i.name))
            .ok_or(Reason::UntrustedIssuer)?;
        let mut keys = issuer.keys();
        if let (Some(kid), Keys::Jwks(jwks)) = (&jws.kid, &issuer.keys)
            && !keys.keys.iter().any(|k| k.kid.as_ref() == Some(kid))
        {
            jwks.refetch_for_unknown_kid(keys.generation).await;
            keys = jwks.current();
        }
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| (jws.kid.is_none() || k.kid == jws.kid) && k.usable_at(now))
            .peekable();
        if candidates.peek().is_none() {
            return Err(Reason::UnknownKid);
        }
        if !candidates.any(|k| k.verify(jws.alg, jws.signed, &jws.signature)) {
            return Err(Reason::BadSignature);
        }
        let claims = &jws.claims;
        let exp = claims.exp.ok_or(Reason::MissingExp)?;
        // Any JSON number is a valid NumericDate: `as` saturates, and so does the leeway.
        let leeway = i64::try_from(self.leeway).unwrap_or(i64::MAX);
        let not_after = (exp.floor() as i64).saturating_add(leeway);
        if now as i64 > not_after {
            return Err(Reason::Expired);
        }
        let not_before = claims
            .nbf
            .map_or(i64::MIN, |nbf| (nbf.ceil() as i64).saturating_sub(leeway));
        if (now as i64) < not_before {
            return Err(Reason::NotYetValid);
        }
        let aud_ok = claims
            .aud
            .as_ref()
            .is_some_and(|aud| match &issuer.audiences {
                Audiences::Endpoint => aud.any(|a| a == endpoint),
                Audiences::Listed(list) => aud.any(|a| list.iter().any(|l| l == a)),
            });
        if !aud_ok {
            return Err(Reason::WrongAudience);
        }
        self.cache.put(
            token,
            Entry {
                endpoint: endpoint.into(),
                issuer: index,
                generation: keys.generation,
                not_before,
                not_after,
            },
        );
        Ok(())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A TLS client trusting the system's roots and, when given, the CAs in `ca_file`.
fn tls_client(ca_file: Option<&std::path::Path>) -> anyhow::Result<TlsConnector> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("{}: cannot read", path.display()))?
        {
            let cert = cert.with_context(|| format!("{}: not PEM certificates", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

struct Entry {
    /// The endpoint the token was verified for.
    endpoint: Box<str>,
    issuer: usize,
    generation: u64,
    not_before: i64,
    not_after: i64,
}

/// Verified tokens by their exact bytes (looked up without copying them). Bounded: when
/// full it starts over, which costs one signature check per live token.
#[derive(Default)]
struct Cache {
    map: Mutex<HashMap<Box<[u8]>, Entry>>,
}

const CACHE_ENTRIES: usize = 4096;

impl Cache {
    /// `(issuer, keys generation)` of `token` verified for `endpoint` and valid at `now`.
    fn get(&self, endpoint: &str, token: &[u8], now: u64) -> Option<(usize, u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(token)
            .filter(|e| {
                &*e.endpoint == endpoint && (e.not_before..=e.not_after).contains(&(now as i64))
            })
            .map(|e| (e.issuer, e.generation))
    }

    fn put(&self, token: &[u8], entry: Entry) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(token.into(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenIssuerConfig;
    use issuer::KeyKind;

    #[tokio::test]
    async fn a_replaced_signing_key_verifies_its_tokens_for_one_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let (old_path, new_path) = (dir.path().join("old.pem"), dir.path().join("new.pem"));
        std::fs::write(&old_path, issuer::generate(KeyKind::Es256).unwrap()).unwrap();
        std::fs::write(&new_path, issuer::generate(KeyKind::Ed25519).unwrap()).unwrap();
        let cfg = AuthConfig {
            token_issuer: Some(TokenIssuerConfig {
                signing_key_file: old_path.clone(),
                ttl_seconds: 600,
                issuer: BUILTIN.into(),
            }),
            ..AuthConfig::default()
        };
        let verifier = Verifier::from_config(&cfg).unwrap();
        let old = Signer::load(&old_path, BUILTIN.into(), 600).unwrap();
        let new = Signer::load(&new_path, BUILTIN.into(), 600).unwrap();
        let now = SystemTime::now();
        let old_token = old.mint("ep", now).unwrap().access_token;
        let new_token = new.mint("ep", now).unwrap().access_token;
        async fn check(verifier: &Verifier, token: &str) -> Result<(), Reason> {
            let trusted = [BUILTIN.to_owned()];
            verifier.verify("ep", &trusted, token.as_bytes()).await
        }
        assert_eq!(check(&verifier, &old_token).await, Ok(()));
        assert_eq!(check(&verifier, &new_token).await, Err(Reason::UnknownKid));

        assert!(verifier.rotate_builtin(new.public.clone()));
        assert!(
            !verifier.rotate_builtin(new.public.clone()),
            "same key again"
        );
        assert_eq!(check(&verifier, &new_token).await, Ok(()));
        assert_eq!(
            check(&verifier, &old_token).await,
            Ok(()),
            "old tokens pass until they expire"
        );
        let keys = verifier.issuers[0].keys();
        let retire = keys.keys[1].retire_at.unwrap();
        let expected = unix_now() + 600 + 60;
        assert!(
            (expected - 2..=expected).contains(&retire),
            "{retire} vs {expected}"
        );
        assert!(!keys.keys[1].usable_at(retire + 1));
        assert!(keys.keys[0].retire_at.is_none());
    }
}
