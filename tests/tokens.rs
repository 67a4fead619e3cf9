//! Token (JWT) authentication over real sockets: `authMode: token` endpoints behind a
//! router whose OIDC issuers publish their keys from a local JWKS server (or a file), and
//! the built-in issuer whose tokens the real binary mints. What is accepted, what is
//! refused (401, `WWW-Authenticate: Bearer error="invalid_token"`, the reason counted, the
//! model never reached), key rotation and refetch limits, stale keys kept through JWKS
//! failures, and the config errors around it all.

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use support::{tokens::*, *};

const IDP_ISS: &str = "https://idp.example.test/tenant/v2.0";
const IDP_AUD: &str = "api://scorefront";
const AUTH_FAILURES: &str = "scorefront_auth_failures_total";

// ---------------------------------------------------------------------------------------
// Helpers

/// One `auth.oidc` entry as a YAML flow mapping; `extra` holds further fields.
fn oidc(name: &str, iss: &str, source: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!("{{name: {name}, issuer: '{iss}', audiences: ['{IDP_AUD}'], {source}{sep}{extra}}}")
}

/// A router config with an `auth` section: `token_issuer` is the flow mapping of
/// `auth.tokenIssuer` (if any), `oidc` the entries of `auth.oidc`.
fn auth_config(token_issuer: Option<&str>, oidc: &[String]) -> String {
    let mut auth = String::from("auth:\n  leewaySeconds: 60\n");
    if let Some(ti) = token_issuer {
        auth += &format!("  tokenIssuer: {ti}\n");
    }
    if !oidc.is_empty() {
        auth += &format!("  oidc: [{}]\n", oidc.join(", "));
    }
    router_config(&auth)
}

/// A scoring POST to `endpoint` with `Authorization: Bearer {token}`, or with no
/// `Authorization` at all.
async fn call(
    router: &Router,
    endpoint: &str,
    token: Option<&str>,
) -> (http::response::Parts, Bytes) {
    let url = router.url(&format!("/api/v1/endpoint/{endpoint}/score"));
    let req = match token {
        Some(t) => scoring_post(&url, t, &[], "{}"),
        None => Request::post(url).body(body("{}")).unwrap(),
    };
    send(req).await
}

