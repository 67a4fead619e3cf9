//! The data plane: one request, top to bottom.
//!
//! [`Proxy::handle`] runs the phases of DESIGN.md 2 in order (ids, endpoint, auth, version,
//! body buffering, slot, forward); each phase either moves on or ends the request with one
//! [`ProxyError`]. The routing table is read lock-free from an [`ArcSwap`] that the index
//! replaces whole.

pub mod auth;
pub mod body;
pub mod forward;
pub mod headers;
pub mod slots;
pub mod table;

use std::{
    net::SocketAddr,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::Poll,
};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header::CONTENT_TYPE};
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use self::{
    body::{Buffered, DRAIN_MAX_BYTES, ProxyBody, Record, Upstream},
    forward::{Failure, RequestBody, SendError, UpstreamBody},
    headers::{ReplicaFields, RequestFields, RequestIds},
    slots::Slot,
    table::{RoutingTable, VersionRoute},
};
use crate::{
    config::{ClientsConfig, UpstreamConfig},
    error::{ClientError, ProxyError, UpstreamError},
    gate::Gated,
    metrics::Metrics,
    token::Verifier,
};

/// Shared state of the data plane. Owned by the app; the index publishes tables into it.
pub struct Proxy {
    table: ArcSwap<RoutingTable>,
    metrics: Arc<Metrics>,
    max_body: AtomicU64,
    upstream: UpstreamConfig,
    /// How much of a request body is read before a slot is taken, and how fast.
    clients: ClientsConfig,
    /// Token issuers for `authMode: token` endpoints; fixed for the process's life.
    tokens: Arc<Verifier>,
}

/// Who is on the other end of a client connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
}

impl Proxy {
    pub fn new(
        metrics: Arc<Metrics>,
        max_body: u64,
        upstream: UpstreamConfig,
        clients: ClientsConfig,
        tokens: Arc<Verifier>,
    ) -> Self {
        Proxy {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            metrics,
            max_body: AtomicU64::new(max_body),
            upstream,
            clients,
            tokens,
        }
    }

    /// Makes `table` the one new requests route by. Requests already past the lookup keep
    /// the endpoint they found.
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn tokens(&self) -> &Verifier {
        &self.tokens
    }

    pub fn set_max_body(&self, bytes: u64) {
        self.max_body.store(bytes, Relaxed);
    }

    /// Answers one request. The future owns its handle on the proxy, so the server can box
    /// it as it is, with no wrapper future to move it into.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: ClientInfo,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let fields = RequestFields::read(&parts.headers);
        // Over h2, a body the router does not forward is drained behind its answer (see
        // `body::Drain`), unless it is declared too large to finish within the bound.
        let drainable = parts.version == http::Version::HTTP_2
            && fields.content_length().is_none_or(|n| n <= DRAIN_MAX_BYTES);
        let mut body = Some(Buffered::unread(body));
        let mut record = Record {
            metrics: self.metrics.clone(),
            start: Instant::now(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            ids: None,
            endpoint: None,
            version: None,
            status: StatusCode::OK,
            code: None,
            queue_wait: None,
            upstream: None,
            outcome: "",
        };
        match self
            .process(parts, &fields, &mut body, client, &mut record)
            .await
        {
            Ok((resp, upstream)) => {
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                finish_headers(&mut parts.headers, &mut record);
                record.status = parts.status;
                Response::from_parts(parts, ProxyBody::upstream(body, upstream, record))
            }
            Err(err) => error_response(
                err,
                record,
                body.and_then(Buffered::into_rest).filter(|_| drainable),
            ),
        }
    }

