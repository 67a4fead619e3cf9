//! The keys of an external OIDC issuer: a JWKS fetched from its `jwksUri` (or read from a
//! `jwksFile`), cached, refreshed periodically, and refetched when a token names a `kid`
//! the cache does not hold, at most once per `minRefetchSeconds`. A failed fetch keeps the
//! keys already held.

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::watch, time::Instant};
use tokio_rustls::TlsConnector;

use super::jwk::{self, PublicKey};

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub enum Source {
    Uri { uri: Uri, tls: Option<TlsConnector> },
    File(PathBuf),
}

/// The keys held at one moment. `generation` changes whenever the keys do.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
    pub generation: u64,
}

pub struct Jwks {
    /// The issuer's configured name, for logs.
    name: String,
    source: Source,
    keys: ArcSwap<KeySet>,
    /// Held while fetching, so one fetch runs at a time; holds when the last one started.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
    refresh: Duration,
}

impl Jwks {
    pub fn new(name: String, source: Source, refresh: Duration, min_refetch: Duration) -> Self {
        Jwks {
            name,
            source,
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_refetch,
            refresh,
        }
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.keys.load().generation
    }

    /// Called when a token names a key the set `seen` does not hold. Returns once the keys
    /// were fetched again, at once when another caller changed them meanwhile, or at once
    /// when the last fetch started less than `minRefetchSeconds` ago.
    pub async fn refetch_for_unknown_kid(&self, seen: u64) {
        let mut last = self.last_fetch.lock().await;
        if self.keys.load().generation != seen {
            return;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refetch) {
            tracing::debug!(issuer = %self.name, "unknown kid; JWKS refetch rate-limited");
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_store().await;
    }

    /// Fetches again every `refresh` until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.refresh) => self.fetch_now().await,
                () = crate::until_true(&mut stop) => return,
            }
        }
    }

    /// Fetches now (after any fetch under way) and stores the keys.
    pub async fn fetch_now(&self) {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_store().await;
    }

    /// Fetches once and stores the keys; on failure keeps the old ones.
    async fn fetch_and_store(&self) {
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        let (keys, skipped) = match fetched.and_then(|b| jwk::parse_jwks(&b)) {
            Ok(parsed) => parsed,
            Err(e) => {
                let held = self.keys.load().keys.len();
                tracing::error!(issuer = %self.name, held, "JWKS fetch failed, keeping the keys held: {e}");
                return;
            }
        };
        for s in &skipped {
            tracing::warn!(issuer = %self.name, "JWKS {s}; skipped");
        }
        let old = self.keys.load();
        if old.keys != keys {
            tracing::info!(issuer = %self.name, keys = keys.len(), "JWKS keys updated");
            self.keys.store(Arc::new(KeySet {
                keys,
                generation: old.generation + 1,
            }));
        }
    }

    async fn fetch(&self) -> Result<Bytes, String> {
        match &self.source {
            Source::File(path) => tokio::fs::read(path)
                .await
                .map(Bytes::from)
                .map_err(|e| format!("{}: {e}", path.display())),
            Source::Uri { uri, tls } => get(uri, tls.as_ref())
                .await
                .map_err(|e| format!("GET {uri}: {e}")),
        }
    }
}

/// One GET over a fresh connection (JWKS fetches are rare; no pool is worth keeping).
async fn get(uri: &Uri, tls: Option<&TlsConnector>) -> Result<Bytes, String> {
    let host = uri.host().ok_or("no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, uri.authority().ok_or("no host")?.as_str())
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "scorefront")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    match tls {
        None => send(TokioIo::new(tcp), req).await,
        Some(connector) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| format!("bad host name: {e}"))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(TokioIo::new(stream), req).await
        }
    }
}

async fn send<IO>(io: IO, req: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("body: {e}"))
}