/// Sends `token` to `endpoint` and asserts the model answered.
async fn accepted(router: &Router, endpoint: &str, token: &str, what: &str) {
    let (parts, body) = call(router, endpoint, Some(token)).await;
    assert_eq!(
        parts.status,
        200,
        "{what}: {}\n{token}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(model_of(&body), "m", "{what}");
}

fn auth_failures(metrics: &str, endpoint: &str, reason: &str) -> f64 {
    metric(
        metrics,
        AUTH_FAILURES,
        &[("endpoint", endpoint), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Sends `token` (or no credential) to `endpoint` and asserts the router refused it: 401,
/// the `WWW-Authenticate` of the endpoint's mode, the `Unauthorized` body that tells the
/// client nothing about why, and one more `scorefront_auth_failures_total{endpoint,
/// reason}`.
async fn refused(
    router: &Router,
    endpoint: &str,
    token: Option<&str>,
    reason: &str,
    token_mode: bool,
    what: &str,
) {
    let before = auth_failures(&router.metrics().await, endpoint, reason);
    let (parts, body) = call(router, endpoint, token).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(parts.status, 401, "{what}: {text}\n{token:?}");
    let challenge = parts
        .headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap());
    let want = if token_mode {
        r#"Bearer error="invalid_token""#
    } else {
        "Bearer"
    };
    assert_eq!(challenge, Some(want), "{what}");
    assert_eq!(error_code(&body), "Unauthorized", "{what}: {text}");
    let message = json(&body)["error"]["message"].as_str().unwrap().to_owned();
    // The same words whatever the reason: the client is never told why.
    let kind = if token_mode { "token" } else { "key" };
    assert_eq!(
        message,
        format!("missing or invalid credential; send 'Authorization: Bearer <{kind}>'"),
        "{what}"
    );
    let after = auth_failures(&router.metrics().await, endpoint, reason);
    assert_eq!(
        after,
        before + 1.0,
        "{what}: {AUTH_FAILURES}{{endpoint={endpoint},reason={reason}}}\n{}",
        router.metrics().await
    );
}

async fn mint(config: &Path, endpoint: &str) -> (Option<i32>, String, String) {
    run_scorefront(&[
        "token".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--endpoint".as_ref(),
        endpoint.as_ref(),
    ])
    .await
}

/// A router with one endpoint, `scoring`, that trusts only the OIDC issuer `idp` whose keys
/// `server` publishes; `settings` are more fields of that issuer.
async fn idp_router(server: &JwksServer, settings: &str, model: &Model) -> Router {
    let issuer = oidc(
        "idp",
        IDP_ISS,
        &format!("jwksUri: '{}'", server.url()),
        settings,
    );
    Router::try_start(
        &auth_config(None, &[issuer]),
        &token_endpoint("scoring", Some(&["idp"]), &[model.addr]),
        &[],
        false,
    )
    .await
    .expect("router starts")
}

/// Waits until `server` has been asked at least `n` times.
async fn fetched(server: &JwksServer, n: usize, what: &str) {
    until(what, Patience::LONG, || server.fetches() >= n).await;
}

// ---------------------------------------------------------------------------------------
// Accepted

#[tokio::test]
async fn oidc_tokens_of_every_allowed_algorithm_are_accepted() {
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "k1");
    let server = JwksServer::start(&idp.jwks()).await;
    let model = Model::start("m").await;
    let router = idp_router(&server, "", &model).await;
    assert_eq!(server.fetches(), 1, "keys are fetched once at start");
    assert_eq!(server.paths(), ["/keys"]);

    let mut sent = 0;
    for alg in [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ] {
        accepted(&router, "scoring", &idp.token(alg), alg).await;
        sent += 1;
    }
    // No kid: every key of the issuer that fits the algorithm is tried.
    for alg in ["RS256", "PS256", "ES256", "EdDSA"] {
        let token = idp.sign(alg, None, json!({}), idp.claims());
        accepted(&router, "scoring", &token, &format!("{alg} without kid")).await;
        sent += 1;
    }
    // `aud` as a list naming one of the issuer's audiences; fractional times.
    let now = now() as f64;
    let claims = idp.claims_with(json!({
        "aud": ["api://something-else", IDP_AUD],
        "exp": now + 60.5,
        "nbf": now - 0.5,
    }));
    accepted(
        &router,
        "scoring",
        &idp.sign("ES256", Some("k1-p256"), json!({}), claims),
        "aud list",
    )
    .await;
    sent += 1;
    // The same token again (from the verifier's cache), with the scheme in lower case.
    let token = idp.token("EdDSA");
    accepted(&router, "scoring", &token, "first use").await;
    let url = router.url("/api/v1/endpoint/scoring/score");
    let req = Request::post(&url)
        .header("authorization", format!("bearer {token}"))
        .body(body("{}"))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 200, "{body:?}");
    sent += 2;

    assert_eq!(model.requests(), sent);
    assert!(
        model.last_headers().get("authorization").is_none(),
        "the token is not forwarded to the model"
    );
    assert_eq!(server.fetches(), 1, "known kids never cause a refetch");
    let metrics = router.metrics().await;
    assert_eq!(
        metric(&metrics, AUTH_FAILURES, &[("endpoint", "scoring")]),
        None,
        "{metrics}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn builtin_tokens_minted_by_the_binary_with_a_key_it_made_are_accepted() {
    // `scorefront keys --token-signing ed25519 --out FILE` writes a new 0600 key file ...
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("signing.pem");
    let keys_cmd = |path: &Path| {
        let path = path.as_os_str().to_owned();
        async move {
            run_scorefront(&[
                "keys".as_ref(),
                "--token-signing".as_ref(),
                "ed25519".as_ref(),
                "--out".as_ref(),
                &path,
            ])
            .await
        }
    };
    let (code, stdout, stderr) = keys_cmd(&key_path).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty(), "the key goes to the file only: {stdout}");
    let pem = std::fs::read(&key_path).unwrap();
    assert!(pem.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // ... and refuses to overwrite one.
    let (code, _, stderr) = keys_cmd(&key_path).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot create"), "{stderr}");
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        pem,
        "the key file is unchanged"
    );
    let key = TestKey::from_pkcs8_pem(&pem);
    assert_eq!(key.default_alg(), "EdDSA");

    let model = Model::start("m").await;
    let endpoints = [
        token_endpoint("scoring", None, &[model.addr]),
        token_endpoint("other", Some(&["scorefront"]), &[model.addr]),
        one_version("keyed", &[model.addr], ""),
    ]
    .join("---\n");
    let config = auth_config(
        Some("{signingKeyFile: token-signing.pem, ttlSeconds: 600}"),
        &[],
    );
    let router = Router::try_start(&config, &endpoints, &[("token-signing.pem", &pem)], false)
        .await
        .expect("router starts");
    let config_path = router.path("scorefront.yaml");

    // `scorefront token` prints {accessToken, tokenType, expiryOn, refreshAfter}.
    let t0 = now();
    let (code, stdout, stderr) = mint(&config_path, "scoring").await;
    let t1 = now();
    assert_eq!(code, Some(0), "{stderr}");
    let answer: Value = serde_json::from_str(stdout.trim()).expect("JSON on stdout");
    let mut fields: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["accessToken", "expiryOn", "refreshAfter", "tokenType"],
        "{answer}"
    );
    assert_eq!(answer["tokenType"], "Bearer");
    let expiry = answer["expiryOn"]
        .as_u64()
        .expect("expiryOn is epoch seconds");
    let refresh = answer["refreshAfter"]
        .as_u64()
        .expect("refreshAfter is epoch seconds");
    assert!(
        (t0 + 600..=t1 + 600).contains(&expiry),
        "expiryOn {expiry} is not now + ttl ({t0}..{t1} + 600)"
    );
    assert!(
        refresh >= t0 && refresh + 150 <= expiry,
        "refreshAfter {refresh} is not well before expiryOn {expiry}"
    );
    let token = answer["accessToken"].as_str().unwrap().to_owned();
    let header = header_of(&token);
    assert_eq!(header["alg"], "EdDSA", "{header}");
    assert_eq!(
        header["kid"],
        key.kid.as_str(),
        "kid is the key's RFC 7638 thumbprint"
    );
    let claims = claims_of(&token);
    assert_eq!(claims["iss"], "scorefront", "{claims}");
    assert_eq!(claims["aud"], "scoring", "{claims}");
    assert_eq!(claims["exp"].as_u64(), Some(expiry), "{claims}");

    accepted(&router, "scoring", &token, "minted by the binary").await;
    accepted(&router, "scoring", &token, "minted by the binary, again").await;
    // A token made with the same key here verifies too: the file is the signing key.
    let own = key.sign(
        "EdDSA",
        Some(&key.kid),
        json!({}),
        json!({"iss": "scorefront", "aud": "scoring", "exp": now() + 60}),
    );
    accepted(&router, "scoring", &own, "signed with the key file").await;

    // Another endpoint's token is refused here, and accepted there.
    let (code, stdout, stderr) = mint(&config_path, "other").await;
    assert_eq!(code, Some(0), "{stderr}");
    let other: Value = serde_json::from_str(stdout.trim()).unwrap();
    let other = other["accessToken"].as_str().unwrap();
    refused(
        &router,
        "scoring",
        Some(other),
        "wrong_audience",
        true,
        "other's token",
    )
    .await;
    accepted(&router, "other", other, "other's token at other").await;

    // Minting is refused for endpoints that take no built-in tokens.
    let (code, _, stderr) = mint(&config_path, "keyed").await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("does not take tokens"), "{stderr}");
    let (code, _, stderr) = mint(&config_path, "nope").await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no endpoint named nope"), "{stderr}");

    assert_eq!(model.requests(), 4);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Refused

