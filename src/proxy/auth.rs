//! Credential checks of the request path. Key mode compares in constant time against both
//! keys every time, so timing tells nothing about which key (if any) was close. Token mode
//! hands the bearer token to the [`Verifier`].

use http::{HeaderMap, header::AUTHORIZATION};
use subtle::ConstantTimeEq;

use crate::{
    error::ClientError,
    spec::Auth,
    token::{Reason, Verifier},
};

/// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|c| !c.is_empty())
}

/// Checks the credential of a request to `endpoint`.
pub async fn verify(
    auth: &Auth,
    endpoint: &str,
    headers: &HeaderMap,
    tokens: &Verifier,
) -> Result<(), ClientError> {
    let refuse = |token, reason| ClientError::Unauthorized { token, reason };
    match auth {
        Auth::None => Ok(()),
        Auth::Token { issuers } => {
            let given = bearer(headers).ok_or(refuse(true, Reason::Missing))?;
            tokens
                .verify(endpoint, issuers, given)
                .await
                .map_err(|reason| refuse(true, reason))
        }
        Auth::Key { primary, secondary } => {
            let given = bearer(headers).ok_or(refuse(false, Reason::Missing))?;
            let primary_ok = given.ct_eq(primary.as_bytes());
            let secondary_ok = match secondary {
                Some(s) => given.ct_eq(s.as_bytes()),
                None => 0u8.ct_eq(&1u8),
            };
            if bool::from(primary_ok | secondary_ok) {
                Ok(())
            } else {
                Err(refuse(false, Reason::InvalidKey))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, auth.parse().unwrap());
        h
    }

    async fn check(auth: &Auth, headers: &HeaderMap) -> Result<(), ClientError> {
        let tokens = Verifier::from_config(&Default::default()).unwrap();
        verify(auth, "ep", headers, &tokens).await
    }

    #[tokio::test]
    async fn either_key_passes_and_nothing_else_does() {
        let auth = Auth::Key {
            primary: "primary-key-0123456789".into(),
            secondary: Some("secondary-key-0123456789".into()),
        };
        assert!(
            check(&auth, &headers("Bearer primary-key-0123456789"))
                .await
                .is_ok()
        );
        assert!(
            check(&auth, &headers("bearer secondary-key-0123456789"))
                .await
                .is_ok()
        );
        for bad in [
            "Bearer primary-key-012345678",
            "Bearer primary-key-0123456789x",
            "Basic primary-key-0123456789",
            "Bearer ",
            "primary-key-0123456789",
        ] {
            assert!(
                matches!(
                    check(&auth, &headers(bad)).await,
                    Err(ClientError::Unauthorized { token: false, .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            check(&auth, &HeaderMap::new()).await,
            Err(ClientError::Unauthorized {
                token: false,
                reason: Reason::Missing
            })
        );
        assert!(check(&Auth::None, &HeaderMap::new()).await.is_ok());
    }
}
