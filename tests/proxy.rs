//! The request/response contract of the data plane (DESIGN.md 1.1-1.4), over real sockets:
//! routes, request ids, header rules, key auth, versions and pins, streaming bodies and
//! limits, model error pass-through, h2c, and the metrics that traffic leaves behind.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// Helpers

/// A response header as text ("" when absent).
fn header<'a>(parts: &'a http::response::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
        .unwrap_or("")
}

/// Asserts a router-generated error: status, JSON content type, `{"error":{code,message}}`.
#[track_caller]
fn assert_router_error(parts: &http::response::Parts, body: &[u8], status: u16, code: &str) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(parts.status, status, "{text}");
    assert_eq!(header(parts, "content-type"), "application/json", "{text}");
    let v = json(body);
    assert_eq!(v["error"]["code"], code, "{text}");
    let message = v["error"]["message"].as_str().expect("error.message");
    assert!(!message.is_empty(), "{text}");
    assert_eq!(error_code(body), code);
}

/// A request with an explicit `Authorization` value (or none).
fn with_auth(method: &str, url: &str, auth: Option<&str>) -> http::request::Builder {
    let b = Request::builder().method(method).uri(url);
    match auth {
        Some(a) => b.header("authorization", a),
        None => b,
    }
}

/// A model that records, per request, whether its body arrived whole and how long it was;
/// answers 200 with the byte count.
struct BodyRecorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Result<usize, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BodyRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BodyRecorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Result<usize, String>>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        let probe =
                            (req.headers().get(http::header::USER_AGENT)).is_some_and(|ua| {
                                ua == scorefront::discovery::process::PROBE_USER_AGENT
                            });
                        async move {
                            if probe {
                                return Ok(Response::new(Full::new(Bytes::from("Healthy"))));
                            }
                            let got = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .map_err(|e| e.to_string());
                            s.lock().unwrap().push(got.clone());
                            let n = got.unwrap_or(0);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "{{\"body\":{n}}}"
                            )))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        BodyRecorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Result<usize, String>> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------
// Routes

#[tokio::test]
async fn both_route_prefixes_forward_the_rest_of_the_path_and_the_query() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let cases = [
        ("GET", "/swagger.json", "/swagger.json"),
        ("GET", "/", "/"),
        ("GET", "", "/"),
        ("POST", "/score?a=1&b=2", "/score?a=1&b=2"),
        (
            "POST",
            "/v2/models/m/infer?x=%20y",
            "/v2/models/m/infer?x=%20y",
        ),
    ];
    let mut n = 0;
    for prefix in ["/api/v1/service/fraud", "/api/v1/endpoint/fraud"] {
        for (method, rest, target) in cases {
            let url = router.url(&format!("{prefix}{rest}"));
            let (parts, body) =
                send(scoring(method, &url).body(support::body("{}")).unwrap()).await;
            assert_eq!(parts.status, 200, "{url}: {body:?}");
            assert_eq!(model_of(&body), "blue", "{url}");
            let v = json(&body);
            assert_eq!(v["path"], target, "{url}");
            assert_eq!(blue.last_target(), target, "{url}");
            assert_eq!(header(&parts, "x-model"), "blue");
            n += 1;
        }
    }
    assert_eq!(blue.requests(), n);
    router.shutdown().await;
}