#[tokio::test]
async fn refused_credentials_get_401_invalid_token_and_count_their_reason() {
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "k1");
    // The same RSA key once more, restricted by its JWK to RS256.
    let mut keys = idp.jwks();
    keys["keys"].as_array_mut().unwrap().push(
        idp.rsa
            .jwk_with(json!({"kid": "k1-rsa-rs256", "alg": "RS256"})),
    );
    let server = JwksServer::start(&keys).await;
    // An attacker's keys, served where the attacker's headers point. The attacker's P-256
    // key claims the kid of the issuer's.
    let evil = TestKey::p256("k1-p256");
    let evil_ed = TestKey::ed25519("evil-ed");
    let attacker = JwksServer::start(&jwks(&[&evil, &evil_ed])).await;

    let builtin = TestKey::p256("builtin");
    let model = Model::start("m").await;
    let endpoints = [
        token_endpoint("scoring", Some(&["scorefront", "idp"]), &[model.addr]),
        token_endpoint("other", None, &[model.addr]),
        one_version("keyed", &[model.addr], ""),
    ]
    .join("---\n");
    let config = auth_config(
        Some("{signingKeyFile: token-signing.pem}"),
        &[oidc(
            "idp",
            IDP_ISS,
            &format!("jwksUri: '{}'", server.url()),
            "minRefetchSeconds: 1",
        )],
    );
    let pem = builtin.pkcs8_pem();
    let router = Router::try_start(
        &config,
        &endpoints,
        &[("token-signing.pem", pem.as_bytes())],
        false,
    )
    .await
    .expect("router starts");

    let now = now();
    let c = |changes: Value| idp.claims_with(changes);
    let es = |claims: Value| idp.sign("ES256", Some("k1-p256"), json!({}), claims);
    let builtin_token = |aud: &str| {
        builtin.sign(
            "ES256",
            Some(&builtin.thumbprint()),
            json!({}),
            json!({"iss": "scorefront", "aud": aud, "nbf": now, "exp": now + 300}),
        )
    };

    // Accepted, to show what the refusals below differ in.
    let mut passed = 0;
    for (what, token) in [
        ("valid", es(c(json!({})))),
        (
            "expired, but within the leeway",
            es(c(
                json!({"exp": now - 20, "nbf": now - 100, "iat": now - 100}),
            )),
        ),
        (
            "not yet valid, but within the leeway",
            es(c(json!({"nbf": now + 20}))),
        ),
        ("built-in token for this endpoint", builtin_token("scoring")),
        ("unrecognised jku header", {
            idp.sign(
                "ES256",
                Some("k1-p256"),
                json!({"jku": attacker.url()}),
                c(json!({})),
            )
        }),
    ] {
        accepted(&router, "scoring", &token, what).await;
        passed += 1;
    }

    let valid = es(c(json!({})));
    let rsa_der = idp.rsa.public_bytes();
    let rsa_jwk = idp.rsa.jwk().to_string();
    let p256_point = idp.p256.public_bytes();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired beyond the leeway",
            es(c(json!({"exp": now - 120, "nbf": now - 600, "iat": now - 600}))),
            "expired",
        ),
        (
            "not yet valid",
            es(c(json!({"nbf": now + 300, "exp": now + 600}))),
            "not_yet_valid",
        ),
        ("no exp", es(c(json!({"exp": null}))), "missing_exp"),
        (
            "another issuer",
            es(c(json!({"iss": "https://evil.example.test/"}))),
            "untrusted_issuer",
        ),
        ("no iss", es(c(json!({"iss": null}))), "untrusted_issuer"),
        (
            "another audience",
            es(c(json!({"aud": "api://other"}))),
            "wrong_audience",
        ),
        (
            "audience list without ours",
            es(c(json!({"aud": ["api://a", "api://b"]}))),
            "wrong_audience",
        ),
        ("no aud", es(c(json!({"aud": null}))), "wrong_audience"),
        (
            "OIDC token naming the endpoint rather than the issuer's audience",
            es(c(json!({"aud": "scoring"}))),
            "wrong_audience",
        ),
        (
            "built-in token of another endpoint",
            builtin_token("other"),
            "wrong_audience",
        ),
        (
            "built-in token naming an unknown kid",
            builtin.sign(
                "ES256",
                Some("k1-p256"),
                json!({}),
                json!({"iss": "scorefront", "aud": "scoring", "exp": now + 300}),
            ),
            "unknown_kid",
        ),
        (
            "alg none",
            alg_none(Some("k1-p256"), &c(json!({}))),
            "unsupported_alg",
        ),
        (
            "alg none without kid",
            alg_none(None, &c(json!({}))),
            "unsupported_alg",
        ),
        (
            "HS256 keyed with the RSA public key's JWK",
            hs256(rsa_jwk.as_bytes(), Some("k1-rsa"), &c(json!({}))),
            "unsupported_alg",
        ),
        (
            "HS256 keyed with the RSA public key's DER",
            hs256(&rsa_der, Some("k1-rsa"), &c(json!({}))),
            "unsupported_alg",
        ),
        (
            "HS256 keyed with the P-256 public point",
            hs256(&p256_point, None, &c(json!({}))),
            "unsupported_alg",
        ),
        (
            "crit header",
            idp.sign("ES256", Some("k1-p256"), json!({"crit": ["exp"]}), c(json!({}))),
            "unsupported_alg",
        ),
        (
            "tampered payload",
            tamper_payload(&valid, &c(json!({"sub": "admin"}))),
            "bad_signature",
        ),
        (
            "tampered payload extending exp",
            tamper_payload(&valid, &c(json!({"exp": now + 86_400 * 365}))),
            "bad_signature",
        ),
        (
            "tampered ES256 signature",
            tamper_signature(&valid),
            "bad_signature",
        ),
        (
            "tampered RS256 signature",
            tamper_signature(&idp.token("RS256")),
            "bad_signature",
        ),
        (
            "tampered PS256 signature",
            tamper_signature(&idp.token("PS256")),
            "bad_signature",
        ),
        (
            "tampered EdDSA signature",
            tamper_signature(&idp.token("EdDSA")),
            "bad_signature",
        ),
        (
            "tampered signature, no kid",
            tamper_signature(&idp.sign("EdDSA", None, json!({}), c(json!({})))),
            "bad_signature",
        ),
        (
            "P-256 signature claiming ES384",
            idp.p256.sign("ES384", Some("k1-p256"), json!({}), c(json!({}))),
            "bad_signature",
        ),
        (
            "PS256 with a key its JWK restricts to RS256",
            idp.sign("PS256", Some("k1-rsa-rs256"), json!({}), c(json!({}))),
            "bad_signature",
        ),
        (
            "signature of the P-256 key under the Ed25519 key's kid",
            idp.sign("ES256", Some("k1-ed"), json!({}), c(json!({}))),
            "bad_signature",
        ),
        (
            "attacker key under the issuer's kid, jku and x5u to the attacker",
            evil.sign(
                "ES256",
                Some("k1-p256"),
                json!({
                    "jku": attacker.url(),
                    "x5u": format!("http://{}/cert.pem", attacker.addr),
                }),
                c(json!({})),
            ),
            "bad_signature",
        ),
        (
            "attacker key embedded as jwk, no kid",
            evil.sign("ES256", None, json!({"jwk": evil.jwk()}), c(json!({}))),
            "bad_signature",
        ),
        (
            "attacker key embedded as jwk and x5c",
            evil_ed.sign(
                "EdDSA",
                Some("k1-ed"),
                json!({"jwk": evil_ed.jwk(), "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]}),
                c(json!({})),
            ),
            "bad_signature",
        ),
        ("not a JWT", "not-a-jwt".into(), "malformed"),
        ("a key-mode key", KEY.into(), "malformed"),
        (
            "claims not JSON",
            format!("{}.bm90IGpzb24.c2ln", valid.split('.').next().unwrap()),
            "malformed",
        ),
    ];
    let before = server.fetches();
    for (what, token, reason) in &cases {
        refused(&router, "scoring", Some(token), reason, true, what).await;
    }
    assert_eq!(
        server.fetches(),
        before,
        "no refusal above names an unknown kid of the OIDC issuer, so none refetched"
    );

    // An unknown kid is looked up again at the JWKS and refused. Each case waits out
    // minRefetchSeconds (1 s) since the fetch before it, so its own refetch is allowed.
    for (what, token) in [
        (
            "unknown kid",
            idp.sign("ES256", Some("k9-p256"), json!({}), c(json!({}))),
        ),
        (
            "attacker key embedded as jwk under its own kid",
            evil_ed.sign(
                "EdDSA",
                Some("evil-ed"),
                json!({"jwk": evil_ed.jwk(), "jku": attacker.url()}),
                c(json!({})),
            ),
        ),
    ] {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = server.fetches();
        refused(&router, "scoring", Some(&token), "unknown_kid", true, what).await;
        assert_eq!(server.fetches(), before + 1, "{what}: one refetch");
    }
    assert_eq!(
        attacker.fetches(),
        0,
        "jku, x5u and jwk headers are never followed: {:?}",
        attacker.paths()
    );

    // No credential, or one that is not a bearer token.
    refused(
        &router,
        "scoring",
        None,
        "missing",
        true,
        "no Authorization",
    )
    .await;
    let req = Request::post(router.url("/api/v1/endpoint/scoring/score"))
        .header("authorization", format!("Basic {valid}"))
        .body(body("{}"))
        .unwrap();
    let (parts, _) = send(req).await;
    assert_eq!(parts.status, 401, "Basic scheme");
    assert_eq!(
        auth_failures(&router.metrics().await, "scoring", "missing"),
        2.0
    );
    // A valid token at a key-mode endpoint is a wrong key there: a plain challenge.
    refused(
        &router,
        "keyed",
        Some(&valid),
        "invalid_key",
        false,
        "token at key endpoint",
    )
    .await;
    refused(
        &router,
        "keyed",
        None,
        "missing",
        false,
        "nothing at key endpoint",
    )
    .await;
    // The key still works there.
    accepted(&router, "keyed", KEY, "key at key endpoint").await;
    passed += 1;

    assert_eq!(
        model.requests(),
        passed,
        "no refused request reached the model"
    );
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Keys at the JWKS change

#[tokio::test]
async fn rotated_keys_are_fetched_on_first_use_at_most_once_per_min_refetch() {
    let a = TestKey::p256("a");
    let b = TestKey::ed25519("b");
    let c = TestKey::p256("c");
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "unused");
    let token =
        |key: &TestKey| key.sign(key.default_alg(), Some(&key.kid), json!({}), idp.claims());
    let server = JwksServer::start(&jwks(&[&a])).await;
    let model = Model::start("m").await;
    let router = idp_router(&server, "minRefetchSeconds: 1", &model).await;
    let started = Instant::now();
    assert_eq!(server.fetches(), 1);
    accepted(&router, "scoring", &token(&a), "a").await;

    // Key b is published; its first token makes the router fetch again (once the start-up
    // fetch is a minRefetchSeconds old) and passes.
    server.set_jwks(&jwks(&[&a, &b]));
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
    let b_token = token(&b);
    accepted(&router, "scoring", &b_token, "b on first use").await;
    assert_eq!(server.fetches(), 2, "one refetch for the unknown kid");
    accepted(&router, "scoring", &b_token, "b again").await;
    let refetched = Instant::now();

    // Key c comes right after: within minRefetchSeconds its kid is refused unfetched.
    server.set_jwks(&jwks(&[&a, &c]));
    refused(
        &router,
        "scoring",
        Some(&token(&c)),
        "unknown_kid",
        true,
        "c too soon",
    )
    .await;
    refused(
        &router,
        "scoring",
        Some(&token(&c)),
        "unknown_kid",
        true,
        "c too soon, again",
    )
    .await;
    assert_eq!(server.fetches(), 2, "rate-limited: no fetch");
    accepted(&router, "scoring", &b_token, "b, not yet known to be gone").await;

    // Once the interval has passed, c's kid is fetched and c passes; b, removed from the
    // JWKS by then, no longer verifies although its token passed (and was cached) before.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(refetched.elapsed())).await;
    accepted(&router, "scoring", &token(&c), "c after the interval").await;
    assert_eq!(server.fetches(), 3);
    refused(
        &router,
        "scoring",
        Some(&b_token),
        "unknown_kid",
        true,
        "b after removal",
    )
    .await;
    refused(
        &router,
        "scoring",
        Some(&token(&b)),
        "unknown_kid",
        true,
        "new b after removal",
    )
    .await;
    assert_eq!(server.fetches(), 3, "the refusals of b were rate-limited");
    accepted(&router, "scoring", &token(&a), "a throughout").await;

    assert_eq!(model.requests(), 6);
    router.shutdown().await;
}

