//! The response body and the per-request record that ride together to the client.
//!
//! Capacity and bookkeeping end when the body ends, not when headers leave: the body owns
//! the request's [`Slot`] (released on drop), its upstream connection (back to the pool
//! only after a complete body), the scoring deadline (which keeps running while the body
//! streams), and the [`Record`] whose drop writes the access-log line and the metrics.
//!
//! A request body is read up to `clients.requestBufferBytes` before a replica slot is
//! taken (see [`Buffered`]), so a slow upload waits without holding replica capacity.
//!
//! An answer of the router's own over h2 may also own the request body the client is
//! still sending, and drain it before the answer ends (see [`Drain`]). Ending the answer
//! first makes h2 reset the stream (with NO_ERROR, as RFC 9113 8.1 allows), and clients
//! such as curl 7.88 that are still uploading then drop the whole answer. Draining is
//! bounded by [`DRAIN_MAX_BYTES`] and [`DRAIN_MAX_TIME`]; past either the answer ends
//! anyway, with that reset.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::{
    forward::UpstreamBody,
    headers::RequestIds,
    slots::Slot,
    table::{EndpointRoute, VersionRoute},
};
use crate::{accesslog, gate::Gated, metrics::Metrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// At most this much of a request body is read and thrown away behind an answer of the
/// router's own over h2. It is the receive window our h2 server (hyper's default) grants
/// a stream: a client can send that much unread anyway, and draining lets it send at most
/// as much again.
pub const DRAIN_MAX_BYTES: u64 = 1024 * 1024;

/// The longest an answer of the router's own over h2 stays open for the client to finish
/// sending its request body.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(2);

pub struct ProxyBody {
    inner: Inner,
    upstream: Option<Upstream>,
    /// The request body of an h2 request the router answered itself, read to its end
    /// (within bounds) before the answer ends.
    drain: Option<Drain>,
    /// Set when the last frame has been handed out.
    ended: bool,
    /// Dropped after the slot is released (see `Drop`), so it logs the final outcome.
    record: Record,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(UpstreamBody),
}

/// What a response from a replica holds until its body is done (the body itself holds
/// the connection).
pub struct Upstream {
    pub slot: Slot,
    pub deadline: Gated<Pin<Box<Sleep>>>,
    pub sent_at: Instant,
}

impl ProxyBody {
    pub fn full(bytes: Bytes, record: Record) -> Self {
        ProxyBody {
            inner: Inner::Full(Some(bytes)),
            upstream: None,
            drain: None,
            ended: false,
            record,
        }
    }

    /// Keeps the answer open, after its bytes, until the client has sent the rest of
    /// `request` (an h2 request body nobody will read otherwise), or a bound of
    /// [`Drain`] is reached. Dropping the body at once would make h2 reset the stream
    /// while the client is still sending it.
    pub fn draining(mut self, request: Incoming) -> Self {
        if !request.is_end_stream() {
            self.drain = Some(Drain {
                body: request,
                left: DRAIN_MAX_BYTES,
                deadline: Box::pin(tokio::time::sleep(DRAIN_MAX_TIME)),
            });
        }
        self
    }

    pub fn upstream(body: UpstreamBody, upstream: Upstream, record: Record) -> Self {
        ProxyBody {
            inner: Inner::Stream(body),
            upstream: Some(upstream),
            drain: None,
            ended: false,
            record,
        }
    }

    fn fail(&mut self, outcome: &'static str) {
        self.record.outcome = outcome;
    }

    /// Whether every byte of the response has been handed out (the drain aside).
    fn response_done(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream(body) => body.is_end_stream(),
        }
    }
}

/// A request body being read and thrown away, so the client can finish sending it before
/// the answer ends. Ends at the body's end or error, after [`DRAIN_MAX_BYTES`], or at
/// [`DRAIN_MAX_TIME`] after the answer was made, whichever comes first. Reading it hands
/// the flow-control window back to the client; nothing is kept.
struct Drain {
    body: Incoming,
    left: u64,
    deadline: Pin<Box<Sleep>>,
}

impl Drain {
    /// Ready once draining is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    match self.left.checked_sub(n) {
                        Some(left) => self.left = left,
                        None => return Poll::Ready(()),
                    }
                }
                Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Full(bytes) => match bytes.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => match this.drain.as_mut().map(|d| d.poll(cx)) {
                    Some(Poll::Pending) => return Poll::Pending,
                    Some(Poll::Ready(())) | None => {
                        this.drain = None;
                        Poll::Ready(None)
                    }
                },
            },
            Inner::Stream(body) => {
                if let Some(up) = this.upstream.as_mut()
                    && Pin::new(&mut up.deadline).poll(cx).is_ready()
                {
                    this.fail("scoring timeout while streaming the response");
                    this.upstream = None;
                    return Poll::Ready(Some(Err("scoring timeout while streaming".into())));
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        this.fail("replica failed while streaming the response");
                        Poll::Ready(Some(Err(e)))
                    }
                    other => other,
                }
            }
        };
        if matches!(polled, Poll::Ready(None)) || this.is_end_stream() {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.response_done() && self.drain.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Stream(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // An unfinished drain is not an unfinished response: the client has it all.
        let complete = self.ended || self.response_done();
        if let Some(up) = self.upstream.take() {
            // Measured when the record is written, with the same clock read as the total.
            self.record.upstream = Some(up.sent_at);
            if complete
                && let Inner::Stream(body) = &mut self.inner
                && let Some(conn) = body.reusable_conn()
            {
                up.slot.replica().conns.put(conn);
            }
            // `up.slot` drops here: the replica's capacity is free again.
        }
        if !complete && self.record.outcome.is_empty() {
            self.record.outcome = "client went away before the response body ended";
        }
    }
}

