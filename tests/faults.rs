//! The fault matrix: each way a replica, a file on disk or a client can fail while requests
//! are under way. After every fault the same things must hold: every slot is back (the
//! in-flight and queued gauges at 0), the router keeps serving with the last good
//! configuration, and no request was lost that had not reached a replica (such a request
//! is retried or still answered; one that reached a replica is never sent twice).

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use support::{tls::TestCa, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const IN_FLIGHT: &str = "scorefront_in_flight_requests";
const QUEUED: &str = "scorefront_queued_requests";
const SCORE: &str = "/api/v1/service/cap/score";

/// What every fault must leave behind: no slot held or waited for on endpoint `cap`, and
/// the endpoint still answering from `model` (a replica that works), which serves version
/// `good` when there is one and the whole endpoint otherwise.
async fn recovered(router: &Router, model: &Model) {
    for gauge in [IN_FLIGHT, QUEUED] {
        metric_eventually(router, Patience::SHORT, gauge, &[("endpoint", "cap")], 0.0).await;
    }
    let pin: &[(&str, &str)] = if model.name == "good" {
        &[("azureml-model-deployment", "good")]
    } else {
        &[]
    };
    let (parts, body) = send(scoring_post(&router.url(SCORE), KEY, pin, "{}")).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(model_of(&body), model.name);
}

// ---------------------------------------------------------------------------------------
// Replicas that fail

/// How a [`Faulty`] replica treats each request, after reading its head.
#[derive(Clone, Copy, Debug)]
enum Misbehaves {
    /// Resets the connection (the process died with the request in hand).
    Resets,
    /// Keeps the connection open and never answers.
    NeverAnswers,
    /// Sends part of a response head, then closes.
    HalfHead,
    /// Sends a head promising 1,000 bytes, then 500 of them, then closes.
    HalfBody,
    /// Answers with bytes that are not HTTP.
    Garbage,
}

/// A replica on a real socket that misbehaves the same way on every request.
struct Faulty {
    addr: SocketAddr,
    /// Requests whose head it read.
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Faulty {
    async fn start(how: Misbehaves) -> Faulty {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (seen, held) = (seen.clone(), held.clone());
                tokio::spawn(async move {
                    if read_head(&mut conn).await.is_none() {
                        return;
                    }
                    seen.fetch_add(1, SeqCst);
                    let reply: Vec<u8> = match how {
                        Misbehaves::Resets => {
                            // SO_LINGER 0: closing sends a reset at once (nothing blocks).
                            #[allow(deprecated)]
                            conn.set_linger(Some(Duration::ZERO)).unwrap();
                            return;
                        }
                        Misbehaves::NeverAnswers => {
                            held.lock().unwrap().push(conn);
                            return;
                        }
                        Misbehaves::HalfHead => b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
                        Misbehaves::HalfBody => {
                            let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec();
                            r.extend_from_slice(&[b'x'; 500]);
                            r
                        }
                        Misbehaves::Garbage => b"this is not HTTP\r\n\r\n".to_vec(),
                    };
                    let _ = conn.write_all(&reply).await;
                });
            }
        });
        Faulty {
            addr,
            requests,
            task,
        }
    }
}

/// Reads one request head (the test requests have no body); `None` if the peer left.
async fn read_head(conn: &mut TcpStream) -> Option<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        seen.extend_from_slice(&buf[..n]);
    }
    Some(())
}

