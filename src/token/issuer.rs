//! The built-in issuer: short-lived tokens for one endpoint, signed with the router's own
//! ES256 or Ed25519 key (a PKCS#8 PEM file, as `scorefront keys --token-signing` writes
//! it). The key's RFC 7638 thumbprint is the tokens' `kid`.

use std::{path::Path, time::SystemTime};

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
use serde::Serialize;

use super::jwk::PublicKey;

/// Which kind of signing key to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    Es256,
    Ed25519,
}

enum Pair {
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

pub struct Signer {
    pair: Pair,
    rng: SystemRandom,
    /// The `iss` claim of the tokens.
    pub issuer: String,
    pub ttl_seconds: u64,
    pub public: PublicKey,
    /// `base64url(header) + "."`, the same for every token.
    header_prefix: String,
}

/// What `scorefront token` prints, shaped like azureml's `get_token` answer.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    /// Epoch seconds after which the token is refused.
    pub expiry_on: u64,
    /// Epoch seconds after which a client should fetch a new token.
    pub refresh_after: u64,
}

/// A fresh PKCS#8 PEM private key.
pub fn generate(kind: KeyKind) -> anyhow::Result<String> {
    let rng = SystemRandom::new();
    let failed = |_| anyhow::anyhow!("could not generate a key");
    let der = match kind {
        KeyKind::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(failed)?
            .as_ref()
            .to_vec(),
        KeyKind::Ed25519 => ed25519_pkcs8_v1(
            Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(failed)?
                .as_ref(),
        )?,
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

/// ring makes Ed25519 keys as PKCS#8 v2 (RFC 5958: the seed and the public key), which
/// OpenSSL 3.0 cannot read; the key file is written as v1 (RFC 8410: the seed alone), which
/// OpenSSL, other JWT libraries and ring all read.
fn ed25519_pkcs8_v1(v2: &[u8]) -> anyhow::Result<Vec<u8>> {
    /// `SEQUENCE { INTEGER 1, { id-Ed25519 }, OCTET STRING { OCTET STRING (32) ...`
    const V2: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    /// The same with version 0 and nothing after the seed.
    const V1: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    match v2.strip_prefix(&V2[..]) {
        Some(rest) if rest.len() >= 32 => Ok([&V1[..], &rest[..32]].concat()),
        _ => bail!("unexpected Ed25519 PKCS#8 layout"),
    }
}

impl Signer {
    pub fn load(path: &Path, issuer: String, ttl_seconds: u64) -> anyhow::Result<Signer> {
        let der = PrivatePkcs8KeyDer::from_pem_file(path).with_context(|| {
            format!(
                "{}: not a PKCS#8 PEM private key ('-----BEGIN PRIVATE KEY-----'); \
                 'scorefront keys --token-signing es256' writes one",
                path.display()
            )
        })?;
        let rng = SystemRandom::new();
        let der = der.secret_pkcs8_der();
        let (pair, public, alg) =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
                let public = PublicKey::p256(k.public_key().as_ref());
                (Pair::Es256(k), public, "ES256")
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                let public = PublicKey::ed25519(k.public_key().as_ref());
                (Pair::Ed25519(k), public, "EdDSA")
            } else {
                bail!(
                    "{}: the token signing key must be an ECDSA P-256 or an Ed25519 key",
                    path.display()
                );
            };
        let mut public = public;
        let kid = public.thumbprint();
        public.kid = Some(kid.clone());
        let header = format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#);
        Ok(Signer {
            pair,
            rng,
            issuer,
            ttl_seconds,
            public,
            header_prefix: format!("{}.", URL_SAFE_NO_PAD.encode(header)),
        })
    }

    /// A token for `endpoint`, valid from `now` for the configured lifetime.
    pub fn mint(&self, endpoint: &str, now: SystemTime) -> anyhow::Result<TokenResponse> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .context("clock is before 1970")?
            .as_secs();
        let exp = iat + self.ttl_seconds;
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": endpoint,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
        });
        let mut token = self.header_prefix.clone();
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut token);
        let signature = match &self.pair {
            Pair::Es256(k) => k
                .sign(&self.rng, token.as_bytes())
                .map_err(|_| anyhow::anyhow!("signing failed"))?
                .as_ref()
                .to_vec(),
            Pair::Ed25519(k) => k.sign(token.as_bytes()).as_ref().to_vec(),
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(TokenResponse {
            access_token: token,
            token_type: "Bearer".into(),
            expiry_on: exp,
            refresh_after: iat + self.ttl_seconds / 2,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_pkcs8_v1_and_load() {
        for kind in [KeyKind::Es256, KeyKind::Ed25519] {
            let pem = generate(kind).unwrap();
            let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
            let der = der.secret_pkcs8_der();
            // SEQUENCE { INTEGER 0 (v1), ... (a long-form length for the P-256 key)
            let version = if der[1] & 0x80 == 0 { 2 } else { 3 };
            assert_eq!(der[version..version + 3], [0x02, 0x01, 0x00], "{kind:?}");
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &pem).unwrap();
            let signer = Signer::load(file.path(), "iss".into(), 60).unwrap();
            let token = signer.mint("ep", SystemTime::now()).unwrap();
            assert_eq!(token.access_token.split('.').count(), 3);
        }
    }
}
