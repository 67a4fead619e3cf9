//! Listeners: the data plane (HTTP/1.1 and h2c, or both over TLS) and the admin port.
//!
//! The caller binds every listener (tests bind port 0). Each listener holds at most
//! `clients.maxConnections` open connections: at the limit it stops accepting, so new
//! connections wait in the kernel's backlog until one closes. Every accepted connection is
//! served in its own task by [`drive`], which closes it gracefully (h2: with a GOAWAY)
//! when the router drains or when it has carried no request for `clients.idleTimeoutMs`
//! (HTTP/1.1: or for `clients.headerReadTimeoutMs`, the time a request head may take); a
//! client that stops reading is cut by [`ClientIo`] after `clients.sendTimeoutMs`.
//! Shutdown stops accepting, lets in-flight requests finish within the grace period, and
//! closes idle keep-alive connections.

pub mod admin;
pub mod tls;

use std::{
    convert::Infallible,
    io,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
};
use prometheus::{IntCounter, IntGauge};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::ClientsConfig,
    gate::Gated,
    proxy::{ClientInfo, Proxy, body::ProxyBody},
};

/// The HTTP/1.1 and HTTP/2 settings of scoring connections. A connection's protocol is
/// known before it is served (ALPN over TLS, the h2 preface on the plain port), so each
/// connection carries only its own protocol's state.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// How long a connection may carry no request.
    idle_timeout: Duration,
    /// How long an HTTP/1.1 connection may wait for a request head: from its start, and
    /// from the end of each request on keep-alive.
    header_read_timeout: Duration,
}

impl Builders {
    fn new(clients: &ClientsConfig) -> Self {
        let mut h1 = http1::Builder::new();
        // The header read timeout is kept by `drive`, with the idle timeout: hyper's own
        // would arm and cancel a timer of its own for every request. An answer's head and
        // body are gathered in one buffer and written with one plain write, as over TLS
        // (see `OneRecord`): for the small answers of scoring, cheaper than queueing the
        // pieces for a vectored write.
        h1.header_read_timeout(None)
            .max_buf_size(64 * 1024)
            .writev(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30));
        Builders {
            h1,
            h2,
            idle_timeout: clients.idle_timeout(),
            header_read_timeout: clients.header_read_timeout(),
        }
    }

    /// Serves one connection until it ends, closing it gracefully on a drain or when idle.
    async fn serve<I, S>(
        &self,
        io: I,
        h2: bool,
        service: S,
        activity: &Activity,
        stop: &mut watch::Receiver<bool>,
    ) -> hyper::Result<()>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = Served> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        // Each protocol's connection state is boxed at its own size, so the connection's
        // task does not reserve room for the largest of them (h2, or TLS) in every case.
        if h2 {
            let conn = self.h2.serve_connection(io, service);
            Box::pin(drive(conn, activity, self.idle_timeout, false, stop)).await
        } else {
            // Between requests an HTTP/1.1 connection is waiting for a head, so the
            // shorter timeout applies.
            let wait = self.idle_timeout.min(self.header_read_timeout);
            let conn = self.h1.serve_connection(io, service);
            Box::pin(drive(conn, activity, wait, true, stop)).await
        }
    }
}

/// Polls `conn` to its end. When the router drains, or when the connection has carried no
/// request for `idle`, it is shut down gracefully: requests in flight finish, h2 clients
/// get a GOAWAY, and an idle HTTP/1.1 connection closes at once, as does one that has
/// read part of its next request head. An HTTP/1.1 connection (`h1`) that has not yet
/// carried a request is dropped instead, on a drain as when idle: hyper would go on
/// waiting for its first head.
async fn drive<C>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    h1: bool,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = pin!(conn);
    // The connection wakes its task several times per request; the drain signal and the
    // idle timer are polled only when they fire.
    let mut closing = Gated::new(Box::pin(async {
        tokio::select! {
            () = crate::until_true(stop) => "draining",
            () = activity.idle_for(idle) => "idle",
        }
    }));
    let why = tokio::select! {
        biased;
        ended = conn.as_mut() => return ended,
        why = &mut closing => why,
    };
    tracing::trace!("closing a client connection: {why}");
    if h1 && !activity.carried_any() {
        return Ok(());
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// The requests a connection has in flight (from the request head until the response
/// body ends), whether it has carried any, and when the last one ended. Requests only
/// touch these atomics; the idle timer looks at them when it fires, so a busy connection
/// is not woken per request.
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    in_flight: AtomicUsize,
    /// Whether a request has started on the connection.
    carried: AtomicBool,
    /// When the last request ended, in milliseconds since `since`.
    last_end_ms: AtomicU64,
    since: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(ActivityState {
            in_flight: AtomicUsize::new(0),
            carried: AtomicBool::new(false),
            last_end_ms: AtomicU64::new(0),
            since: Instant::now(),
        }))
    }

    /// Marks a request as in flight until the guard drops.
    fn start(&self) -> Active {
        self.0.in_flight.fetch_add(1, SeqCst);
        self.0.carried.store(true, SeqCst);
        Active(self.0.clone())
    }

    fn carried_any(&self) -> bool {
        self.0.carried.load(SeqCst)
    }

    /// Returns once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let state = &self.0;
        loop {
            let last_end = Duration::from_millis(state.last_end_ms.load(SeqCst));
            let idle_at = state.since + last_end + idle;
            let busy = state.in_flight.load(SeqCst) > 0;
            let now = Instant::now();
            if !busy && now >= idle_at {
                return;
            }
            // A request in flight now ends now at the earliest.
            tokio::time::sleep_until(if busy { now + idle } else { idle_at }).await;
        }
    }
}

