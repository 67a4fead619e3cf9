//! Passive outlier detection over real sockets: a replica that refuses connections is
//! ejected after failures in a row and gets no attempts while ejected, the last replica of
//! a version never is, and an ejected replica comes back when its time is over.

mod support;

use std::net::SocketAddr;

use http::Request;
use support::*;
use tokio::net::TcpListener;

const EJECTIONS: &str = "scorefront_replica_ejections_total";
const EJECTED: &str = "scorefront_ejected_replicas";

/// A scoring POST to version `version` of endpoint `out`.
fn req(router: &Router, version: &str) -> Request<TestBody> {
    scoring_post(
        &router.url("/api/v1/service/out/score"),
        KEY,
        &[("azureml-model-deployment", version)],
        "{}",
    )
}

/// A metric of version `version` of endpoint `out`, if it is exported.
async fn value(router: &Router, name: &str, version: &str) -> Option<f64> {
    let labels = [("endpoint", "out"), ("version", version)];
    metric(&router.metrics().await, name, &labels)
}

/// Sends requests to `version`, each answered 200 by `live`, until one of its replicas has
/// been ejected (at most `max` requests).
async fn serve_until_ejected(router: &Router, version: &str, max: usize) {
    for _ in 0..max {
        let (_, body) = send_ok(req(router, version)).await;
        assert_eq!(model_of(&body), "live");
        if value(router, EJECTIONS, version).await == Some(1.0) {
            return;
        }
    }
    panic!("no ejection after {max} requests");
}

/// A fake model on `addr` again, the address of a replica that refused connections.
async fn revive(addr: SocketAddr) -> Model {
    Model::serve("revived", TcpListener::bind(addr).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_replica_is_ejected_and_gets_no_attempts() {
    let live = Model::start("live").await;
    let dead = unused_addr();
    let router = Router::start(&endpoint(
        "out",
        &format!("[{}]", version("blue", &[dead, live.addr], "")),
    ))
    .await;
    assert_eq!(value(&router, EJECTED, "blue").await, Some(0.0));

    // Each request goes to the dead replica first about half the time, and is retried on
    // the live one; after 5 refusals in a row (the default) the dead one is ejected.
    serve_until_ejected(&router, "blue", 200).await;
    assert_eq!(value(&router, EJECTED, "blue").await, Some(1.0));

    // Something listens there again, but within the 30 s ejection nothing is sent to it.
    let revived = revive(dead).await;
    for _ in 0..30 {
        let (_, body) = send_ok(req(&router, "blue")).await;
        assert_eq!(model_of(&body), "live");
    }
    assert_eq!(
        revived
            .state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(value(&router, EJECTIONS, "blue").await, Some(1.0));
    assert_eq!(value(&router, EJECTED, "blue").await, Some(1.0));

    // A version that goes takes its series along.
    router
        .reload(&endpoint(
            "out",
            &format!("[{}]", version("green", &[live.addr], "")),
        ))
        .await;
    assert_eq!(value(&router, EJECTIONS, "blue").await, None);
    assert_eq!(value(&router, EJECTED, "blue").await, None);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_available_replica_of_a_version_is_never_ejected() {
    let (solo, pair) = (unused_addr(), [unused_addr(), unused_addr()]);
    let versions = format!(
        "[{}, {}]",
        version("solo", &[solo], ""),
        version("pair", &pair, "")
    );
    let router = Router::start(&endpoint("out", &versions)).await;
    for v in ["solo", "pair"] {
        for _ in 0..20 {
            let (parts, body) = send(req(&router, v)).await;
            assert_eq!(parts.status, 502, "{body:?}");
            assert_eq!(
                error_code(&body),
                "ReplicaUnavailable",
                "not a queue timeout"
            );
        }
    }
    assert_eq!(value(&router, EJECTED, "solo").await, Some(0.0));
    assert_eq!(value(&router, EJECTIONS, "solo").await, None);
    assert_eq!(
        value(&router, EJECTED, "pair").await,
        Some(1.0),
        "one of two"
    );

    // The only replica comes back: it gets the very next request.
    let revived = revive(solo).await;
    let (_, body) = send_ok(req(&router, "solo")).await;
    assert_eq!(model_of(&body), "revived");
    assert_eq!(revived.requests(), 1);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_replica_returns_when_its_time_is_over() {
    let live = Model::start("live").await;
    let dead = unused_addr();
    let config = router_config(
        "upstream:\n  outlierDetection: {consecutiveFailures: 2, baseEjectionTimeMs: 200}\n",
    );
    let endpoints = endpoint(
        "out",
        &format!("[{}]", version("blue", &[dead, live.addr], "")),
    );
    let router = Router::start_with(&config, &endpoints).await;
    serve_until_ejected(&router, "blue", 200).await;

    let revived = revive(dead).await;
    eventually(
        "the revived replica to get requests",
        Patience::LONG,
        || {
            let (router, revived) = (&router, &revived);
            async move {
                send_ok(req(router, "blue")).await;
                (revived.requests() > 0).then_some(())
            }
        },
    )
    .await;
    metric_eventually(
        &router,
        Patience::SHORT,
        EJECTED,
        &[("endpoint", "out"), ("version", "blue")],
        0.0,
    )
    .await;
    router.shutdown().await;
}