#[tokio::test]
async fn known_keys_keep_verifying_while_the_jwks_fails_and_refresh_is_periodic() {
    const ISS2: &str = "https://second.example.test/";
    let (a1, b1, a2) = (
        TestKey::p256("a1"),
        TestKey::ed25519("b1"),
        TestKey::p256("a2"),
    );
    let idp1 = TestIssuer::new(IDP_ISS, IDP_AUD, "unused1");
    let idp2 = TestIssuer::new(ISS2, IDP_AUD, "unused2");
    let token = |issuer: &TestIssuer, key: &TestKey| {
        key.sign(
            key.default_alg(),
            Some(&key.kid),
            json!({}),
            issuer.claims(),
        )
    };
    let s1 = JwksServer::start(&jwks(&[&a1])).await;
    let s2 = JwksServer::start(&jwks(&[&a2])).await;
    let model = Model::start("m").await;
    // minRefetchSeconds stays at its default of 30: only the periodic refresh fetches.
    let config = auth_config(
        None,
        &[
            oidc(
                "idp1",
                IDP_ISS,
                &format!("jwksUri: '{}'", s1.url()),
                "refreshSeconds: 1",
            ),
            oidc(
                "idp2",
                ISS2,
                &format!("jwksUri: '{}'", s2.url()),
                "refreshSeconds: 1",
            ),
        ],
    );
    let router = Router::try_start(
        &config,
        &token_endpoint("scoring", Some(&["idp1", "idp2"]), &[model.addr]),
        &[],
        false,
    )
    .await
    .expect("router starts");
    assert_eq!((s1.fetches(), s2.fetches()), (1, 1));

    // b1 is published at idp1, and idp2's JWKS starts closing every connection.
    s1.set_jwks(&jwks(&[&a1, &b1]));
    s2.set_reply(Reply::Close);
    // The router does not look for b1 on demand (rate-limited: no fetch) ...
    refused(
        &router,
        "scoring",
        Some(&token(&idp1, &b1)),
        "unknown_kid",
        true,
        "b1 before refresh",
    )
    .await;
    assert_eq!(s1.fetches(), 1);
    // ... but the periodic refresh brings it within a second or so.
    let mut passed = 0;
    eventually(
        "b1 verifies after a periodic refresh",
        Patience::LONG,
        || {
            let t = token(&idp1, &b1);
            let router = &router;
            async move {
                let (parts, _) = call(router, "scoring", Some(&t)).await;
                (parts.status == 200).then_some(())
            }
        },
    )
    .await;
    passed += 1;
    assert!(s1.fetches() >= 2);

    // Now idp1's JWKS answers 500 too. Once each has failed a refresh (idp2 twice, so
    // its first failure has certainly been handled), the keys held still verify.
    s1.set_reply(Reply::Status(500));
    let f1 = s1.fetches();
    fetched(&s1, f1 + 1, "a failing refresh of idp1").await;
    fetched(&s2, 3, "two failing refreshes of idp2").await;
    // Give idp1's failed fetch time to be handled (it fails at once).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (issuer, key) in [(&idp1, &a1), (&idp1, &b1), (&idp2, &a2)] {
        accepted(
            &router,
            "scoring",
            &token(issuer, key),
            &format!("{} while its JWKS fails", key.kid),
        )
        .await;
        passed += 1;
    }
    assert_eq!(model.requests(), passed);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// jwksFile and config errors

