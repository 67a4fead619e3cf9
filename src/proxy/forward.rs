//! Upstream HTTP/1.1 to replicas: an idle pool per replica, and one exchange driven inside
//! the request's own task (no connection task, no hand-off between tasks).
//!
//! Replicas are the operator's own processes, but the framing is still read strictly: a
//! response body is delimited by `Transfer-Encoding: chunked` (chunk extensions skipped,
//! trailers passed on), else by `Content-Length`, else by the connection's close; HEAD
//! answers and 204/304 have none. Interim 1xx responses are skipped (101 is refused: the
//! router does not forward upgrades). A response head over [`MAX_HEAD_BYTES`] or with more
//! than [`MAX_HEADERS`] fields fails the exchange.
//!
//! A request that was never written (connect failed, or a pooled connection turned out
//! closed before a byte of it went out) comes back whole as [`SendError::NotSent`], body
//! untouched, so the caller may retry it; anything else is [`SendError::Failed`] and is not
//! retried; [`SendError::replica_fault`] says which failures count against the replica
//! in outlier detection. A replica may answer before it has the whole request body: the
//! rest is then sent while the response streams (see [`UpstreamBody`]). Connections go back
//! to the pool only after their response body has ended and the whole request was sent,
//! and only when the replica did not ask to close them (see [`super::body`]); one idle
//! longer than `idleTimeoutMs` is dropped instead of reused, since the replica may be
//! closing it.

use std::{
    collections::VecDeque,
    future::{Future, poll_fn},
    io::{self, Write as _},
    mem::MaybeUninit,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::Mutex,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::ext::ReasonPhrase;
use tokio::{
    io::{AsyncReadExt, AsyncWrite},
    net::TcpStream,
    time::Instant,
};

use super::{
    body::{BoxError, Buffered},
    headers::{self, ReplicaFields},
};
use crate::config::UpstreamConfig;

/// Request body sent upstream: the client's body, its buffered start then the rest.
pub type RequestBody = Buffered;

/// Most header fields a response head (or a trailer section) may carry.
pub const MAX_HEADERS: usize = 100;
/// Fields of a response head located without an allocation.
const FEW_HEADERS: usize = 16;
/// Largest response head (or trailer section), in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;
/// Request body bytes encoded ahead of the socket before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Buffers of a pooled connection grown past this are let go rather than kept idle.
const KEEP_BUFFER: usize = 16 * 1024;

/// One HTTP/1.1 connection to a replica, between exchanges.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Read from the replica, not consumed yet.
    rbuf: BytesMut,
    /// Encoded for the replica; `wbuf[wpos..]` is not written yet.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl Conn {
    fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    /// Whether the replica has neither closed the connection nor sent anything unasked.
    /// Only the socket's readiness is looked at, and read when it says readable.
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads what the socket has into `rbuf`; `Ok(0)` is the end of the stream.
    ///
    /// A read that leaves room unfilled also marks the socket as drained, so that
    /// [`Conn::is_open`] costs no system call when the connection is next taken from the
    /// pool, unless the replica has closed it or sent something since.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_SIZE / 8 {
            self.rbuf.reserve(READ_SIZE);
        }
        // The future only reads when polled, and keeps nothing if dropped pending.
        pin!(self.io.read_buf(&mut self.rbuf)).poll(cx)
    }
}

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
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn put(&self, mut conn: Conn) {
        if conn.rbuf.capacity() > KEEP_BUFFER {
            conn.rbuf = BytesMut::new();
        }
        if conn.wbuf.capacity() > KEEP_BUFFER {
            conn.wbuf = Vec::new();
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push_back((conn, Instant::now()));
    }
}

#[derive(Debug)]
pub enum SendError {
    /// Nothing was written; the request is handed back for a retry.
    NotSent(Box<Request<RequestBody>>, String),
    /// The exchange started and failed; the request is gone.
    Failed(Failure),
}

