//! Autoscaling in a cluster: the real router, the real kube client and the test API
//! server, with fake models on loopback addresses as the pods. What is checked is what
//! reaches the API server: the exact scale PATCH, sent only when the count changes, the
//! count read back at start, the pod marked for removal (and withdrawn from routing
//! first), and errors retried.

mod support;

use std::net::SocketAddr;

use serde_json::json;
use support::{kubeapi::*, *};
use tokio::net::TcpListener;

const NS: &str = "models";

/// Two fake model "pods" on one port at 127.0.0.2 and 127.0.0.3.
async fn pods() -> (Model, Model) {
    for _ in 0..20 {
        let a = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(SocketAddr::from(([127, 0, 0, 3], port))).await {
            return (Model::serve("pod-a", a), Model::serve("pod-b", b));
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "blue"}},
        "spec": {"containers": [{"name": "model", "image": "model:test"}]},
        "status": {"podIP": ip},
    })
}

/// The cluster: a Deployment `blue` at `replicas`, its two pods (returned) behind Service
/// `blue`, the key Secret and a ScoringEndpoint `fraud` autoscaling `blue` with
/// `autoscale`.
async fn cluster(api: &KubeApi, replicas: i32, autoscale: serde_json::Value) -> (Model, Model) {
    let (a, b) = pods().await;
    let port = a.addr.port();
    api.apply(deployment(NS, "blue", replicas));
    api.apply(pod("blue-a", "127.0.0.2"));
    api.apply(pod("blue-b", "127.0.0.3"));
    api.apply(endpoint_slice(
        NS,
        "blue-1",
        "blue",
        Some("http"),
        port,
        &[
            ("127.0.0.2", true, true, false),
            ("127.0.0.3", true, true, false),
        ],
    ));
    api.apply(secret(
        NS,
        "keys",
        &[("scorefront.io/keys", "true")],
        &[("primaryKey", KEY), ("secondaryKey", KEY2)],
    ));
    api.apply(scoring_endpoint(
        NS,
        "fraud",
        json!({"keysSecret": "keys", "versions": [
            {"name": "blue", "service": "blue", "maxRequestWaitTimeMs": 5000,
             "maxPendingRequests": 20, "autoscale": autoscale}
        ]}),
    ));
    (a, b)
}

async fn router(api: &KubeApi) -> Router {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = std::fs::read(api.kubeconfig(dir.path())).unwrap();
    let config = format!(
        "endpoints: {{kubernetes: {{namespaces: [{NS}], kubeconfig: kubeconfig}}}}\n\
         shutdownGracePeriodSeconds: 5\n"
    );
    let router = Router::try_start(&config, "", &[("kubeconfig", &kubeconfig)], false)
        .await
        .expect("router starts");
    let readyz = format!("http://{}/readyz", router.admin);
    eventually("the router to be ready", Patience::LONG, || async {
        (send(get_request(&readyz)).await.0.status == 200).then_some(())
    })
    .await;
    router
}

fn get_request(url: &str) -> http::Request<TestBody> {
    http::Request::get(url).body(body("")).unwrap()
}

/// The scale PATCHes the API server received for Deployment `blue`, as bodies.
fn scale_patches(api: &KubeApi) -> Vec<serde_json::Value> {
    api.requests()
        .iter()
        .filter(|r| r.method == http::Method::PATCH && r.path.ends_with("/deployments/blue/scale"))
        .map(|r| r.json())
        .collect()
}

async fn desired(router: &Router) -> Option<f64> {
    let text = router.metrics().await;
    metric(
        &text,
        "scorefront_desired_replicas",
        &[("endpoint", "fraud"), ("version", "blue")],
    )
}

