//! Header rules of DESIGN.md 1.1: request ids, what is forwarded to a replica, and what is
//! added to every response.

use std::net::SocketAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{self, AUTHORIZATION, CONNECTION, HOST},
};

use crate::error::ClientError;

pub const MODEL_DEPLOYMENT: HeaderName = HeaderName::from_static("azureml-model-deployment");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
pub const MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Longest request id header accepted, as the AzureML scoring server enforces.
pub const MAX_ID_LEN: usize = 100;

/// The ids a request carries through the router.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub request_id: HeaderValue,
    pub client_request_id: Option<HeaderValue>,
}

impl RequestIds {
    /// Keeps a valid `x-request-id`, else makes a UUID v4; refuses ids over 100 chars.
    pub fn read(headers: &HeaderMap) -> Result<Self, ClientError> {
        let client_request_id = headers.get(&MS_CLIENT_REQUEST_ID).cloned();
        if client_request_id
            .as_ref()
            .is_some_and(|v| v.len() > MAX_ID_LEN)
        {
            return Err(ClientError::HeaderTooLarge("x-ms-client-request-id"));
        }
        let request_id = match headers.get(&REQUEST_ID) {
            Some(v) if v.len() > MAX_ID_LEN => {
                return Err(ClientError::HeaderTooLarge("x-request-id"));
            }
            Some(v) if valid_id(v) => v.clone(),
            _ => new_request_id(),
        };
        Ok(RequestIds {
            request_id,
            client_request_id,
        })
    }
}

/// A request id we pass on: non-empty printable ASCII without spaces.
fn valid_id(v: &HeaderValue) -> bool {
    !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_graphic)
}

pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass of cheap name comparisons instead of a hashed
    // removal per name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Whether a response says its connection must close after it.
pub fn closes_connection(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Turns the client's headers into the ones a replica gets.
pub fn for_replica(
    headers: &mut HeaderMap,
    authority: Option<&http::uri::Authority>,
    client: SocketAddr,
    scheme: &'static str,
    ids: &RequestIds,
) {
    strip_hop_by_hop(headers);
    headers.remove(AUTHORIZATION);
    // The router answers `Expect: 100-continue` itself when it starts reading the body.
    headers.remove(header::EXPECT);
    if !headers.contains_key(HOST)
        && let Some(a) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(HOST, a);
    }
    let ip = client.ip().to_string();
    let forwarded = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(FORWARDED_FOR, v);
    }
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static(scheme));
    headers.insert(REQUEST_ID, ids.request_id.clone());
}

/// Headers every response gets once the router knows them.
pub fn for_client(headers: &mut HeaderMap, ids: &RequestIds, version: Option<&HeaderValue>) {
    if let Some(v) = version {
        headers.insert(MODEL_DEPLOYMENT, v.clone());
    }
    headers.insert(REQUEST_ID, ids.request_id.clone());
    headers.insert(MS_REQUEST_ID, ids.request_id.clone());
    if let Some(c) = &ids.client_request_id {
        headers.insert(MS_CLIENT_REQUEST_ID, c.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_kept_generated_or_refused() {
        let mut h = HeaderMap::new();
        let fresh = RequestIds::read(&h).unwrap().request_id;
        assert_eq!(fresh.len(), 36);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestIds::read(&h).unwrap().request_id, "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static(""));
        assert_eq!(RequestIds::read(&h).unwrap().request_id.len(), 36);
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(101)).unwrap());
        assert!(RequestIds::read(&h).is_err());
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(100)).unwrap());
        assert!(RequestIds::read(&h).is_ok());
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }
}
