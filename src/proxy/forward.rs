//! Upstream HTTP/1.1 connections to replicas: an idle pool per replica, and one
//! send that says whether the request left scorefront or not.
//!
//! A request that was never written (connect failed, or a pooled connection turned out
//! closed before hyper dispatched it) comes back whole as [`SendError::NotSent`], body
//! untouched, so the caller may retry it; anything else is [`SendError::Failed`] and is not
//! retried; [`SendError::replica_fault`] says which failures count against the replica
//! in outlier detection. Connections go back to the pool only after their response body
//! has ended (see [`super::body`]) and only when the replica did not ask to close them; one
//! idle longer than `idleTimeoutMs` is dropped instead of reused, since the replica may be
//! closing it.

use std::{collections::VecDeque, io, net::SocketAddr, sync::Mutex};

use tokio::time::Instant;

use crate::config::UpstreamConfig;

use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Request body sent upstream: the client's body (its buffered start, then the rest)
/// under the size limit.
pub type RequestBody = http_body_util::Limited<super::body::Buffered>;
/// One HTTP/1.1 connection to a replica, ready for (at most) one request at a time.
pub type Conn = http1::SendRequest<RequestBody>;

/// Idle connections of one replica, most recently used last. Its size is bounded by the
/// replica's peak concurrency, since a connection only returns here after carrying a
/// request.
///
/// The newest connection is reused first, so under steady traffic a small hot set carries
/// the requests and the rest age out: each `take` also closes connections idle longer than
/// the timeout at the cold end.
#[derive(Debug, Default)]
pub struct ConnPool {
    /// Each with the time it went idle, oldest first.
    idle: Mutex<VecDeque<(Conn, Instant)>>,
}

impl ConnPool {
    /// An open connection that has not been idle for `max_idle`; older ones are closed.
    fn take(&self, max_idle: std::time::Duration) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while idle
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= max_idle)
        {
            idle.pop_front();
        }
        while let Some((conn, _)) = idle.pop_back() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn put(&self, conn: Conn) {
        if !conn.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push_back((conn, Instant::now()));
        }
    }
}

#[derive(Debug)]
pub enum SendError {
    /// Nothing was written; the request is handed back for a retry.
    NotSent(Box<Request<RequestBody>>, String),
    /// The exchange started and failed; the request is gone.
    Failed(hyper::Error),
}

impl SendError {
    /// Why the replica failed the attempt, or `None` when the fault was the client's (its
    /// request body failed or went over the limit): what outlier detection counts. Every
    /// `NotSent` is the replica's (no connection, or one closed before the request went
    /// out), and so is a `Failed` exchange short of a response head (reset, closed, or an
    /// answer that is not HTTP), which the client sees as the router's 502.
    pub fn replica_fault(&self) -> Option<String> {
        match self {
            SendError::NotSent(_, reason) => Some(reason.clone()),
            SendError::Failed(e) if e.is_user() => None,
            SendError::Failed(e) => Some(e.to_string()),
        }
    }
}

async fn connect(addr: SocketAddr, timeout: std::time::Duration) -> io::Result<Conn> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    let (conn, driver) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        // The driver ends when the connection closes; its error, if any, has already
        // reached the request that was on it.
        let _ = driver.await;
    });
    Ok(conn)
}

/// Sends `req` to `addr`, reusing an idle connection from `pool` when there is one.
/// On success also returns the connection, for the body to put back when it ends.
pub async fn send(
    pool: &ConnPool,
    addr: SocketAddr,
    mut req: Request<RequestBody>,
    settings: &UpstreamConfig,
) -> Result<(Response<Incoming>, Conn), SendError> {
    while let Some(mut conn) = pool.take(settings.idle_timeout()) {
        match conn.try_send_request(req).await {
            Ok(resp) => return Ok((resp, conn)),
            // The replica closed an idle connection under us: try the next one.
            Err(mut e) => match e.take_message() {
                Some(back) => req = back,
                None => return Err(SendError::Failed(e.into_error())),
            },
        }
    }
    let mut conn = match connect(addr, settings.connect_timeout()).await {
        Ok(conn) => conn,
        Err(e) => {
            return Err(SendError::NotSent(
                Box::new(req),
                format!("connect {addr}: {e}"),
            ));
        }
    };
    match conn.try_send_request(req).await {
        Ok(resp) => Ok((resp, conn)),
        Err(mut e) => match e.take_message() {
            Some(back) => Err(SendError::NotSent(Box::new(back), e.error().to_string())),
            None => Err(SendError::Failed(e.into_error())),
        },
    }
}
