//! Capacity: replica slots, the wait queue and its bounds, scoring timeouts, the retry-once
//! rule, slot release on every way a request can end, and upstream keep-alive. Real
//! sockets throughout: fake models on loopback, the router started from real files.

mod support;

use std::{
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::Duration,
};

use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

/// An endpoint `cap` with one version `blue` on `replicas`, with extra version `settings`.
async fn router_one(replicas: &[SocketAddr], settings: &str) -> Router {
    Router::start(&one_version("cap", replicas, settings)).await
}

/// A scoring POST to endpoint `cap` with extra headers.
fn req(router: &Router, headers: &[(&str, &str)]) -> Request<TestBody> {
    scoring_post(&router.url("/api/v1/service/cap/score"), KEY, headers, "{}")
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of gauge `name` for endpoint `cap` on the router's /metrics.
async fn gauge(router: &Router, name: &str) -> Option<f64> {
    metric(&router.metrics().await, name, &[("endpoint", "cap")])
}

/// Polls /metrics until gauge `name` of endpoint `cap` equals `want`.
async fn wait_gauge(router: &Router, name: &str, want: f64) {
    metric_eventually(router, Patience::SHORT, name, &[("endpoint", "cap")], want).await;
}

const IN_FLIGHT: &str = "scorefront_in_flight_requests";
const QUEUED: &str = "scorefront_queued_requests";

/// Sends `req`, asserts a 200 from a fake model and returns the model's name.
async fn ok(req: Request<TestBody>) -> String {
    model_of(&send_ok(req).await.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_never_get_more_than_their_slots() {
    let (a, b) = (Model::start("a").await, Model::start("b").await);
    let router = router_one(
        &[a.addr, b.addr],
        "maxConcurrentRequestsPerContainer: 2, maxRequestWaitTimeMs: 4000, maxPendingRequests: 100",
    )
    .await;
    let tasks: Vec<_> = (0..40)
        .map(|_| tokio::spawn(send(req(&router, &[("x-delay-ms", "50")]))))
        .collect();
    for t in tasks {
        let (parts, body) = t.await.unwrap();
        assert_eq!(parts.status, 200, "{body:?}");
    }
    assert_eq!(a.requests() + b.requests(), 40);
    let conns = a.state.connections.load(SeqCst) + b.state.connections.load(SeqCst);
    assert!(
        conns <= 20,
        "pooled connections are reused: {conns} for 40 requests"
    );
    assert!(a.requests() > 0 && b.requests() > 0, "both replicas serve");
    assert!(a.max_concurrent() <= 2, "a had {}", a.max_concurrent());
    assert!(b.max_concurrent() <= 2, "b had {}", b.max_concurrent());
    assert_eq!(
        a.max_concurrent().max(b.max_concurrent()),
        2,
        "40 requests on 4 slots fill a replica"
    );
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_longer_than_max_wait_is_503_queue_timeout() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "maxRequestWaitTimeMs: 100").await;
    let holder = tokio::spawn(send(req(&router, &[("x-delay-ms", "1500")])));
    until("the holder at the model", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 1
    })
    .await;

    let start = Instant::now();
    let (parts, body) = send(req(&router, &[])).await;
    let waited = start.elapsed();
    assert_eq!(parts.status, 503, "{body:?}");
    assert_eq!(error_code(&body), "QueueTimeout");
    assert!(
        header(&parts, "retry-after").is_some(),
        "{:?}",
        parts.headers
    );
    assert_eq!(header(&parts, "azureml-model-deployment"), Some("blue"));
    assert!(
        waited >= Duration::from_millis(90),
        "gave up after {waited:?}"
    );
    assert!(
        !holder.is_finished(),
        "the 503 came while the slot was held"
    );
    assert_eq!(
        m.requests(),
        1,
        "the timed-out request never reached the model"
    );

    let (parts, _) = holder.await.unwrap();
    assert_eq!(parts.status, 200);
    wait_gauge(&router, QUEUED, 0.0).await;
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_at_once() {
    let m = Model::start("m").await;
    let router = router_one(
        &[m.addr],
        "maxPendingRequests: 1, maxRequestWaitTimeMs: 4000",
    )
    .await;
    let holder = tokio::spawn(send(req(&router, &[("x-delay-ms", "1500")])));
    until("the holder at the model", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 1
    })
    .await;
    let waiter = tokio::spawn(send(req(&router, &[])));
    wait_gauge(&router, QUEUED, 1.0).await;

    let (parts, body) = send(req(&router, &[])).await;
    assert_eq!(parts.status, 429, "{body:?}");
    assert_eq!(error_code(&body), "TooManyPendingRequests");
    assert!(
        header(&parts, "retry-after").is_some(),
        "{:?}",
        parts.headers
    );
    assert_eq!(header(&parts, "azureml-model-deployment"), Some("blue"));
    assert!(!holder.is_finished(), "429 did not wait for the slot");
    assert!(!waiter.is_finished(), "the waiter still waits");

    assert_eq!(holder.await.unwrap().0.status, 200);
    assert_eq!(
        waiter.await.unwrap().0.status,
        200,
        "the waiter gets the slot"
    );
    assert_eq!(
        m.requests(),
        2,
        "the refused request never reached the model"
    );
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_served_in_arrival_order() {
    let m = Model::start("m").await;
    let router = router_one(
        &[m.addr],
        "maxPendingRequests: 50, maxRequestWaitTimeMs: 4000",
    )
    .await;
    let holder = tokio::spawn(send(req(&router, &[("x-delay-ms", "1500")])));
    until("the holder at the model", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 1
    })
    .await;

    let done = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..6 {
        let (r, done) = (req(&router, &[("x-delay-ms", "30")]), done.clone());
        waiters.push(tokio::spawn(async move {
            let (parts, body) = send(r).await;
            done.lock().unwrap().push(i);
            (parts.status, body)
        }));
        wait_gauge(&router, QUEUED, (i + 1) as f64).await;
    }
    assert!(!holder.is_finished(), "all six queued behind the holder");
    assert_eq!(holder.await.unwrap().0.status, 200);
    for w in waiters {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!(*done.lock().unwrap(), (0..6).collect::<Vec<_>>(), "FIFO");
    assert_eq!(m.max_concurrent(), 1);
    assert_eq!(m.requests(), 7);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_timeout_is_504_and_frees_the_slot() {
    let m = Model::start("m").await;
    let router = router_one(
        &[m.addr],
        "scoringTimeoutMs: 200, maxRequestWaitTimeMs: 100",
    )
    .await;
    let (parts, body) = send(req(&router, &[("x-delay-ms", "5000")])).await;
    assert_eq!(parts.status, 504, "{body:?}");
    assert_eq!(error_code(&body), "ScoringTimeout");
    assert_eq!(header(&parts, "azureml-model-deployment"), Some("blue"));
    // The model still sleeps on the first request; only a freed slot lets this one in
    // within the 100 ms wait.
    assert_eq!(ok(req(&router, &[])).await, "m");
    assert_eq!(m.requests(), 2);
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    // The router dropped the timed-out exchange's connection, so the model stops too.
    until(
        "the model to see the abandoned request go",
        Patience::SHORT,
        || m.state.current.load(SeqCst) == 0,
    )
    .await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsent_requests_are_retried_once_on_another_replica() {
    let live = Model::start("live").await;
    let versions = format!(
        "[{}, {}]",
        version("mixed", &[unused_addr(), live.addr], ""),
        version("dead", &[unused_addr(), unused_addr()], "")
    );
    let router = Router::start(&endpoint("cap", &versions)).await;
    for _ in 0..20 {
        assert_eq!(ok(req(&router, &[])).await, "live");
    }
    assert_eq!(live.requests(), 20);

    let (parts, body) = send(req(&router, &[("azureml-model-deployment", "dead")])).await;
    assert_eq!(parts.status, 502, "{body:?}");
    assert_eq!(error_code(&body), "ReplicaUnavailable");
    assert_eq!(header(&parts, "azureml-model-deployment"), Some("dead"));
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_replica_received_is_not_retried() {
    let (a, b) = (Model::start("a").await, Model::start("b").await);
    let router = router_one(&[a.addr, b.addr], "").await;
    let (parts, body) = send(req(&router, &[("x-close-early", "1")])).await;
    assert_eq!(parts.status, 502, "{body:?}");
    assert_eq!(error_code(&body), "ReplicaUnavailable");
    assert_eq!(
        a.requests() + b.requests(),
        1,
        "exactly one replica saw it, once"
    );
    router.shutdown().await;
}

/// Writes a scoring request by hand on a fresh connection to the router.
async fn raw_request(router: &Router, headers: &str) -> TcpStream {
    let mut s = TcpStream::connect(router.http).await.unwrap();
    let head = format!(
        "POST /api/v1/service/cap/score HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {KEY}\r\n\
         content-length: 0\r\n{headers}\r\n",
        router.http
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "maxRequestWaitTimeMs: 3000").await;

    // A raw connection closed while the model works on its request.
    let conn = raw_request(&router, "x-delay-ms: 30000\r\n").await;
    until("the request at the model", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 1
    })
    .await;
    drop(conn);
    // The model would hold the slot for 30 s: only the release lets this one through.
    assert_eq!(ok(req(&router, &[])).await, "m");
    wait_gauge(&router, IN_FLIGHT, 0.0).await;

    // An HTTP client whose request future is dropped (a client-side timeout).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        send(req(&router, &[("x-delay-ms", "30000")])),
    )
    .await;
    assert!(gave_up.is_err(), "the model answers after 30 s, not 50 ms");
    assert_eq!(ok(req(&router, &[])).await, "m");
    wait_gauge(&router, IN_FLIGHT, 0.0).await;

    // A waiter that gives up while queued leaves the queue without taking a slot.
    until("the model to drop abandoned work", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 0
    })
    .await;
    let holder = tokio::spawn(send(req(&router, &[("x-delay-ms", "1500")])));
    until("the holder at the model", Patience::SHORT, || {
        m.state.current.load(SeqCst) == 1
    })
    .await;
    let before = m.requests();
    let quitter = tokio::spawn(send(req(&router, &[])));
    wait_gauge(&router, QUEUED, 1.0).await;
    quitter.abort();
    wait_gauge(&router, QUEUED, 0.0).await;
    assert!(
        !holder.is_finished(),
        "the queue emptied because the waiter left"
    );
    assert_eq!(holder.await.unwrap().0.status, 200);
    assert_eq!(ok(req(&router, &[])).await, "m");
    assert_eq!(
        m.requests(),
        before + 1,
        "the quitter never reached the model"
    );
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_frees_its_slot() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "maxRequestWaitTimeMs: 3000").await;
    {
        // 1000 chunks 20 ms apart: the stream would hold the slot for 20 s.
        let client = client();
        let resp = client
            .request(req(&router, &[("x-stream", "1000")]))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "chunk-0\n");
        assert_eq!(
            gauge(&router, IN_FLIGHT).await,
            Some(1.0),
            "the stream holds it"
        );
    }
    assert_eq!(ok(req(&router, &[])).await, "m");
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_free_the_slot() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "maxRequestWaitTimeMs: 100").await;
    for _ in 0..3 {
        let (parts, body) = send(req(&router, &[("x-status", "500")])).await;
        assert_eq!(parts.status, 500, "the model's status passes through");
        assert_eq!(model_of(&body), "m");
        assert_eq!(ok(req(&router, &[])).await, "m");

        let (parts, body) = send(req(&router, &[("x-close-early", "1")])).await;
        assert_eq!(parts.status, 502, "{body:?}");
        assert_eq!(error_code(&body), "ReplicaUnavailable");
        assert_eq!(ok(req(&router, &[])).await, "m");
    }
    assert_eq!(m.requests(), 12);
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "").await;
    for _ in 0..50 {
        assert_eq!(ok(req(&router, &[])).await, "m");
    }
    assert_eq!(m.requests(), 50);
    let conns = m.state.connections.load(SeqCst);
    assert!(
        conns <= 2,
        "50 sequential requests used {conns} connections"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_closes_every_connection_still_serves() {
    let m = Model::start("m").await;
    m.state.close_always.store(true, SeqCst);
    let router = router_one(&[m.addr], "").await;
    for _ in 0..50 {
        let (parts, body) = send(req(&router, &[])).await;
        assert_eq!(parts.status, 200, "{body:?}");
        assert!(
            header(&parts, "connection").is_none(),
            "hop-by-hop headers are not passed on"
        );
    }
    assert_eq!(m.requests(), 50);
    assert_eq!(
        m.state.connections.load(SeqCst),
        50,
        "one connection per request"
    );
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_off_by_the_scoring_timeout_frees_the_slot() {
    let m = Model::start("m").await;
    let router = router_one(
        &[m.addr],
        "scoringTimeoutMs: 300, maxRequestWaitTimeMs: 3000",
    )
    .await;
    let client = client();
    let resp = client
        .request(req(&router, &[("x-stream", "1000")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "headers came before the deadline");
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(Patience::SHORT.within, async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => received.extend_from_slice(frame.data_ref().unwrap()),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the router cuts the stream at the scoring timeout");
    assert!(
        outcome.is_err(),
        "a cut-off body ends with an error, not a clean end"
    );
    let text = String::from_utf8(received).unwrap();
    assert!(text.starts_with("chunk-0\n"), "{text:?}");
    assert!(!text.contains("chunk-999"), "the body was truncated");
    // The model would stream for 20 s more: the slot was released at the cut.
    assert_eq!(ok(req(&router, &[])).await, "m");
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    drop(body);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_client_that_reads_part_of_a_stream_and_leaves_frees_the_slot() {
    let m = Model::start("m").await;
    let router = router_one(&[m.addr], "maxRequestWaitTimeMs: 3000").await;
    let mut conn = raw_request(&router, "x-stream: 1000\r\n").await;
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    tokio::time::timeout(Patience::SHORT.within, async {
        while !seen.contains("chunk-1") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "router closed early: {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("two chunks arrive");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    drop(conn);
    assert_eq!(ok(req(&router, &[])).await, "m");
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

/// 20 concurrent requests (40 with 2 slots) on a version whose first replica refuses
/// connections: the retry never goes back to it, so every request is served.
async fn dead_replica_under_load(slots: u32, n: usize) {
    let live = Model::start("live").await;
    let router = router_one(
        &[unused_addr(), live.addr],
        &format!(
            "maxConcurrentRequestsPerContainer: {slots}, maxRequestWaitTimeMs: 4000, \
             maxPendingRequests: 100"
        ),
    )
    .await;
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(send(req(&router, &[("x-delay-ms", "20")]))))
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        let (parts, body) = t.await.unwrap();
        if parts.status != 200 {
            failed.push((parts.status, body));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(live.requests(), n);
    assert!(live.max_concurrent() <= slots as usize);
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    wait_gauge(&router, QUEUED, 0.0).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_under_load_never_returns_to_the_dead_replica() {
    dead_replica_under_load(1, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_under_load_never_returns_to_the_dead_replica_with_two_slots() {
    dead_replica_under_load(2, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_all_dead_replicas_are_502_without_waiting() {
    let router = router_one(
        &[unused_addr(), unused_addr()],
        "maxRequestWaitTimeMs: 4000, maxPendingRequests: 100",
    )
    .await;
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(send(req(&router, &[]))))
        .collect();
    for t in tasks {
        let (parts, body) = tokio::time::timeout(Patience::SHORT.within, t)
            .await
            .expect("a refused request does not wait out the queue")
            .unwrap();
        assert_eq!(parts.status, 502, "{body:?}");
        assert_eq!(error_code(&body), "ReplicaUnavailable");
    }
    wait_gauge(&router, IN_FLIGHT, 0.0).await;
    router.shutdown().await;
}

/// A loopback address that never completes a TCP handshake: a listener with a backlog of
/// 0 whose one queue place is taken, so the kernel drops further SYNs. Keep the returned
/// sockets alive while it is in use.
fn blackhole() -> (SocketAddr, std::net::TcpStream, OwnedFd) {
    // SAFETY: plain socket calls on a fresh descriptor owned by the returned OwnedFd.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        owned
    };
    let listener = std::net::TcpListener::from(fd.try_clone().unwrap());
    let addr = listener.local_addr().unwrap();
    std::mem::forget(listener); // `fd` owns the descriptor
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (addr, filler, fd)
}

#[tokio::test]
async fn a_replica_that_never_accepts_is_given_up_after_the_connect_timeout() {
    let live = Model::start("live").await;
    let (hole, _filler, _listener) = blackhole();
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(hole),
    )
    .await;
    assert!(probe.is_err(), "the blackhole must not accept: {probe:?}");

    let config = router_config("upstream: {connectTimeoutMs: 100}\n");
    let endpoints = format!(
        "{}---\n{}",
        one_version(
            "cap",
            &[hole, live.addr],
            "maxConcurrentRequestsPerContainer: 4"
        ),
        one_version("dead", &[hole], "scoringTimeoutMs: 30000")
    );
    let router = Router::start_with(&config, &endpoints).await;
    for _ in 0..10 {
        assert_eq!(ok(req(&router, &[])).await, "live");
    }
    let started = Instant::now();
    let (parts, body) = send(scoring_post(
        &router.url("/api/v1/service/dead/score"),
        KEY,
        &[],
        "{}",
    ))
    .await;
    assert_eq!(parts.status, 502, "{body:?}");
    assert_eq!(error_code(&body), "ReplicaUnavailable");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up at the connect timeout, not the 30 s scoring timeout"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn idle_replica_connections_are_not_reused_after_the_idle_timeout() {
    let model = Model::start("m").await;
    let config = router_config("upstream: {idleTimeoutMs: 100}\n");
    let router = Router::start_with(&config, &one_version("cap", &[model.addr], "")).await;
    ok(req(&router, &[])).await;
    ok(req(&router, &[])).await;
    assert_eq!(
        model.state.connections.load(SeqCst),
        1,
        "reused while fresh"
    );
    // Idle for longer than the timeout (a real wait: the timeout is about real sockets).
    tokio::time::sleep(Duration::from_millis(250)).await;
    ok(req(&router, &[])).await;
    assert_eq!(
        model.state.connections.load(SeqCst),
        2,
        "a stale connection is not reused"
    );
    router.shutdown().await;
}