#[tokio::test]
async fn jwks_file_keys_verify_and_are_re_read_for_an_unknown_kid() {
    let a = TestKey::ed25519("a");
    let b = TestKey::p256("b");
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "unused");
    let token =
        |key: &TestKey| key.sign(key.default_alg(), Some(&key.kid), json!({}), idp.claims());
    let model = Model::start("m").await;
    let config = auth_config(
        None,
        &[oidc(
            "idp",
            IDP_ISS,
            "jwksFile: keys.json",
            "minRefetchSeconds: 1",
        )],
    );
    let keys = jwks(&[&a]).to_string();
    let router = Router::try_start(
        &config,
        &token_endpoint("scoring", Some(&["idp"]), &[model.addr]),
        &[("keys.json", keys.as_bytes())],
        false,
    )
    .await
    .expect("router starts");
    accepted(&router, "scoring", &token(&a), "a from the file").await;
    refused(
        &router,
        "scoring",
        Some(&token(&b)),
        "unknown_kid",
        true,
        "b not yet in the file",
    )
    .await;
    write_atomically(router.path("keys.json"), jwks(&[&a, &b]).to_string()).unwrap();
    // The refusal above re-read the file less than minRefetchSeconds (1 s) ago.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    accepted(&router, "scoring", &token(&b), "b once in the file").await;
    accepted(&router, "scoring", &token(&a), "a still").await;
    router.shutdown().await;
}

