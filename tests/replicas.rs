//! Replica supervision: a changed command replaces a version's replicas make-before-break,
//! no process of a replica outlives scorefront however it ends, and fixed addresses are
//! health-checked.
//!
//! Everything is real: loopback sockets, the sample model as child processes, the real
//! binary killed with real signals. State is polled with a bounded timeout.

mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use support::*;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// An endpoint `fraud` with one version `blue` of two replicas running `command`. A
/// request waits at most 50 ms for a replica, less than a replica takes to start: a
/// version left without replicas while new ones start fails requests.
fn command_endpoint(command: &str) -> String {
    let command = serde_json::to_string(command).unwrap(); // a valid YAML string
    endpoint(
        "fraud",
        &format!("[{{name: blue, command: {command}, replicaCount: 2, maxRequestWaitTimeMs: 50}}]"),
    )
}

/// The sample model, telling its generation in the `version` it answers with.
fn generation(name: &str) -> String {
    format!(
        "env SCOREFRONT_VERSION={name} python3 {} --port {{port}}",
        sample_model()
    )
}

/// A sample model answer: (generation, pid).
fn answer_of(body: &[u8]) -> (String, i32) {
    let v = json(body);
    let pid = v["pid"].as_i64().expect("pid") as i32;
    (v["version"].as_str().expect("version").to_owned(), pid)
}

