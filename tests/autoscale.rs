//! Autoscaling local replicas: real sample-model processes, real load over loopback, the
//! real autoscaler and supervisor. Nothing waits with a fixed sleep: state is polled with a
//! bounded timeout, through the metrics a user would watch.

mod support;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use support::*;

fn sample_model() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sample_model.py");
    path.display().to_string()
}

/// Reads a gauge of version `blue` of endpoint `slow`.
async fn gauge(router: &Router, name: &str, extra: &[(&str, &str)]) -> f64 {
    let text = router.metrics().await;
    let mut labels = vec![("endpoint", "slow"), ("version", "blue")];
    labels.extend_from_slice(extra);
    metric(&text, name, &labels).unwrap_or(0.0)
}

async fn ready(router: &Router) -> f64 {
    gauge(router, "scorefront_replicas", &[("state", "ready")]).await
}

/// Clients each sending one request at a time until `stop`; every answer must be 200.
/// Returns the pids that answered.
fn load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<HashSet<i64>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (url, stop, failures) = (url.clone(), stop.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut pids = HashSet::new();
                // Bounded: at most 10,000 requests per client.
                for _ in 0..10_000 {
                    if stop.load(SeqCst) {
                        break;
                    }
                    let req = scoring_post(&url, KEY, &[], r#"{"n": 1}"#);
                    let (parts, body) = send(req).await;
                    if parts.status == 200 {
                        pids.insert(json(&body)["pid"].as_i64().expect("pid"));
                    } else {
                        eprintln!("failed: {} {body:?}", parts.status);
                        failures.fetch_add(1, SeqCst);
                    }
                }
                pids
            }));
        }
        let mut all = HashSet::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replicas_follow_demand_up_and_down_without_failing_a_request() {
    // Each request takes 200 ms and a replica serves one at a time: four clients need
    // four replicas at 100 % utilization.
    let endpoints = endpoint(
        "slow",
        &format!(
            "[{{name: blue, command: 'python3 {} --port {{port}} --delay-ms 200', \
             maxRequestWaitTimeMs: 20000, maxPendingRequests: 100, \
             autoscale: {{minReplicas: 1, maxReplicas: 6, targetUtilization: 100, \
             refreshSeconds: 1, scaleDownDelaySeconds: 2}}}}]",
            sample_model()
        ),
    );
    let router = Router::start(&endpoints).await;
    let url = router.url("/api/v1/service/slow/score");
    eventually("the first replica to be ready", Patience::LONG, || async {
        (ready(&router).await == 1.0).then_some(())
    })
    .await;

    let failures = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicBool::new(false));
    let heavy = load(url.clone(), 4, busy.clone(), failures.clone());
    // Within about two refreshes the autoscaler asks for four.
    eventually("four replicas to be asked for", Patience::LONG, || async {
        (gauge(&router, "scorefront_desired_replicas", &[]).await == 4.0).then_some(())
    })
    .await;
    eventually("four replicas to be ready", Patience::LONG, || async {
        (ready(&router).await == 4.0).then_some(())
    })
    .await;
    let text = router.metrics().await;
    let ups = metric(
        &text,
        "scorefront_scale_events_total",
        &[
            ("endpoint", "slow"),
            ("version", "blue"),
            ("direction", "up"),
        ],
    );
    assert!(ups.is_some_and(|n| n >= 1.0), "{ups:?}");

    // Demand drops to one client: after the delay the count comes down to one, while
    // that client's requests keep succeeding through the scale-down.
    let light_stop = Arc::new(AtomicBool::new(false));
    let light = load(url.clone(), 1, light_stop.clone(), failures.clone());
    busy.store(true, SeqCst);
    let mut pids = heavy.await.unwrap();
    assert!(pids.len() >= 4, "four processes served: {pids:?}");
    eventually("the count to come down to one", Patience::LONG, || async {
        (gauge(&router, "scorefront_desired_replicas", &[]).await == 1.0
            && ready(&router).await == 1.0)
            .then_some(())
    })
    .await;
    light_stop.store(true, SeqCst);
    pids.extend(light.await.unwrap());
    assert_eq!(failures.load(SeqCst), 0, "no request failed");

    tokio::time::timeout(Duration::from_secs(20), router.shutdown())
        .await
        .expect("shutdown ends");
    for pid in pids {
        eventually(
            &format!("replica {pid} to be gone"),
            Patience::LONG,
            || async { (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn dev_test_clusters_do_not_autoscale() {
    let endpoints = endpoint(
        "slow",
        &format!(
            "[{{name: blue, command: 'python3 {} --port {{port}}', \
             autoscale: {{minReplicas: 2, maxReplicas: 3}}}}]",
            sample_model()
        ),
    );
    let router = Router::start_with(&router_config("clusterPurpose: DevTest"), &endpoints).await;
    eventually(
        "the initial two replicas to be ready",
        Patience::LONG,
        || async { (ready(&router).await == 2.0).then_some(()) },
    )
    .await;
    let text = router.metrics().await;
    assert!(
        !text.contains("scorefront_desired_replicas"),
        "no autoscaler runs:\n{text}"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_decides_and_exports_but_changes_nothing() {
    let endpoints = endpoint(
        "slow",
        &format!(
            "[{{name: blue, command: 'python3 {} --port {{port}} --delay-ms 300', \
             maxRequestWaitTimeMs: 20000, maxPendingRequests: 100, \
             autoscale: {{minReplicas: 1, maxReplicas: 4, targetUtilization: 100}}}}]",
            sample_model()
        ),
    );
    let router = Router::start_with(&router_config("autoscaler: {dryRun: true}"), &endpoints).await;
    eventually("the first replica to be ready", Patience::LONG, || async {
        (ready(&router).await == 1.0).then_some(())
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let url = router.url("/api/v1/service/slow/score");
    let clients = load(url, 3, stop.clone(), failures.clone());
    eventually("three replicas to be asked for", Patience::LONG, || async {
        (gauge(&router, "scorefront_desired_replicas", &[]).await == 3.0).then_some(())
    })
    .await;
    assert_eq!(ready(&router).await, 1.0, "nothing was started");
    stop.store(true, SeqCst);
    let pids = clients.await.unwrap();
    assert_eq!(pids.len(), 1, "one process served: {pids:?}");
    assert_eq!(failures.load(SeqCst), 0);
    router.shutdown().await;
}
