//! Lifecycle: hot reload (splits, keys, invalid files, router config, SIGHUP), reloads under
//! load, draining of removed replicas and on shutdown, the admin port, local process
//! replicas (supervision, restart, no orphans), and the real binary (`serve` under SIGTERM
//! and SIGKILL, `check-config`).
//!
//! Everything is real: loopback sockets, files in temporary folders, child processes
//! (`python3 examples/sample_model.py`). Nothing waits with a fixed sleep: state is polled
//! with a bounded timeout.

mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use support::*;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{RwLock, watch},
    task::JoinHandle,
};

/// Tests that run routers inside this process hold this for reading; the SIGHUP test holds
/// it for writing, so its signal (delivered to every router of the process) cannot race
/// another test's reload.
static SIGNALS: RwLock<()> = RwLock::const_new(());

const NEW_KEY: &str = "rotated-primary-key-0003";
const NEW_KEY2: &str = "rotated-secondary-key-0004";

// ---------------------------------------------------------------------------------------
// helpers

/// Sends a request and reads the whole answer; panics if none comes within 15 s.
async fn exchange(req: Request<TestBody>) -> (http::response::Parts, Bytes) {
    tokio::time::timeout(Duration::from_secs(15), send(req))
        .await
        .expect("an answer within 15 s")
}

/// `POST {url}` with `Authorization: Bearer {key}`, extra headers and a body.
async fn score(
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    payload: impl Into<Bytes>,
) -> (http::response::Parts, Bytes) {
    exchange(scoring_post(url, key, headers, payload)).await
}

/// GET without panicking when nothing listens (yet, or any more).
async fn try_get(url: &str) -> Option<(StatusCode, Bytes)> {
    let req = Request::get(url).body(body("")).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, bytes))
}

/// Whether a TCP connection to `addr` is refused (nothing listens).
async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Err(_))
    )
}

/// Blue (default) and green versions on fixed replicas, `green_pct` of traffic to green.
fn blue_green(blue: SocketAddr, green: SocketAddr, green_pct: u32) -> String {
    let versions = format!(
        "[{}, {}]",
        version("blue", &[blue], ""),
        version(
            "green",
            &[green],
            &format!("trafficPercentile: {green_pct}")
        ),
    );
    endpoint("fraud", &versions)
}

/// Which models answered `n` sequential scoring requests (all must be 200).
async fn models_answering(router: &Router, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (parts, body) = score(&router.url("/api/v1/service/fraud/score"), KEY, &[], "{}").await;
        assert_eq!(parts.status, 200, "{body:?}");
        let model = model_of(&body);
        let version = parts.headers["azureml-model-deployment"].to_str().unwrap();
        if ["blue", "green"].contains(&model.as_str()) {
            assert_eq!(
                version, model,
                "the version header names the version that served"
            );
        }
        seen.push(model);
    }
    seen
}

fn all_equal(seen: &[String], want: &str) -> bool {
    seen.iter().all(|m| m == want)
}

/// Whether process `pid` exists (a zombie still counts: it has not been reaped).
fn proc_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// An endpoint `fraud` with one version `blue` of `count` sample model processes.
fn sample_endpoint(count: u32, extra: &str) -> String {
    endpoint(
        "fraud",
        &format!(
            "[{{name: blue, command: 'python3 {} --port {{port}}', replicaCount: {count}{extra}}}]",
            sample_model()
        ),
    )
}

/// The pid that answered a sample model request, checking the rest of the answer.
fn sample_pid(body: &[u8]) -> i32 {
    let v = json(body);
    assert_eq!(v["version"], "blue", "{v}");
    assert_eq!(v["input"], serde_json::json!({"n": 1}), "{v}");
    v["pid"].as_i64().expect("pid") as i32
}

