//! Credential checks per request: an endpoint key (constant-time compare against both
//! keys), and tokens from the built-in issuer, both on first sight (signature verified)
//! and on repeat (served from the verified-token cache).
//!
//! Run: `cargo bench --bench auth`.

use std::{
    hint::black_box,
    time::{Duration, SystemTime},
};

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderValue;
use scorefront::{
    config::{AuthConfig, TokenIssuerConfig},
    proxy::auth,
    spec::Auth,
    token::{
        BUILTIN, Verifier,
        issuer::{self, KeyKind, Signer},
    },
};

/// An `Authorization` value carrying `credential`.
fn bearer(credential: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {credential}")).unwrap()
}

fn key_check(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let tokens = Verifier::from_config(&AuthConfig::default()).unwrap();
    let key = Auth::Key {
        primary: "primary-key-0123456789abcdef0123".into(),
        secondary: Some("secondary-key-0123456789abcdef01".into()),
    };
    let good = bearer("secondary-key-0123456789abcdef01");
    c.bench_function("auth/key", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(auth::verify(&key, "ep", black_box(Some(&good)), &tokens).await).unwrap()
        })
    });
}

/// Distinct tokens, more than the cache holds, so cycling through them always verifies.
const UNCACHED: usize = 5000;

fn token_check(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for kind in [KeyKind::Es256, KeyKind::Ed25519] {
        let path = dir.path().join(format!("{kind:?}.pem"));
        std::fs::write(&path, issuer::generate(kind).unwrap()).unwrap();
        let ttl = 10 * 86_400;
        let cfg = AuthConfig {
            token_issuer: Some(TokenIssuerConfig {
                signing_key_file: path.clone(),
                ttl_seconds: ttl,
                issuer: BUILTIN.into(),
            }),
            ..AuthConfig::default()
        };
        let verifier = Verifier::from_config(&cfg).unwrap();
        let signer = Signer::load(&path, BUILTIN.into(), ttl).unwrap();
        let auth = Auth::Token {
            issuers: vec![BUILTIN.into()],
        };
        // Tokens minted a second apart differ in iat, nbf and exp.
        let headers: Vec<HeaderValue> = (0..UNCACHED)
            .map(|i| {
                let at = SystemTime::now() - Duration::from_secs(i as u64);
                bearer(&signer.mint("ep", at).unwrap().access_token)
            })
            .collect();
        let mut next = 0;
        c.bench_function(&format!("auth/token/{kind:?}/verify"), |b| {
            b.to_async(&rt).iter(|| {
                next = (next + 1) % UNCACHED;
                let h = &headers[next];
                let (auth, verifier) = (&auth, &verifier);
                async move { auth::verify(auth, "ep", Some(h), verifier).await.unwrap() }
            })
        });
        c.bench_function(&format!("auth/token/{kind:?}/cached"), |b| {
            b.to_async(&rt).iter(|| async {
                auth::verify(&auth, "ep", Some(&headers[0]), &verifier)
                    .await
                    .unwrap()
            })
        });
    }
}

criterion_group!(benches, key_check, token_check);
criterion_main!(benches);