/// Why an exchange that started failed.
#[derive(Debug)]
pub enum Failure {
    /// The client's request body went over the size limit while it was sent.
    TooLarge,
    /// The client's request body failed while it was sent.
    Client(String),
    /// The replica: the connection failed or closed before a response head, or the head
    /// was not valid HTTP/1.1 within the limits.
    Replica(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::TooLarge => f.write_str("request body over the size limit"),
            Failure::Client(e) => write!(f, "request body failed: {e}"),
            Failure::Replica(e) => f.write_str(e),
        }
    }
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
            SendError::Failed(Failure::Replica(e)) => Some(e.clone()),
            SendError::Failed(_) => None,
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
    Ok(Conn::new(stream))
}

/// Sends `req` to `addr`, reusing an idle connection from `pool` when there is one, and
/// reads the response head. A request body over `limit` bytes fails the exchange.
pub async fn send(
    pool: &ConnPool,
    addr: SocketAddr,
    req: Request<RequestBody>,
    added: &ReplicaFields,
    limit: u64,
    settings: &UpstreamConfig,
) -> Result<Response<UpstreamBody>, SendError> {
    let (parts, body) = req.into_parts();
    let mut sender = Sender::new(body, limit);
    let not_sent = |parts, sender: Sender, reason| {
        Err(SendError::NotSent(
            Box::new(Request::from_parts(parts, sender.body)),
            reason,
        ))
    };
    while let Some(conn) = pool.take(settings.idle_timeout()) {
        match exchange(conn, &parts, added, sender).await {
            // The replica closed an idle connection under us: try the next one.
            Err(Attempt::NotSent(back, _)) => sender = back,
            Err(Attempt::Failed(f)) => return Err(SendError::Failed(f)),
            Ok(resp) => return Ok(resp),
        }
    }
    let conn = match connect(addr, settings.connect_timeout()).await {
        Ok(conn) => conn,
        Err(e) => return not_sent(parts, sender, format!("connect {addr}: {e}")),
    };
    match exchange(conn, &parts, added, sender).await {
        Ok(resp) => Ok(resp),
        Err(Attempt::NotSent(back, reason)) => not_sent(parts, back, reason),
        Err(Attempt::Failed(f)) => Err(SendError::Failed(f)),
    }
}

enum Attempt {
    NotSent(Sender, String),
    Failed(Failure),
}

/// Writes the request on `conn` and reads the response head, skipping interim answers.
/// The request body goes on being sent while the head is awaited, and after it if the
/// replica answers early.
async fn exchange(
    mut conn: Conn,
    parts: &http::request::Parts,
    added: &ReplicaFields,
    mut sender: Sender,
) -> Result<Response<UpstreamBody>, Attempt> {
    sender.start(&mut conn, parts, added);
    let head_request = parts.method == Method::HEAD;
    let mut sending = true;
    // A write that failed after the request started: the replica may still have answered.
    let mut write_failed = false;
    let head = poll_fn(|cx| {
        if sending {
            match sender.poll_send(&mut conn, cx) {
                Poll::Ready(Ok(())) => sending = false,
                Poll::Ready(Err(SendFail::Write(e))) if !sender.written => {
                    return Poll::Ready(Err(HeadError::NotSent(e.to_string())));
                }
                Poll::Ready(Err(SendFail::Write(_))) => {
                    sending = false;
                    write_failed = true;
                }
                Poll::Ready(Err(SendFail::Body(f))) => {
                    return Poll::Ready(Err(HeadError::Failed(f)));
                }
                Poll::Pending => {}
            }
        }
        poll_head(&mut conn, cx, head_request).map_err(|e| match sender.written {
            false => HeadError::NotSent(e),
            true => HeadError::Failed(Failure::Replica(e)),
        })
    })
    .await;
    let head = match head {
        Ok(head) => head,
        Err(HeadError::NotSent(reason)) => return Err(Attempt::NotSent(sender.reset(), reason)),
        Err(HeadError::Failed(f)) => return Err(Attempt::Failed(f)),
    };
    let body = UpstreamBody {
        conn: Some(conn),
        sender: sending.then(|| Box::new(sender)),
        state: head.framing,
        keep_alive: head.keep_alive && !write_failed,
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        resp.extensions_mut().insert(reason);
    }
    Ok(resp)
}

enum HeadError {
    NotSent(String),
    Failed(Failure),
}

enum SendFail {
    Write(io::Error),
    Body(Failure),
}