/// A router with endpoint `cap`: version `blue` (99 %) on `blue`, and version `good` on a
/// working model, reached by pinning. A 300 ms scoring timeout bounds the silent replica.
async fn router_with(blue: &[SocketAddr], good: &Model) -> Router {
    let settings = "scoringTimeoutMs: 300, maxRequestWaitTimeMs: 2000";
    Router::start(&endpoint(
        "cap",
        &format!(
            "[{}, {}]",
            version("blue", blue, &format!("trafficPercentile: 100, {settings}")),
            version("good", &[good.addr], settings)
        ),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_costs_its_request_and_nothing_else() {
    let good = Model::start("good").await;
    let cases = [
        (Misbehaves::Resets, Some((502, "ReplicaUnavailable"))),
        (Misbehaves::NeverAnswers, Some((504, "ScoringTimeout"))),
        (Misbehaves::HalfHead, Some((502, "ReplicaUnavailable"))),
        (Misbehaves::Garbage, Some((502, "ReplicaUnavailable"))),
        // The head was sent: the client must see the answer cut short.
        (Misbehaves::HalfBody, None),
    ];
    for (how, want) in cases {
        let faulty = Faulty::start(how).await;
        let router = router_with(&[faulty.addr], &good).await;
        let mut conn = TcpStream::connect(router.http).await.unwrap();
        let head = format!(
            "POST {SCORE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
             azureml-model-deployment: blue\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 8192];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
                // A complete router answer ends the exchange; the connection stays open.
                if want.is_some() && answer.ends_with(b"}}") {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{how:?}: no answer within 5 s");
        let answer = String::from_utf8_lossy(&answer);
        match want {
            Some((status, code)) => {
                assert!(
                    answer.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{how:?}: {answer}"
                );
                assert!(
                    answer.contains(&format!("\"code\":\"{code}\"")),
                    "{how:?}: {answer}"
                );
            }
            None => {
                // Either the connection is cut before anything reaches the client, or the
                // head arrives and the body stops short: never a body that looks whole.
                if let Some((head, body)) = answer.split_once("\r\n\r\n") {
                    assert!(head.starts_with("HTTP/1.1 200 "), "{how:?}: {answer}");
                    assert!(
                        head.to_ascii_lowercase().contains("content-length: 1000"),
                        "{how:?}: the length promised must reach the client: {head}"
                    );
                    assert!(body.len() < 1000, "{how:?}: {} bytes", body.len());
                }
            }
        }
        recovered(&router, &good).await;
        assert_eq!(
            faulty.requests.load(SeqCst),
            1,
            "{how:?}: a request that reached a replica is never sent again"
        );
        router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_replica_received_is_never_lost() {
    let good = Model::start("good").await;
    let live = Model::start("live").await;
    let router = router_with(&[unused_addr(), live.addr], &good).await;
    for _ in 0..20 {
        let req = scoring_post(
            &router.url(SCORE),
            KEY,
            &[("azureml-model-deployment", "blue")],
            "{}",
        );
        assert_eq!(model_of(&send_ok(req).await.1), "live");
    }
    assert_eq!(live.requests(), 20);
    recovered(&router, &good).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_process_killed_mid_request_is_502_and_comes_back() {
    let good = Model::start("good").await;
    let router = Router::start(&endpoint(
        "cap",
        &format!(
            "[{{name: blue, trafficPercentile: 100, replicaCount: 1, \
             command: 'python3 {} --port {{port}} --delay-ms 600'}}, {}]",
            sample_model(),
            version("good", &[good.addr], "")
        ),
    ))
    .await;
    let blue = |router: &Router| {
        scoring_post(
            &router.url(SCORE),
            KEY,
            &[("azureml-model-deployment", "blue")],
            "{}",
        )
    };
    let pid = eventually("the replica to answer", Patience::LONG, || async {
        let (parts, body) = send(blue(&router)).await;
        (parts.status == 200).then(|| json(&body)["pid"].as_i64().unwrap() as i32)
    })
    .await;

    let in_flight = tokio::spawn(send(blue(&router)));
    metric_eventually(
        &router,
        Patience::SHORT,
        IN_FLIGHT,
        &[("endpoint", "cap"), ("version", "blue")],
        1.0,
    )
    .await;
    // The request is at the model for 600 ms: give it time to get there, then kill it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (parts, body) = in_flight.await.unwrap();
    assert_eq!(parts.status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "ReplicaUnavailable");
    recovered(&router, &good).await;

    // The replica is restarted and serves again, as a new process.
    let again = eventually("the replica back", Patience::LONG, || async {
        let (parts, body) = send(blue(&router)).await;
        (parts.status == 200).then(|| json(&body)["pid"].as_i64().unwrap() as i32)
    })
    .await;
    assert_ne!(again, pid);
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Clients that leave

/// Where a client gives up.
#[derive(Clone, Copy, Debug)]
enum Leaves {
    /// Halfway through the request head.
    InTheHead,
    /// After 10 of the 1,000 body bytes it announced.
    InTheBody,
    /// While its request waits for a slot.
    WhileQueued,
    /// While the model works on its request.
    AwaitingTheAnswer,
    /// After the first bytes of a streamed answer.
    MidStream,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_at_any_phase_gives_everything_back() {
    let model = Model::start("m").await;
    let router = Router::start(&one_version(
        "cap",
        &[model.addr],
        "maxConcurrentRequestsPerContainer: 1, maxRequestWaitTimeMs: 5000",
    ))
    .await;
    let head = |extra: &str, length: usize| {
        format!(
            "POST {SCORE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
             content-length: {length}\r\n{extra}\r\n"
        )
    };
    for phase in [
        Leaves::InTheHead,
        Leaves::InTheBody,
        Leaves::WhileQueued,
        Leaves::AwaitingTheAnswer,
        Leaves::MidStream,
    ] {
        let before = model.requests();
        let mut conn = TcpStream::connect(router.http).await.unwrap();
        let mut holder = None;
        // Requests the model is expected to have seen from this phase.
        let reached = match phase {
            Leaves::InTheHead => {
                let head = head("", 0);
                conn.write_all(&head.as_bytes()[..head.len() / 2])
                    .await
                    .unwrap();
                0
            }
            Leaves::InTheBody => {
                conn.write_all(head("", 1000).as_bytes()).await.unwrap();
                conn.write_all(&[b'x'; 10]).await.unwrap();
                // Time for the request to travel on if the router let it (a small body is
                // read whole before a slot is taken, so it must not).
                tokio::time::sleep(Duration::from_millis(200)).await;
                0
            }
            Leaves::WhileQueued => {
                let hold = scoring_post(&router.url(SCORE), KEY, &[("x-delay-ms", "1000")], "");
                holder = Some(tokio::spawn(send(hold)));
                until("the holder at the model", Patience::SHORT, || {
                    model.state.current.load(SeqCst) == 1
                })
                .await;
                conn.write_all(head("", 0).as_bytes()).await.unwrap();
                metric_eventually(
                    &router,
                    Patience::SHORT,
                    QUEUED,
                    &[("endpoint", "cap")],
                    1.0,
                )
                .await;
                1
            }
            Leaves::AwaitingTheAnswer => {
                conn.write_all(head("x-delay-ms: 30000\r\n", 0).as_bytes())
                    .await
                    .unwrap();
                until("the request at the model", Patience::SHORT, || {
                    model.state.current.load(SeqCst) == 1
                })
                .await;
                1
            }
            Leaves::MidStream => {
                conn.write_all(head("x-stream: 1000\r\n", 0).as_bytes())
                    .await
                    .unwrap();
                let mut first = [0u8; 64];
                let n = conn.read(&mut first).await.unwrap();
                assert!(n > 0, "{phase:?}: the stream started");
                1
            }
        };
        drop(conn);
        if let Some(holder) = holder {
            assert_eq!(holder.await.unwrap().0.status, 200, "{phase:?}");
        }
        until(
            &format!("{phase:?}: the model to drop abandoned work"),
            Patience::SHORT,
            || model.state.current.load(SeqCst) == 0,
        )
        .await;
        assert_eq!(
            model.requests() - before,
            reached,
            "{phase:?}: requests that reached the model"
        );
        recovered(&router, &model).await;
    }
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Files broken on disk

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_on_disk_keep_the_last_good_configuration_in_force() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let model = Model::start("m").await;
    let files = leaf.files("server");
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let router = Router::try_start(
        &router_config("tls: {certFile: server.crt, keyFile: server.key}\n"),
        &one_version("cap", &[model.addr], ""),
        &files,
        true,
    )
    .await
    .expect("router starts");
    let https = router.https.unwrap();
    let client = ca.client();

    // Every kind of broken file, one after another, while requests keep coming.
    let broken: [(&str, &[u8]); 5] = [
        (
            "endpoints.yaml",
            b"apiVersion: scorefront.io/v1\nkind: [unclosed",
        ),
        (
            "endpoints.yaml",
            b"apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: cap}\n\
              spec: {versions: [{name: blue, replicas: ['127.0.0.1:1'], trafficPercentile: 250}]}\n",
        ),
        ("server.crt", b"this is not a certificate\n"),
        ("server.key", b"garbage"),
        ("endpoints.yaml", b"\xff\xfe not utf-8"),
    ];
    for (file, contents) in broken {
        write_atomically(router.path(file), contents).unwrap();
        // Many reload intervals (20 ms): long enough for a bad reload to have happened.
        for _ in 0..10 {
            let ex = client
                .request(https, scoring_post(SCORE, KEY, &[], "{}"))
                .await
                .unwrap_or_else(|e| panic!("after a broken {file}: {e}"));
            assert_eq!(ex.parts.status, 200, "after a broken {file}");
            assert_eq!(ex.info.leaf(), &leaf.der, "after a broken {file}");
            recovered(&router, &model).await;
        }
    }
    router.shutdown().await;
}
