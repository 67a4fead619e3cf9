//! The https listener over real sockets and real handshakes: HTTP/1.1 and h2 by ALPN,
//! TLS versions and suites, certificate checks at start (in-process and with
//! `scorefront check-config`), hot rotation of the certificate (file replace and a
//! Kubernetes-style symlink swap), broken certificates kept out, the handshake timeout and
//! the certificate expiry metric.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use rustls::{CipherSuite, ProtocolVersion};
use support::{tls::*, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

// ---------------------------------------------------------------------------------------
// Helpers

const SCORE: &str = "/api/v1/endpoint/e/score";
const EXPIRY: &str = "scorefront_tls_cert_expiry_timestamp_seconds";

/// The router config of these tests: `tls` naming `server.crt` and `server.key` in the
/// router's folder, with `tls_extra` (`", handshakeTimeoutMs: 200"`) appended inside.
fn tls_config(tls_extra: &str) -> String {
    router_config(&format!(
        "tls: {{certFile: server.crt, keyFile: server.key{tls_extra}}}\n"
    ))
}

/// A router with an https listener serving `leaf`, and endpoint `e` on `model`.
async fn start_tls(leaf: &Leaf, model: &Model, tls_extra: &str) -> Router {
    start_tls_with(leaf, model, &tls_config(tls_extra)).await
}

/// [`start_tls`] with the whole router config given.
async fn start_tls_with(leaf: &Leaf, model: &Model, config: &str) -> Router {
    let files = leaf.files("server");
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    Router::try_start(config, &one_version("e", &[model.addr], ""), &files, true)
        .await
        .expect("router starts")
}

fn https(router: &Router) -> SocketAddr {
    router.https.expect("an https listener")
}

fn score() -> http::Request<TestBody> {
    scoring_post(SCORE, KEY, &[], "{\"data\": [1]}")
}

/// Asserts a 200 from the fake model `model`.
#[track_caller]
fn assert_scored(parts: &http::response::Parts, body: &[u8], model: &str) {
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(body));
    assert_eq!(model_of(body), model);
}