    /// The phases of one request. The request body stays in `body` until the request is
    /// forwarded, so that an answer of the router's own can still drain it.
    async fn process(
        &self,
        mut parts: http::request::Parts,
        fields: &RequestFields,
        body: &mut Option<Buffered>,
        client: ClientInfo,
        record: &mut Record,
    ) -> Result<(Response<UpstreamBody>, Upstream), ProxyError> {
        let ids = RequestIds::read(fields)?;
        let ids = record.ids.insert(ids);
        let (name, target_at) = split_path(&parts.uri)?;
        let endpoint = self
            .table
            .load()
            .endpoint(name)
            .cloned()
            .ok_or_else(|| ClientError::EndpointNotFound(name.to_owned()))?;
        record.endpoint = Some(endpoint.clone());
        if let Err(e) = auth::verify(
            &endpoint.auth,
            &endpoint.name,
            fields.authorization.as_ref(),
            &self.tokens,
        )
        .await
        {
            if let ClientError::Unauthorized { reason, .. } = e {
                self.metrics
                    .count_auth_failure(&endpoint.name, reason.label());
            }
            return Err(e.into());
        }
        let pin = fields.model_deployment.as_ref().map(|v| v.as_bytes());
        let version = endpoint.pick(pin, rand::random_range(0..100))?.clone();
        record.version = Some(version.clone());
        let limit = self.max_body.load(Relaxed);
        if fields.content_length().is_some_and(|n| n > limit) {
            return Err(ClientError::PayloadTooLarge { limit }.into());
        }
        let buffered = body
            .as_mut()
            .ok_or_else(|| ProxyError::Internal("request body already taken".into()))?;
        // A request with a body starts waiting for a slot once the start of its body is in.
        let waiting = if buffered.is_end_stream() {
            record.start
        } else {
            self.buffer_body(buffered, limit).await?;
            Instant::now()
        };

        let slot = version.slots.acquire(version.spec.max_wait).await?;
        let acquired = slot.taken_at();
        record.queue_wait = Some(acquired - waiting);

        let body = body
            .take()
            .ok_or_else(|| ProxyError::Internal("request body already taken".into()))?;
        let added = headers::for_replica(
            &mut parts.headers,
            fields,
            parts.uri.authority(),
            client.addr,
            client.scheme,
            ids,
            target_at,
        );
        let upstream_req = Request::from_parts(parts, body);
        forward(
            &version,
            slot,
            upstream_req,
            &added,
            limit,
            &self.upstream,
            acquired,
        )
        .await
    }

    /// Reads the start of the request body (all of a small one) before a slot is taken,
    /// within the body read timeout.
    async fn buffer_body(&self, body: &mut Buffered, limit: u64) -> Result<(), ClientError> {
        let timeout = self.clients.body_read_timeout();
        let max = self
            .clients
            .request_buffer_bytes
            .min(limit.saturating_add(1));
        let filled = {
            let mut fill = pin!(body.fill(max));
            // A small body mostly comes with its head: the timer is set only for one that
            // has not.
            match futures::poll!(fill.as_mut()) {
                Poll::Ready(filled) => Ok(filled),
                Poll::Pending => tokio::time::timeout(timeout, fill).await,
            }
        };
        match filled {
            Err(_) => Err(ClientError::RequestTimeout {
                timeout_ms: timeout.as_millis() as u64,
            }),
            Ok(Err(e)) => Err(ClientError::BadRequestBody(e.to_string())),
            Ok(Ok(())) if body.buffered() > limit => Err(ClientError::PayloadTooLarge { limit }),
            Ok(Ok(())) => Ok(()),
        }
    }
}

/// Sends the request within the version's scoring timeout, retrying once on another
/// replica if it was never written.
async fn forward(
    version: &VersionRoute,
    mut slot: Slot,
    req: Request<RequestBody>,
    added: &ReplicaFields,
    limit: u64,
    settings: &UpstreamConfig,
    sent_at: Instant,
) -> Result<(Response<UpstreamBody>, Upstream), ProxyError> {
    let timeout = version.spec.scoring_timeout;
    // From when the slot was taken. Polled only when it fires, not on each of the
    // exchange's wake-ups.
    let mut deadline = Gated::new(Box::pin(tokio::time::sleep_until(sent_at + timeout)));
    let timed_out = || UpstreamError::Timeout {
        version: version.spec.name.clone(),
        timeout_ms: timeout.as_millis() as u64,
    };
    let unavailable = |reason: String| UpstreamError::Unavailable {
        version: version.spec.name.clone(),
        reason,
    };
    let mut req = req;
    let mut retried = false;
    loop {
        let replica = slot.replica().clone();
        let sent = tokio::select! {
            biased;
            sent = forward::send(&replica.conns, replica.addr, req, added, limit, settings) => sent,
            () = &mut deadline => return Err(timed_out().into()),
        };
        version.observe(&replica, &sent, &settings.outlier_detection);
        match sent {
            Ok(resp) => {
                let upstream = Upstream {
                    slot,
                    deadline,
                    sent_at,
                };
                return Ok((resp, upstream));
            }
            Err(SendError::NotSent(back, reason)) if !retried => {
                tracing::debug!(replica = %replica.addr, %reason, "request not sent; retrying once");
                retried = true;
                req = *back;
                slot = match version.slots.try_acquire(Some(&replica)) {
                    Some(other) => other,
                    None => {
                        drop(slot);
                        // Not the replica that just refused it, while another could serve.
                        let wait = version
                            .slots
                            .acquire_avoiding(version.spec.max_wait, Some(&replica));
                        tokio::select! {
                            biased;
                            got = wait => got?,
                            () = &mut deadline => return Err(timed_out().into()),
                        }
                    }
                };
            }
            Err(SendError::NotSent(_, reason)) => return Err(unavailable(reason).into()),
            Err(SendError::Failed(Failure::TooLarge)) => {
                return Err(ClientError::PayloadTooLarge { limit }.into());
            }
            Err(SendError::Failed(e)) => {
                return Err(unavailable(format!("{} at {}", e, replica.addr)).into());
            }
        }
    }
}