#[tokio::test]
async fn token_config_errors_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scorefront.yaml");
    let signing = TestKey::p256("s").pkcs8_pem();
    std::fs::write(dir.path().join("token-signing.pem"), &signing).unwrap();
    let keys_json = jwks(&[&TestKey::ed25519("a")]).to_string();
    std::fs::write(dir.path().join("keys.json"), &keys_json).unwrap();
    std::fs::write(dir.path().join("bad.json"), "{\"not\": \"a jwks\"}").unwrap();
    let replica = unused_addr();
    let with_issuer = Some("{signingKeyFile: token-signing.pem}");
    let file_idp = oidc("idp", IDP_ISS, "jwksFile: keys.json", "");

    // (router config, endpoints file, what stderr must say)
    let keys_too = format!(
        "{}  keys: {{primaryKey: {KEY}}}\n",
        token_endpoint("scoring", None, &[replica])
    );
    let cases: Vec<(String, String, Vec<&str>)> = vec![
        (
            auth_config(with_issuer, &[]),
            keys_too,
            vec!["spec.keys", "authMode is token"],
        ),
        (
            auth_config(with_issuer, std::slice::from_ref(&file_idp)),
            token_endpoint("scoring", Some(&["idp", "nope"]), &[replica]),
            vec![
                "spec.tokenIssuers: `nope` is not configured",
                "endpoint scoring",
            ],
        ),
        (
            auth_config(None, std::slice::from_ref(&file_idp)),
            token_endpoint("scoring", None, &[replica]),
            vec!["`scorefront` is not configured", "auth.tokenIssuer"],
        ),
        (
            auth_config(
                None,
                &[oidc(
                    "idp",
                    IDP_ISS,
                    "jwksUri: 'http://127.0.0.1:1/keys', jwksFile: keys.json",
                    "",
                )],
            ),
            token_endpoint("scoring", Some(&["idp"]), &[replica]),
            vec![
                "auth.oidc[0] (idp)",
                "set exactly one of jwksUri and jwksFile",
            ],
        ),
        (
            auth_config(
                None,
                &[format!(
                    "{{name: idp, issuer: '{IDP_ISS}', audiences: [], jwksFile: keys.json}}"
                )],
            ),
            token_endpoint("scoring", Some(&["idp"]), &[replica]),
            vec!["auth.oidc[0] (idp)", "audiences must list at least one"],
        ),
        (
            auth_config(None, &[oidc("idp", IDP_ISS, "jwksUri: 'ftp://x/keys'", "")]),
            token_endpoint("scoring", Some(&["idp"]), &[replica]),
            vec!["jwksUri must be an http:// or https:// URL"],
        ),
        (
            auth_config(
                None,
                &[oidc("scorefront", IDP_ISS, "jwksFile: keys.json", "")],
            ),
            token_endpoint("scoring", None, &[replica]),
            vec!["name is taken"],
        ),
        (
            auth_config(None, &[oidc("idp", IDP_ISS, "jwksFile: bad.json", "")]),
            token_endpoint("scoring", Some(&["idp"]), &[replica]),
            vec!["auth.oidc idp", "bad.json", "not a JSON Web Key Set"],
        ),
        (
            auth_config(Some("{signingKeyFile: keys.json}"), &[]),
            token_endpoint("scoring", None, &[replica]),
            vec!["auth.tokenIssuer", "not a PKCS#8 PEM private key"],
        ),
    ];
    for (router_cfg, endpoints, want) in &cases {
        std::fs::write(&config, router_cfg).unwrap();
        std::fs::write(dir.path().join("endpoints.yaml"), endpoints).unwrap();
        let (code, stdout, stderr) = check_config(&config).await;
        assert_eq!(code, Some(1), "{router_cfg}\n{endpoints}\n{stdout}{stderr}");
        for w in want {
            assert!(stderr.contains(w), "missing {w:?} in:\n{stderr}");
        }
    }

    // The same unknown issuer stops a router from starting.
    let err = Router::try_start(
        &auth_config(with_issuer, &[]),
        &token_endpoint("scoring", Some(&["nope"]), &[replica]),
        &[("token-signing.pem", signing.as_bytes())],
        false,
    )
    .await
    .err()
    .expect("refused");
    assert!(
        format!("{err:#}").contains("`nope` is not configured"),
        "{err:#}"
    );

    // And the good variants pass: the built-in issuer plus a jwksFile issuer.
    std::fs::write(&config, auth_config(with_issuer, &[file_idp])).unwrap();
    let endpoints = [
        token_endpoint("scoring", Some(&["scorefront", "idp"]), &[replica]),
        token_endpoint("other", None, &[replica]),
    ]
    .join("---\n");
    std::fs::write(dir.path().join("endpoints.yaml"), endpoints).unwrap();
    let (code, stdout, stderr) = check_config(&config).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("ok: 2 endpoint(s)"), "{stdout}");
}

