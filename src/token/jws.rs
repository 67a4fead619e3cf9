//! The compact JWS form of a JWT: `base64url(header).base64url(claims).base64url(sig)`.
//! Only what verification needs is parsed; `jku`, `x5u`, `jwk` and `x5c` headers are
//! ignored (never fetched, never trusted), and a `crit` header is refused because no
//! extension is understood.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;

use super::{Reason, jwk::Alg};

/// Tokens longer than this are refused before any decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

pub struct Jws<'a> {
    /// `header.claims`, the bytes the signature covers.
    pub signed: &'a [u8],
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Claims,
    pub signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub aud: Option<Audience>,
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn any(&self, mut accepted: impl FnMut(&str) -> bool) -> bool {
        match self {
            Audience::One(a) => accepted(a),
            Audience::Many(all) => all.iter().any(|a| accepted(a)),
        }
    }
}

impl<'a> Jws<'a> {
    pub fn parse(token: &'a [u8]) -> Result<Jws<'a>, Reason> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reason::Malformed);
        }
        let mut parts = token.splitn(4, |&b| b == b'.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reason::Malformed);
        };
        let decode = |part: &[u8]| URL_SAFE_NO_PAD.decode(part).map_err(|_| Reason::Malformed);
        let header: Header = serde_json::from_slice(&decode(h)?).map_err(|_| Reason::Malformed)?;
        if header.crit.is_some() {
            return Err(Reason::UnsupportedAlg);
        }
        let alg = Alg::parse(&header.alg).ok_or(Reason::UnsupportedAlg)?;
        let claims: Claims = serde_json::from_slice(&decode(c)?).map_err(|_| Reason::Malformed)?;
        Ok(Jws {
            signed: &token[..h.len() + 1 + c.len()],
            alg,
            kid: header.kid,
            claims,
            signature: decode(s)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(claims), b64("sig"))
    }

    #[test]
    fn parses_what_verification_needs() {
        let t = token(
            r#"{"alg":"ES256","kid":"k1","jku":"http://evil/keys"}"#,
            r#"{"iss":"i","aud":["a","b"],"exp":10.5,"nbf":1}"#,
        );
        let jws = Jws::parse(t.as_bytes()).unwrap();
        assert_eq!(jws.alg, Alg::Es256);
        assert_eq!(jws.kid.as_deref(), Some("k1"));
        assert_eq!(jws.signature, b"sig");
        assert_eq!(jws.signed, t.rsplit_once('.').unwrap().0.as_bytes());
        assert!(jws.claims.aud.unwrap().any(|a| a == "b"));
        assert_eq!(jws.claims.exp, Some(10.5));
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let claims = r#"{"exp":1}"#;
        for (t, reason) in [
            (token(r#"{"alg":"none"}"#, claims), Reason::UnsupportedAlg),
            (token(r#"{"alg":"HS256"}"#, claims), Reason::UnsupportedAlg),
            (
                token(r#"{"alg":"ES256","crit":["exp"]}"#, claims),
                Reason::UnsupportedAlg,
            ),
            (token(r#"{"kid":"x"}"#, claims), Reason::Malformed),
            (token(r#"{"alg":"ES256"}"#, "[]"), Reason::Malformed),
            ("a.b".to_string(), Reason::Malformed),
            (
                format!("{}.x", token(r#"{"alg":"ES256"}"#, claims)),
                Reason::Malformed,
            ),
            ("e30.e30.!!!".to_string(), Reason::Malformed),
        ] {
            assert_eq!(Jws::parse(t.as_bytes()).err(), Some(reason), "{t}");
        }
    }
}
