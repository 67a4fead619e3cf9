//! Credential checks of the request path. Key mode compares in constant time against both
//! keys every time, so timing tells nothing about which key (if any) was close.

use http::{HeaderMap, header::AUTHORIZATION};
use subtle::ConstantTimeEq;

use crate::{error::ClientError, spec::Auth};

/// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|c| !c.is_empty())
}

pub fn verify(auth: &Auth, headers: &HeaderMap) -> Result<(), ClientError> {
    match auth {
        Auth::None => Ok(()),
        Auth::Key { primary, secondary } => {
            let given = bearer(headers).ok_or(ClientError::Unauthorized)?;
            let primary_ok = given.ct_eq(primary.as_bytes());
            let secondary_ok = match secondary {
                Some(s) => given.ct_eq(s.as_bytes()),
                None => 0u8.ct_eq(&1u8),
            };
            if bool::from(primary_ok | secondary_ok) {
                Ok(())
            } else {
                Err(ClientError::Unauthorized)
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

    #[test]
    fn either_key_passes_and_nothing_else_does() {
        let auth = Auth::Key {
            primary: "primary-key-0123456789".into(),
            secondary: Some("secondary-key-0123456789".into()),
        };
        assert!(verify(&auth, &headers("Bearer primary-key-0123456789")).is_ok());
        assert!(verify(&auth, &headers("bearer secondary-key-0123456789")).is_ok());
        for bad in [
            "Bearer primary-key-012345678",
            "Bearer primary-key-0123456789x",
            "Basic primary-key-0123456789",
            "Bearer ",
            "primary-key-0123456789",
        ] {
            assert_eq!(
                verify(&auth, &headers(bad)),
                Err(ClientError::Unauthorized),
                "{bad}"
            );
        }
        assert_eq!(
            verify(&auth, &HeaderMap::new()),
            Err(ClientError::Unauthorized)
        );
        assert!(verify(&Auth::None, &HeaderMap::new()).is_ok());
    }
}