/// A signed token whose `exp` or `nbf` is far outside the i64 range (any JSON number is a
/// valid NumericDate) is answered, and judged by saturating arithmetic.
#[tokio::test]
async fn extreme_exp_and_nbf_are_answered_not_dropped() {
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "k1");
    let server = JwksServer::start(&idp.jwks()).await;
    let model = Model::start("m").await;
    let router = idp_router(&server, "", &model).await;
    let url = router.url("/api/v1/endpoint/scoring/score");
    for changes in [
        json!({"exp": 1e300}),
        json!({"exp": 9_223_372_036_854_775_807u64}),
        json!({"nbf": -1e300}),
    ] {
        let token = idp.sign(
            "ES256",
            Some("k1-p256"),
            json!({}),
            idp.claims_with(changes.clone()),
        );
        let resp = client()
            .request(scoring_post(&url, &token, &[], "{}"))
            .await
            .unwrap_or_else(|e| panic!("{changes}: no answer: {e:?}"));
        assert_eq!(resp.status(), 200, "{changes}");
    }
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Cross-checked with an independent implementation (the `jsonwebtoken` crate)

#[tokio::test]
async fn tokens_of_an_independent_signer_verify_and_their_tampered_forms_do_not() {
    let keys = JwtKey::every_accepted_alg("jwt", shared_rsa_pem());
    let stranger = JwtKey::every_accepted_alg("stranger", &openssl_rsa());
    let idp = TestIssuer::new(IDP_ISS, IDP_AUD, "unused");
    let model = Model::start("m").await;
    let jwks = jwt_jwks(&keys);
    let router = Router::try_start(
        &auth_config(None, &[oidc("idp", IDP_ISS, "jwksFile: keys.json", "")]),
        &token_endpoint("scoring", Some(&["idp"]), &[model.addr]),
        &[("keys.json", jwks.as_bytes())],
        false,
    )
    .await
    .expect("router starts");
    for (key, stranger) in keys.iter().zip(&stranger) {
        let alg = format!("{:?}", key.alg);
        let token = key.sign(&idp.claims());
        assert_eq!(header_of(&token)["alg"], alg.as_str());
        accepted(&router, "scoring", &token, &alg).await;
        let changed = idp.claims_with(json!({"sub": "someone-else"}));
        let hs256 = {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some(key.kid.clone());
            // The classic confusion: the public key (as published) used as an HMAC secret.
            let secret = jsonwebtoken::EncodingKey::from_secret(jwks.as_bytes());
            jsonwebtoken::encode(&header, &idp.claims(), &secret).unwrap()
        };
        for (bad, reason, what) in [
            (
                tamper_payload(&token, &changed),
                "bad_signature",
                "payload changed",
            ),
            (
                tamper_signature(&token),
                "bad_signature",
                "signature flipped",
            ),
            (
                alg_none(Some(&key.kid), &idp.claims()),
                "unsupported_alg",
                "alg none",
            ),
            (hs256, "unsupported_alg", "alg HS256"),
            (stranger.sign(&idp.claims()), "unknown_kid", "kid unknown"),
            // A key not in the JWKS, under the kid of one that is.
            (
                stranger.sign_as(&key.kid, &idp.claims()),
                "bad_signature",
                "kid of another key",
            ),
            (
                key.sign(&idp.claims_with(json!({"exp": now() - 3600}))),
                "expired",
                "exp past",
            ),
            (
                key.sign(&idp.claims_with(json!({"aud": "api://someone-else"}))),
                "wrong_audience",
                "aud wrong",
            ),
        ] {
            refused(
                &router,
                "scoring",
                Some(&bad),
                reason,
                true,
                &format!("{alg}: {what}"),
            )
            .await;
        }
    }
    assert_eq!(model.requests(), keys.len());
    router.shutdown().await;
}