#[tokio::test]
async fn scaling_down_withdraws_marks_and_patches_the_deployment_once() {
    let api = KubeApi::start().await;
    let (a, b) = cluster(&api, 2, json!({"minReplicas": 1, "maxReplicas": 5, "targetUtilization": 100, "scaleDownDelaySeconds": 1})).await;
    let router = router(&api).await;
    // No demand: after the delay the count goes from the 2 in force down to 1.
    eventually("one scale PATCH", Patience::LONG, || async {
        (!scale_patches(&api).is_empty()).then_some(())
    })
    .await;
    assert_eq!(scale_patches(&api), [json!({"spec": {"replicas": 1}})]);
    eventually(
        "a Scaled event on the Deployment",
        Patience::LONG,
        || async {
            let scaled = (api.requests().iter())
                .filter(|r| r.method == http::Method::POST && r.path.ends_with("/events"))
                .map(|r| r.json())
                .find(|e| e["reason"] == "Scaled" && e["regarding"]["name"] == "blue")?;
            (scaled["note"].as_str()?.contains("from 2 to 1")).then_some(())
        },
    )
    .await;
    assert_eq!(
        api.get("deployments", NS, "blue").unwrap()["spec"]["replicas"],
        1
    );
    // Exactly one pod was marked to go first, before the PATCH, and it takes no traffic.
    let marked: Vec<String> = ["blue-a", "blue-b"]
        .into_iter()
        .filter(|p| {
            api.get("pods", NS, p).unwrap()["metadata"]["annotations"]
                ["controller.kubernetes.io/pod-deletion-cost"]
                == "-1000"
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(marked.len(), 1, "{marked:?}");
    let (gone, staying) = if marked[0] == "blue-a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let before = gone.requests();
    for _ in 0..10 {
        let (parts, body) = send(scoring_post(
            &router.url("/api/v1/endpoint/fraud/score"),
            KEY,
            &[],
            "{}",
        ))
        .await;
        assert_eq!(parts.status, 200, "{body:?}");
    }
    assert_eq!(
        gone.requests(),
        before,
        "the marked pod gets no new request"
    );
    assert_eq!(staying.requests(), 10);

    // Decisions go on (utilization is exported each time); the count does not change, so
    // nothing more is sent.
    let slow = tokio::spawn(send(
        http::Request::post(router.url("/api/v1/endpoint/fraud/score"))
            .header("authorization", format!("Bearer {KEY}"))
            .header("x-delay-ms", "3000")
            .body(body("{}"))
            .unwrap(),
    ));
    eventually(
        "a decision that sees the busy replica",
        Patience::LONG,
        || async {
            let text = router.metrics().await;
            let u = metric(
                &text,
                "scorefront_utilization_ratio",
                &[("endpoint", "fraud"), ("version", "blue")],
            );
            (u == Some(1.0)).then_some(())
        },
    )
    .await;
    assert_eq!(scale_patches(&api).len(), 1, "no PATCH without a change");
    eventually(
        "the status to show the count asked for",
        Patience::LONG,
        || async {
            let obj = api.get("scoringendpoints", NS, "fraud").unwrap();
            (obj["status"]["versions"][0]["desiredReplicas"] == 1).then_some(())
        },
    )
    .await;
    assert_eq!(slow.await.unwrap().0.status, 200);
    router.shutdown().await;
}

#[tokio::test]
async fn the_count_in_force_is_read_back_and_errors_are_retried() {
    let api = KubeApi::start().await;
    // A Deployment already scaled to 4 by an earlier router; scaling down waits 60 s.
    let (_a, _b) = cluster(&api, 4, json!({"minReplicas": 1, "maxReplicas": 5})).await;
    api.deny("patch", "deployments/scale", None);
    let router = router(&api).await;
    eventually(
        "the count in force to be read back",
        Patience::LONG,
        || async { (desired(&router).await == Some(4.0)).then_some(()) },
    )
    .await;
    assert!(scale_patches(&api).is_empty(), "not reset to the minimum");

    // Demand above 4 replicas' worth: the PATCH is refused, retried, and lands once allowed.
    let url = router.url("/api/v1/endpoint/fraud/score");
    let mut load = Vec::new();
    for _ in 0..8 {
        load.push(tokio::spawn(send(
            http::Request::post(&url)
                .header("authorization", format!("Bearer {KEY}"))
                .header("x-delay-ms", "4000")
                .body(body("{}"))
                .unwrap(),
        )));
    }
    eventually("a refused PATCH to be retried", Patience::LONG, || async {
        (scale_patches(&api).len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        api.get("deployments", NS, "blue").unwrap()["spec"]["replicas"],
        4
    );
    api.allow_all();
    eventually("the count to land once allowed", Patience::LONG, || async {
        (api.get("deployments", NS, "blue").unwrap()["spec"]["replicas"] == 5).then_some(())
    })
    .await;
    for l in load {
        let _ = l.await;
    }
    router.shutdown().await;
}

#[tokio::test]
async fn a_missing_deployment_is_retried_until_it_exists() {
    let api = KubeApi::start().await;
    let (_a, _b) = cluster(&api, 2, json!({"minReplicas": 1, "maxReplicas": 5})).await;
    api.delete("deployments", NS, "blue");
    let router = router(&api).await;
    let url = router.url("/api/v1/endpoint/fraud/score");
    let scale_reads = || {
        (api.requests().iter())
            .filter(|r| {
                r.method == http::Method::GET && r.path.ends_with("/deployments/blue/scale")
            })
            .count()
    };
    eventually(
        "the scale to be asked for again",
        Patience::LONG,
        || async { (scale_reads() >= 2).then_some(()) },
    )
    .await;
    // Scoring goes on meanwhile; the count is unknown, so nothing is decided or sent.
    let (parts, body) = send(scoring_post(&url, KEY, &[], "{}")).await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(desired(&router).await, None);
    assert!(scale_patches(&api).is_empty());
    api.apply(deployment(NS, "blue", 3));
    eventually(
        "the count to be read once the Deployment exists",
        Patience::LONG,
        || async { (desired(&router).await == Some(3.0)).then_some(()) },
    )
    .await;
    router.shutdown().await;
}
