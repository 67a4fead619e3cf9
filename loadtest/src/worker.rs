//! A slot of the load generator: sends the template request over its connection (its
//! own for HTTP/1.1, shared with the other streams of the same connection for h2) and
//! reports to the recorder.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use tokio::time::Instant;

use crate::{
    client::{Conn, Failure, MODEL_DEPLOYMENT, RequestTemplate, Target, connect},
    schedule::{Slot, Timing},
    stats::Recorder,
};

/// What every slot shares.
pub struct Shared {
    pub target: Target,
    pub template: RequestTemplate,
    pub recorder: Mutex<Recorder>,
    /// Requests sent and not yet answered.
    pub in_flight: AtomicI64,
    pub timeout: Duration,
    /// Open a new connection for every request and close it after.
    pub fresh_each: bool,
    pub warmup_errors: AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An h2 connection shared by several slots; the first slot to find it gone reopens it.
#[derive(Default)]
pub struct H2Conn {
    send: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

enum ConnState {
    H1(Option<http1::SendRequest<Full<Bytes>>>),
    H2 {
        mine: Option<http2::SendRequest<Full<Bytes>>>,
        shared: Arc<H2Conn>,
    },
}

/// A response as far as the report cares.
pub struct Answer {
    pub status: u16,
    pub version: Option<HeaderValue>,
    pub bytes: u64,
}

pub struct Worker {
    shared: Arc<Shared>,
    conn: ConnState,
    /// False during warmup: nothing is recorded but errors are counted.
    pub measuring: bool,
}

impl Worker {
    /// An HTTP/1.1 slot with its own connection.
    pub fn h1(shared: Arc<Shared>) -> Self {
        Worker {
            shared,
            conn: ConnState::H1(None),
            measuring: false,
        }
    }

    /// An h2 stream slot on a shared connection.
    pub fn h2(shared: Arc<Shared>, conn: Arc<H2Conn>) -> Self {
        Worker {
            shared,
            conn: ConnState::H2 {
                mine: None,
                shared: conn,
            },
            measuring: false,
        }
    }

    fn drop_conn(&mut self) {
        match &mut self.conn {
            ConnState::H1(c) => *c = None,
            ConnState::H2 { mine, .. } => *mine = None,
        }
    }

    async fn exchange(&mut self) -> Result<Answer, Failure> {
        let shared = &*self.shared;
        let measuring = self.measuring;
        let mut retried = false;
        // The response, and the connection to close once its body is read (if any).
        let (resp, _close_after_body) = loop {
            let sent = match &mut self.conn {
                ConnState::H1(slot) => {
                    if shared.fresh_each || slot.as_ref().is_none_or(|s| s.is_closed()) {
                        *slot = None;
                        match open(shared, measuring).await? {
                            Conn::H1(s) => *slot = Some(s),
                            Conn::H2(_) => unreachable!("HTTP/1.1 target"),
                        }
                    }
                    let s = slot.as_mut().expect("connection opened above");
                    let sent = send_h1(s, &shared.template).await;
                    match sent {
                        Sent::Answered(resp) => {
                            let done = shared.fresh_each || asks_to_close(&resp);
                            let close = if done {
                                slot.take().map(Conn::H1)
                            } else {
                                None
                            };
                            (Sent::Answered(resp), close)
                        }
                        other => {
                            *slot = None;
                            (other, None)
                        }
                    }
                }
                ConnState::H2 { mine, shared: h2 } => {
                    if shared.fresh_each {
                        match open(shared, measuring).await? {
                            Conn::H2(s) => *mine = Some(s),
                            Conn::H1(_) => unreachable!("h2 target"),
                        }
                    } else if mine.as_ref().is_none_or(|s| s.is_closed()) {
                        *mine = None;
                        let mut current = h2.send.lock().await;
                        if current.as_ref().is_none_or(|s| s.is_closed()) {
                            *current = None;
                            match open(shared, measuring).await? {
                                Conn::H2(s) => *current = Some(s),
                                Conn::H1(_) => unreachable!("h2 target"),
                            }
                        }
                        *mine = current.clone();
                    }
                    let s = mine.as_mut().expect("connection opened above");
                    let sent = send_h2(s, &shared.template).await;
                    match sent {
                        Sent::Answered(resp) => {
                            let done = shared.fresh_each;
                            let close = if done {
                                mine.take().map(Conn::H2)
                            } else {
                                None
                            };
                            (Sent::Answered(resp), close)
                        }
                        Sent::Unsent(e) => {
                            *mine = None;
                            (Sent::Unsent(e), None)
                        }
                        Sent::Failed(e) => {
                            if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
                                *mine = None;
                            }
                            (Sent::Failed(e), None)
                        }
                    }
                }
            };
            // A connection found closed before the request went out is replaced and the
            // request tried once more; a request that went out is never resent.
            match sent {
                (Sent::Answered(resp), keep) => break (resp, keep),
                (Sent::Unsent(e), _) if retried => return Err(Failure::from_hyper(e)),
                (Sent::Unsent(_), _) => retried = true,
                (Sent::Failed(e), _) => return Err(Failure::from_hyper(e)),
            }
        };
        let status = resp.status().as_u16();
        let version = resp.headers().get(MODEL_DEPLOYMENT).cloned();
        let mut body = resp.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let mut f = Failure::from_hyper(e);
                if f.kind != "timeout" {
                    f.kind = "body";
                }
                f
            })?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
            }
        }
        Ok(Answer {
            status,
            version,
            bytes,
        })
    }
}