/// The value of a request header the model saw last.
fn seen(model: &Model, name: &str) -> String {
    model
        .last_headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Waits until new connections get `want`; every handshake on the way must succeed and
/// serve either `want` or one of `before` (never a failed or foreign certificate).
async fn wait_for_leaf(client: &TlsClient, addr: SocketAddr, want: &Leaf, before: &[&Leaf]) {
    wait_for_leaf_within(client, addr, want, before, Patience::LONG).await;
}

async fn wait_for_leaf_within(
    client: &TlsClient,
    addr: SocketAddr,
    want: &Leaf,
    before: &[&Leaf],
    patience: Patience,
) {
    eventually(
        "new connections get the new certificate",
        patience,
        move || async move {
            let got = client.served_leaf(addr).await;
            assert!(
                got == want.der || before.iter().any(|l| l.der == got),
                "served a certificate that is neither the old nor the new one"
            );
            (got == want.der).then_some(())
        },
    )
    .await;
}

/// For `span` (many reload intervals), every new connection still gets `leaf`, and the
/// router still answers scoring requests over TLS.
async fn keeps_serving(client: &TlsClient, addr: SocketAddr, leaf: &Leaf, span: Duration) {
    let start = Instant::now();
    let mut handshakes = 0;
    while start.elapsed() < span {
        assert!(
            client.served_leaf(addr).await == leaf.der,
            "a broken certificate was swapped in"
        );
        handshakes += 1;
    }
    assert!(handshakes >= 3, "only {handshakes} handshakes in {span:?}");
    let ex = client
        .request(addr, score())
        .await
        .expect("scoring over TLS");
    assert_eq!(ex.parts.status, 200);
    assert_eq!(ex.info.leaf(), &leaf.der);
}

async fn expiry_metric(router: &Router) -> Option<f64> {
    metric(&router.metrics().await, EXPIRY, &[])
}

// ---------------------------------------------------------------------------------------
// 1. HTTP/1.1 and h2 over TLS

/// A broken setup: what it is, the files written, and what the error must say.
type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, Vec<&'a str>);

#[tokio::test]
async fn http1_and_h2_over_tls_reach_the_model_as_https() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, "").await;
    let addr = https(&router);

    // HTTP/1.1, chosen by ALPN. A client's own x-forwarded-proto is replaced.
    let req = scoring_post(SCORE, KEY, &[("x-forwarded-proto", "http")], "{}");
    let ex = ca
        .client()
        .h1()
        .request(addr, req)
        .await
        .expect("h1 over TLS");
    assert_scored(&ex.parts, &ex.body, "m");
    assert_eq!(ex.info.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(ex.parts.version, http::Version::HTTP_11);
    assert_eq!(ex.info.leaf(), &leaf.der);
    assert_eq!(seen(&model, "x-forwarded-proto"), "https");
    assert_eq!(seen(&model, "x-forwarded-for"), "127.0.0.1");
    assert!(
        seen(&model, "authorization").is_empty(),
        "the key was forwarded"
    );
    assert_eq!(model.last_target(), "/score");

    // h2, chosen by ALPN.
    let ex = ca
        .client()
        .h2()
        .request(addr, score())
        .await
        .expect("h2 over TLS");
    assert_scored(&ex.parts, &ex.body, "m");
    assert_eq!(ex.info.alpn.as_deref(), Some("h2"));
    assert_eq!(ex.parts.version, http::Version::HTTP_2);
    assert_eq!(seen(&model, "x-forwarded-proto"), "https");
    assert_eq!(model.last_target(), "/score");

    // Offered both, the server prefers h2; offered none, HTTP/1.1 is spoken.
    let ex = ca.client().request(addr, score()).await.unwrap();
    assert_eq!(ex.info.alpn.as_deref(), Some("h2"));
    assert_scored(&ex.parts, &ex.body, "m");
    let ex = ca.client().alpn(&[]).request(addr, score()).await.unwrap();
    assert_eq!(ex.info.alpn, None);
    assert_eq!(ex.parts.version, http::Version::HTTP_11);
    assert_scored(&ex.parts, &ex.body, "m");

    // Several requests, one after the other, on one h2 connection.
    let mut conn = ca.client().h2().connect(addr).await.unwrap();
    for _ in 0..3 {
        let (parts, body) = conn.send(score()).await.unwrap();
        assert_scored(&parts, &body, "m");
    }

    // A wrong key over TLS is still refused by the router.
    let ex = ca
        .client()
        .request(addr, scoring_post(SCORE, "wrong", &[], "{}"))
        .await
        .unwrap();
    assert_eq!(ex.parts.status, 401);
    assert_eq!(error_code(&ex.body), "Unauthorized");

    // The plain http listener works alongside, and says so.
    let (parts, body) = send_ok(scoring_post(&router.url(SCORE), KEY, &[], "{}")).await;
    assert_scored(&parts, &body, "m");
    assert_eq!(seen(&model, "x-forwarded-proto"), "http");

    // The certificate names 127.0.0.1 too.
    let ex = ca
        .client()
        .server_name("127.0.0.1")
        .request(addr, score())
        .await
        .unwrap();
    assert_scored(&ex.parts, &ex.body, "m");
    router.shutdown().await;
}

#[tokio::test]
async fn a_chain_with_an_intermediate_is_sent_whole() {
    let root = TestCa::new("test root");
    let intermediate = root.intermediate("test intermediate");
    let leaf = intermediate.issue(&LeafSpec::default());
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, "").await;
    let ex = root
        .client()
        .request(https(&router), score())
        .await
        .expect("chain verifies");
    assert_scored(&ex.parts, &ex.body, "m");
    assert_eq!(
        ex.info.chain,
        vec![leaf.der.clone(), intermediate.der.clone()]
    );
    router.shutdown().await;

    // The same leaf without its intermediate does not verify against the root alone.
    let alone = Leaf {
        chain_pem: leaf.cert_pem.clone(),
        ..leaf
    };
    let router = start_tls(&alone, &model, "").await;
    let err = root
        .client()
        .handshake(https(&router))
        .await
        .expect_err("no chain");
    assert!(err.contains("UnknownIssuer"), "{err}");
    router.shutdown().await;
}

