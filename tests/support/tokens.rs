//! Test token issuers: signing keys made at test time, JWTs signed with them, and a JWKS
//! served by a local HTTP server.
//!
//! Keys: ECDSA (P-256, P-384) and Ed25519 come from ring's `generate_pkcs8`; the RSA key
//! (2048 bits) from the `openssl` command, made once per test binary and shared by every
//! [`TestKey::rsa`], since making one takes a noticeable fraction of a second.
//!
//! [`JwtKey`]: keys and tokens of an independent JWT implementation (the `jsonwebtoken`
//! crate, on openssl-made keys), to cross-check scorefront's verifier and issuer.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------
// Keys

enum Pair {
    /// Shared by every RSA test key of the binary.
    Rsa(&'static RsaKeyPair),
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// One signing key and the `kid` its JWK is published under.
pub struct TestKey {
    pub kid: String,
    pair: Pair,
    /// The PKCS#8 document (not kept for the shared RSA key).
    pkcs8: Option<Vec<u8>>,
}

/// A private key made by `openssl genpkey` with `args`, as PKCS#8 PEM.
pub fn openssl_key(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl genpkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A fresh 2048-bit RSA private key (PKCS#8 PEM).
pub fn openssl_rsa() -> Vec<u8> {
    openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
}

/// The binary's 2048-bit RSA private key (PKCS#8 PEM), made once.
pub fn shared_rsa_pem() -> &'static [u8] {
    static PEM: OnceLock<Vec<u8>> = OnceLock::new();
    PEM.get_or_init(openssl_rsa)
}

/// The binary's RSA key, parsed by ring.
fn shared_rsa() -> &'static RsaKeyPair {
    static KEY: OnceLock<RsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(shared_rsa_pem()).expect("PKCS#8 PEM from openssl");
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("ring takes the RSA key")
    })
}

impl TestKey {
    /// The binary's shared 2048-bit RSA key under `kid`.
    pub fn rsa(kid: &str) -> TestKey {
        TestKey {
            kid: kid.into(),
            pair: Pair::Rsa(shared_rsa()),
            pkcs8: None,
        }
    }

    pub fn p256(kid: &str) -> TestKey {
        Self::ecdsa(kid, true)
    }

    pub fn p384(kid: &str) -> TestKey {
        Self::ecdsa(kid, false)
    }

    fn ecdsa(kid: &str, p256: bool) -> TestKey {
        let alg = if p256 {
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING
        } else {
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING
        };
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap();
        let pair = if p256 {
            Pair::P256(pair)
        } else {
            Pair::P384(pair)
        };
        TestKey {
            kid: kid.into(),
            pair,
            pkcs8: Some(doc.as_ref().to_vec()),
        }
    }

