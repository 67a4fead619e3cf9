//! Listeners: the data plane (HTTP/1.1 and h2c, or both over TLS) and the admin port.
//!
//! The caller binds every listener (tests bind port 0). Each accepted connection is
//! watched by a [`GracefulShutdown`], so shutdown stops accepting, lets in-flight requests
//! finish, and closes idle keep-alive connections.

pub mod admin;
pub mod tls;

use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::server::conn::{http1, http2};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use crate::proxy::{ClientInfo, Proxy};

/// A client that sends no complete request head within this long is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/1.1 and HTTP/2 settings of scoring connections. A connection's protocol is
/// known before it is served (ALPN over TLS, the h2 preface on the plain port), so each
/// connection carries only its own protocol's state.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(64 * 1024);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30));
        Builders { h1, h2 }
    }

    /// Serves one connection until it ends, as part of a graceful drain.
    async fn serve<I, S>(&self, io: I, h2: bool, service: S, watcher: Watcher) -> hyper::Result<()>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = crate::proxy::body::ProxyBody>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        if h2 {
            watcher.watch(self.h2.serve_connection(io, service)).await
        } else {
            watcher.watch(self.h1.serve_connection(io, service)).await
        }
    }
}

/// A connection whose protocol is known: `true` for h2.
enum Prepared {
    Plain(TcpStream, bool),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, bool),
}

/// The connection preface of HTTP/2 with prior knowledge (h2c).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection opens with the h2 preface, read without consuming it.
async fn sniff_h2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 || head[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far (clients send it whole; this is rare): look again.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// TLS settings of an https listener.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// A client that has not completed its handshake within this long is disconnected.
    pub handshake_timeout: Duration,
}

/// Accepts scoring connections (over TLS when `tls` is set) until `stop` turns true, then
/// drains: in-flight requests get up to `grace` to finish, after which the remaining
/// connections are cut.
pub async fn serve_data(
    listener: TcpListener,
    tls: Option<Tls>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let builders = Arc::new(Builders::new());
    let tls = tls.map(|t| (TlsAcceptor::from(t.config), t.handshake_timeout));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::until_true(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let client = ClientInfo {
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
        };
        let proxy = proxy.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            // Boxed, so an idle connection does not carry room for a request in flight.
            Box::pin(async move { Ok::<_, Infallible>(proxy.handle(req, client).await) })
        });
        // The connection's protocol is settled in its own task (the TLS handshake, or a
        // look at its first bytes), bounded in time; a failed one costs its task and
        // socket, nothing else. A drain does not wait for this: it is cut.
        let builders = builders.clone();
        let watcher = graceful.watcher();
        let mut draining = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let prepared = async {
                match tls {
                    None => {
                        let h2 = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff_h2(&stream))
                            .await
                            .map_err(|_| "no request within the header read timeout".to_owned())?
                            .map_err(|e| e.to_string())?;
                        Ok(Prepared::Plain(stream, h2))
                    }
                    Some((acceptor, timeout)) => {
                        let stream = handshake(acceptor, stream, timeout)
                            .await
                            .map_err(|e| format!("TLS handshake failed: {e}"))?;
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        Ok(Prepared::Tls(Box::new(stream), h2))
                    }
                }
            };
            let prepared: Result<Prepared, String> = tokio::select! {
                p = prepared => p,
                () = crate::until_true(&mut draining) => return,
            };
            let ended = match prepared {
                Ok(Prepared::Plain(s, h2)) => {
                    builders.serve(TokioIo::new(s), h2, service, watcher).await
                }
                Ok(Prepared::Tls(s, h2)) => {
                    builders.serve(TokioIo::new(*s), h2, service, watcher).await
                }
                Err(e) => {
                    tracing::debug!(client = %addr, "{e}");
                    return;
                }
            };
            if let Err(e) = ended {
                tracing::debug!(client = %addr, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        connections = open,
        "draining: no new connections; waiting for requests to finish"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period of {grace:?} ended with requests still running; cutting them");
        connections.shutdown().await;
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not completed within {timeout:?}")),
    }
}