/// Scores against sample models until `want` distinct pids have answered; returns them.
async fn pids_answering(url: &str, want: usize) -> HashSet<i32> {
    let mut pids = HashSet::new();
    let deadline = Deadline::new(
        format!("{want} replica processes answering at {url}"),
        Patience::LONG,
    );
    loop {
        let (parts, body) = score(url, KEY, &[], r#"{"n": 1}"#).await;
        if parts.status == 200 {
            pids.insert(sample_pid(&body));
        }
        if pids.len() >= want {
            return pids;
        }
        deadline.tick().await;
    }
}

/// A model whose requests carrying `x-gate` wait until the test opens the gate, so a test
/// knows for certain that a request is in flight.
struct Gated {
    addr: SocketAddr,
    /// Requests received.
    requests: Arc<AtomicUsize>,
    /// Requests waiting at the gate now.
    held: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gated {
    async fn start(name: &str) -> Gated {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, open) = watch::channel(false);
        let requests = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let (r, h, name) = (requests.clone(), held.clone(), name.to_string());
        let svc = service_fn(move |req: Request<Incoming>| {
            let (r, h, name, mut open) = (r.clone(), h.clone(), name.clone(), open.clone());
            async move {
                if req
                    .headers()
                    .get(http::header::USER_AGENT)
                    .is_some_and(|ua| ua == scorefront::discovery::process::PROBE_USER_AGENT)
                {
                    // Health probes are not traffic.
                    let ok = Response::new(Full::new(Bytes::from("Healthy")));
                    return Ok::<_, Infallible>(ok);
                }
                r.fetch_add(1, SeqCst);
                let gated = req.headers().contains_key("x-gate");
                let _ = req.into_body().collect().await;
                if gated {
                    h.fetch_add(1, SeqCst);
                    let _ = open.wait_for(|o| *o).await;
                    h.fetch_sub(1, SeqCst);
                }
                let answer = serde_json::json!({"model": name}).to_string();
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(answer)))
                        .unwrap(),
                )
            }
        });
        let task = serve_connections(listener, svc);
        Gated {
            addr,
            requests,
            held,
            gate,
            task,
        }
    }

    fn held(&self) -> usize {
        self.held.load(SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------------
// hot reload

#[tokio::test]
async fn traffic_split_change_applies_on_reload() {
    let _signals = SIGNALS.read().await;
    let (blue, green) = (Model::start("blue").await, Model::start("green").await);
    let router = Router::start(&blue_green(blue.addr, green.addr, 0)).await;
    let seen = models_answering(&router, 20).await;
    assert!(all_equal(&seen, "blue"), "{seen:?}");

    router.reload(&blue_green(blue.addr, green.addr, 100)).await;
    let seen = models_answering(&router, 20).await;
    assert!(all_equal(&seen, "green"), "{seen:?}");

    router.reload(&blue_green(blue.addr, green.addr, 0)).await;
    let seen = models_answering(&router, 20).await;
    assert!(all_equal(&seen, "blue"), "{seen:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn series_of_a_removed_version_leave_the_metrics() {
    let _signals = SIGNALS.read().await;
    let (blue, green) = (Model::start("blue").await, Model::start("green").await);
    let router = Router::start(&blue_green(blue.addr, green.addr, 100)).await;
    let seen = models_answering(&router, 5).await;
    assert!(all_equal(&seen, "green"), "{seen:?}");
    let text = router.metrics().await;
    assert!(text.contains(r#"version="green""#), "{text}");

    router.reload(&one_version("fraud", &[blue.addr], "")).await;
    let text = router.metrics().await;
    assert!(!text.contains(r#"version="green""#), "{text}");
    assert!(
        text.contains(r#"endpoint="fraud",version="blue""#),
        "{text}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn keys_rotate_without_restart() {
    let _signals = SIGNALS.read().await;
    let blue = Model::start("blue").await;
    let versions = format!("[{}]", version("blue", &[blue.addr], ""));
    let router = Router::start(&endpoint("fraud", &versions)).await;
    let url = router.url("/api/v1/service/fraud/score");
    for key in [KEY, KEY2] {
        assert_eq!(score(&url, key, &[], "{}").await.0.status, 200);
    }
    assert_eq!(score(&url, NEW_KEY, &[], "{}").await.0.status, 401);

    router
        .reload(&endpoint_with_keys("fraud", NEW_KEY, NEW_KEY2, &versions))
        .await;
    for old in [KEY, KEY2] {
        let (parts, body) = score(&url, old, &[], "{}").await;
        assert_eq!(parts.status, 401, "old key {old} refused: {body:?}");
        assert_eq!(error_code(&body), "Unauthorized");
        assert_eq!(parts.headers["www-authenticate"], "Bearer");
    }
    for new in [NEW_KEY, NEW_KEY2] {
        let (parts, body) = score(&url, new, &[], "{}").await;
        assert_eq!(parts.status, 200, "new key {new} accepted: {body:?}");
        assert_eq!(model_of(&body), "blue");
    }
    assert_eq!(blue.requests(), 4, "refused requests never reach the model");
    router.shutdown().await;
}

#[tokio::test]
async fn invalid_endpoints_file_keeps_the_last_good_table() {
    let _signals = SIGNALS.read().await;
    let (blue, green) = (Model::start("blue").await, Model::start("green").await);
    let router = Router::start(&blue_green(blue.addr, green.addr, 0)).await;
    let generation = *router.app().generation.borrow();
    let url = router.url("/api/v1/service/fraud/score");

    // Invalid: had it applied, green would get everything.
    let invalid = blue_green(blue.addr, green.addr, 150);
    write_atomically(router.path("endpoints.yaml"), &invalid).unwrap();
    // Then a router config change, written after it: once it shows, the watcher has
    // re-read both files since the invalid one was written.
    write_atomically(
        router.path("scorefront.yaml"),
        router_config("maxRequestBodyBytes: 64\n"),
    )
    .unwrap();
    eventually(
        "the router config change to apply",
        Patience::LONG,
        || async {
            let (parts, body) = score(&url, KEY, &[], vec![b'x'; 100]).await;
            (parts.status == 413).then(|| assert_eq!(error_code(&body), "PayloadTooLarge"))
        },
    )
    .await;

    assert_eq!(
        *router.app().generation.borrow(),
        generation,
        "no table was published from the invalid file"
    );
    let seen = models_answering(&router, 20).await;
    assert!(
        all_equal(&seen, "blue"),
        "the last good split stays: {seen:?}"
    );

    // A valid change afterwards applies as usual.
    router.reload(&blue_green(blue.addr, green.addr, 100)).await;
    let seen = models_answering(&router, 20).await;
    assert!(all_equal(&seen, "green"), "{seen:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn body_limit_change_applies_live() {
    let _signals = SIGNALS.read().await;
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");
    let (parts, body) = score(&url, KEY, &[], vec![b'x'; 1000]).await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(body_len_of(&body), 1000);

    write_atomically(
        router.path("scorefront.yaml"),
        router_config("maxRequestBodyBytes: 500\n"),
    )
    .unwrap();
    eventually(
        "maxRequestBodyBytes: 500 to apply",
        Patience::LONG,
        || async {
            let (parts, body) = score(&url, KEY, &[], vec![b'x'; 1000]).await;
            (parts.status == 413).then(|| assert_eq!(error_code(&body), "PayloadTooLarge"))
        },
    )
    .await;
    let (parts, body) = score(&url, KEY, &[], vec![b'x'; 400]).await;
    assert_eq!(
        parts.status, 200,
        "a body under the new limit passes: {body:?}"
    );

    write_atomically(
        router.path("scorefront.yaml"),
        router_config("maxRequestBodyBytes: 2000\n"),
    )
    .unwrap();
    eventually(
        "maxRequestBodyBytes: 2000 to apply",
        Patience::LONG,
        || async {
            let (parts, _) = score(&url, KEY, &[], vec![b'x'; 1000]).await;
            (parts.status == 200).then_some(())
        },
    )
    .await;
    router.shutdown().await;
}

#[tokio::test]
async fn sighup_rereads_the_files() {
    // Alone: the signal reaches every router in this process.
    let _signals = SIGNALS.write().await;
    // A handler for the whole process before any signal is sent: without one, SIGHUP
    // would end the test process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("SIGHUP handler");
    let (blue, green) = (Model::start("blue").await, Model::start("green").await);
    // The files are polled only once an hour: only SIGHUP makes the router look.
    let config = "endpoints: {file: endpoints.yaml}\nreloadIntervalMs: 3600000\n\
                  shutdownGracePeriodSeconds: 5\n";
    let router = Router::start_with(config, &blue_green(blue.addr, green.addr, 0)).await;
    let seen = models_answering(&router, 10).await;
    assert!(all_equal(&seen, "blue"), "{seen:?}");

    write_atomically(
        router.path("endpoints.yaml"),
        blue_green(blue.addr, green.addr, 100),
    )
    .unwrap();
    let mut generation = router.app().generation.clone();
    let before = *generation.borrow_and_update();
    // The watcher registers its own handler when its task first runs; until then a
    // signal passes it by, so send again until the reload shows.
    let deadline = Deadline::new("SIGHUP to reload the endpoints file", Patience::LONG);
    loop {
        // SAFETY: kill(2) on our own pid; SIGHUP has a handler (above).
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
        let delivered = tokio::time::timeout(Duration::from_secs(1), hangup.recv()).await;
        assert!(delivered.is_ok(), "SIGHUP is delivered");
        let applied = tokio::time::timeout(
            Duration::from_millis(200),
            generation.wait_for(|g| *g > before),
        )
        .await;
        if applied.is_ok() {
            break;
        }
        deadline.tick().await;
    }
    let seen = models_answering(&router, 10).await;
    assert!(all_equal(&seen, "green"), "{seen:?}");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// reloads and in-flight requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_during_load_loses_no_request() {
    let _signals = SIGNALS.read().await;
    let (a, b, c) = (
        Model::start("a").await,
        Model::start("b").await,
        Model::start("c").await,
    );
    let table = |blue: &[&Model], green: &[&Model], green_pct: u32| {
        let addrs = |ms: &[&Model]| ms.iter().map(|m| m.addr).collect::<Vec<_>>();
        let versions = format!(
            "[{}, {}]",
            version("blue", &addrs(blue), "maxConcurrentRequestsPerContainer: 8"),
            version(
                "green",
                &addrs(green),
                &format!("maxConcurrentRequestsPerContainer: 8, trafficPercentile: {green_pct}")
            ),
        );
        endpoint("fraud", &versions)
    };
    // Splits changing, replicas added, removed and moving between versions.
    let tables = [
        table(&[&a, &b], &[&c], 0),
        table(&[&a, &b], &[&c], 50),
        table(&[&a], &[&c, &b], 50),
        table(&[&a, &b, &c], &[&c], 30),
        table(&[&b], &[&a], 70),
        table(&[&c, &a], &[&b], 10),
    ];
    let router = Router::start(&tables[0]).await;
    let url = router.url("/api/v1/service/fraud/score");

    // Each client sends 50 requests in 5 phases of 10; phase p waits for reload p, so
    // every reload happens while clients are sending.
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 50;
    const PHASE: usize = 10;
    let done = Arc::new(AtomicUsize::new(0));
    let (reloads_tx, reloads) = watch::channel(0usize);
    let clients: Vec<JoinHandle<Vec<(StatusCode, Bytes)>>> = (0..CLIENTS)
        .map(|_| {
            let (url, done, mut reloads) = (url.clone(), done.clone(), reloads.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0..PER_CLIENT {
                    let _ = reloads.wait_for(|r| *r >= i / PHASE).await;
                    let (parts, body) = score(&url, KEY, &[("x-delay-ms", "5")], "{}").await;
                    if parts.status != 200 {
                        failures.push((parts.status, body));
                    }
                    done.fetch_add(1, SeqCst);
                }
                failures
            })
        })
        .collect();

    let per_phase = CLIENTS * PHASE;
    for (p, t) in tables.iter().enumerate().skip(1) {
        // Halfway through the phase that is running.
        let target = (per_phase * p - per_phase / 2).min(CLIENTS * PER_CLIENT - per_phase / 2);
        eventually("clients to progress", Patience::LONG, || async {
            (done.load(SeqCst) >= target).then_some(())
        })
        .await;
        router.reload(t).await;
        reloads_tx.send_replace(p);
    }
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .expect("clients finish")
                .unwrap(),
        );
    }
    assert_eq!(done.load(SeqCst), CLIENTS * PER_CLIENT);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        a.requests() + b.requests() + c.requests(),
        CLIENTS * PER_CLIENT,
        "each request reached a model exactly once"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn removed_replica_drains() {
    let _signals = SIGNALS.read().await;
    let (one, two) = (Gated::start("one").await, Gated::start("two").await);
    let table = |replicas: &[&Gated]| {
        let addrs: Vec<SocketAddr> = replicas.iter().map(|m| m.addr).collect();
        one_version("fraud", &addrs, "")
    };
    let router = Router::start(&table(&[&one, &two])).await;
    let url = router.url("/api/v1/service/fraud/score");

    let slow = {
        let url = url.clone();
        tokio::spawn(async move { score(&url, KEY, &[("x-gate", "1")], "{}").await })
    };
    eventually(
        "the slow request to reach a replica",
        Patience::LONG,
        || async { (one.held() + two.held() == 1).then_some(()) },
    )
    .await;
    let (busy, idle, idle_name) = if one.held() == 1 {
        (&one, &two, "two")
    } else {
        (&two, &one, "one")
    };

    router.reload(&table(&[idle])).await;
    let seen = models_answering(&router, 10).await;
    assert!(
        all_equal(&seen, idle_name),
        "only the remaining replica: {seen:?}"
    );
    assert_eq!(
        busy.requests(),
        1,
        "the removed replica gets no new request"
    );
    assert_eq!(busy.held(), 1, "the slow request is still running");
    assert!(!slow.is_finished());

    busy.open();
    let (parts, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow request finishes")
        .unwrap();
    assert_eq!(
        parts.status, 200,
        "the in-flight request completes: {body:?}"
    );
    assert_ne!(model_of(&body), idle_name);
    assert_eq!(idle.requests(), 10);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// shutdown

#[tokio::test]
async fn shutdown_lets_a_slow_request_finish() {
    let _signals = SIGNALS.read().await;
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let (http, admin) = (router.http, router.admin);
    let url = router.url("/api/v1/service/fraud/score");
    let slow = tokio::spawn(async move { score(&url, KEY, &[("x-delay-ms", "500")], "{}").await });
    eventually(
        "the slow request to reach the model",
        Patience::LONG,
        || async { (blue.state.current.load(SeqCst) == 1).then_some(()) },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), router.shutdown())
        .await
        .expect("shutdown ends");
    let (parts, body) = slow.await.unwrap();
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(model_of(&body), "blue");
    assert!(
        refused(http).await,
        "no new scoring connections after shutdown"
    );
    assert!(
        refused(admin).await,
        "the admin port is closed after shutdown"
    );
}

#[tokio::test]
async fn shutdown_drains_not_ready_and_refusing_new_connections() {
    let _signals = SIGNALS.read().await;
    let model = Gated::start("blue").await;
    let router = Router::start(&one_version("fraud", &[model.addr], "")).await;
    let (http, admin) = (router.http, router.admin);
    let readyz = format!("http://{admin}/readyz");
    assert_eq!(get(&readyz).await.0.status, 200);
    let url = router.url("/api/v1/service/fraud/score");
    let slow = tokio::spawn(async move { score(&url, KEY, &[("x-gate", "1")], "{}").await });
    eventually(
        "the slow request to reach the model",
        Patience::LONG,
        || async { (model.held() == 1).then_some(()) },
    )
    .await;

    let shutdown = tokio::spawn(router.shutdown());
    // The slow request cannot finish before the gate opens, so this is the drain.
    eventually(
        "/readyz to turn 503 while draining",
        Patience::LONG,
        || async {
            let (parts, _) = get(&readyz).await;
            (parts.status == 503).then_some(())
        },
    )
    .await;
    eventually(
        "new scoring connections to be refused while draining",
        Patience::LONG,
        || async { refused(http).await.then_some(()) },
    )
    .await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the in-flight request"
    );
    assert!(!slow.is_finished());

    model.open();
    let (parts, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the in-flight request finishes")
        .unwrap();
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(model_of(&body), "blue");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends once the request is done")
        .unwrap();
    assert!(refused(http).await);
    assert!(refused(admin).await);
}

// ---------------------------------------------------------------------------------------
// admin port

#[tokio::test]
async fn admin_port_health_readiness_and_metrics() {
    let _signals = SIGNALS.read().await;
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let admin = |path: &str| format!("http://{}{path}", router.admin);
    let (parts, body) = get(&admin("/healthz")).await;
    assert_eq!(parts.status, 200, "{body:?}");
    let (parts, body) = get(&admin("/readyz")).await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(get(&admin("/nothing")).await.0.status, 404);

    let url = router.url("/api/v1/service/fraud/score");
    assert_eq!(score(&url, KEY, &[], "{}").await.0.status, 200);
    assert_eq!(
        score(&url, "wrong-key-wrong-key", &[], "{}").await.0.status,
        401
    );

    let (parts, body) = get(&admin("/metrics")).await;
    assert_eq!(parts.status, 200);
    let kind = parts.headers["content-type"].to_str().unwrap();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let text = String::from_utf8(body.to_vec()).unwrap();
    for (kind, name) in [
        ("counter", "scorefront_requests_total"),
        ("histogram", "scorefront_request_duration_seconds"),
        ("histogram", "scorefront_queue_wait_seconds"),
        ("histogram", "scorefront_upstream_duration_seconds"),
        ("gauge", "scorefront_in_flight_requests"),
        ("gauge", "scorefront_queued_requests"),
        ("gauge", "scorefront_replicas"),
        ("counter", "scorefront_auth_failures_total"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} help:\n{text}"
        );
    }
    let ep = ("endpoint", "fraud");
    let blue_v = ("version", "blue");
    assert_eq!(
        metric(
            &text,
            "scorefront_requests_total",
            &[ep, blue_v, ("code", "200")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "scorefront_auth_failures_total",
            &[ep, ("reason", "invalid_key")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "scorefront_replicas",
            &[ep, blue_v, ("state", "ready")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "scorefront_request_duration_seconds_count",
            &[ep, blue_v]
        ),
        Some(1.0),
        "{text}"
    );
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// local process replicas

#[tokio::test]
async fn local_replicas_are_supervised_and_stopped() {
    let _signals = SIGNALS.read().await;
    let router = Router::start(&sample_endpoint(2, ", maxRequestWaitTimeMs: 2000")).await;
    let url = router.url("/api/v1/service/fraud/score");
    let pids = pids_answering(&url, 2).await;
    assert_eq!(pids.len(), 2, "{pids:?}");
    let mut pids = pids.into_iter();
    let (killed, survivor) = (pids.next().unwrap(), pids.next().unwrap());

    // SAFETY: kill(2) on a replica process this router started.
    assert_eq!(unsafe { libc::kill(killed, libc::SIGKILL) }, 0);
    let replacement = eventually("a restarted replica to answer", Patience::LONG, || async {
        let (parts, body) = score(&url, KEY, &[], r#"{"n": 1}"#).await;
        if parts.status != 200 {
            // Allowed briefly, while the router learns the replica is gone.
            let code = error_code(&body);
            assert!(
                ["ReplicaUnavailable", "NoReadyReplicas", "QueueTimeout"].contains(&code.as_str()),
                "{} {code}",
                parts.status
            );
            return None;
        }
        let pid = sample_pid(&body);
        assert_ne!(pid, killed, "the killed replica cannot answer");
        (pid != survivor).then_some(pid)
    })
    .await;
    eventually(
        "the killed replica to be reaped",
        Patience::LONG,
        || async { (!proc_exists(killed)).then_some(()) },
    )
    .await;
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let (parts, body) = score(&url, KEY, &[], r#"{"n": 1}"#).await;
        assert_eq!(
            parts.status, 200,
            "after the restart every request succeeds: {body:?}"
        );
        seen.insert(sample_pid(&body));
    }
    assert!(
        seen.is_subset(&HashSet::from([survivor, replacement])),
        "{seen:?} vs {survivor} and {replacement}"
    );

    tokio::time::timeout(Duration::from_secs(15), router.shutdown())
        .await
        .expect("shutdown ends");
    for pid in [survivor, replacement] {
        eventually(
            &format!("replica {pid} to be gone"),
            Patience::LONG,
            || async { (!proc_exists(pid)).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn replica_that_never_answers_its_probe_gets_no_traffic() {
    let _signals = SIGNALS.read().await;
    // Listens (accepts TCP) but never answers HTTP; tells the test its port and pid.
    let command = r#"python3 -c "import os,socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); open('listening-' + sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)" {port}"#;
    let yaml_command = serde_json::to_string(command).unwrap(); // a valid YAML string
    let router = Router::start(&endpoint(
        "fraud",
        &format!(
            "[{{name: blue, command: {yaml_command}, replicaCount: 1, maxRequestWaitTimeMs: 300}}]"
        ),
    ))
    .await;
    let dir = router.path("");
    let (port, pid) = eventually("the replica to listen", Patience::LONG, || async {
        std::fs::read_dir(&dir).unwrap().find_map(|e| {
            let e = e.unwrap();
            let port: u16 = e
                .file_name()
                .to_str()?
                .strip_prefix("listening-")?
                .parse()
                .ok()?;
            let pid: i32 = std::fs::read_to_string(e.path()).ok()?.parse().ok()?;
            Some((port, pid))
        })
    })
    .await;
    let replica = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        TcpStream::connect(replica).await.is_ok(),
        "the replica accepts TCP connections"
    );
    let url = router.url("/api/v1/service/fraud/score");
    for _ in 0..5 {
        let (parts, body) = score(&url, KEY, &[], "{}").await;
        assert_eq!(parts.status, 503, "{body:?}");
        assert_eq!(error_code(&body), "NoReadyReplicas");
        assert!(parts.headers.contains_key("retry-after"));
    }
    assert!(proc_exists(pid), "the replica is still running");
    let metrics = router.metrics().await;
    assert_eq!(
        metric(&metrics, "scorefront_replicas", &[("state", "ready")]),
        Some(0.0),
        "{metrics}"
    );
    tokio::time::timeout(Duration::from_secs(15), router.shutdown())
        .await
        .expect("shutdown ends");
    eventually("the replica to be stopped", Patience::LONG, || async {
        (!proc_exists(pid)).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// the real binary

/// How a test names the router config: the folder to run in (or this process's), and the
/// path given to `--config`.
type ConfigName = (Option<PathBuf>, PathBuf);

/// `scorefront serve` with two sample model replicas.
async fn serve_sample(extra: &[&str], name: impl Fn(&Path) -> ConfigName) -> Served {
    Served::start_at(
        &sample_endpoint(2, ", maxRequestWaitTimeMs: 2000"),
        extra,
        name,
    )
    .await
}

/// The config named by its full path, from this process's folder.
fn full_path(dir: &Path) -> ConfigName {
    (None, dir.join("scorefront.yaml"))
}

/// Waits for /readyz, then for both replicas to answer; returns their pids.
async fn ready_pids(served: &Served) -> HashSet<i32> {
    let readyz = format!("http://{}/readyz", served.admin);
    eventually("/readyz to answer 200", Patience::LONG, || async {
        matches!(try_get(&readyz).await, Some((StatusCode::OK, _))).then_some(())
    })
    .await;
    let url = format!("http://{}/api/v1/endpoint/fraud/score", served.http);
    pids_answering(&url, 2).await
}

#[tokio::test]
async fn binary_stops_cleanly_on_sigterm() {
    serves_and_stops_on_sigterm(&[]).await;
}

/// One worker runs on the single-threaded scheduler: the same router, the same shutdown.
#[tokio::test]
async fn binary_on_one_worker_serves_and_stops_cleanly() {
    serves_and_stops_on_sigterm(&["--workers", "1"]).await;
}

#[tokio::test]
async fn zero_workers_is_refused() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_scorefront"))
        .args(["serve", "--config", "unread.yaml", "--workers", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}

/// The real binary with two replicas, started with `extra`: it answers, and SIGTERM
/// stops it, its replicas and its listeners.
async fn serves_and_stops_on_sigterm(extra: &[&str]) {
    let mut served = serve_sample(extra, full_path).await;
    let pids = ready_pids(&served).await;
    assert_eq!(pids.len(), 2);
    served.signal(libc::SIGTERM);
    let status = served.exit_status().await;
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", served.log());
    for pid in pids {
        // scorefront waits for its replicas before it exits, so they are reaped already.
        assert!(!proc_exists(pid), "replica {pid} outlived scorefront");
    }
    assert!(refused(served.http).await);
    assert!(refused(served.admin).await);
    let log = served.log();
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_an_access_line_per_request() {
    let mut served = serve_sample(&["--log-format", "json"], full_path).await;
    ready_pids(&served).await;
    served.signal(libc::SIGTERM);
    let status = served.exit_status().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", served.log());
    let log = served.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "scorefront::access")
        .collect();
    assert!(!access.is_empty(), "{log}");
    for a in &access {
        assert_eq!(a["endpoint"], "fraud", "{a}");
        assert_eq!(a["status"], 200, "{a}");
        assert_eq!(a["request_id"].as_str().map(str::len), Some(36), "{a}");
        assert!(a["duration_us"].as_u64().is_some(), "{a}");
        assert!(a["upstream_us"].as_i64().is_some_and(|u| u >= 0), "{a}");
    }
    // Shutdown flushed the writer thread: the last lines made it out.
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test]
async fn check_config_summarises_or_lists_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scorefront.yaml");
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(&config, router_config("")).unwrap();

    let good = format!(
        "{}---\n{}",
        sample_endpoint(2, ""),
        endpoint(
            "spam",
            "[{name: a, replicas: ['127.0.0.1:5001']}, \
              {name: b, trafficPercentile: 10, replicas: ['127.0.0.1:5002']}]"
        )
    );
    std::fs::write(&endpoints, &good).unwrap();
    let (code, out, err) = check_config(&config).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    assert!(
        out.contains("2 endpoint(s), 3 version(s) (1 with local replicas)"),
        "{out}"
    );

    let bad = format!(
        "{}---\n{}---\n{}",
        endpoint(
            "fraud",
            "[{name: Blue, trafficPercentile: 150, replicas: ['127.0.0.1:5001']}]"
        ),
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: spam}\n\
         spec:\n  versions: [{name: a, command: 'python3 model.py', autoscale: {enabled: false}}]\n",
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: eggs}\n\
         spec: {authMode: none, versions: [{name: a, replicas: ['127.0.0.1:1']}], extra: 1}\n",
    );
    std::fs::write(&endpoints, &bad).unwrap();
    let (code, out, err) = check_config(&config).await;
    assert_eq!(code, Some(1), "{out}{err}");
    let file = endpoints.display().to_string();
    let want = [
        "document 1 (fraud): spec.versions[0].name",
        "document 1 (fraud): spec.versions[0].trafficPercentile",
        "document 1 (fraud): spec.versions: trafficPercentile values add up to 150",
        "document 2 (spam): spec.keys.primaryKey",
        "document 2 (spam): spec.versions[0].command",
        "document 2 (spam): spec.versions[0].replicaCount",
        "document 3: spec: unknown field `extra`",
    ];
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    for w in want {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&format!("error: {file}: {w}"))),
            "missing {w:?} in:\n{err}"
        );
    }
    assert_eq!(errors.len(), want.len(), "{err}");
    assert!(
        err.contains(&format!("{} error(s) found", want.len())),
        "{err}"
    );
    assert!(
        err.contains("scorefront keys"),
        "the missing-key error says how to make keys: {err}"
    );

    // A router config error names the file and the field.
    std::fs::write(&config, router_config("maxRequestBodyByte: 5\n")).unwrap();
    let (code, out, err) = check_config(&config).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("maxRequestBodyByte"), "{err}");
}

#[tokio::test]
async fn keys_prints_a_fresh_pair_that_an_endpoint_accepts() {
    let run = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_scorefront"))
            .arg("keys")
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let (first, second) = (run().await, run().await);
    assert_ne!(first, second, "every run makes new keys");
    let key_of = |text: &str, field: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {text}"));
        line.split(':').nth(1).unwrap().trim().to_string()
    };
    let (primary, secondary) = (key_of(&first, "primaryKey"), key_of(&first, "secondaryKey"));
    assert_ne!(primary, secondary);
    for key in [&primary, &secondary] {
        assert_eq!(key.len(), 32, "{key}");
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
    }

    // The printed block drops into a spec as it is.
    let spec = format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: fresh}}\n\
         spec:\n{}  versions: [{{name: a, replicas: ['127.0.0.1:5001']}}]\n",
        first
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scorefront.yaml");
    std::fs::write(&config, router_config("")).unwrap();
    std::fs::write(dir.path().join("endpoints.yaml"), spec).unwrap();
    let (code, out, err) = check_config(&config).await;
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test]
async fn sidecar_readiness_waits_for_its_model_to_answer() {
    let _signals = SIGNALS.read().await;
    // The model's port accepts nothing yet, as while a model loads in its container.
    let addr = unused_addr();
    let router = Router::start_with(
        &router_config("readiness: {requireReadyReplicas: true}"),
        &one_version("fraud", &[addr], "maxRequestWaitTimeMs: 50"),
    )
    .await;
    let readyz = format!("http://{}/readyz", router.admin);
    assert_eq!(get(&readyz).await.0.status, 503);
    let url = router.url("/api/v1/service/fraud/score");
    let (parts, body) = score(&url, KEY, &[], "{}").await;
    assert_eq!(parts.status, 503, "{body:?}");
    assert!(
        String::from_utf8_lossy(&body).contains("NoReadyReplicas"),
        "{body:?}"
    );

    let model = Model::serve("blue", TcpListener::bind(addr).await.unwrap());
    eventually(
        "/readyz to turn 200 once the model answers",
        Patience::LONG,
        || async { (get(&readyz).await.0.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(score(&url, KEY, &[], "{}").await.0.status, 200);

    // The model goes away: after its failed probes the pod stops taking traffic.
    drop(model);
    eventually(
        "/readyz to turn 503 once the model is gone",
        Patience::LONG,
        || async { (get(&readyz).await.0.status == 503).then_some(()) },
    )
    .await;
    router.shutdown().await;
}

#[tokio::test]
async fn the_readme_example_config_is_valid() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/scorefront.yaml");
    let (code, out, err) = check_config(&config).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("1 endpoint(s), 2 version(s) (2 with local replicas)"),
        "{out}"
    );
}

#[tokio::test]
async fn replicas_start_however_the_config_path_is_written() {
    let links = tempfile::tempdir().unwrap();
    let name = |how: &str, dir: &Path| -> ConfigName {
        match how {
            "a bare file name" => (Some(dir.to_path_buf()), "scorefront.yaml".into()),
            "./file" => (Some(dir.to_path_buf()), "./scorefront.yaml".into()),
            "an absolute path" => (None, dir.join("scorefront.yaml")),
            _ => {
                std::os::unix::fs::symlink(dir, links.path().join("conf")).unwrap();
                (
                    Some(links.path().to_path_buf()),
                    "conf/scorefront.yaml".into(),
                )
            }
        }
    };
    for how in [
        "a bare file name",
        "./file",
        "an absolute path",
        "a path through a symlinked folder",
    ] {
        let mut served = serve_sample(&[], |dir| name(how, dir)).await;
        let pids = ready_pids(&served).await;
        assert_eq!(pids.len(), 2, "{how}: {}", served.log());
        served.signal(libc::SIGTERM);
        let status = served.exit_status().await;
        assert_eq!(status.code(), Some(0), "{how}: {}", served.log());
    }
}

#[tokio::test]
async fn a_replica_that_exits_takes_its_workers_with_it() {
    let _signals = SIGNALS.read().await;
    // A replica whose main process has a worker in its process group, as gunicorn's do.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("worker.pid");
    let command = format!(
        "sh -c \"sleep 600 & echo \\$! > {}; exec python3 {} --port {{port}}\"",
        pidfile.display(),
        sample_model()
    );
    let endpoints = endpoint(
        "fraud",
        &format!("[{{name: blue, command: '{command}', replicaCount: 1}}]"),
    );
    let router = Router::start(&endpoints).await;
    let url = router.url("/api/v1/service/fraud/score");
    let main = *pids_answering(&url, 1).await.iter().next().unwrap();
    let worker: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(proc_exists(worker));
    std::fs::remove_file(&pidfile).unwrap();

    // SAFETY: kill(2) on a replica process this router started.
    assert_eq!(unsafe { libc::kill(main, libc::SIGKILL) }, 0);
    eventually(
        "the worker of the exited replica to be gone",
        Patience::LONG,
        || async { proc_dead(worker).then_some(()) },
    )
    .await;
    // The restarted replica serves, with a worker of its own.
    eventually("a restarted replica to answer", Patience::LONG, || async {
        let (parts, _) = score(&url, KEY, &[], r#"{"n": 1}"#).await;
        (parts.status == 200 && pidfile.exists()).then_some(())
    })
    .await;
    router.shutdown().await;
}
