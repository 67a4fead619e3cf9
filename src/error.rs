//! Every status the router itself generates, grouped by who is at fault.
//!
//! A request that fails inside scorefront ends as exactly one [`ProxyError`]; the handler
//! turns it into the JSON body `{"error":{"code","message"}}` with the status, code and
//! headers listed in DESIGN.md 1.3. Model responses never pass through here: 4xx and 5xx
//! from a replica are forwarded unchanged.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::token::Reason;

/// Why the router answered instead of a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The client asked for something that does not exist or sent something unacceptable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The version has no room for this request right now; retrying later may work.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// A replica could not be reached or did not answer in time.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A bug in scorefront.
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("no scoring endpoint is named '{0}'")]
    EndpointNotFound(String),
    #[error("endpoint '{endpoint}' has no version named '{version}'")]
    VersionNotFound { endpoint: String, version: String },
    #[error("endpoint '{0}' has no version that takes traffic and no default version")]
    NoRoute(String),
    #[error("missing or invalid credential; send 'Authorization: Bearer <{}>'", if *.token {"token"} else {"key"})]
    Unauthorized {
        /// The endpoint takes tokens rather than keys.
        token: bool,
        /// For the log and the metric only; the client is never told.
        reason: Reason,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("the request body did not arrive within {timeout_ms} ms")]
    RequestTimeout { timeout_ms: u64 },
    #[error("the request body could not be read: {0}")]
    BadRequestBody(String),
    #[error("header '{0}' is longer than 100 characters")]
    HeaderTooLarge(&'static str),
    #[error("request path is not /api/v1/service/{{name}}/... or /api/v1/endpoint/{{name}}/...")]
    BadPath,
}

/// `retry_after`: seconds until a slot is likely to be free for a newcomer, estimated
/// from the live queue; sent as `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("version '{version}' already has {limit} requests waiting for a replica")]
    TooManyPending {
        version: String,
        limit: usize,
        retry_after: u32,
    },
    #[error("no replica of version '{version}' had a free slot within {waited_ms} ms")]
    QueueTimeout {
        version: String,
        waited_ms: u64,
        retry_after: u32,
    },
    #[error("version '{version}' has no ready replica")]
    NoReadyReplicas { version: String, retry_after: u32 },
}

impl CapacityError {
    pub fn retry_after(&self) -> u32 {
        match self {
            CapacityError::TooManyPending { retry_after, .. }
            | CapacityError::QueueTimeout { retry_after, .. }
            | CapacityError::NoReadyReplicas { retry_after, .. } => *retry_after,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// `reason` names replica addresses: it goes to the log, never to the client.
    #[error(
        "no replica of version '{version}' could be reached, or it closed the connection before answering"
    )]
    Unavailable { version: String, reason: String },
    #[error("version '{version}' did not answer within {timeout_ms} ms")]
    Timeout { version: String, timeout_ms: u64 },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Client(e) => match e {
                ClientError::EndpointNotFound(_)
                | ClientError::VersionNotFound { .. }
                | ClientError::NoRoute(_)
                | ClientError::BadPath => StatusCode::NOT_FOUND,
                ClientError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
                ClientError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                ClientError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
                ClientError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
                ClientError::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            },
            ProxyError::Capacity(CapacityError::TooManyPending { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Capacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(UpstreamError::Unavailable { .. }) => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(UpstreamError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Client(e) => match e {
                ClientError::EndpointNotFound(_) | ClientError::BadPath => "EndpointNotFound",
                ClientError::VersionNotFound { .. } => "VersionNotFound",
                ClientError::NoRoute(_) => "NoRoute",
                ClientError::Unauthorized { .. } => "Unauthorized",
                ClientError::PayloadTooLarge { .. } => "PayloadTooLarge",
                ClientError::RequestTimeout { .. } => "RequestTimeout",
                ClientError::BadRequestBody(_) => "BadRequest",
                ClientError::HeaderTooLarge(_) => "HeaderTooLarge",
            },
            ProxyError::Capacity(e) => match e {
                CapacityError::TooManyPending { .. } => "TooManyPendingRequests",
                CapacityError::QueueTimeout { .. } => "QueueTimeout",
                CapacityError::NoReadyReplicas { .. } => "NoReadyReplicas",
            },
            ProxyError::Upstream(e) => match e {
                UpstreamError::Unavailable { .. } => "ReplicaUnavailable",
                UpstreamError::Timeout { .. } => "ScoringTimeout",
            },
            ProxyError::Internal(_) => "Internal",
        }
    }

    /// Headers the error adds to the response besides `content-type`.
    pub fn extra_header(&self) -> Option<(header::HeaderName, HeaderValue)> {
        match self {
            ProxyError::Client(ClientError::Unauthorized { token, .. }) => Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(if *token {
                    r#"Bearer error="invalid_token""#
                } else {
                    "Bearer"
                }),
            )),
            ProxyError::Capacity(e) => Some((header::RETRY_AFTER, e.retry_after().into())),
            _ => None,
        }
    }

    /// What the operator needs besides the client's message, if anything.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ProxyError::Upstream(UpstreamError::Unavailable { reason, .. }) => Some(reason),
            ProxyError::Client(ClientError::Unauthorized { reason, .. }) => Some(reason.label()),
            _ => None,
        }
    }

    /// The JSON body: `{"error":{"code":"...","message":"..."}}`.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_addresses_stay_out_of_client_bodies() {
        let err = ProxyError::from(UpstreamError::Unavailable {
            version: "blue".into(),
            reason: "connect 10.1.2.3:5001: Connection refused".into(),
        });
        let body = String::from_utf8(err.body().to_vec()).unwrap();
        assert!(
            body.contains("ReplicaUnavailable") && body.contains("blue"),
            "{body}"
        );
        assert!(!body.contains("10.1.2.3"), "{body}");
        assert_eq!(
            err.detail(),
            Some("connect 10.1.2.3:5001: Connection refused")
        );
    }

    #[test]
    fn capacity_errors_say_when_to_retry_and_auth_errors_how_to_authenticate() {
        let full = ProxyError::from(CapacityError::TooManyPending {
            version: "blue".into(),
            limit: 2,
            retry_after: 7,
        });
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            full.extra_header().unwrap(),
            (header::RETRY_AFTER, HeaderValue::from(7))
        );
        let denied = ProxyError::from(ClientError::Unauthorized {
            token: false,
            reason: Reason::InvalidKey,
        });
        assert_eq!(denied.extra_header().unwrap().1, "Bearer");
        assert_eq!(denied.detail(), Some("invalid_key"));
        let denied = ProxyError::from(ClientError::Unauthorized {
            token: true,
            reason: Reason::Expired,
        });
        assert_eq!(
            denied.extra_header().unwrap().1,
            r#"Bearer error="invalid_token""#
        );
        assert!(denied.to_string().contains("Bearer <token>"), "{denied}");
    }
}
