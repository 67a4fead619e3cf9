//! The response body and the per-request record that ride together to the client.
//!
//! Capacity and bookkeeping end when the body ends, not when headers leave: the body owns
//! the request's [`Slot`] (released on drop), its upstream connection (back to the pool
//! only after a complete body), the scoring deadline (which keeps running while the body
//! streams), and the [`Record`] whose drop writes the access-log line and the metrics.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::{
    forward::Conn,
    headers::RequestIds,
    slots::Slot,
    table::{EndpointRoute, VersionRoute},
};
use crate::{accesslog, metrics::Metrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct ProxyBody {
    inner: Inner,
    upstream: Option<Upstream>,
    /// Set when the last frame has been handed out.
    ended: bool,
    /// Dropped after the slot is released (see `Drop`), so it logs the final outcome.
    record: Record,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(Incoming),
}

/// What a response from a replica holds until its body is done.
pub struct Upstream {
    pub slot: Slot,
    /// `None` when the connection must not be reused.
    pub conn: Option<Conn>,
    pub deadline: Pin<Box<Sleep>>,
    pub sent_at: Instant,
}

impl ProxyBody {
    pub fn full(bytes: Bytes, record: Record) -> Self {
        ProxyBody {
            inner: Inner::Full(Some(bytes)),
            upstream: None,
            ended: false,
            record,
        }
    }

    pub fn upstream(body: Incoming, upstream: Upstream, record: Record) -> Self {
        ProxyBody {
            inner: Inner::Stream(body),
            upstream: Some(upstream),
            ended: false,
            record,
        }
    }

    fn fail(&mut self, outcome: &'static str) {
        if let Some(up) = self.upstream.as_mut() {
            up.conn = None;
        }
        self.record.outcome = outcome;
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
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(body) => {
                if let Some(up) = this.upstream.as_mut()
                    && up.deadline.as_mut().poll(cx).is_ready()
                {
                    this.fail("scoring timeout while streaming the response");
                    this.upstream = None;
                    return Poll::Ready(Some(Err("scoring timeout while streaming".into())));
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        this.fail("replica failed while streaming the response");
                        Poll::Ready(Some(Err(e.into())))
                    }
                    other => other.map_err(|e| e.into()),
                }
            }
        };
        if matches!(polled, Poll::Ready(None)) || this.is_end_stream() {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream(body) => body.is_end_stream(),
        }
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
        let complete = self.ended || self.is_end_stream();
        if let Some(up) = self.upstream.take() {
            self.record.upstream = Some(up.sent_at.elapsed());
            if complete && let Some(conn) = up.conn {
                up.slot.replica().conns.put(conn);
            }
            // `up.slot` drops here: the replica's capacity is free again.
        }
        if !complete && self.record.outcome.is_empty() {
            self.record.outcome = "client went away before the response body ended";
        }
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
    pub upstream: Option<Duration>,
    /// Why the exchange ended badly after headers, if it did; empty otherwise.
    pub outcome: &'static str,
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let endpoint = self.endpoint.as_ref().map_or("", |e| e.name.as_str());
        let version = self.version.as_ref().map_or("", |v| v.name());
        match &self.version {
            Some(v) => v.metrics.count_request(self.status),
            None => self.metrics.count_unrouted(endpoint, self.status.as_str()),
        }
        if let Some(v) = &self.version {
            v.metrics.request_duration.observe(elapsed.as_secs_f64());
            if let Some(w) = self.queue_wait {
                v.metrics.queue_wait.observe(w.as_secs_f64());
            }
            if let Some(u) = self.upstream {
                v.metrics.upstream_duration.observe(u.as_secs_f64());
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
            upstream_us: us(self.upstream),
            outcome: self.outcome,
        });
    }
}