/// How sending one request went.
enum Sent {
    Answered(Response<Incoming>),
    /// The request never left: the connection was found closed.
    Unsent(hyper::Error),
    /// The request left (or may have) and no response came.
    Failed(hyper::Error),
}

async fn send_h1(s: &mut http1::SendRequest<Full<Bytes>>, template: &RequestTemplate) -> Sent {
    if let Err(e) = s.ready().await {
        return Sent::Unsent(e);
    }
    match s.try_send_request(template.build()).await {
        Ok(resp) => Sent::Answered(resp),
        Err(e) if e.message().is_some() => Sent::Unsent(e.into_error()),
        Err(e) => Sent::Failed(e.into_error()),
    }
}

async fn send_h2(s: &mut http2::SendRequest<Full<Bytes>>, template: &RequestTemplate) -> Sent {
    if let Err(e) = s.ready().await {
        return Sent::Unsent(e);
    }
    match s.try_send_request(template.build()).await {
        Ok(resp) => Sent::Answered(resp),
        Err(e) if e.message().is_some() => Sent::Unsent(e.into_error()),
        Err(e) => Sent::Failed(e.into_error()),
    }
}

/// True when an HTTP/1.1 response says the server closes the connection after it.
fn asks_to_close(resp: &Response<Incoming>) -> bool {
    resp.version() == http::Version::HTTP_10
        || resp.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        })
}

/// Opens a connection, timing it when measuring.
async fn open(shared: &Shared, measuring: bool) -> Result<Conn, Failure> {
    let start = Instant::now();
    let conn = connect(&shared.target).await?;
    if measuring {
        shared.lock().record_connect(start.elapsed());
    }
    Ok(conn)
}

impl Slot for Worker {
    type Outcome = Result<Answer, Failure>;

    async fn send(&mut self) -> Self::Outcome {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let timeout = self.shared.timeout;
        let result = match tokio::time::timeout(timeout, self.exchange()).await {
            Ok(r) => r,
            Err(_) => {
                // The connection's state is unknown: start afresh.
                self.drop_conn();
                Err(Failure::new(
                    "timeout",
                    format!("no complete response within {timeout:?}"),
                ))
            }
        };
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn record(&mut self, timing: &Timing, outcome: Self::Outcome) {
        if !self.measuring {
            if outcome.is_err() {
                self.shared.warmup_errors.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let mut r = self.shared.lock();
        match outcome {
            Ok(a) => r.record_response(
                timing,
                a.status,
                a.version.as_ref().map(HeaderValue::as_bytes),
                a.bytes,
            ),
            Err(f) => r.record_error(timing, f.kind, &f),
        }
    }
}