#[tokio::test]
async fn every_key_type_is_served() {
    let ca = TestCa::new("test root");
    let model = Model::start("m").await;
    for kind in [KeyKind::EcdsaP256, KeyKind::EcdsaP384, KeyKind::Ed25519] {
        let leaf = ca.issue(&LeafSpec::default().key(kind));
        let router = start_tls(&leaf, &model, "").await;
        for client in [ca.client().tls12_only(), ca.client().tls13_only()] {
            let ex = client
                .request(https(&router), score())
                .await
                .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_scored(&ex.parts, &ex.body, "m");
            assert_eq!(ex.info.leaf(), &leaf.der, "{kind:?}");
        }
        router.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Versions, suites, trust

#[tokio::test]
async fn tls12_and_tls13_negotiate_with_aead_suites_only() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, "").await;
    let addr = https(&router);

    let ex = ca
        .client()
        .tls12_only()
        .request(addr, score())
        .await
        .unwrap();
    assert_eq!(ex.info.version, ProtocolVersion::TLSv1_2);
    assert_scored(&ex.parts, &ex.body, "m");
    let ex = ca
        .client()
        .tls13_only()
        .request(addr, score())
        .await
        .unwrap();
    assert_eq!(ex.info.version, ProtocolVersion::TLSv1_3);
    assert_scored(&ex.parts, &ex.body, "m");
    // Offered both, 1.3 wins.
    let (_, info) = ca.client().handshake(addr).await.unwrap();
    assert_eq!(info.version, ProtocolVersion::TLSv1_3);

    // Each suite the client can offer, alone: the server accepts every one usable with
    // an ECDSA certificate, and all of them are AEAD with ECDHE (1.2) or 1.3 suites.
    let mut negotiated = Vec::new();
    for suite in rustls::crypto::ring::default_provider().cipher_suites {
        let name = format!("{:?}", suite.suite());
        let client = ca
            .client()
            .versions(&[suite.version()])
            .suites(&[suite.suite()]);
        let result = client.handshake(addr).await;
        if name.starts_with("TLS_ECDHE_RSA_") {
            // Needs an RSA certificate; this one is ECDSA.
            assert!(
                result.is_err(),
                "{name} negotiated with an ECDSA certificate"
            );
            continue;
        }
        let (_, info) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.suite, suite.suite());
        negotiated.push(name);
    }
    assert_eq!(negotiated.len(), 6, "{negotiated:?}");
    for name in &negotiated {
        assert!(
            (name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"))
                && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305")),
            "not an AEAD/ECDHE suite: {name}"
        );
    }

    // rustls clients cannot offer CBC, RC4, 3DES or static-RSA suites: offer them by
    // hand. First a control: the same hello with an AEAD suite gets a ServerHello.
    let gcm = u16::from(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    assert_eq!(
        raw_reply(addr, &client_hello(0x0303, &[gcm], None)).await,
        RawReply::ServerHello
    );
    let legacy = [
        0xc009, // TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA
        0xc00a, // TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA
        0xc023, // TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256
        0xc024, // TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384
        0xc013, // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA
        0x002f, // TLS_RSA_WITH_AES_128_CBC_SHA
        0x009c, // TLS_RSA_WITH_AES_128_GCM_SHA256 (no forward secrecy)
        0x000a, // TLS_RSA_WITH_3DES_EDE_CBC_SHA
        0xc007, // TLS_ECDHE_ECDSA_WITH_RC4_128_SHA
    ];
    assert_eq!(
        raw_reply(addr, &client_hello(0x0303, &legacy, None)).await,
        RawReply::Alert(40), // handshake_failure
        "a TLS 1.2 client offering only CBC/RC4/3DES/static-RSA suites"
    );
    // TLS 1.0 and 1.1 are refused even with a good suite.
    for old in [0x0301, 0x0302] {
        assert_eq!(
            raw_reply(addr, &client_hello(old, &[gcm, 0xc009], None)).await,
            RawReply::Alert(70), // protocol_version
            "a client speaking at most {old:#06x}"
        );
    }
    // And the listener carries on.
    let ex = ca.client().request(addr, score()).await.unwrap();
    assert_scored(&ex.parts, &ex.body, "m");
    router.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_certificate_fails_and_others_carry_on() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, "").await;
    let addr = https(&router);

    let stranger = TestCa::new("another root");
    for client in [stranger.client().h1(), stranger.client().h2()] {
        let err = client.handshake(addr).await.expect_err("untrusted CA");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }
    let err = ca
        .client()
        .server_name("scoring.example.com")
        .handshake(addr)
        .await
        .expect_err("wrong name");
    assert!(err.contains("not valid for name"), "{err}");
    let requests = model.requests();

    for client in [ca.client().h1(), ca.client().h2()] {
        let ex = client
            .request(addr, score())
            .await
            .expect("served after failures");
        assert_scored(&ex.parts, &ex.body, "m");
    }
    assert_eq!(model.requests(), requests + 2);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 3. Rotation

#[tokio::test]
async fn a_replaced_certificate_reaches_new_connections_and_open_ones_carry_on() {
    let ca = TestCa::new("test root");
    let (a, b) = (ca.leaf(), ca.leaf());
    let model = Model::start("m").await;
    let router = start_tls(&a, &model, "").await;
    let addr = https(&router);

    let mut h1 = ca.client().h1().connect(addr).await.unwrap();
    let mut h2 = ca.client().h2().connect(addr).await.unwrap();
    assert_eq!(h1.info.leaf(), &a.der);
    assert_eq!(h2.info.leaf(), &a.der);
    for conn in [&mut h1, &mut h2] {
        let (parts, body) = conn.send(score()).await.unwrap();
        assert_scored(&parts, &body, "m");
    }
    // Certificate first, key second, as two renames: in between the pair does not match
    // and must not be served.
    write_atomically(router.path("server.crt"), &b.chain_pem).unwrap();
    write_atomically(router.path("server.key"), &b.key_pem).unwrap();
    wait_for_leaf(&ca.client(), addr, &b, &[&a]).await;
    let ex = ca.client().request(addr, score()).await.unwrap();
    assert_eq!(ex.info.leaf(), &b.der);
    assert_scored(&ex.parts, &ex.body, "m");

    // The connections opened under A are still open and still serve.
    for conn in [&mut h1, &mut h2] {
        assert!(!conn.is_closed());
        let (parts, body) = conn
            .send(score())
            .await
            .expect("old connection still works");
        assert_scored(&parts, &body, "m");
    }
    router.shutdown().await;
}

/// Lays out a Kubernetes secret volume in `dir`: `..2026_vN/` holding the files,
/// `..data -> ..2026_vN`, and `tls.crt -> ..data/tls.crt`, `tls.key -> ..data/tls.key`.
/// Later versions are swapped in as kubelet does: a new folder, a new symlink renamed
/// over `..data`, the old folder removed.
fn k8s_publish(dir: &Path, version: u32, leaf: &Leaf) {
    use std::os::unix::fs::symlink;
    let folder = format!("..2026_v{version}");
    std::fs::create_dir(dir.join(&folder)).unwrap();
    std::fs::write(dir.join(&folder).join("tls.crt"), &leaf.chain_pem).unwrap();
    std::fs::write(dir.join(&folder).join("tls.key"), &leaf.key_pem).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(&folder, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_kubernetes_style_symlink_swap_is_picked_up() {
    let ca = TestCa::new("test root");
    let (a, b, c) = (ca.leaf(), ca.leaf(), ca.leaf());
    let model = Model::start("m").await;
    let secret = tempfile::tempdir().unwrap();
    let tls = secret.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    k8s_publish(&tls, 1, &a);
    let config = router_config(&format!(
        "tls: {{certFile: '{}', keyFile: '{}'}}\n",
        tls.join("tls.crt").display(),
        tls.join("tls.key").display()
    ));
    let router = Router::try_start(&config, &one_version("e", &[model.addr], ""), &[], true)
        .await
        .expect("router starts");
    let addr = https(&router);

    let mut old = ca.client().h1().connect(addr).await.unwrap();
    assert_eq!(old.info.leaf(), &a.der);
    let (parts, body) = old.send(score()).await.unwrap();
    assert_scored(&parts, &body, "m");

    k8s_publish(&tls, 2, &b);
    wait_for_leaf(&ca.client(), addr, &b, &[&a]).await;
    let (parts, body) = old.send(score()).await.expect("old connection still works");
    assert_scored(&parts, &body, "m");

    // And again: each swap is seen, though the paths the config names never change.
    k8s_publish(&tls, 3, &c);
    wait_for_leaf(&ca.client(), addr, &c, &[&b]).await;
    let ex = ca.client().request(addr, score()).await.unwrap();
    assert_scored(&ex.parts, &ex.body, "m");
    let (parts, body) = old.send(score()).await.expect("old connection still works");
    assert_scored(&parts, &body, "m");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. A broken certificate is kept out

#[tokio::test]
async fn a_broken_certificate_is_kept_out_until_a_good_pair_arrives() {
    let ca = TestCa::new("test root");
    let (a, b, c) = (ca.leaf(), ca.leaf(), ca.leaf());
    let expired = ca.issue(&LeafSpec::default().expired());
    let model = Model::start("m").await;
    let router = start_tls(&a, &model, "").await;
    let addr = https(&router);
    let client = ca.client();
    // 300 ms is 15 reload intervals of 20 ms.
    let span = Duration::from_millis(300);
    let crt = router.path("server.crt");
    let key = router.path("server.key");

    // B's certificate with A's key.
    write_atomically(&crt, &b.chain_pem).unwrap();
    keeps_serving(&client, addr, &a, span).await;
    // Not PEM at all.
    write_atomically(&crt, "this is not a certificate\n").unwrap();
    keeps_serving(&client, addr, &a, span).await;
    // A PEM block that is not DER.
    write_atomically(
        &crt,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    keeps_serving(&client, addr, &a, span).await;
    // An expired pair.
    write_atomically(&crt, &expired.chain_pem).unwrap();
    write_atomically(&key, &expired.key_pem).unwrap();
    keeps_serving(&client, addr, &a, span).await;
    // A key that is not a key; then no files at all.
    write_atomically(&crt, &a.chain_pem).unwrap();
    write_atomically(&key, "garbage").unwrap();
    keeps_serving(&client, addr, &a, span).await;
    std::fs::remove_file(&crt).unwrap();
    std::fs::remove_file(&key).unwrap();
    keeps_serving(&client, addr, &a, span).await;
    assert_eq!(expiry_metric(&router).await, Some(a.not_after as f64));

    // A good pair is picked up.
    write_atomically(&crt, &c.chain_pem).unwrap();
    write_atomically(&key, &c.key_pem).unwrap();
    wait_for_leaf(&client, addr, &c, &[&a]).await;
    let ex = client.request(addr, score()).await.unwrap();
    assert_scored(&ex.parts, &ex.body, "m");
    router.shutdown().await;
}

/// A certificate issued with `notBefore` a moment in the future (clock skew between the
/// issuer and this host, or a renewal that starts on the hour) is refused when it appears,
/// rightly; but it should be served once it has become valid.
#[tokio::test]
async fn a_certificate_not_yet_valid_is_served_once_it_becomes_valid() {
    let ca = TestCa::new("test root");
    let a = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&a, &model, "").await;
    let addr = https(&router);
    let from = unix_now() + 2;
    let soon = ca.issue(&LeafSpec::default().valid(from, from + 86_400));
    write_atomically(router.path("server.crt"), &soon.chain_pem).unwrap();
    write_atomically(router.path("server.key"), &soon.key_pem).unwrap();
    keeps_serving(&ca.client(), addr, &a, Duration::from_millis(300)).await;
    until(
        "the new certificate's notBefore passes",
        Patience::LONG,
        || unix_now() > from,
    )
    .await;
    // Once valid, a fixed router would pick it up within a few reload intervals.
    let patience = Patience {
        within: Duration::from_millis(1500),
        every: Duration::from_millis(20),
    };
    wait_for_leaf_within(&ca.client(), addr, &soon, &[&a], patience).await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 5. Handshake timeout and garbage

#[tokio::test]
async fn a_silent_client_is_cut_at_the_handshake_timeout_while_others_are_served() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, ", handshakeTimeoutMs: 200").await;
    let addr = https(&router);

    /// Reads until the server closes; returns how long that took.
    async fn closed_after(mut tcp: TcpStream, opened: Instant) -> Duration {
        let mut buf = [0u8; 256];
        let wait = async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return opened.elapsed(),
                    Ok(_) => {} // an alert, maybe
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3), wait)
            .await
            .expect("the server closes the connection within 3 s")
    }

    // One sends nothing, one stops halfway through its ClientHello.
    let opened = Instant::now();
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    let hello = client_hello(0x0303, &[0xc02b], Some(&[0x0304, 0x0303]));
    half.write_all(&hello[..hello.len() / 2]).await.unwrap();

    // Meanwhile a normal client is served (one exchange takes milliseconds; the stalled
    // connections hold nothing up).
    let served = async {
        let ex = ca.client().request(addr, score()).await.expect("served");
        assert_scored(&ex.parts, &ex.body, "m");
        opened.elapsed()
    };
    let (silent_closed, half_closed, served_by) = tokio::join!(
        closed_after(silent, opened),
        closed_after(half, opened),
        served
    );
    for closed in [silent_closed, half_closed] {
        assert!(
            closed >= Duration::from_millis(150),
            "closed after {closed:?}, before the handshake timeout"
        );
    }
    assert!(
        served_by < silent_closed,
        "served at {served_by:?}, only after the stalled connections closed at {silent_closed:?}"
    );
    // A client that completes its handshake in time is not cut by the timeout: its
    // connection outlives it.
    let mut conn = ca.client().h1().connect(addr).await.unwrap();
    let (parts, body) = conn.send(score()).await.unwrap();
    assert_scored(&parts, &body, "m");
    let idle = Instant::now();
    until(
        "an idle TLS connection outlives the handshake timeout",
        Patience::SHORT,
        || {
            assert!(!conn.is_closed(), "closed after {:?} idle", idle.elapsed());
            idle.elapsed() > Duration::from_millis(400)
        },
    )
    .await;
    let (parts, body) = conn.send(score()).await.expect("still open after 400 ms");
    assert_scored(&parts, &body, "m");
    router.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_disconnected() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    // The default handshake timeout (10 s): a quick close must come from the garbage.
    let router = start_tls(&leaf, &model, "").await;
    let addr = https(&router);

    let probes: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    for probe in probes {
        let started = Instant::now();
        let reply = raw_reply(addr, probe).await;
        assert!(
            matches!(reply, RawReply::Alert(_) | RawReply::Closed),
            "{probe:?}: {reply:?}"
        );
        // And the connection is then closed, well before the handshake timeout.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(probe).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut buf))
            .await
            .expect("closed within 3 s");
        assert!(buf.is_empty() || buf[0] == 0x15, "not an alert: {buf:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let ex = ca
            .client()
            .request(addr, score())
            .await
            .expect("still served");
        assert_scored(&ex.parts, &ex.body, "m");
    }
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 6. Start-up and check-config

/// The error `Router::try_start` fails with, given these files and `tls` settings.
async fn start_error(files: &[(&str, &[u8])], config: &str, https: bool) -> String {
    match Router::try_start(
        config,
        &one_version("e", &[unused_addr()], ""),
        files,
        https,
    )
    .await
    {
        Ok(router) => {
            router.shutdown().await;
            panic!("the router started")
        }
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn start_refuses_missing_mismatched_expired_and_unreadable_certificates() {
    let ca = TestCa::new("test root");
    let (a, b) = (ca.leaf(), ca.leaf());
    let expired = ca.issue(&LeafSpec::default().expired());
    let future = ca.issue(&LeafSpec::default().not_yet_valid());
    let config = tls_config("");
    let cases: Vec<Case> = vec![
        (
            "missing certificate",
            vec![("server.key", a.key_pem.as_bytes())],
            vec!["server.crt", "cannot read certificates", "No such file"],
        ),
        (
            "missing key",
            vec![("server.crt", a.chain_pem.as_bytes())],
            vec!["server.key", "no PEM private key"],
        ),
        (
            "key of another certificate",
            vec![
                ("server.crt", a.chain_pem.as_bytes()),
                ("server.key", b.key_pem.as_bytes()),
            ],
            vec![
                "server.key",
                "the private key does not belong to the certificate in",
                "server.crt",
            ],
        ),
        (
            "expired",
            vec![
                ("server.crt", expired.chain_pem.as_bytes()),
                ("server.key", expired.key_pem.as_bytes()),
            ],
            vec!["server.crt", "the certificate expired 2 days ago"],
        ),
        (
            "not yet valid",
            vec![
                ("server.crt", future.chain_pem.as_bytes()),
                ("server.key", future.key_pem.as_bytes()),
            ],
            vec!["server.crt", "not valid for another"],
        ),
        (
            "no certificate in the file",
            vec![
                ("server.crt", b"not PEM\n"),
                ("server.key", a.key_pem.as_bytes()),
            ],
            vec!["server.crt", "holds no certificate"],
        ),
    ];
    for (what, files, wants) in cases {
        let err = start_error(&files, &config, true).await;
        assert!(err.contains("TLS certificate"), "{what}: {err}");
        for want in wants {
            assert!(err.contains(want), "{what}: `{want}` not in: {err}");
        }
    }

    // An https listener without tls settings, or listen.https without tls.
    let err = start_error(&[], &router_config(""), true).await;
    assert!(err.contains("https listener needs tls"), "{err}");
    let err = start_error(
        &[],
        &router_config("listen: {https: '127.0.0.1:0', admin: '127.0.0.1:0'}\n"),
        false,
    )
    .await;
    assert!(
        err.contains("listen.https needs tls.certFile and tls.keyFile"),
        "{err}"
    );
}

/// Runs `scorefront check-config` on `config` written to a new folder with `files`;
/// returns the exit code, stdout and stderr.
async fn check_config_with(config: &str, files: &[(&str, &[u8])]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("scorefront.yaml"), config).unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let (code, stdout, stderr) = check_config(&dir.path().join("scorefront.yaml")).await;
    (code.unwrap_or(-1), stdout, stderr)
}

#[tokio::test]
async fn check_config_reports_certificate_problems() {
    let ca = TestCa::new("test root");
    let (a, b) = (ca.leaf(), ca.leaf());
    let expired = ca.issue(&LeafSpec::default().expired());
    let endpoints = one_version("e", &[unused_addr()], "");
    let config = router_config(
        "listen: {https: '127.0.0.1:8443', admin: '127.0.0.1:9090'}\n\
         tls: {certFile: server.crt, keyFile: server.key}\n",
    );

    let good: Vec<(&str, &[u8])> = vec![
        ("endpoints.yaml", endpoints.as_bytes()),
        ("server.crt", a.chain_pem.as_bytes()),
        ("server.key", a.key_pem.as_bytes()),
    ];
    let (code, stdout, stderr) = check_config_with(&config, &good).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("ok: 1 endpoint(s)"), "{stdout}");

    let cases: Vec<Case> = vec![
        (
            "missing certificate",
            vec![
                ("endpoints.yaml", endpoints.as_bytes()),
                ("server.key", a.key_pem.as_bytes()),
            ],
            vec!["server.crt: cannot read certificates"],
        ),
        (
            "key of another certificate",
            vec![
                ("endpoints.yaml", endpoints.as_bytes()),
                ("server.crt", a.chain_pem.as_bytes()),
                ("server.key", b.key_pem.as_bytes()),
            ],
            vec!["server.key: the private key does not belong to the certificate in"],
        ),
        (
            "expired",
            vec![
                ("endpoints.yaml", endpoints.as_bytes()),
                ("server.crt", expired.chain_pem.as_bytes()),
                ("server.key", expired.key_pem.as_bytes()),
            ],
            vec!["server.crt: the certificate expired 2 days ago"],
        ),
    ];
    for (what, files, wants) in cases {
        let (code, stdout, stderr) = check_config_with(&config, &files).await;
        assert_eq!(code, 1, "{what}: {stdout}{stderr}");
        assert!(stderr.contains("error: tls: "), "{what}: {stderr}");
        for want in wants {
            assert!(stderr.contains(want), "{what}: `{want}` not in: {stderr}");
        }
        assert!(stderr.contains("1 error(s) found"), "{what}: {stderr}");
    }

    // listen.https without tls.
    let (code, _, stderr) = check_config_with(
        &router_config("listen: {https: '127.0.0.1:8443'}\n"),
        &[("endpoints.yaml", endpoints.as_bytes())],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("listen.https needs tls.certFile and tls.keyFile"),
        "{stderr}"
    );
}

/// check-config promises "every error": a certificate problem should be listed along
/// with an endpoints file problem.
#[tokio::test]
async fn check_config_lists_certificate_and_endpoint_errors_together() {
    let config = router_config("tls: {certFile: server.crt, keyFile: server.key}\n");
    let (code, _, stderr) =
        check_config_with(&config, &[("endpoints.yaml", b"kind: Nonsense\n")]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("endpoints.yaml"), "{stderr}");
    assert!(
        stderr.contains("server.crt: cannot read certificates"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. The expiry metric

#[tokio::test]
async fn the_expiry_metric_follows_the_served_certificate() {
    let ca = TestCa::new("test root");
    let a = ca.issue(&LeafSpec::default().days(30));
    // Past 2050, where X.509 switches from UTCTime to GeneralizedTime.
    let far = unix_now() + 30 * 365 * 86_400;
    let b = ca.issue(&LeafSpec::default().valid(unix_now() - 60, far));
    let c = ca.issue(&LeafSpec::default().days(90));
    let model = Model::start("m").await;
    let router = start_tls(&a, &model, "").await;
    let addr = https(&router);
    assert_eq!(expiry_metric(&router).await, Some(a.not_after as f64));

    for (next, before) in [(&b, &a), (&c, &b)] {
        write_atomically(router.path("server.crt"), &next.chain_pem).unwrap();
        write_atomically(router.path("server.key"), &next.key_pem).unwrap();
        wait_for_leaf(&ca.client(), addr, next, &[before]).await;
        // The gauge is set before the new certificate is swapped in.
        assert_eq!(expiry_metric(&router).await, Some(next.not_after as f64));
    }

    // Without an https listener there is no such series.
    let plain = Router::start(&one_version("e", &[model.addr], "")).await;
    assert_eq!(expiry_metric(&plain).await, None);
    plain.shutdown().await;
    router.shutdown().await;
}

/// Shutdown waits for in-flight requests only: a client sitting in its handshake has none,
/// so it should not hold the drain up.
#[tokio::test]
async fn a_pending_handshake_does_not_hold_up_shutdown() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, ", handshakeTimeoutMs: 2000").await;
    let addr = https(&router);
    let _silent = TcpStream::connect(addr).await.unwrap();
    // Connections are accepted in order: once this one is served, the silent one has been
    // accepted and is waiting in its handshake.
    let ex = ca.client().request(addr, score()).await.unwrap();
    assert_scored(&ex.parts, &ex.body, "m");
    let started = Instant::now();
    router.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// A client's TCP stream that keeps a copy of every byte it reads.
struct Recording {
    tcp: TcpStream,
    read: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.read
            .lock()
            .unwrap()
            .extend_from_slice(&buf.filled()[before..]);
        polled
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Over TLS too, a request head that stalls halfway is cut at the header read timeout,
/// counted from the end of the handshake.
#[tokio::test]
async fn a_stalled_head_over_tls_is_cut_at_the_header_read_timeout() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let config = format!(
        "{}clients: {{headerReadTimeoutMs: 300, idleTimeoutMs: 60000}}\n",
        tls_config("")
    );
    let router = start_tls_with(&leaf, &model, &config).await;
    let (mut tls, _) = ca.client().h1().handshake(https(&router)).await.unwrap();
    let started = Instant::now();
    let request = raw_request("e", "", "{}");
    let half_head = &request.as_bytes()[..request.find("\r\n").unwrap() + 2];
    tls.write_all(half_head).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "cut after {took:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn a_small_answer_comes_in_one_tls_record() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let router = start_tls(&leaf, &model, "").await;
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tcp = TcpStream::connect(https(&router)).await.unwrap();
    let recording = Recording {
        tcp,
        read: read.clone(),
    };
    let connector = tokio_rustls::TlsConnector::from(ca.client().h1().config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, recording).await.unwrap();
    let request = raw_request("e", "", "{}");
    // The first exchange lets the session tickets sent after the handshake arrive; the
    // second one's records are the answer's alone.
    let mut records = 0;
    for _ in 0..2 {
        let mark = read.lock().unwrap().len();
        tls.write_all(request.as_bytes()).await.unwrap();
        let (status, answer) = read_response(&mut tls).await;
        assert_eq!(status, 200, "{answer}");
        // TLS records: a 5-byte header whose last two bytes are the length.
        let bytes = read.lock().unwrap()[mark..].to_vec();
        let mut at = 0;
        records = 0;
        while at + 5 <= bytes.len() {
            at += 5 + u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) as usize;
            records += 1;
        }
    }
    assert_eq!(
        records, 1,
        "the answer's head and body came in {records} records"
    );
    router.shutdown().await;
}