#[tokio::test]
async fn builtin_tokens_verify_with_an_independent_implementation() {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk, jwk::ThumbprintHash};
    for (kind, alg) in [("es256", Algorithm::ES256), ("ed25519", Algorithm::EdDSA)] {
        let dir = tempfile::tempdir().unwrap();
        let (code, pem, stderr) =
            run_scorefront(&["keys".as_ref(), "--token-signing".as_ref(), kind.as_ref()]).await;
        assert_eq!(code, Some(0), "{stderr}");
        std::fs::write(dir.path().join("signing.pem"), &pem).unwrap();
        std::fs::write(
            dir.path().join("scorefront.yaml"),
            auth_config(
                Some(
                    "{signingKeyFile: signing.pem, issuer: 'https://router.test', ttlSeconds: 600}",
                ),
                &[],
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("endpoints.yaml"),
            token_endpoint("scoring", None, &[unused_addr()]),
        )
        .unwrap();
        let (code, stdout, stderr) = mint(&dir.path().join("scorefront.yaml"), "scoring").await;
        assert_eq!(code, Some(0), "{stderr}");
        let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
        let token = answer["accessToken"].as_str().unwrap();

        // The public key, as openssl derives it from the signing key file.
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(dir.path().join("signing.pem"))
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = match alg {
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&out.stdout),
            _ => DecodingKey::from_ec_pem(&out.stdout),
        }
        .unwrap();

        let mut validation = Validation::new(alg);
        validation.set_audience(&["scoring"]);
        validation.set_issuer(&["https://router.test"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "nbf"]);
        let data = jsonwebtoken::decode::<Value>(token, &public, &validation)
            .unwrap_or_else(|e| panic!("{kind}: jsonwebtoken refuses {token}: {e}"));
        assert_eq!(data.claims["exp"].as_u64(), answer["expiryOn"].as_u64());
        let thumbprint = Jwk::from_decoding_key(&public, Some(alg))
            .unwrap()
            .thumbprint(ThumbprintHash::SHA256)
            .unwrap();
        assert_eq!(
            data.header.kid.as_deref(),
            Some(thumbprint.as_str()),
            "{kind}: kid"
        );
        for bad in [
            tamper_signature(token),
            tamper_payload(
                token,
                &json!({"iss": "https://router.test", "aud": "other", "exp": now() + 600}),
            ),
        ] {
            assert!(
                jsonwebtoken::decode::<Value>(&bad, &public, &validation).is_err(),
                "{kind}: jsonwebtoken accepts a tampered token"
            );
        }
    }
}
