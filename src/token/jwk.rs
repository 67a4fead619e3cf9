//! Public keys from JSON Web Key Sets (RFC 7517) and the signature algorithms each may be
//! used with. A key's type fixes its algorithms (RSA: RS256/384/512 and PS256/384/512;
//! P-256: ES256; P-384: ES384; Ed25519: EdDSA), and a key's own `alg`, when present,
//! narrows that to one. HMAC and `none` are never accepted: every key here is public.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;

/// The JWS algorithms scorefront verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    /// `None` for anything not on the allow-list, including `none` and the HS family.
    pub fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed SEC1 point (`04 || x || y`).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: Option<String>,
    /// The key's own `alg`, if it named one.
    alg: Option<Alg>,
    material: Material,
    /// Epoch second after which this key verifies nothing (a replaced signing key).
    pub retire_at: Option<u64>,
}

impl PublicKey {
    pub fn usable_at(&self, now: u64) -> bool {
        self.retire_at.is_none_or(|t| now <= t)
    }

    /// Whether this key may verify a signature made with `alg`.
    pub fn allows(&self, alg: Alg) -> bool {
        let by_type = match self.material {
            Material::Rsa { .. } => matches!(
                alg,
                Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512
            ),
            Material::P256(_) => alg == Alg::Es256,
            Material::P384(_) => alg == Alg::Es384,
            Material::Ed25519(_) => alg == Alg::EdDsa,
        };
        by_type && self.alg.is_none_or(|own| own == alg)
    }

    /// Checks `signature` over `message`; false also when the key does not allow `alg`.
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        if !self.allows(alg) {
            return false;
        }
        match &self.material {
            Material::Rsa { n, e } => {
                let params = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            Material::P256(point) => verify_with(
                &signature::ECDSA_P256_SHA256_FIXED,
                point,
                message,
                signature,
            ),
            Material::P384(point) => verify_with(
                &signature::ECDSA_P384_SHA384_FIXED,
                point,
                message,
                signature,
            ),
            Material::Ed25519(x) => verify_with(&signature::ED25519, x, message, signature),
        }
    }

    /// The RFC 7638 thumbprint, used as the `kid` of keys scorefront makes itself.
    pub fn thumbprint(&self) -> String {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        // Members in lexicographic order, no whitespace, as the RFC requires.
        let canonical = match &self.material {
            Material::Rsa { n, e } => {
                format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64(e), b64(n))
            }
            Material::P256(p) | Material::P384(p) => {
                let (crv, half) = match self.material {
                    Material::P256(_) => ("P-256", 32),
                    _ => ("P-384", 48),
                };
                format!(
                    r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
                    b64(&p[1..1 + half]),
                    b64(&p[1 + half..])
                )
            }
            Material::Ed25519(x) => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(x)),
        };
        b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// A P-256 key from its uncompressed point (as ring's key pairs give it).
    pub fn p256(point: &[u8]) -> PublicKey {
        PublicKey {
            kid: None,
            alg: Some(Alg::Es256),
            material: Material::P256(point.to_vec()),
            retire_at: None,
        }
    }

    /// An Ed25519 key from its 32 bytes.
    pub fn ed25519(x: &[u8]) -> PublicKey {
        PublicKey {
            kid: None,
            alg: Some(Alg::EdDsa),
            material: Material::Ed25519(x.to_vec()),
            retire_at: None,
        }
    }
}

fn verify_with(
    alg: &'static dyn VerificationAlgorithm,
    key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(alg, key)
        .verify(message, signature)
        .is_ok()
}