#[tokio::test]
async fn bad_paths_and_unknown_endpoints_are_404_endpoint_not_found() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    for path in [
        "/",
        "/score",
        "/api/v1/service/",
        "/api/v1/service",
        "/api/v1/model/fraud/score",
        "/api/v2/service/fraud/score",
        "/api/v1/service/nope/score",
        "/api/v1/endpoint/nope",
        "/api/v1/service/frau/score",
        "/api/v1/service//score",
        "/API/V1/SERVICE/fraud/score",
    ] {
        let (parts, body) = send(
            scoring("POST", &router.url(path))
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_router_error(&parts, &body, 404, "EndpointNotFound");
        assert_eq!(header(&parts, "azureml-model-deployment"), "", "{path}");
        assert_eq!(header(&parts, "x-request-id").len(), 36, "{path}");
    }
    assert_eq!(blue.requests(), 0, "nothing reached the model");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Request ids and headers

#[tokio::test]
async fn request_ids_are_kept_or_generated_forwarded_and_echoed() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");

    // A valid id is kept, forwarded and echoed twice; the client id is echoed.
    let (parts, _) = send_ok(
        scoring("POST", &url)
            .header("x-request-id", "my-req-42")
            .header("x-ms-client-request-id", "client-7")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(header(&parts, "x-request-id"), "my-req-42");
    assert_eq!(header(&parts, "x-ms-request-id"), "my-req-42");
    assert_eq!(header(&parts, "x-ms-client-request-id"), "client-7");
    assert_eq!(blue.last_headers()["x-request-id"], "my-req-42");

    // Missing: a fresh UUID v4, the same one the model saw.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (parts, _) = send_ok(scoring("POST", &url).body(support::body("{}")).unwrap()).await;
        let id = header(&parts, "x-request-id").to_owned();
        assert_eq!(id.len(), 36, "{id}");
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert_eq!(header(&parts, "x-ms-request-id"), id);
        assert_eq!(header(&parts, "x-ms-client-request-id"), "");
        assert_eq!(blue.last_headers()["x-request-id"], id.as_str());
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");

    // Invalid (contains a space): replaced by a UUID.
    let (parts, _) = send_ok(
        scoring("POST", &url)
            .header("x-request-id", "has space")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    let id = header(&parts, "x-request-id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert_eq!(blue.last_headers()["x-request-id"], id);

    // 100 characters is fine.
    let hundred = "a".repeat(100);
    let (parts, _) = send_ok(
        scoring("POST", &url)
            .header("x-request-id", &hundred)
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(header(&parts, "x-request-id"), hundred);

    // Router errors echo ids too.
    let (parts, body) = send(
        scoring("POST", &router.url("/api/v1/service/nope/score"))
            .header("x-request-id", "lost-1")
            .header("x-ms-client-request-id", "lost-client")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_router_error(&parts, &body, 404, "EndpointNotFound");
    assert_eq!(header(&parts, "x-request-id"), "lost-1");
    assert_eq!(header(&parts, "x-ms-request-id"), "lost-1");
    assert_eq!(header(&parts, "x-ms-client-request-id"), "lost-client");

    // 101 characters in either id header: 431, and the model is not called.
    let before = blue.requests();
    let long = "b".repeat(101);
    for name in ["x-request-id", "x-ms-client-request-id"] {
        let (parts, body) = send(
            scoring("POST", &url)
                .header(name, &long)
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_router_error(&parts, &body, 431, "HeaderTooLarge");
        assert_ne!(
            header(&parts, "x-request-id"),
            long,
            "the long id is not echoed"
        );
        assert_eq!(header(&parts, "x-request-id").len(), 36);
    }
    assert_eq!(blue.requests(), before);
    router.shutdown().await;
}

#[tokio::test]
async fn authorization_and_hop_by_hop_headers_stay_at_the_router() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    send_ok(
        scoring("POST", &url)
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("upgrade", "websocket")
            .header("proxy-authorization", "Basic dXNlcjpwYXNz")
            .header("proxy-connection", "keep-alive")
            .header("traceparent", traceparent)
            .header("tracestate", "congo=t61rcWkgMzE")
            .header("x-custom", "kept")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    let seen = blue.last_headers();
    for gone in [
        "authorization",
        "x-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the model: {seen:?}"
        );
    }
    // The router's own upstream connection may carry its own Connection header, but never
    // the client's tokens.
    for v in seen.get_all("connection") {
        assert!(!v.to_str().unwrap().contains("x-private"), "{seen:?}");
    }
    assert!(
        !format!("{seen:?}").contains(KEY),
        "the key reached the model: {seen:?}"
    );
    assert_eq!(seen["traceparent"], traceparent);
    assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");

    // A prior x-forwarded-for is extended, not replaced.
    send_ok(
        scoring("POST", &url)
            .header("x-forwarded-for", "203.0.113.9")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    let seen = blue.last_headers();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(!seen.contains_key("authorization"));

    // The model's own hop-by-hop headers stay on the router's side too: a replica that
    // closes each connection does not make the router close the client's.
    blue.state.close_always.store(true, SeqCst);
    for _ in 0..2 {
        let (parts, body) = send_ok(scoring("POST", &url).body(support::body("{}")).unwrap()).await;
        assert_eq!(model_of(&body), "blue");
        assert_eq!(header(&parts, "connection"), "", "{:?}", parts.headers);
    }
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Key auth

#[tokio::test]
async fn either_key_is_accepted_and_anything_else_is_401() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");

    for auth in [
        format!("Bearer {KEY}"),
        format!("Bearer {KEY2}"),
        format!("bearer {KEY2}"),
    ] {
        let (parts, body) = send(
            with_auth("POST", &url, Some(&auth))
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200, "{auth}: {body:?}");
        assert_eq!(model_of(&body), "blue");
    }
    assert_eq!(blue.requests(), 3);

    let bad = [
        None,
        Some("Bearer wrong-key-for-tests-9999".to_owned()),
        Some(format!("Basic {KEY}")),
        Some(format!("Bearer {KEY}x")),
        Some(format!("Bearer {}", &KEY[..KEY.len() - 1])),
        Some(KEY.to_owned()),
        Some("Bearer ".to_owned()),
    ];
    for auth in &bad {
        let (parts, body) = send(
            with_auth("POST", &url, auth.as_deref())
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_router_error(&parts, &body, 401, "Unauthorized");
        assert_eq!(header(&parts, "www-authenticate"), "Bearer", "{auth:?}");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains(KEY) && !text.contains(KEY2), "{text}");
        assert!(!text.contains("wrong-key"), "{text}");
    }
    assert_eq!(blue.requests(), 3, "refused requests never reach the model");

    // No usable `Bearer` credential, then a wrong one.
    for (reason, count) in [("missing", 4.0), ("invalid_key", 3.0)] {
        metric_eventually(
            &router,
            Patience::SHORT,
            "scorefront_auth_failures_total",
            &[("endpoint", "fraud"), ("reason", reason)],
            count,
        )
        .await;
    }
    let text = router.metrics().await;
    assert!(!text.contains(KEY) && !text.contains(KEY2));
    router.shutdown().await;
}

#[tokio::test]
async fn auth_mode_none_needs_no_key() {
    let blue = Model::start("blue").await;
    let doc = format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: open}}\n\
         spec:\n  authMode: none\n  versions: [{{name: blue, replicas: ['{}']}}]\n",
        blue.addr
    );
    let router = Router::start(&doc).await;
    let url = router.url("/api/v1/endpoint/open/score");
    let (parts, body) = send_ok(
        with_auth("POST", &url, None)
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(model_of(&body), "blue");
    assert_eq!(header(&parts, "www-authenticate"), "");

    // Any credential is ignored, and still not forwarded.
    send_ok(
        with_auth("POST", &url, Some("Bearer whatever-the-client-had"))
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert!(!blue.last_headers().contains_key("authorization"));
    assert_eq!(blue.requests(), 2);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Versions

#[tokio::test]
async fn traffic_splits_90_10_over_2000_requests() {
    let blue = Model::start("blue").await;
    let green = Model::start("green").await;
    let versions = format!(
        "[{}, {}]",
        version(
            "blue",
            &[blue.addr],
            "trafficPercentile: 90, isDefault: true, maxConcurrentRequestsPerContainer: 8"
        ),
        version(
            "green",
            &[green.addr],
            "trafficPercentile: 10, maxConcurrentRequestsPerContainer: 8"
        ),
    );
    let router = Router::start(&endpoint("fraud", &versions)).await;
    const N: usize = 2000;
    const TASKS: usize = 4;
    let url = router.url("/api/v1/service/fraud/score");
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut green = 0usize;
            for _ in 0..N / TASKS {
                let req = scoring("POST", &url).body(support::body("{}")).unwrap();
                let resp = client.request(req).await.expect("response");
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                assert_eq!(parts.status, 200, "{body:?}");
                let model = model_of(&body);
                assert_eq!(header(&parts, "azureml-model-deployment"), model);
                if model == "green" {
                    green += 1;
                }
            }
            green
        }));
    }
    let mut green_count = 0;
    for t in tasks {
        green_count += t.await.unwrap();
    }
    // Binomial(2000, 0.1): mean 200, standard deviation 13.4. +-100 is 7.4 sigma, so a
    // correct router fails this about once in 10^13 runs; a 80/20 or 95/5 split fails it.
    assert!(
        (100..=300).contains(&green_count),
        "green got {green_count} of {N}, want about 200"
    );
    assert_eq!(green.requests(), green_count);
    assert_eq!(blue.requests(), N - green_count);
    router.shutdown().await;
}

#[tokio::test]
async fn pins_reach_versions_at_zero_percent_and_unknown_pins_are_404() {
    let blue = Model::start("blue").await;
    let dark = Model::start("dark").await;
    let versions = format!(
        "[{}, {}]",
        version("blue", &[blue.addr], "trafficPercentile: 100"),
        version("dark", &[dark.addr], "trafficPercentile: 0"),
    );
    let router = Router::start(&endpoint("fraud", &versions)).await;
    let url = router.url("/api/v1/service/fraud/score");
    for _ in 0..20 {
        let (parts, body) = send_ok(scoring("POST", &url).body(support::body("{}")).unwrap()).await;
        assert_eq!(model_of(&body), "blue");
        assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    }
    assert_eq!(dark.requests(), 0, "0% gets no unpinned traffic");
    for _ in 0..5 {
        let (parts, body) = send_ok(
            scoring("POST", &url)
                .header("azureml-model-deployment", "dark")
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(model_of(&body), "dark");
        assert_eq!(header(&parts, "azureml-model-deployment"), "dark");
    }
    assert_eq!(dark.requests(), 5);
    for pin in ["nope", "Dark", "blue-2"] {
        let (parts, body) = send(
            scoring("POST", &url)
                .header("azureml-model-deployment", pin)
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_router_error(&parts, &body, 404, "VersionNotFound");
        let v = json(&body);
        assert!(v["error"]["message"].as_str().unwrap().contains(pin), "{v}");
        assert_eq!(
            header(&parts, "azureml-model-deployment"),
            "",
            "no version served it"
        );
    }
    assert_eq!(dark.requests(), 5);
    assert_eq!(blue.requests(), 20);
    router.shutdown().await;
}

#[tokio::test]
async fn every_response_after_the_pick_names_the_version() {
    let blue = Model::start("blue").await;
    let slow = Model::start("slow").await;
    let versions = format!(
        "[{}, {}, {}]",
        version("blue", &[blue.addr], ""),
        version("slow", &[slow.addr], "maxRequestWaitTimeMs: 50"),
        version("dead", &[unused_addr()], ""),
    );
    let router = Router::start(&endpoint("fraud", &versions)).await;
    let url = router.url("/api/v1/service/fraud/score");
    let pinned = |v: &str| {
        scoring("POST", &url)
            .header("azureml-model-deployment", v)
            .header("x-request-id", format!("req-{v}"))
    };

    // The model's answers, good and bad.
    for status in ["200", "500"] {
        let (parts, _) = send(
            scoring("POST", &url)
                .header("x-status", status)
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status.as_str(), status);
        assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    }

    // 502: the replica is unreachable (tried, retried, gave up).
    let (parts, body) = send(pinned("dead").body(support::body("{}")).unwrap()).await;
    assert_router_error(&parts, &body, 502, "ReplicaUnavailable");
    assert_eq!(header(&parts, "azureml-model-deployment"), "dead");
    assert_eq!(header(&parts, "x-request-id"), "req-dead");

    // 503: the only slot of `slow` is taken for longer than its 50 ms wait.
    let held = tokio::spawn(send(
        pinned("slow")
            .header("x-delay-ms", "1500")
            .body(support::body("{}"))
            .unwrap(),
    ));
    until("the slow model to be busy", Patience::SHORT, || {
        slow.state.current.load(SeqCst) == 1
    })
    .await;
    let (parts, body) = send(pinned("slow").body(support::body("{}")).unwrap()).await;
    assert_router_error(&parts, &body, 503, "QueueTimeout");
    assert_eq!(header(&parts, "azureml-model-deployment"), "slow");
    assert_eq!(header(&parts, "retry-after"), "1", "{:?}", parts.headers);
    assert_eq!(header(&parts, "x-request-id"), "req-slow");
    let (parts, body) = held.await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(model_of(&body), "slow");
    assert_eq!(header(&parts, "azureml-model-deployment"), "slow");
    assert_eq!(
        slow.requests(),
        1,
        "the refused request never reached the model"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_without_versions_has_no_route() {
    let router = Router::start(&endpoint("empty", "[]")).await;
    let (parts, body) = send(
        scoring("POST", &router.url("/api/v1/endpoint/empty/score"))
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_router_error(&parts, &body, 404, "NoRoute");
    assert_eq!(header(&parts, "azureml-model-deployment"), "");
    // Auth still comes first: no key, no hint about the endpoint's versions.
    let (parts, body) = send(
        with_auth("POST", &router.url("/api/v1/endpoint/empty/score"), None)
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_router_error(&parts, &body, 401, "Unauthorized");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Bodies

#[tokio::test]
async fn large_request_bodies_stream_to_the_model_intact() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");

    // With Content-Length.
    let size = 4 * 1024 * 1024 + 7;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (_, body) = send_ok(scoring("POST", &url).body(support::body(payload)).unwrap()).await;
    assert_eq!(body_len_of(&body), size as u64);

    // Chunked, without Content-Length.
    let chunks: Vec<Bytes> = (0..48)
        .map(|i| Bytes::from(vec![i as u8; 64 * 1024]))
        .collect();
    let (_, body) = send_ok(
        scoring("POST", &url)
            .body(chunked(chunks, Duration::ZERO))
            .unwrap(),
    )
    .await;
    assert_eq!(body_len_of(&body), 48 * 64 * 1024);
    assert!(!blue.last_headers().contains_key("content-length"));
    router.shutdown().await;
}

#[tokio::test]
async fn request_bodies_arrive_byte_for_byte() {
    // The fake model only counts bytes; this one echoes them back.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let bytes = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(Response::new(Full::new(bytes)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let router = Router::start(&one_version("echo", &[addr], "")).await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (_, body) = send_ok(
        scoring("PUT", &router.url("/api/v1/service/echo/score"))
            .body(support::body(payload.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(body.len(), payload.len());
    assert!(body == payload, "the body came back changed");
    echo.abort();
    router.shutdown().await;
}

#[tokio::test]
async fn streamed_responses_arrive_chunk_by_chunk() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let req = scoring("GET", &router.url("/api/v1/service/fraud/stream"))
        .header("x-stream", "5")
        .body(support::body(""))
        .unwrap();
    let resp = client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-model"], "blue");
    assert_eq!(resp.headers()["azureml-model-deployment"], "blue");
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            frames.push(data);
        }
    }
    let all: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
    let want: String = (0..5).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(String::from_utf8(all).unwrap(), want);
    // The model sends a chunk every 20 ms; a router that buffered the body would deliver
    // it in one frame.
    assert!(frames.len() >= 2, "{frames:?}");
    assert_eq!(frames[0], "chunk-0\n");
    router.shutdown().await;
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_413_before_the_model_sees_anything() {
    let blue = Model::start("blue").await;
    let router = Router::start_with(
        &router_config("maxRequestBodyBytes: 1000\n"),
        &one_version("fraud", &[blue.addr], ""),
    )
    .await;
    let url = router.url("/api/v1/service/fraud/score");
    let (parts, body) = send(
        scoring("POST", &url)
            .body(support::body(vec![b'x'; 1001]))
            .unwrap(),
    )
    .await;
    assert_router_error(&parts, &body, 413, "PayloadTooLarge");
    assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    assert_eq!(blue.requests(), 0);
    assert_eq!(
        blue.state.connections.load(SeqCst),
        0,
        "not even a connection"
    );

    // At the limit is fine.
    let (parts, body) = send(
        scoring("POST", &url)
            .body(support::body(vec![b'x'; 1000]))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(body_len_of(&body), 1000);
    router.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_is_413_and_never_reaches_the_model_whole() {
    let model = BodyRecorder::start().await;
    let router = Router::start_with(
        // No request buffering: the body is found too large while it streams.
        &router_config("maxRequestBodyBytes: 1000\nclients: {requestBufferBytes: 0}\n"),
        &one_version("fraud", &[model.addr], ""),
    )
    .await;
    let url = router.url("/api/v1/service/fraud/score");
    let chunks = vec![Bytes::from(vec![b'a'; 600]), Bytes::from(vec![b'b'; 600])];
    let (parts, body) = send(
        scoring("POST", &url)
            .body(chunked(chunks, Duration::ZERO))
            .unwrap(),
    )
    .await;
    assert_router_error(&parts, &body, 413, "PayloadTooLarge");
    assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    // The model may have started reading, but its body must end in an error, never as a
    // complete 1200-byte (or truncated but "complete") body.
    until("the model to see the broken body", Patience::SHORT, || {
        !model.seen().is_empty()
    })
    .await;
    let seen = model.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].is_err(), "the model got a complete body: {seen:?}");

    // Chunked within the limit still works afterwards.
    let chunks = vec![Bytes::from(vec![b'a'; 500]), Bytes::from(vec![b'b'; 500])];
    let (_, body) = send_ok(
        scoring("POST", &url)
            .body(chunked(chunks, Duration::ZERO))
            .unwrap(),
    )
    .await;
    assert_eq!(body_len_of(&body), 1000);
    assert_eq!(model.seen().last(), Some(&Ok(1000)));
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Model errors

#[tokio::test]
async fn model_4xx_and_5xx_pass_through_unchanged() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score?q=1");
    for status in [400u16, 404, 422, 429, 500, 502, 503, 504] {
        let (parts, body) = send(
            scoring("POST", &url)
                .header("x-status", status.to_string())
                .body(support::body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, status, "{body:?}");
        assert_eq!(header(&parts, "x-model"), "blue");
        assert_eq!(header(&parts, "content-type"), "application/json");
        let v = json(&body);
        assert_eq!(
            v,
            serde_json::json!({"model": "blue", "path": "/score?q=1", "body": 2}),
            "{status}"
        );
        assert_eq!(
            header(&parts, "retry-after"),
            "",
            "{status}: no router headers added"
        );
        assert_eq!(header(&parts, "www-authenticate"), "");
        assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    }
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
#[tokio::test]
async fn content_length_beside_transfer_encoding_is_framed_by_the_encoding_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let mut stream = TcpStream::connect(router.http).await.unwrap();
    // RFC 9112 6.1: a request with both is read by Transfer-Encoding alone, the length
    // never reaches the next hop (where it could frame another request), and the
    // connection is closed after the answer.
    let request = format!(
        "POST /api/v1/service/fraud/score HTTP/1.1\r\nHost: router\r\n\
         Authorization: Bearer {KEY}\r\nContent-Length: 3\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the router closes the connection")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(
        body_len_of(answer.split("\r\n\r\n").nth(1).unwrap().as_bytes()),
        5
    );
    // The body was read whole before it was forwarded, so it goes with the length it
    // turned out to have, never the one the client claimed.
    let seen = blue.last_headers();
    assert_eq!(seen["content-length"], "5", "{seen:?}");
    assert!(!seen.contains_key("transfer-encoding"), "{seen:?}");
}

// HTTP/2

#[tokio::test]
async fn h2c_with_prior_knowledge_works() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version(
        "fraud",
        &[blue.addr],
        "maxConcurrentRequestsPerContainer: 4",
    ))
    .await;
    let stream = TcpStream::connect(router.http).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let driver = tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut sender = sender.clone();
        let url = router.url(&format!("/api/v1/endpoint/fraud/score?i={i}"));
        tasks.push(tokio::spawn(async move {
            let req: Request<TestBody> = scoring("POST", &url)
                .header("x-request-id", format!("h2-{i}"))
                .body(support::body("{\"h2\":true}"))
                .unwrap();
            let resp = sender.send_request(req).await.expect("h2 response");
            let (parts, body) = resp.into_parts();
            (i, parts, body.collect().await.unwrap().to_bytes())
        }));
    }
    for t in tasks {
        let (i, parts, body) = t.await.unwrap();
        assert_eq!(parts.status, 200, "{body:?}");
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert_eq!(model_of(&body), "blue");
        assert_eq!(body_len_of(&body), 11);
        let v = json(&body);
        assert_eq!(v["path"], format!("/score?i={i}"));
        assert_eq!(header(&parts, "x-request-id"), format!("h2-{i}"));
        assert_eq!(header(&parts, "azureml-model-deployment"), "blue");
    }
    assert_eq!(blue.requests(), 4);
    let seen = blue.last_headers();
    assert!(!seen.contains_key("authorization"));
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.contains_key("host"), "{seen:?}");

    // Router errors over h2 too.
    let req: Request<TestBody> = scoring("GET", &router.url("/api/v1/endpoint/nope/"))
        .body(support::body(""))
        .unwrap();
    let resp = sender.clone().send_request(req).await.expect("h2 response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_router_error(&parts, &body, 404, "EndpointNotFound");
    drop(sender);
    driver.abort();
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn traffic_shows_up_in_metrics() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version(
        "fraud",
        &[blue.addr],
        "maxRequestWaitTimeMs: 3000",
    ))
    .await;
    let url = router.url("/api/v1/service/fraud/score");
    for _ in 0..3 {
        send_ok(scoring("POST", &url).body(support::body("{}")).unwrap()).await;
    }
    let (parts, _) = send(
        scoring("POST", &url)
            .header("x-status", "500")
            .body(support::body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 500);
    let (parts, _) = send(
        scoring("POST", &router.url("/api/v1/service/nope/score"))
            .body(support::body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 404);

    let ev = [("endpoint", "fraud"), ("version", "blue")];
    let code = |c| [("code", c), ("endpoint", "fraud"), ("version", "blue")];
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_requests_total",
        &code("200"),
        3.0,
    )
    .await;
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_requests_total",
        &code("500"),
        1.0,
    )
    .await;
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_requests_total",
        &[("code", "404"), ("endpoint", ""), ("version", "")],
        1.0,
    )
    .await;
    for h in [
        "scorefront_request_duration_seconds_count",
        "scorefront_queue_wait_seconds_count",
        "scorefront_upstream_duration_seconds_count",
    ] {
        metric_eventually(&router, Patience::SHORT, h, &ev, 4.0).await;
    }
    let text = router.metrics().await;
    let sum = metric(&text, "scorefront_request_duration_seconds_sum", &ev).unwrap();
    assert!(sum > 0.0, "{text}");
    let le = |b| [("endpoint", "fraud"), ("version", "blue"), ("le", b)];
    assert_eq!(
        metric(
            &text,
            "scorefront_request_duration_seconds_bucket",
            &le("+Inf")
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "scorefront_in_flight_requests", &ev),
        Some(0.0)
    );
    assert_eq!(metric(&text, "scorefront_queued_requests", &ev), Some(0.0));
    let state = |s| [("endpoint", "fraud"), ("state", s), ("version", "blue")];
    assert_eq!(
        metric(&text, "scorefront_replicas", &state("ready")),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "scorefront_replicas", &state("busy")),
        Some(0.0)
    );

    // Live gauges: one request at the replica, one waiting for its only slot.
    let held = tokio::spawn(send(
        scoring("POST", &url)
            .header("x-delay-ms", "1500")
            .body(support::body("{}"))
            .unwrap(),
    ));
    until("the model to be busy", Patience::SHORT, || {
        blue.state.current.load(SeqCst) == 1
    })
    .await;
    let waiting = tokio::spawn(send(
        scoring("POST", &url).body(support::body("{}")).unwrap(),
    ));
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_queued_requests",
        &ev,
        1.0,
    )
    .await;
    let text = router.metrics().await;
    assert_eq!(
        metric(&text, "scorefront_in_flight_requests", &ev),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "scorefront_replicas", &state("busy")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(held.await.unwrap().0.status, 200);
    assert_eq!(waiting.await.unwrap().0.status, 200);
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_requests_total",
        &code("200"),
        5.0,
    )
    .await;
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_queue_wait_seconds_count",
        &ev,
        6.0,
    )
    .await;
    let text = router.metrics().await;
    assert_eq!(
        metric(&text, "scorefront_in_flight_requests", &ev),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "scorefront_queued_requests", &ev),
        Some(0.0),
        "{text}"
    );
    router.shutdown().await;
}