impl ActivityState {
    /// Counts the connection as idle from now, as when a request has just ended.
    fn idle_from_now(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_end_ms.fetch_max(now, SeqCst);
    }
}

/// One request in flight on a connection.
struct Active(Arc<ActivityState>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.idle_from_now();
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// A request being answered. The answer's future is boxed, so an idle connection does not
/// carry room for a request in flight.
struct Serving<F> {
    response: Pin<Box<F>>,
    /// Handed to the response body once the answer is made.
    active: Option<Active>,
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Serving<F> {
    type Output = Result<Response<Served>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.response.as_mut().poll(cx));
        let active = self
            .active
            .take()
            .expect("Serving polled after it completed");
        Poll::Ready(Ok(response.map(|body| Served {
            body,
            _active: active,
        })))
    }
}

/// A response body that keeps its request counted as in flight on the connection until
/// the body ends or is dropped.
pub struct Served {
    body: ProxyBody,
    _active: Active,
}

impl Body for Served {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection preface of HTTP/2 with prior knowledge (h2c).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read off a plain connection to tell h2c from HTTP/1.1, replayed to the server
/// that gets the connection.
#[derive(Default)]
struct Prefix {
    bytes: [u8; H2_PREFACE.len()],
    start: usize,
    end: usize,
}

/// Reads a plain connection's first bytes until they are the whole h2 preface (`true`) or
/// stop matching it (`false`). Each read waits for data, so a client that trickles or
/// stalls costs nothing meanwhile; the caller bounds the time. `None`: the client closed
/// the connection without sending anything.
async fn sniff_h2(stream: &mut TcpStream, prefix: &mut Prefix) -> io::Result<Option<bool>> {
    loop {
        let n = stream.read(&mut prefix.bytes[prefix.end..]).await?;
        if n == 0 {
            return Ok((prefix.end > 0).then_some(false));
        }
        prefix.end += n;
        if prefix.bytes[..prefix.end] != H2_PREFACE[..prefix.end] {
            return Ok(Some(false));
        }
        if prefix.end == H2_PREFACE.len() {
            return Ok(Some(true));
        }
    }
}

/// A client's TCP stream as the servers see it: the bytes read while sniffing come
/// first, and a write that makes no progress for `send_timeout` (the client has stopped
/// reading and the socket buffer is full) fails the connection, which releases whatever
/// its requests hold. The timer is armed only once a write would block.
struct ClientIo {
    stream: TcpStream,
    prefix: Prefix,
    send_timeout: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` runs for the write now blocked.
    stalled: bool,
    send_timeouts: IntCounter,
}

impl ClientIo {
    fn new(
        stream: TcpStream,
        prefix: Prefix,
        send_timeout: Duration,
        timeouts: IntCounter,
    ) -> Self {
        ClientIo {
            stream,
            prefix,
            send_timeout,
            stall: None,
            stalled: false,
            send_timeouts: timeouts,
        }
    }

    /// Turns the result of a write into the timed one: progress disarms the timer, a
    /// blocked write arms it (once) and fails when it fires.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let deadline = Instant::now() + self.send_timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            stall.as_mut().reset(deadline);
            self.stalled = true;
        }
        ready!(stall.as_mut().poll(cx));
        self.send_timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {:?}", self.send_timeout),
        )))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let p = &mut self.prefix;
        if p.start < p.end {
            let n = (p.end - p.start).min(buf.remaining());
            buf.put_slice(&p.bytes[p.start..p.start + n]);
            p.start += n;
            // What followed the sniffed bytes comes in the same read: a read that returned
            // only them would make hyper reserve a second read buffer's worth on top of
            // its first, and every connection would keep 16 KiB instead of 8. Whatever
            // the socket says now (nothing yet, its end, an error) the next read says
            // again.
            if p.start == p.end && buf.remaining() > 0 {
                let _ = Pin::new(&mut self.stream).poll_read(cx, buf);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.timed(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.timed(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection whose protocol is known: `true` for h2.
enum Prepared {
    Plain(ClientIo, bool),
    Tls(OneRecord, bool),
}

/// A TLS stream that tells hyper and h2 it takes no vectored writes, so they gather a
/// response's head and body (or a frame's head and payload) into one write, which TLS
/// seals as one record: a vectored write would become a record per piece, each with its
/// own encryption and framing.
struct OneRecord(Box<tokio_rustls::server::TlsStream<ClientIo>>);

impl AsyncRead for OneRecord {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for OneRecord {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// TLS settings of an https listener.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// A client that has not completed its handshake within this long is disconnected.
    pub handshake_timeout: Duration,
}

/// An open client connection: holds its place under the listener's limit and in the
/// connections gauge until it drops.
struct Open {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Open {
    fn new(permit: OwnedSemaphorePermit, gauge: IntGauge) -> Self {
        gauge.inc();
        Open {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Lets a warning that may repeat many times a second through at most once a second.
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let allowed = self
            .0
            .is_none_or(|last| now - last >= Duration::from_secs(1));
        if allowed {
            self.0 = Some(now);
        }
        allowed
    }
}

/// Accepts scoring connections (over TLS when `tls` is set) until `stop` turns true, then
/// drains: in-flight requests get up to `grace` to finish, after which the remaining
/// connections are cut.
pub async fn serve_data(
    listener: TcpListener,
    tls: Option<Tls>,
    proxy: Arc<Proxy>,
    clients: ClientsConfig,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let builders = Arc::new(Builders::new(&clients));
    let tls = tls.map(|t| (TlsAcceptor::from(t.config), t.handshake_timeout));
    let metrics = proxy.metrics().clients.clone();
    let limit = Arc::new(Semaphore::new(clients.max_connections));
    let (mut limit_warning, mut accept_warning) = (Throttle::default(), Throttle::default());
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = match limit.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics.connection_limit_reached.inc();
                if limit_warning.allow() {
                    tracing::warn!(
                        limit = clients.max_connections,
                        "client connection limit reached: not accepting until one closes"
                    );
                }
                tokio::select! {
                    permit = limit.clone().acquire_owned() => {
                        permit.expect("the connection limit is never closed")
                    }
                    () = crate::until_true(&mut stop) => break,
                }
            }
        };
        let (mut stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    metrics.accept_errors.inc();
                    if accept_warning.allow() {
                        tracing::warn!("accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Ended connections are reaped as they end: each holds its task's memory
            // until then, which after a burst of connections could be most of the heap.
            Some(_) = connections.join_next() => continue,
            () = crate::until_true(&mut stop) => break,
        };
        let open = Open::new(permit, metrics.connections.clone());
        let _ = stream.set_nodelay(true);
        let client = ClientInfo {
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
        };
        let activity = Activity::new();
        let service = {
            let (proxy, activity) = (proxy.clone(), activity.clone());
            service_fn(move |req: Request<Incoming>| Serving {
                response: Box::pin(proxy.clone().handle(req, client)),
                active: Some(activity.start()),
            })
        };
        // The connection's protocol is settled in its own task (the TLS handshake, or a
        // look at its first bytes), bounded in time; a failed one costs its task and
        // socket, nothing else. A drain does not wait for this: it is cut.
        let builders = builders.clone();
        let mut draining = stop.clone();
        let tls = tls.clone();
        let send_timeouts = metrics.send_timeouts.clone();
        let header_timeout = clients.header_read_timeout();
        let send_timeout = clients.send_timeout();
        connections.spawn(async move {
            let _open = open;
            let prepared = async {
                let mut prefix = Prefix::default();
                let h2 = match &tls {
                    Some(_) => false,
                    None => {
                        tokio::time::timeout(header_timeout, sniff_h2(&mut stream, &mut prefix))
                            .await
                            .map_err(|_| "no request within the header read timeout".to_owned())?
                            .map_err(|e| e.to_string())?
                            .ok_or_else(|| "closed before sending anything".to_owned())?
                    }
                };
                let io = ClientIo::new(stream, prefix, send_timeout, send_timeouts);
                match tls {
                    None => Ok(Prepared::Plain(io, h2)),
                    Some((acceptor, timeout)) => {
                        // Boxed: the handshake's state is large and a plain connection's
                        // task would otherwise carry room for it.
                        let stream = Box::pin(handshake(acceptor, io, timeout))
                            .await
                            .map_err(|e| format!("TLS handshake failed: {e}"))?;
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        Ok(Prepared::Tls(OneRecord(Box::new(stream)), h2))
                    }
                }
            };
            let prepared: Result<Prepared, String> = tokio::select! {
                p = prepared => p,
                () = crate::until_true(&mut draining) => return,
            };
            // The connection's clock starts once it is ready for HTTP: its first request
            // head is due within the header read timeout from here, after a TLS handshake
            // that has its own bound.
            activity.0.idle_from_now();
            let ended = match prepared {
                Ok(Prepared::Plain(s, h2)) => {
                    (builders.serve(TokioIo::new(s), h2, service, &activity, &mut draining)).await
                }
                Ok(Prepared::Tls(s, h2)) => {
                    (builders.serve(TokioIo::new(s), h2, service, &activity, &mut draining)).await
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
    tracing::info!(
        connections = connections.len(),
        "draining: no new connections; waiting for requests to finish"
    );
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("grace period of {grace:?} ended with requests still running; cutting them");
        connections.shutdown().await;
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: ClientIo,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<ClientIo>, String> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not completed within {timeout:?}")),
    }
}