/// The request on its way out: head and body, encoded into the connection's write buffer.
#[derive(Debug)]
struct Sender {
    body: RequestBody,
    /// Whether the body goes chunked (its length is not known) or as it is; settled by
    /// [`Sender::start`].
    chunked: bool,
    /// Data bytes taken from the body so far, against `limit`.
    taken: u64,
    limit: u64,
    /// The end of the body is encoded.
    ended: bool,
    /// Some byte of the request has been written: it can no longer be retried.
    written: bool,
}

impl Sender {
    fn new(body: RequestBody, limit: u64) -> Self {
        let ended = body.is_end_stream();
        Sender {
            chunked: false,
            body,
            taken: 0,
            limit,
            ended,
            written: false,
        }
    }

    /// The sender as before `start`, once nothing was written.
    fn reset(mut self) -> Self {
        self.taken = 0;
        self.ended = self.body.is_end_stream();
        self
    }

    /// Encodes the head and the body's buffered start, which is taken from the body only
    /// once the first byte is written, so an unwritten request stays whole.
    fn start(&mut self, conn: &mut Conn, parts: &http::request::Parts, added: &ReplicaFields) {
        let w = &mut conn.wbuf;
        w.clear();
        conn.wpos = 0;
        w.extend_from_slice(parts.method.as_str().as_bytes());
        w.push(b' ');
        w.push(b'/');
        w.extend_from_slice(super::replica_target(&parts.uri, added.target_at).as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            if headers::to_replica(name) {
                encode_field(w, name.as_str(), value.as_bytes());
            }
        }
        for (name, value) in added.iter() {
            encode_field(w, name, value);
        }
        // The client's framing is kept: its `content-length` if it sent one; otherwise the
        // body's exact length if known (h2 may leave it out), except for an empty body
        // where the method has no use for one; otherwise chunked.
        self.chunked = false;
        if !added.client_length {
            match self.body.size_hint().exact() {
                None => {
                    self.chunked = true;
                    w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                }
                Some(0) if bodyless(&parts.method) => {}
                Some(n) => {
                    w.extend_from_slice(b"content-length: ");
                    w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    w.extend_from_slice(b"\r\n");
                }
            }
        }
        w.extend_from_slice(b"\r\n");
        let (buffered, whole) = self.body.peek();
        for data in buffered {
            self.taken += data.len() as u64;
            encode_data(w, self.chunked, data);
        }
        if whole {
            self.ended = true;
            if self.chunked {
                w.extend_from_slice(b"0\r\n\r\n");
            }
        }
    }

    /// Writes what is encoded and encodes more as the body yields it; ready once the whole
    /// request is written.
    fn poll_send(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<(), SendFail>> {
        if self.taken > self.limit {
            return Poll::Ready(Err(SendFail::Body(Failure::TooLarge)));
        }
        loop {
            // What is written goes from the buffer's front before more is encoded: a
            // replica that reads slowly takes a little at each write, and the buffer
            // must not grow with the whole body meanwhile.
            if conn.wpos >= WRITE_BATCH {
                conn.wbuf.drain(..conn.wpos);
                conn.wpos = 0;
            }
            while self.written && !self.ended && conn.wbuf.len() - conn.wpos < WRITE_BATCH {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        self.ended = true;
                        if self.chunked {
                            conn.wbuf.extend_from_slice(b"0\r\n\r\n");
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(SendFail::Body(Failure::Client(e.to_string()))));
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        // Request trailers are not forwarded.
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        self.taken += data.len() as u64;
                        if self.taken > self.limit {
                            return Poll::Ready(Err(SendFail::Body(Failure::TooLarge)));
                        }
                        encode_data(&mut conn.wbuf, self.chunked, &data);
                    }
                }
            }
            if conn.wpos == conn.wbuf.len() {
                return match self.ended {
                    true => Poll::Ready(Ok(())),
                    // The body has nothing yet; it wakes the task when it has.
                    false => Poll::Pending,
                };
            }
            let n = match Pin::new(&mut conn.io).poll_write(cx, &conn.wbuf[conn.wpos..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SendFail::Write(e))),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(SendFail::Write(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => n,
            };
            if !self.written {
                self.written = true;
                // Its buffered start is encoded already.
                self.body.discard_buffered();
            }
            conn.wpos += n;
            if conn.wpos == conn.wbuf.len() {
                conn.wbuf.clear();
                conn.wpos = 0;
            }
        }
    }
}