    pub fn ed25519(kid: &str) -> TestKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        TestKey {
            kid: kid.into(),
            pair: Pair::Ed25519(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()),
            pkcs8: Some(doc.as_ref().to_vec()),
        }
    }

    /// A P-256 or Ed25519 key from a PKCS#8 PEM file's text (as `scorefront keys
    /// --token-signing` writes it), under its RFC 7638 thumbprint as `kid`.
    pub fn from_pkcs8_pem(pem: &[u8]) -> TestKey {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).expect("PKCS#8 PEM");
        let der = der.secret_pkcs8_der();
        let rng = SystemRandom::new();
        let pair = match EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &rng,
        ) {
            Ok(k) => Pair::P256(k),
            Err(_) => Pair::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).unwrap()),
        };
        let mut key = TestKey {
            kid: String::new(),
            pair,
            pkcs8: Some(der.to_vec()),
        };
        key.kid = key.thumbprint();
        key
    }

    /// The private key as PKCS#8 PEM, for `auth.tokenIssuer.signingKeyFile`.
    pub fn pkcs8_pem(&self) -> String {
        let der = self.pkcs8.as_ref().expect("no PKCS#8 kept for the RSA key");
        let b64 = STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The public key's bytes as ring gives them: the PKCS#1 `RSAPublicKey` DER for RSA,
    /// the uncompressed SEC1 point for ECDSA, the 32 bytes for Ed25519.
    pub fn public_bytes(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(k) => k.public().as_ref().to_vec(),
            Pair::P256(k) | Pair::P384(k) => k.public_key().as_ref().to_vec(),
            Pair::Ed25519(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// The JWK members that define the key (no `kid`, `alg` or `use`).
    fn jwk_core(&self) -> Value {
        match &self.pair {
            Pair::Rsa(k) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Pair::P256(_) | Pair::P384(_) => {
                let point = self.public_bytes();
                let half = (point.len() - 1) / 2;
                let crv = if half == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "x": b64(&point[1..1 + half]),
                       "y": b64(&point[1 + half..])})
            }
            Pair::Ed25519(k) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key())}),
        }
    }

    /// The public JWK with `kid` and `use: sig`.
    pub fn jwk(&self) -> Value {
        self.jwk_with(json!({}))
    }

    /// The public JWK with `kid`, `use: sig` and the members of `extra` (which win).
    pub fn jwk_with(&self, extra: Value) -> Value {
        let mut v = self.jwk_core();
        let m = v.as_object_mut().unwrap();
        m.insert("kid".into(), json!(self.kid));
        m.insert("use".into(), json!("sig"));
        for (k, val) in extra.as_object().expect("extra is an object") {
            m.insert(k.clone(), val.clone());
        }
        v
    }

    /// The RFC 7638 thumbprint (the `kid` scorefront gives its own key).
    pub fn thumbprint(&self) -> String {
        // The required members in lexicographic order, no whitespace (RFC 7638 3.2).
        let core = self.jwk_core();
        let s = |name: &str| core[name].as_str().unwrap().to_owned();
        let canonical = match s("kty").as_str() {
            "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e"), s("n")),
            "EC" => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                s("crv"),
                s("x"),
                s("y")
            ),
            _ => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv"), s("x")),
        };
        b64(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    /// Signs `message` with `alg` (which must fit the key).
    pub fn sign_bytes(&self, alg: &str, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    other => panic!("an RSA key does not sign {other}"),
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, message, &mut sig).unwrap();
                sig
            }
            Pair::P256(k) | Pair::P384(k) => k.sign(&rng, message).unwrap().as_ref().to_vec(),
            Pair::Ed25519(k) => k.sign(message).as_ref().to_vec(),
        }
    }

    /// The algorithm this key signs with by default.
    pub fn default_alg(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::P256(_) => "ES256",
            Pair::P384(_) => "ES384",
            Pair::Ed25519(_) => "EdDSA",
        }
    }

    /// A compact JWS: header `{"alg", "typ": "JWT", "kid"?}` plus `header_extra`'s members
    /// (which win, so they may also replace `alg` or `typ`), `claims`, signed with this key.
    pub fn sign(&self, alg: &str, kid: Option<&str>, header_extra: Value, claims: Value) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        let h = header.as_object_mut().unwrap();
        if let Some(kid) = kid {
            h.insert("kid".into(), json!(kid));
        }
        for (k, v) in header_extra.as_object().expect("header_extra is an object") {
            h.insert(k.clone(), v.clone());
        }
        let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = self.sign_bytes(alg, signed.as_bytes());
        format!("{signed}.{}", b64(sig))
    }
}

/// `{"keys": [...]}` of the public JWKs of `keys`.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

// ---------------------------------------------------------------------------------------
// Issuers

/// An external (OIDC) issuer: an `iss`, an audience its tokens name, and one key of each
/// kind, with kids `{prefix}-rsa`, `{prefix}-p256`, `{prefix}-p384` and `{prefix}-ed`.
pub struct TestIssuer {
    pub iss: String,
    pub audience: String,
    pub rsa: TestKey,
    pub p256: TestKey,
    pub p384: TestKey,
    pub ed25519: TestKey,
}

impl TestIssuer {
    pub fn new(iss: &str, audience: &str, kid_prefix: &str) -> TestIssuer {
        TestIssuer {
            iss: iss.into(),
            audience: audience.into(),
            rsa: TestKey::rsa(&format!("{kid_prefix}-rsa")),
            p256: TestKey::p256(&format!("{kid_prefix}-p256")),
            p384: TestKey::p384(&format!("{kid_prefix}-p384")),
            ed25519: TestKey::ed25519(&format!("{kid_prefix}-ed")),
        }
    }