#[derive(Deserialize)]
struct JwkSetDoc {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct JwkDoc {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parses a JWKS document. Keys that cannot be used (encryption keys, unsupported types
/// or curves, symmetric keys) are skipped with a reason each; a document that is not a
/// JWKS at all is an error.
pub fn parse_jwks(json: &[u8]) -> Result<(Vec<PublicKey>, Vec<String>), String> {
    let doc: JwkSetDoc =
        serde_json::from_slice(json).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        match serde_json::from_value::<JwkDoc>(value)
            .map_err(|e| e.to_string())
            .and_then(parse_jwk)
        {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(e) => skipped.push(format!("key {i}: {e}")),
        }
    }
    Ok((keys, skipped))
}

fn parse_jwk(jwk: JwkDoc) -> Result<Option<PublicKey>, String> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let field = |name: &str, v: &Option<String>| -> Result<Vec<u8>, String> {
        let v = v.as_deref().ok_or_else(|| format!("missing '{name}'"))?;
        URL_SAFE_NO_PAD
            .decode(v.trim_end_matches('='))
            .map_err(|e| format!("'{name}' is not base64url: {e}"))
    };
    let material = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let n = field("n", &jwk.n)?;
            let e = field("e", &jwk.e)?;
            let n = strip_leading_zeros(n);
            if n.len() < 256 {
                return Err(format!("RSA key of {} bits is too short", n.len() * 8));
            }
            Material::Rsa { n, e }
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (x, y) = (field("x", &jwk.x)?, field("y", &jwk.y)?);
            let half = if crv == "P-256" { 32 } else { 48 };
            if x.len() != half || y.len() != half {
                return Err(format!("{crv} coordinates must be {half} bytes"));
            }
            let point = [&[4u8][..], &x, &y].concat();
            if crv == "P-256" {
                Material::P256(point)
            } else {
                Material::P384(point)
            }
        }
        ("OKP", Some("Ed25519")) => {
            let x = field("x", &jwk.x)?;
            if x.len() != 32 {
                return Err("Ed25519 key must be 32 bytes".into());
            }
            Material::Ed25519(x)
        }
        (kty, crv) => {
            return Err(format!(
                "unsupported key type {kty}{}",
                crv.map(|c| format!(" ({c})")).unwrap_or_default()
            ));
        }
    };
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(name) => Some(Alg::parse(name).ok_or_else(|| format!("unsupported alg {name}"))?),
    };
    let key = PublicKey {
        kid: jwk.kid,
        alg,
        material,
        retire_at: None,
    };
    if let Some(alg) = alg
        && !key.allows(alg)
    {
        return Err(format!("alg {} does not fit the key type", alg.name()));
    }
    Ok(Some(key))
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|&&b| b == 0).count();
    v.drain(..zeros);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_fix_their_algorithms() {
        let (keys, skipped) = parse_jwks(
            br#"{"keys":[
              {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
              {"kty":"oct","k":"c2VjcmV0"},
              {"kty":"EC","crv":"P-256","use":"enc","x":"","y":""},
              {"kty":"OKP","crv":"Ed25519","alg":"ES256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].contains("unsupported key type oct"),
            "{skipped:?}"
        );
        assert!(skipped[1].contains("does not fit"), "{skipped:?}");
        let ed = &keys[0];
        assert!(ed.allows(Alg::EdDsa));
        for alg in [Alg::Es256, Alg::Rs256, Alg::Ps256] {
            assert!(!ed.allows(alg));
        }
        for bad in ["none", "HS256", "HS512", "ES512", ""] {
            assert_eq!(Alg::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn thumbprint_matches_rfc_8037_example() {
        // RFC 8037 appendix A.3.
        let (keys, _) = parse_jwks(
            br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
        )
        .unwrap();
        assert_eq!(
            keys[0].thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn short_rsa_keys_are_refused() {
        let n = URL_SAFE_NO_PAD.encode([0xffu8; 128]);
        let doc = format!(r#"{{"keys":[{{"kty":"RSA","n":"{n}","e":"AQAB"}}]}}"#);
        let (keys, skipped) = parse_jwks(doc.as_bytes()).unwrap();
        assert!(keys.is_empty());
        assert!(skipped[0].contains("1024 bits"), "{skipped:?}");
        assert!(parse_jwks(b"[1]").is_err());
    }
}