/// Methods whose requests carry no body by custom: an empty one goes without a length.
fn bodyless(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

fn encode_field(w: &mut Vec<u8>, name: &str, value: &[u8]) {
    w.extend_from_slice(name.as_bytes());
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

fn encode_data(w: &mut Vec<u8>, chunked: bool, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if chunked {
        let _ = write!(w, "{:x}\r\n", data.len());
        w.extend_from_slice(data);
        w.extend_from_slice(b"\r\n");
    } else {
        w.extend_from_slice(data);
    }
}

struct Head {
    status: StatusCode,
    /// The replica's reason phrase where it is not the standard one, passed on as is.
    reason: Option<ReasonPhrase>,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Reads and parses the response head, skipping 1xx interim responses.
fn poll_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    head_request: bool,
) -> Poll<Result<Head, String>> {
    loop {
        if !conn.rbuf.is_empty() {
            match parse_head(&mut conn.rbuf, head_request)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(head)) => return Poll::Ready(Ok(head)),
                None => {}
            }
        }
        match ready!(conn.poll_fill(cx)) {
            Ok(0) if conn.rbuf.is_empty() => {
                return Poll::Ready(Err("connection closed before a response".into()));
            }
            Ok(0) => return Poll::Ready(Err("connection closed within the response head".into())),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e.to_string())),
        }
    }
}

enum Parsed {
    /// A 1xx response was consumed.
    Interim,
    Final(Head),
}

/// Parses one response head at the start of `buf` and consumes it, or `None` if it is not
/// all there yet.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, String> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(format!("response head over {MAX_HEAD_BYTES} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("response head with more than {MAX_HEADERS} fields"));
        }
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    if len > MAX_HEAD_BYTES {
        return Err(format!("response head over {MAX_HEAD_BYTES} bytes"));
    }
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 Switching Protocols is not supported".into());
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let http10 = resp.version == Some(0);
    // Where each field lies in the head, for its values to share the head's buffer.
    // Most heads have a few fields: room for those is on the stack, as clearing room
    // for the most a head may have would cost more than parsing it.
    let at = |h: &httparse::Header<'_>| field_at(buf, h);
    let mut few = [(0usize, 0usize, 0usize, 0usize); FEW_HEADERS];
    let many: Vec<_>;
    let fields = if resp.headers.len() <= FEW_HEADERS {
        for (f, h) in few.iter_mut().zip(resp.headers.iter()) {
            *f = at(h);
        }
        &few[..resp.headers.len()]
    } else {
        many = resp.headers.iter().map(at).collect();
        &many[..]
    };
    let reason = resp
        .reason
        .filter(|r| Some(*r) != status.canonical_reason())
        .and_then(|r| ReasonPhrase::try_from(r.as_bytes().to_vec()).ok());
    let head = buf.split_to(len).freeze();
    let (headers, seen) = header_map(&head, fields)?;
    let (framing, reusable) = response_framing(&headers, seen, status, head_request)?;
    let keep_alive =
        reusable && !http10 && !(seen.connection && super::headers::closes_connection(&headers));
    Ok(Some(Parsed::Final(Head {
        status,
        reason,
        headers,
        framing,
        keep_alive,
    })))
}

/// Where a field parsed from `buf` lies in it: its name's and its value's byte ranges.
fn field_at(buf: &[u8], h: &httparse::Header<'_>) -> (usize, usize, usize, usize) {
    let base = buf.as_ptr() as usize;
    let name = h.name.as_ptr() as usize - base;
    let value = h.value.as_ptr() as usize - base;
    (name, name + h.name.len(), value, value + h.value.len())
}

/// Which of the fields that bear on a response's framing and its connection a head has,
/// noted while its map is built so that absent ones are not looked up.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    transfer_encoding: bool,
    content_length: bool,
    connection: bool,
}