    pub fn keys(&self) -> [&TestKey; 4] {
        [&self.rsa, &self.p256, &self.p384, &self.ed25519]
    }

    /// The JWKS publishing all four public keys.
    pub fn jwks(&self) -> Value {
        jwks(&self.keys())
    }

    /// The key that signs `alg`.
    pub fn key_for(&self, alg: &str) -> &TestKey {
        match alg {
            "ES256" => &self.p256,
            "ES384" => &self.p384,
            "EdDSA" => &self.ed25519,
            a if a.starts_with("RS") || a.starts_with("PS") => &self.rsa,
            other => panic!("no test key signs {other}"),
        }
    }

    /// Claims that pass: this issuer, its audience, valid from 10 s ago for 5 minutes, and
    /// a fresh `jti` so no two tokens are alike.
    pub fn claims(&self) -> Value {
        static JTI: AtomicUsize = AtomicUsize::new(0);
        let now = now();
        json!({
            "iss": self.iss,
            "aud": self.audience,
            "sub": "test-client",
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + 300,
            "jti": format!("jti-{}", JTI.fetch_add(1, SeqCst)),
        })
    }

    /// [`TestIssuer::claims`] with the members of `changes` set (a `null` removes one).
    pub fn claims_with(&self, changes: Value) -> Value {
        let mut c = self.claims();
        let m = c.as_object_mut().unwrap();
        for (k, v) in changes.as_object().expect("changes is an object") {
            if v.is_null() {
                m.remove(k);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
        c
    }

    /// A compact JWS signed with the key for `alg`, naming `kid` (if any) in its header.
    pub fn sign(&self, alg: &str, kid: Option<&str>, header_extra: Value, claims: Value) -> String {
        self.key_for(alg).sign(alg, kid, header_extra, claims)
    }

    /// A valid token signed with `alg`, naming its key's kid.
    pub fn token(&self, alg: &str) -> String {
        let key = self.key_for(alg);
        key.sign(alg, Some(&key.kid), json!({}), self.claims())
    }
}

// ---------------------------------------------------------------------------------------
// Bad tokens

/// An unsecured JWS: `alg: none` and an empty signature.
pub fn alg_none(kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": "none", "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    format!("{}.{}.", b64(header.to_string()), b64(claims.to_string()))
}

/// An HS256 token MACed with `secret`: the classic key-confusion attack when `secret` is
/// the verifier's public key (its JWK text or its DER).
pub fn hs256(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64(tag.as_ref()))
}

/// `token` with its claims replaced by `claims`, the header and signature kept.
pub fn tamper_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    format!("{}.{}.{}", parts[0], b64(claims.to_string()), parts[2])
}

/// `token` with one bit of its signature flipped.
pub fn tamper_signature(token: &str) -> String {
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let mid = sig.len() / 2;
    sig[mid] ^= 0x01;
    format!("{signed}.{}", b64(sig))
}

/// The decoded header of a compact JWS.
pub fn header_of(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

/// The decoded claims of a compact JWS.
pub fn claims_of(token: &str) -> Value {
    let c = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// Endpoint documents

/// An `authMode: token` endpoint `name` with one version `blue` on `replicas`, trusting
/// `issuers` (`None`: no `tokenIssuers`, so the built-in issuer only).
pub fn token_endpoint(name: &str, issuers: Option<&[&str]>, replicas: &[SocketAddr]) -> String {
    let issuers = issuers
        .map(|list| format!("  tokenIssuers: [{}]\n", list.join(", ")))
        .unwrap_or_default();
    format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: {name}}}\n\
         spec:\n  authMode: token\n{issuers}  versions: [{}]\n",
        super::version("blue", replicas, "")
    )
}

// ---------------------------------------------------------------------------------------
// A JWKS over HTTP

/// What the [`JwksServer`] does with the next request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(String),
    /// This status and a short text body.
    Status(u16),
    /// Accept the connection and close it without reading or answering.
    Close,
}

struct JwksState {
    reply: Mutex<Reply>,
    fetches: AtomicUsize,
    paths: Mutex<Vec<String>>,
}

