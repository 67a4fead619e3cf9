//! Header rules of DESIGN.md 1.1: request ids, what is forwarded to a replica, and what is
//! added to every response.
//!
//! A request's fields are read once, in one pass over its head ([`RequestFields`]), and the
//! request goes to its replica with the router's own fields written after the client's
//! ([`ReplicaFields`], [`to_replica`]) rather than put into its map: comparing names costs
//! less than hashing each name looked up or set.

use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
};

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{self, CONNECTION},
};

use crate::error::ClientError;

pub const MODEL_DEPLOYMENT: HeaderName = HeaderName::from_static("azureml-model-deployment");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
pub const MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Longest request id header accepted, as the AzureML scoring server enforces.
pub const MAX_ID_LEN: usize = 100;

/// The fields of a request head the router reads, each the first value of its name (as
/// `HeaderMap::get` gives it).
#[derive(Debug, Default)]
pub struct RequestFields {
    pub request_id: Option<HeaderValue>,
    pub client_request_id: Option<HeaderValue>,
    pub model_deployment: Option<HeaderValue>,
    pub authorization: Option<HeaderValue>,
    content_length: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    host: bool,
    /// A `Connection` field is present: it may name more fields that stay here.
    connection: bool,
}

impl RequestFields {
    pub fn read(headers: &HeaderMap) -> Self {
        let mut f = RequestFields::default();
        for (name, value) in headers {
            let first = match name.as_str() {
                "x-request-id" => &mut f.request_id,
                "x-ms-client-request-id" => &mut f.client_request_id,
                "azureml-model-deployment" => &mut f.model_deployment,
                "authorization" => &mut f.authorization,
                "content-length" => &mut f.content_length,
                "x-forwarded-for" => &mut f.forwarded_for,
                "host" => {
                    f.host = true;
                    continue;
                }
                "connection" => {
                    f.connection = true;
                    continue;
                }
                _ => continue,
            };
            if first.is_none() {
                *first = Some(value.clone());
            }
        }
        f
    }

    /// The declared body length, if the client sent a valid one.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length.as_ref()?.to_str().ok()?.parse().ok()
    }
}

/// The ids a request carries through the router.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub request_id: HeaderValue,
    pub client_request_id: Option<HeaderValue>,
}

impl RequestIds {
    /// Keeps a valid `x-request-id`, else makes a UUID v4; refuses ids over 100 chars.
    pub fn read(fields: &RequestFields) -> Result<Self, ClientError> {
        let client_request_id = fields.client_request_id.clone();
        if client_request_id
            .as_ref()
            .is_some_and(|v| v.len() > MAX_ID_LEN)
        {
            return Err(ClientError::HeaderTooLarge("x-ms-client-request-id"));
        }
        let request_id = match &fields.request_id {
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
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // The id is cloned into the upstream request and two response headers. Bytes that own
    // the array are one allocation, and their clones only count references; a header
    // value copied from a str is another allocation, and its first clone one more.
    // SAFETY: a hyphenated UUID is hex digits and hyphens, all valid in a header value.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::from_owner(buf)) }
}

/// Headers that describe one connection, not the message: never forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
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

/// The index in [`HOP_BY_HOP`] of `name`, if it is one: a match on the text, which
/// compiles to a switch on its length and rarely a comparison.
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authorization" => 3,
        "proxy-authenticate" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass of cheap name comparisons notes which are present; most messages carry
    // none, and most others only `Connection: keep-alive`. Only those present are
    // removed, each a hashed lookup.
    let mut present = 0u16;
    for k in headers.keys() {
        if let Some(i) = hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // `Connection` is HOP_BY_HOP[0].
        strip_connection_named(headers);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes the fields that `Connection` names, other than the hop-by-hop ones (which go
/// anyway) and `close`; whether it removed any.
fn strip_connection_named(headers: &mut HeaderMap) -> bool {
    // The values share the message's buffer, so holding them while removing costs no
    // copy; a second value is rare.
    let mut values = headers.get_all(CONNECTION).iter();
    let first = values.next().cloned();
    let more: Vec<HeaderValue> = values.cloned().collect();
    let mut removed = false;
    for v in first.iter().chain(&more) {
        let Ok(v) = v.to_str() else { continue };
        for name in v.split(',').map(str::trim) {
            if name.eq_ignore_ascii_case("close")
                || HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| hop_index(&n).is_some())
            {
                continue;
            }
            // Parsed on the stack; a token that is no valid name removes nothing.
            removed |= headers.remove(name).is_some();
        }
    }
    removed
}

/// Whether a response says its connection must close after it.
pub fn closes_connection(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Whether the client's field `name` goes to the replica as it is. Hop-by-hop fields, the
/// credential and `Expect` (the router answers `100-continue` itself when it starts
/// reading the body) stay here; the fields of [`ReplicaFields`] are replaced.
pub fn to_replica(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "authorization" | "expect" | "x-forwarded-for" | "x-forwarded-proto" | "x-request-id"
    ) && hop_index(name).is_none()
}

/// The fields the router sets on a request to a replica, written after the client's own.
#[derive(Debug)]
pub struct ReplicaFields {
    /// The client's `content-length` goes on with its body (it sent one, and `Connection`
    /// did not name it).
    pub client_length: bool,
    /// Where the request target the replica gets continues in the client's (see
    /// [`super::replica_target`]).
    pub target_at: usize,
    /// From the request target's authority, when the client sent no `Host` (h2).
    host: Option<HeaderValue>,
    forwarded_for: HeaderValue,
    proto: &'static str,
    request_id: HeaderValue,
}

impl ReplicaFields {
    /// The fields, as names and values.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let host = self.host.as_ref().map(|h| ("host", h.as_bytes()));
        host.into_iter().chain([
            ("x-forwarded-for", self.forwarded_for.as_bytes()),
            ("x-forwarded-proto", self.proto.as_bytes()),
            ("x-request-id", self.request_id.as_bytes()),
        ])
    }
}

/// What a replica gets of the client's request: fields `Connection` names are removed
/// from `headers` (the rest of what stays here is left out by [`to_replica`]), and the
/// router's own fields are returned.
pub fn for_replica(
    headers: &mut HeaderMap,
    fields: &RequestFields,
    authority: Option<&http::uri::Authority>,
    client: SocketAddr,
    scheme: &'static str,
    ids: &RequestIds,
    target_at: usize,
) -> ReplicaFields {
    // The fields `Connection` names are gone from here on (it may name `content-length`
    // or `host`), so what the head says is read again if it named any present.
    let stripped;
    let fields = if fields.connection && strip_connection_named(headers) {
        stripped = RequestFields::read(headers);
        &stripped
    } else {
        fields
    };
    let host = match fields.host {
        true => None,
        false => authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let prior = fields.forwarded_for.as_ref().and_then(|v| v.to_str().ok());
    let forwarded_for = prior
        .and_then(|prior| HeaderValue::from_str(&format!("{prior}, {}", client.ip())).ok())
        .unwrap_or_else(|| client_ip_value(client.ip()));
    ReplicaFields {
        client_length: fields.content_length.is_some(),
        target_at,
        host,
        forwarded_for,
        proto: scheme,
        request_id: ids.request_id.clone(),
    }
}

thread_local! {
    /// The last client address seen on this thread as a header value: consecutive
    /// requests mostly come from the same client, and a clone shares the bytes.
    static CLIENT_IP: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
}

/// `ip` as an `x-forwarded-for` value.
fn client_ip_value(ip: IpAddr) -> HeaderValue {
    let make = || HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid value");
    CLIENT_IP
        .try_with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some((seen, v)) if *seen == ip => v.clone(),
                _ => last.insert((ip, make())).1.clone(),
            }
        })
        .unwrap_or_else(|_| make())
}