/// A client's request body: the frames already read (before a slot was taken), then the
/// rest of the stream. Frames are kept as they arrived, not copied; the size hint stays
/// the client's, so a chunked body is forwarded chunked even when read whole.
#[derive(Debug)]
pub struct Buffered {
    /// The first frame read, held inline: most bodies are one frame, which then costs no
    /// allocation.
    first: Option<Frame<Bytes>>,
    /// Frames read after `first`, in order.
    more: VecDeque<Frame<Bytes>>,
    /// Data bytes in `first` and `more`.
    head_len: u64,
    /// `None` once it has said it ended, which h2 may say only when asked for one more
    /// frame: the body's length is then known although the client did not give it.
    rest: Option<Incoming>,
}

impl Buffered {
    /// A body nothing has been read from yet.
    pub fn unread(body: Incoming) -> Self {
        Buffered {
            first: None,
            more: VecDeque::new(),
            head_len: 0,
            rest: Some(body),
        }
    }

    /// Reads frames until the body ends or at least `max` data bytes are buffered. Safe
    /// to cancel: a frame is kept once read, and the body stays whole.
    pub async fn fill(&mut self, max: u64) -> Result<(), hyper::Error> {
        while self.head_len < max && !self.rest_done() {
            let Some(rest) = self.rest.as_mut() else {
                break;
            };
            let Some(frame) = rest.frame().await else {
                self.rest = None;
                break;
            };
            let frame = frame?;
            self.head_len += frame.data_ref().map_or(0, |d| d.len() as u64);
            if self.first.is_none() && self.more.is_empty() {
                self.first = Some(frame);
            } else {
                self.more.push_back(frame);
            }
        }
        Ok(())
    }

    /// Data bytes buffered and not yet handed out.
    pub fn buffered(&self) -> u64 {
        self.head_len
    }

    /// The data already read, and whether it is the whole body.
    pub fn peek(&self) -> (impl Iterator<Item = &Bytes>, bool) {
        let data = (self.first.iter().chain(&self.more)).filter_map(Frame::data_ref);
        (data, self.rest_done())
    }

    /// Drops what was read: it has been sent on from [`Buffered::peek`].
    pub fn discard_buffered(&mut self) {
        self.first = None;
        self.more.clear();
        self.head_len = 0;
    }

    /// The part of the body not read yet.
    pub fn into_rest(self) -> Option<Incoming> {
        self.rest
    }

    /// Whether the part not read yet is known to be empty.
    fn rest_done(&self) -> bool {
        self.rest.as_ref().is_none_or(Incoming::is_end_stream)
    }
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.first.take().or_else(|| self.more.pop_front()) {
            self.head_len -= frame.data_ref().map_or(0, |d| d.len() as u64);
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.more.is_empty() && self.rest_done()
    }

    fn size_hint(&self) -> SizeHint {
        let Some(rest) = self.rest.as_ref().filter(|r| !r.is_end_stream()) else {
            return SizeHint::with_exact(self.head_len);
        };
        let rest = rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.head_len);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.head_len);
        }
        hint
    }
}

/// Everything the access log and the metrics need about one request. Written on drop.
pub struct Record {
    pub metrics: Arc<Metrics>,
    pub start: Instant,
    pub method: Method,
    pub uri: Uri,
    pub ids: Option<RequestIds>,
    pub endpoint: Option<Arc<EndpointRoute>>,
    pub version: Option<Arc<VersionRoute>>,
    pub status: StatusCode,
    /// The router's error code when it answered itself.
    pub code: Option<&'static str>,
    pub queue_wait: Option<Duration>,
    /// When the request was sent to the replica that answered it.
    pub upstream: Option<Instant>,
    /// Why the exchange ended badly after headers, if it did; empty otherwise.
    pub outcome: &'static str,
}

impl Drop for Record {
    fn drop(&mut self) {
        let now = Instant::now();
        let elapsed = now - self.start;
        let upstream = self.upstream.map(|sent| now - sent);
        let endpoint = self.endpoint.as_ref().map_or("", |e| e.name.as_str());
        let version = self.version.as_ref().map_or("", |v| v.name());
        match &self.version {
            Some(v) => v.metrics.count_request(self.status),
            None => self.metrics.count_unrouted(endpoint, self.status.as_str()),
        }
        if let Some(v) = &self.version {
            let handles = v.metrics.handles();
            handles.request_duration.observe(elapsed.as_secs_f64());
            if let Some(w) = self.queue_wait {
                handles.queue_wait.observe(w.as_secs_f64());
            }
            if let Some(u) = upstream {
                handles.upstream_duration.observe(u.as_secs_f64());
            }
        }
        // Whole microseconds; -1 for a phase the request never reached.
        let us = |d: Option<Duration>| d.map_or(-1, |d| d.as_micros() as i64);
        accesslog::write(&accesslog::Entry {
            request_id: self
                .ids
                .as_ref()
                .and_then(|i| i.request_id.to_str().ok())
                .unwrap_or(""),
            method: self.method.as_str(),
            path: self.uri.path(),
            endpoint,
            version,
            status: self.status.as_u16(),
            code: self.code.unwrap_or(""),
            duration_us: elapsed.as_micros() as u64,
            queue_us: us(self.queue_wait),
            upstream_us: us(upstream),
            outcome: self.outcome,
        });
    }
}