/// A small HTTP/1.1 server on `127.0.0.1:0` that answers every GET with the JWKS (or the
/// failure) set at the moment, and counts what it was asked: each request, and each
/// connection it closed unanswered, is one fetch.
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<JwksState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub async fn start(jwks: &Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(JwksState {
            reply: Mutex::new(Reply::Json(jwks.to_string())),
            fetches: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                if matches!(*st.reply.lock().unwrap(), Reply::Close) {
                    st.fetches.fetch_add(1, SeqCst);
                    drop(stream);
                    continue;
                }
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| serve_jwks(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, state, task }
    }

    /// `http://ADDR/keys`.
    pub fn url(&self) -> String {
        format!("http://{}/keys", self.addr)
    }

    /// Serves `jwks` from the next request on.
    pub fn set_jwks(&self, jwks: &Value) {
        self.set_reply(Reply::Json(jwks.to_string()));
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }

    /// Requests answered plus connections closed unanswered.
    pub fn fetches(&self) -> usize {
        self.state.fetches.load(SeqCst)
    }

    /// The targets of the requests received, in order.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }
}

async fn serve_jwks(
    st: Arc<JwksState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    st.fetches.fetch_add(1, SeqCst);
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    st.paths.lock().unwrap().push(target);
    let reply = st.reply.lock().unwrap().clone();
    let resp = match reply {
        Reply::Json(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body))),
        Reply::Status(s) => Response::builder()
            .status(StatusCode::from_u16(s).unwrap())
            .body(Full::new(Bytes::from_static(b"failing on purpose"))),
        // Only reached by a request on a connection accepted before the switch.
        Reply::Close => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("connection", "close")
            .body(Full::new(Bytes::new())),
    };
    Ok(resp.unwrap())
}

// ---------------------------------------------------------------------------------------
// An independent implementation

/// A signing key of the `jsonwebtoken` crate for one algorithm, under `kid`, with the
/// public JWK that crate derives from it.
pub struct JwtKey {
    pub alg: jsonwebtoken::Algorithm,
    pub kid: String,
    key: jsonwebtoken::EncodingKey,
    pub jwk: jsonwebtoken::jwk::Jwk,
}

impl JwtKey {
    /// One key per algorithm scorefront accepts, on openssl-made keys (the RSA algorithms
    /// share `rsa_pem`), with kids `{prefix}-{alg}`.
    pub fn every_accepted_alg(prefix: &str, rsa_pem: &[u8]) -> Vec<JwtKey> {
        use jsonwebtoken::{Algorithm::*, EncodingKey};
        let p256 = openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let p384 = openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
        let ed = openssl_key(&["-algorithm", "ED25519"]);
        let rsa = EncodingKey::from_rsa_pem(rsa_pem).expect("jsonwebtoken reads RSA");
        let mut keys: Vec<JwtKey> = [RS256, RS384, RS512, PS256, PS384, PS512]
            .into_iter()
            .map(|alg| JwtKey::new(alg, prefix, rsa.clone()))
            .collect();
        keys.push(JwtKey::new(
            ES256,
            prefix,
            EncodingKey::from_ec_pem(&p256).unwrap(),
        ));
        keys.push(JwtKey::new(
            ES384,
            prefix,
            EncodingKey::from_ec_pem(&p384).unwrap(),
        ));
        keys.push(JwtKey::new(
            EdDSA,
            prefix,
            EncodingKey::from_ed_pem(&ed).unwrap(),
        ));
        keys
    }

    fn new(alg: jsonwebtoken::Algorithm, prefix: &str, key: jsonwebtoken::EncodingKey) -> JwtKey {
        let kid = format!("{prefix}-{alg:?}");
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg)
            .expect("jsonwebtoken derives the public JWK");
        jwk.common.key_id = Some(kid.clone());
        JwtKey { alg, kid, key, jwk }
    }

    /// A token of `claims` signed by jsonwebtoken, naming `kid` in its header.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key).expect("jsonwebtoken signs")
    }

    /// A token of `claims` signed by jsonwebtoken under this key's kid.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

/// The JWKS (as jsonwebtoken writes it) publishing `keys`.
pub fn jwt_jwks(keys: &[JwtKey]) -> String {
    let set = jsonwebtoken::jwk::JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).unwrap()
}