/// Splits `/api/v1/{service|endpoint}/{name}/{rest}` into the name and where `{rest}` (or,
/// with no `/` after the name, the query) begins in the URI's path and query: the replica
/// gets `/` and what follows from there (see [`replica_target`]).
pub fn split_path(uri: &Uri) -> Result<(&str, usize), ClientError> {
    let path = uri.path();
    let prefix = ["/api/v1/service/", "/api/v1/endpoint/"]
        .into_iter()
        .find(|p| path.starts_with(p))
        .ok_or(ClientError::BadPath)?;
    let tail = &path[prefix.len()..];
    let name = tail.find('/').map_or(tail, |end| &tail[..end]);
    if name.is_empty() {
        return Err(ClientError::BadPath);
    }
    // After the name's slash, or at the query (or the end) when there is none.
    let at = prefix.len() + name.len();
    Ok((name, at + usize::from(tail.len() > name.len())))
}

/// The replica's request target after its leading `/`: the client's path and query from
/// `at`, where [`split_path`] found the rest of the path to begin. A suffix of a valid
/// path and query is one.
pub fn replica_target(uri: &Uri, at: usize) -> &str {
    let pq = uri.path_and_query().map_or("", |p| p.as_str());
    pq.get(at..).unwrap_or_default()
}

/// Adds the id and version headers; a request refused before its ids were read gets a
/// fresh id, kept in the record so the access log names the id the client saw.
fn finish_headers(headers: &mut http::HeaderMap, record: &mut Record) {
    let ids = record.ids.get_or_insert_with(|| RequestIds {
        request_id: headers::new_request_id(),
        client_request_id: None,
    });
    headers::for_client(headers, ids, record.version.as_ref().map(|v| &v.header));
}

/// The router's own answer to a request. `unread` is the request body when it should be
/// drained behind the answer (h2 only).
fn error_response(
    err: ProxyError,
    mut record: Record,
    unread: Option<Incoming>,
) -> Response<ProxyBody> {
    if let ProxyError::Upstream(_) | ProxyError::Internal(_) = &err {
        tracing::warn!(
            endpoint = record.endpoint.as_ref().map_or("", |e| e.name.as_str()),
            version = record.version.as_ref().map_or("", |v| v.name()),
            detail = err.detail().unwrap_or(""),
            "{err}"
        );
    }
    let mut headers = http::HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((name, value)) = err.extra_header() {
        headers.insert(name, value);
    }
    finish_headers(&mut headers, &mut record);
    record.status = err.status();
    record.code = Some(err.code());
    let mut body = ProxyBody::full(err.body(), record);
    if let Some(unread) = unread {
        body = body.draining(unread);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = err.status();
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_name_and_forwarded_target() {
        let cases = [
            ("/api/v1/service/fraud/score", "fraud", "/score"),
            (
                "/api/v1/endpoint/fraud/score?a=1&b=%20",
                "fraud",
                "/score?a=1&b=%20",
            ),
            ("/api/v1/service/fraud", "fraud", "/"),
            ("/api/v1/service/fraud?a=1", "fraud", "/?a=1"),
            ("http://host:1/api/v1/service/fraud/x?a", "fraud", "/x?a"),
            ("/api/v1/service/fraud/", "fraud", "/"),
            (
                "/api/v1/service/fraud/swagger.json",
                "fraud",
                "/swagger.json",
            ),
            ("/api/v1/service/fraud/a/b/c", "fraud", "/a/b/c"),
        ];
        for (input, name, target) in cases {
            let uri: Uri = input.parse().unwrap();
            let (n, at) = split_path(&uri).unwrap();
            let t = format!("/{}", replica_target(&uri, at));
            assert_eq!((n, t.as_str()), (name, target), "{input}");
        }
        for bad in ["/", "/api/v1/service/", "/api/v1/model/x/score", "/score"] {
            assert!(split_path(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
