//! Credential checks of the request path. Key mode compares in constant time against both
//! keys every time, so timing tells nothing about which key (if any) was close. Token mode
//! hands the bearer token to the [`Verifier`].

use http::HeaderValue;
use subtle::{Choice, ConstantTimeEq};

use crate::{
    error::ClientError,
    spec::Auth,
    token::{Reason, Verifier},
};

/// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive), given
/// the field's value.
pub fn bearer(authorization: Option<&HeaderValue>) -> Option<&[u8]> {
    let value = authorization?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    // The scheme compared in one word: setting bit 5 lowers the letters and keeps the
    // space; the only other byte it maps onto any of these is NUL (onto the space), which
    // a field value cannot hold.
    let mut word = [b' '; 8];
    word[..7].copy_from_slice(scheme);
    (u64::from_le_bytes(word) | 0x2020_2020_2020_2020 == u64::from_le_bytes(*b"bearer  "))
        .then(|| rest.trim_ascii())
        .filter(|c| !c.is_empty())
}

/// Checks the credential of a request to `endpoint`, given its `Authorization` field.
pub async fn verify(
    auth: &Auth,
    endpoint: &str,
    authorization: Option<&HeaderValue>,
    tokens: &Verifier,
) -> Result<(), ClientError> {
    let refuse = |token, reason| ClientError::Unauthorized { token, reason };
    match auth {
        Auth::None => Ok(()),
        Auth::Token { issuers } => {
            let given = bearer(authorization).ok_or(refuse(true, Reason::Missing))?;
            // Boxed: a token's check (which may fetch a key set) is a large future, and
            // every request would otherwise carry room for it, keys or not.
            Box::pin(tokens.verify(endpoint, issuers, given))
                .await
                .map_err(|reason| refuse(true, reason))
        }
        Auth::Key { primary, secondary } => {
            let given = bearer(authorization).ok_or(refuse(false, Reason::Missing))?;
            let primary_ok = key_eq(given, primary.as_bytes());
            let secondary_ok = match secondary {
                Some(s) => key_eq(given, s.as_bytes()),
                None => Choice::from(0),
            };
            if bool::from(primary_ok | secondary_ok) {
                Ok(())
            } else {
                Err(refuse(false, Reason::InvalidKey))
            }
        }
    }
}

/// Whether `given` is `key`, in a time that depends on their lengths only (as
/// `subtle`'s slice comparison, but eight bytes at a time): every word is compared, the
/// differences are gathered without a branch, and only the total is tested.
fn key_eq(given: &[u8], key: &[u8]) -> Choice {
    if given.len() != key.len() {
        return Choice::from(0);
    }
    let (g, k) = (given.chunks_exact(8), key.chunks_exact(8));
    let tail = g.remainder().iter().zip(k.remainder());
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("8 bytes"));
    let diff = g.zip(k).fold(0, |d, (g, k)| d | (word(g) ^ word(k)));
    let diff = tail.fold(diff, |d, (g, k)| d | u64::from(g ^ k));
    diff.ct_eq(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(auth: &Auth, authorization: Option<&str>) -> Result<(), ClientError> {
        let tokens = Verifier::from_config(&Default::default()).unwrap();
        let value = authorization.map(|a| HeaderValue::from_str(a).unwrap());
        verify(auth, "ep", value.as_ref(), &tokens).await
    }

    #[tokio::test]
    async fn either_key_passes_and_nothing_else_does() {
        let auth = Auth::Key {
            primary: "primary-key-0123456789".into(),
            secondary: Some("secondary-key-0123456789".into()),
        };
        assert!(
            check(&auth, Some("Bearer primary-key-0123456789"))
                .await
                .is_ok()
        );
        assert!(
            check(&auth, Some("bearer secondary-key-0123456789"))
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
                    check(&auth, Some(bad)).await,
                    Err(ClientError::Unauthorized { token: false, .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            check(&auth, None).await,
            Err(ClientError::Unauthorized {
                token: false,
                reason: Reason::Missing
            })
        );
        assert!(check(&Auth::None, None).await.is_ok());
    }

    /// The scheme matches exactly when `eq_ignore_ascii_case` says so, for every byte a
    /// field value may hold at every place of it.
    #[test]
    fn the_scheme_is_bearer_in_any_case_and_nothing_else() {
        for at in 0..7 {
            for b in 0..=255u8 {
                let mut value = b"Bearer key".to_vec();
                value[at] = b;
                let Ok(value) = HeaderValue::from_bytes(&value) else {
                    continue;
                };
                let expected = value.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ");
                assert_eq!(bearer(Some(&value)).is_some(), expected, "{value:?}");
            }
        }
    }

    #[test]
    fn keys_compare_equal_only_when_every_byte_is() {
        let key: Vec<u8> = (0..40).map(|i| b'a' + i % 26).collect();
        for len in 0..key.len() {
            let k = &key[..len];
            assert!(bool::from(key_eq(k, k)), "{len}");
            assert!(!bool::from(key_eq(k, &key[..len + 1])), "{len}");
            for at in 0..len {
                for bit in 0..8 {
                    let mut other = k.to_vec();
                    other[at] ^= 1 << bit;
                    assert!(!bool::from(key_eq(&other, k)), "{len} {at} {bit}");
                }
            }
        }
    }
}
