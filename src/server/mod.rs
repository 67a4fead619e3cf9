//! Listeners: the data plane (HTTP/1.1 and h2c, or both over TLS) and the admin port.
//!
//! The caller binds every listener (tests bind port 0). Each accepted connection is
//! watched by a [`GracefulShutdown`], so shutdown stops accepting, lets in-flight requests
//! finish, and closes idle keep-alive connections.

pub mod admin;
pub mod tls;

use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
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

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    b
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
    let builder = Arc::new(builder());
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
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                connections.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(client = %addr, "connection ended: {e}");
                    }
                });
            }
            Some((acceptor, timeout)) => {
                // The handshake runs in the connection's own task, bounded in time; a
                // failed one costs its task and socket, nothing else.
                // A drain does not wait for handshakes: one under way when it starts is cut.
                let handshake = handshake(acceptor.clone(), stream, *timeout);
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let mut draining = stop.clone();
                connections.spawn(async move {
                    let handshake = tokio::select! {
                        done = handshake => done,
                        () = crate::until_true(&mut draining) => return,
                    };
                    let stream = match handshake {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(client = %addr, "TLS handshake failed: {e}");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(client = %addr, "connection ended: {e}");
                    }
                });
            }
        }
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