/// The most fields [`for_client`] adds to a response: room made for them up front spares
/// the map a rehash.
pub const ADDED_FOR_CLIENT: usize = 4;

/// Headers every response gets once the router knows them (at most [`ADDED_FOR_CLIENT`]).
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
        let fresh = RequestIds::read(&RequestFields::read(&h))
            .unwrap()
            .request_id;
        assert_eq!(fresh.len(), 36);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(
            RequestIds::read(&RequestFields::read(&h))
                .unwrap()
                .request_id,
            "abc-123"
        );
        h.insert(REQUEST_ID, HeaderValue::from_static(""));
        assert_eq!(
            RequestIds::read(&RequestFields::read(&h))
                .unwrap()
                .request_id
                .len(),
            36
        );
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(101)).unwrap());
        assert!(RequestIds::read(&RequestFields::read(&h)).is_err());
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(100)).unwrap());
        assert!(RequestIds::read(&RequestFields::read(&h)).is_ok());
    }

    #[test]
    fn request_fields_are_the_first_value_of_each_name() {
        let mut h = HeaderMap::new();
        h.append(REQUEST_ID, HeaderValue::from_static("first"));
        h.append(REQUEST_ID, HeaderValue::from_static("second"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert(MODEL_DEPLOYMENT, HeaderValue::from_static("blue"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let f = RequestFields::read(&h);
        assert_eq!(f.request_id.as_ref().unwrap(), "first");
        assert_eq!(f.authorization.as_ref().unwrap(), "Bearer k");
        assert_eq!(f.model_deployment.as_ref().unwrap(), "blue");
        assert_eq!(f.content_length(), Some(12));
        assert!(f.connection && !f.host && f.client_request_id.is_none());
    }

    #[test]
    fn fields_the_router_keeps_or_replaces_do_not_go_to_the_replica() {
        for name in [
            header::AUTHORIZATION,
            header::EXPECT,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::TE,
            REQUEST_ID,
            HeaderName::from_static("x-forwarded-for"),
            HeaderName::from_static("x-forwarded-proto"),
            KEEP_ALIVE,
        ] {
            assert!(!to_replica(&name), "{name}");
        }
        for name in [
            header::HOST,
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            MS_CLIENT_REQUEST_ID,
            MODEL_DEPLOYMENT,
        ] {
            assert!(to_replica(&name), "{name}");
        }
    }

    #[test]
    fn hop_index_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name), Some(i), "{name}");
        }
        for name in [
            header::HOST,
            header::USER_AGENT,
            REQUEST_ID,
            header::CONTENT_TYPE,
        ] {
            assert_eq!(hop_index(&name), None, "{name}");
        }
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

        // Every Connection header counts, not only the first.
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("close"));
        h.append(CONNECTION, HeaderValue::from_static(" X-Second ,x-third"));
        for name in ["x-second", "x-third", "upgrade", "x-kept"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "{h:?}");
    }
}