/// Header fields at the given (name, value) byte ranges of `block`, as httparse found
/// them there; the values share it.
fn header_map(
    block: &Bytes,
    fields: &[(usize, usize, usize, usize)],
) -> Result<(HeaderMap, Seen), String> {
    let mut map = HeaderMap::with_capacity(fields.len() + super::headers::ADDED_FOR_CLIENT);
    let mut seen = Seen::default();
    for &(n0, n1, v0, v1) in fields {
        let name = HeaderName::from_bytes(&block[n0..n1])
            .map_err(|_| "invalid header name in the response".to_string())?;
        seen.transfer_encoding |= name == header::TRANSFER_ENCODING;
        seen.content_length |= name == header::CONTENT_LENGTH;
        seen.connection |= name == header::CONNECTION;
        // SAFETY: httparse accepted these bytes as a field value. The bytes it accepts
        // there (tab, space, visible ASCII, and 0x80 and above) are exactly those a
        // `HeaderValue` may hold, so its check would find nothing.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(block.slice(v0..v1)) };
        map.append(name, value);
    }
    Ok((map, seen))
}

/// How the response body is delimited, and whether the connection may carry another
/// exchange after it (RFC 9112 6.3).
fn response_framing(
    headers: &HeaderMap,
    seen: Seen,
    status: StatusCode,
    head_request: bool,
) -> Result<(Framing, bool), String> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if seen.transfer_encoding {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        let chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        // A length beside a transfer coding is ignored, and the connection not reused.
        let reusable = chunked && !seen.content_length;
        let framing = match chunked {
            true => Framing::Chunked(Chunk::Size),
            false => Framing::Close,
        };
        return Ok((framing, reusable));
    }
    let mut length = None;
    let values = seen
        .content_length
        .then(|| headers.get_all(header::CONTENT_LENGTH));
    for v in values.into_iter().flatten() {
        for t in v.as_bytes().split(|b| *b == b',') {
            let t = t.trim_ascii();
            let n = std::str::from_utf8(t)
                .ok()
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or("invalid content-length in the response")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values in the response".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many body bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the replica closes the connection.
    Close,
    Done,
}

impl Framing {
    /// What a body read in this state lacks when its connection ends: built only then.
    fn cut_short(self) -> String {
        match self {
            Framing::Length(left) => {
                format!("connection closed {left} bytes before the end of the response body")
            }
            Framing::Chunked(Chunk::Data(_) | Chunk::DataEnd) => {
                "connection closed within a chunk".into()
            }
            Framing::Chunked(Chunk::Size) => "connection closed within a chunk size".into(),
            Framing::Chunked(Chunk::Trailers) => "connection closed within the trailers".into(),
            // A close-delimited body ends with its connection.
            Framing::Close | Framing::Done => String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are left.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// The trailer section after the last chunk is next.
    Trailers,
}

/// A replica's response body, read from its connection as the client takes it. It also
/// sends the rest of the request body when the replica answered before having it all.
#[derive(Debug)]
pub struct UpstreamBody {
    /// `None` once the connection failed.
    conn: Option<Conn>,
    /// Boxed: only a replica that answers before the whole request has it needs one.
    sender: Option<Box<Sender>>,
    state: Framing,
    keep_alive: bool,
}

impl UpstreamBody {
    /// The connection, if the exchange ended cleanly and it may carry another: the whole
    /// response read, the whole request sent, nothing unasked after it, no close asked.
    pub fn reusable_conn(&mut self) -> Option<Conn> {
        let clean = self.state == Framing::Done
            && self.keep_alive
            && self.sender.is_none()
            && self.conn.as_ref().is_some_and(|c| c.rbuf.is_empty());
        if clean { self.conn.take() } else { None }
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.sender = None;
        self.state = Framing::Done;
        Poll::Ready(Some(Err(e.into())))
    }

    /// Up to `max` bytes of body data already read, if any.
    fn take_data(conn: &mut Conn, max: u64) -> Option<Bytes> {
        if conn.rbuf.is_empty() {
            return None;
        }
        let n = conn
            .rbuf
            .len()
            .min(usize::try_from(max).unwrap_or(usize::MAX));
        Some(conn.rbuf.split_to(n).freeze())
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(sender) = this.sender.as_mut() {
            match sender.poll_send(conn, cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => this.sender = None,
                // The replica answered without the rest; the connection is not reused.
                Poll::Ready(Err(SendFail::Write(_))) => {
                    this.sender = None;
                    this.keep_alive = false;
                }
                // The rest of the request will not come (too large, or the client's
                // body failed): a replica that waits for it would hold the answer until
                // the scoring timeout, so the exchange ends here.
                Poll::Ready(Err(SendFail::Body(f))) => {
                    return this.fail(format!("the request body was cut: {f}"));
                }
            }
        }
        loop {
            // Each arm returns, goes on with what it consumed, or falls through to read
            // more from the connection.
            match this.state {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) => {
                    if let Some(data) = Self::take_data(conn, left) {
                        let left = left - data.len() as u64;
                        this.state = if left == 0 {
                            Framing::Done
                        } else {
                            Framing::Length(left)
                        };
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Close => {
                    if let Some(data) = Self::take_data(conn, u64::MAX) {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if let Some(data) = Self::take_data(conn, left) {
                        let left = left - data.len() as u64;
                        this.state = Framing::Chunked(if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        });
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if conn.rbuf.len() >= 2 {
                        if &conn.rbuf[..2] != b"\r\n" {
                            return this.fail("invalid chunk: no CRLF after its data");
                        }
                        conn.rbuf.advance(2);
                        this.state = Framing::Chunked(Chunk::Size);
                        continue;
                    }
                }
                Framing::Chunked(Chunk::Size) => match chunk_size(&conn.rbuf) {
                    Err(e) => return this.fail(e),
                    Ok(Some((line, 0))) => {
                        conn.rbuf.advance(line);
                        this.state = Framing::Chunked(Chunk::Trailers);
                        continue;
                    }
                    Ok(Some((line, size))) => {
                        conn.rbuf.advance(line);
                        this.state = Framing::Chunked(Chunk::Data(size));
                        continue;
                    }
                    Ok(None) => {}
                },
                Framing::Chunked(Chunk::Trailers) => {
                    if conn.rbuf.starts_with(b"\r\n") {
                        conn.rbuf.advance(2);
                        this.state = Framing::Done;
                        return Poll::Ready(None);
                    }
                    match trailers(&mut conn.rbuf) {
                        Err(e) => return this.fail(e),
                        Ok(Some(map)) => {
                            this.state = Framing::Done;
                            return Poll::Ready(Some(Ok(Frame::trailers(map))));
                        }
                        Ok(None) => {}
                    }
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(0)) if this.state == Framing::Close => {
                    this.state = Framing::Done;
                    this.keep_alive = false;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(this.state.cut_short()),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The length of a complete chunk-size line at the start of `buf` and the size it gives,
/// or `None` if the line is not all there yet. Extensions are skipped.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, String> {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_CHUNK_LINE {
            return Err(format!("chunk size line over {MAX_CHUNK_LINE} bytes"));
        }
        return Ok(None);
    };
    if end > MAX_CHUNK_LINE {
        return Err(format!("chunk size line over {MAX_CHUNK_LINE} bytes"));
    }
    let line = buf[..end]
        .strip_suffix(b"\r")
        .ok_or("invalid chunk size line: no CR before LF")?;
    let size_part = line.split(|b| *b == b';').next().unwrap_or_default();
    // Only spaces and tabs may follow the digits: a lone CR or other whitespace there
    // is how framing gets read two ways.
    let digits = size_part.trim_ascii_end();
    if size_part[digits.len()..]
        .iter()
        .any(|b| !matches!(b, b' ' | b'\t'))
    {
        return Err("invalid chunk size".into());
    }
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("invalid chunk size".into());
    }
    let size = digits.iter().fold(0u64, |n, d| {
        (n << 4) | u64::from((*d as char).to_digit(16).unwrap_or(0))
    });
    Ok(Some((end + 1, size)))
}

/// A complete trailer section at the start of `buf`, consumed, or `None` if it is not all
/// there yet.
fn trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((len, parsed))) => {
            let fields: Vec<_> = parsed.iter().map(|h| field_at(buf, h)).collect();
            (len, fields)
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(format!("response trailers over {MAX_HEAD_BYTES} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "response trailers with more than {MAX_HEADERS} fields"
            ));
        }
        Err(e) => return Err(format!("invalid response trailers: {e}")),
    };
    if len > MAX_HEAD_BYTES {
        return Err(format!("response trailers over {MAX_HEAD_BYTES} bytes"));
    }
    let block = buf.split_to(len).freeze();
    header_map(&block, &fields).map(|(map, _)| Some(map))
}