async fn score_once(url: &str) -> (StatusCode, Bytes) {
    let req = scoring_post(url, KEY, &[], r#"{"n": 1}"#);
    let (parts, body) = tokio::time::timeout(Duration::from_secs(15), send(req))
        .await
        .expect("an answer within 15 s");
    (parts.status, body)
}

/// Requests sent back to back by two clients until told to stop; every answer is kept.
struct Load {
    stop: watch::Sender<bool>,
    clients: Vec<JoinHandle<Vec<(StatusCode, Bytes)>>>,
}

impl Load {
    fn start(url: &str) -> Load {
        let (stop, stopped) = watch::channel(false);
        let clients = (0..2)
            .map(|_| {
                let (url, stopped) = (url.to_owned(), stopped.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while !*stopped.borrow() {
                        answers.push(score_once(&url).await);
                    }
                    answers
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients; asserts every answer was a 200 and returns the generations
    /// that answered, in order.
    async fn finish(self) -> Vec<(String, i32)> {
        self.stop.send_replace(true);
        let mut seen = Vec::new();
        for c in self.clients {
            for (status, body) in c.await.unwrap() {
                assert_eq!(status, 200, "no request fails during the change: {body:?}");
                seen.push(answer_of(&body));
            }
        }
        seen
    }
}

/// Scores until `n` answers in a row came from generation `name`; returns their pids.
async fn only_generation_answers(url: &str, name: &str, n: usize) -> HashSet<i32> {
    eventually(
        &format!("{n} answers in a row from {name}"),
        Patience::LONG,
        || async {
            let mut pids = HashSet::new();
            for _ in 0..n {
                let (status, body) = score_once(url).await;
                assert_eq!(status, 200, "{body:?}");
                let (generation, pid) = answer_of(&body);
                if generation != name {
                    return None;
                }
                pids.insert(pid);
            }
            Some(pids)
        },
    )
    .await
}

/// Scores until both replicas of generation `one` answered (a 503 is fine while they
/// start); returns their pids.
async fn both_replicas_answer(url: &str) -> HashSet<i32> {
    let mut pids = HashSet::new();
    let deadline = Deadline::new("both first replicas to answer", Patience::LONG);
    while pids.len() < 2 {
        let (status, body) = score_once(url).await;
        if status == 200 {
            let (generation, pid) = answer_of(&body);
            assert_eq!(generation, "one");
            pids.insert(pid);
        }
        if pids.len() < 2 {
            deadline.tick().await;
        }
    }
    pids
}

/// Waits until every process of `pids` (an old command's replicas) is gone.
async fn all_gone(pids: &HashSet<i32>) {
    for pid in pids.iter().copied() {
        eventually(
            &format!("replica {pid} of the old command to be gone"),
            Patience::LONG,
            || async { proc_dead(pid).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_command_replaces_replicas_without_failing_a_request() {
    let router = Router::start(&command_endpoint(&generation("one"))).await;
    let url = router.url("/api/v1/service/fraud/score");
    let old = both_replicas_answer(&url).await;

    let load = Load::start(&url);
    router.reload(&command_endpoint(&generation("two"))).await;
    all_gone(&old).await;
    let seen = load.finish().await;
    assert!(
        seen.iter().any(|(g, _)| g == "one"),
        "the old command served during the change: {seen:?}"
    );
    let new = only_generation_answers(&url, "two", 20).await;
    assert!(new.is_disjoint(&old), "{new:?} vs {old:?}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_command_that_never_gets_ready_leaves_the_old_one_serving() {
    let router = Router::start(&command_endpoint(&generation("one"))).await;
    let url = router.url("/api/v1/service/fraud/score");
    let old = both_replicas_answer(&url).await;

    // Each attempt leaves a line in `attempts`, then fails at once (unknown option).
    let broken = format!(
        "sh -c 'echo x >> attempts; exec python3 {} --port {{port}} --no-such-option'",
        sample_model()
    );
    let load = Load::start(&url);
    router.reload(&command_endpoint(&broken)).await;
    let attempts = router.path("attempts");
    until(
        "the broken command to be tried 6 times",
        Patience::LONG,
        || std::fs::read_to_string(&attempts).is_ok_and(|a| a.lines().count() >= 6),
    )
    .await;
    let seen = load.finish().await;
    assert!(
        seen.iter().all(|(g, pid)| g == "one" && old.contains(pid)),
        "{seen:?}"
    );

    // A second change while the first is stalled: the broken set goes, the old one serves
    // until the newest is ready, then goes too.
    let load = Load::start(&url);
    router.reload(&command_endpoint(&generation("three"))).await;
    all_gone(&old).await;
    let tries = std::fs::read_to_string(&attempts).unwrap().lines().count();
    load.finish().await;
    only_generation_answers(&url, "three", 20).await;
    assert_eq!(
        std::fs::read_to_string(&attempts).unwrap().lines().count(),
        tries,
        "the broken command is no longer restarted"
    );
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// no replica process outlives scorefront

/// `scorefront serve` with one replica whose command starts a worker of its own in the
/// background and writes the worker's pid to `worker.pid`.
async fn serve_with_worker() -> Served {
    let command = format!(
        "sh -c 'sleep 600 & echo $! > worker.pid; exec python3 {} --port {{port}}'",
        sample_model()
    );
    let command = serde_json::to_string(&command).unwrap();
    let endpoints = endpoint(
        "fraud",
        &format!("[{{name: blue, command: {command}, replicaCount: 1}}]"),
    );
    Served::start_at(&endpoints, &[], |dir| (None, dir.join("scorefront.yaml"))).await
}

/// The pids of the replica's processes: the model that answers and its worker.
async fn replica_pids(served: &Served) -> [i32; 2] {
    let url = format!("http://{}/api/v1/service/fraud/score", served.http);
    let pidfile = served.dir.path().join("worker.pid");
    eventually("the replica to answer", Patience::LONG, || async {
        let req = scoring_post(&url, KEY, &[], r#"{"n": 1}"#);
        let resp = client().request(req).await.ok()?;
        if resp.status() != 200 {
            return None;
        }
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes();
        let worker = std::fs::read_to_string(&pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some([answer_of(&body).1, worker])
    })
    .await
}

/// A replica command starts with no signal blocked, so the SIGTERM that stops it can end it
/// gracefully (before, the guard's own blocked signals were inherited: every stop waited
/// for the SIGKILL after the grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_command_starts_with_no_signal_blocked() {
    let router = Router::start(&command_endpoint(&generation("one"))).await;
    let url = router.url("/api/v1/service/fraud/score");
    for pid in both_replicas_answer(&url).await {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        assert_eq!(
            blocked.split_whitespace().nth(1),
            Some("0000000000000000"),
            "replica {pid}: {blocked}"
        );
    }
    router.shutdown().await;
}

/// Kills scorefront with `signal` and waits for every process of its replica to die.
async fn no_replica_process_survives(signal: i32) {
    let mut served = serve_with_worker().await;
    let pids = replica_pids(&served).await;
    served.signal(signal);
    served.exit_status().await;
    for pid in pids {
        eventually(
            &format!("replica process {pid} to die with scorefront"),
            Patience::LONG,
            || async { proc_dead(pid).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn no_replica_process_survives_scorefront_killed_outright() {
    no_replica_process_survives(libc::SIGKILL).await;
}

#[tokio::test]
async fn no_replica_process_survives_scorefront_stopped() {
    no_replica_process_survives(libc::SIGTERM).await;
}

// ---------------------------------------------------------------------------------------
// health checks of fixed addresses

/// A model whose `GET /` and scoring answers turn 503 while it is unhealthy.
struct Flaky {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flaky {
    async fn start(name: &'static str) -> Flaky {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let svc = service_fn(move |_: Request<Incoming>| {
            let status = if h.load(SeqCst) { 200 } else { 503 };
            let answer = serde_json::json!({"model": name}).to_string();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(answer)))
                        .unwrap(),
                )
            }
        });
        let task = serve_connections(listener, svc);
        Flaky {
            addr,
            healthy,
            task,
        }
    }
}

/// Which models answered `n` requests; any status but 200 gives `None`.
async fn models(url: &str, n: usize) -> Option<HashSet<String>> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (status, body) = score_once(url).await;
        if status != 200 {
            return None;
        }
        seen.insert(model_of(&body));
    }
    Some(seen)
}

#[tokio::test]
async fn an_unhealthy_fixed_address_is_withdrawn_until_it_recovers() {
    let (a, b) = (Flaky::start("a").await, Flaky::start("b").await);
    let router = Router::start(&one_version("fraud", &[a.addr, b.addr], "")).await;
    let url = router.url("/api/v1/service/fraud/score");
    let both = HashSet::from(["a".to_owned(), "b".to_owned()]);
    assert_eq!(
        models(&url, 20).await,
        Some(both.clone()),
        "both addresses are routable from the start"
    );

    b.healthy.store(false, SeqCst);
    eventually("b to be withdrawn", Patience::LONG, || async {
        (models(&url, 20).await == Some(HashSet::from(["a".to_owned()]))).then_some(())
    })
    .await;
    assert_eq!(
        models(&url, 20).await,
        Some(HashSet::from(["a".to_owned()])),
        "a withdrawn address gets no request"
    );

    b.healthy.store(true, SeqCst);
    eventually("b to be routable again", Patience::LONG, || async {
        (models(&url, 20).await == Some(both.clone())).then_some(())
    })
    .await;
    router.shutdown().await;
}
