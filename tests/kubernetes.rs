//! Kubernetes discovery end to end: the real router, started in this process, finds its
//! endpoints through the real kube client talking to the test API server
//! (`support::kubeapi`), and routes to fake models on real sockets that stand in for pods.
//!
//! Pods of one Service share a port and differ by address, as on a cluster: each set of
//! pods listens on 127.0.S.2, 127.0.S.3, ... with one port, and the EndpointSlices list
//! those addresses. Every test has its own API server and router, and waits by polling.

mod support;

use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
};

use http::Request;
use serde_json::{Value, json};
use support::{Patience, Router, eventually, kubeapi::*, metric};
use tokio::net::TcpListener;

const NS: &str = "models";
const KEYS_LABEL: &str = "scorefront.io/keys";
const KEY: &str = support::KEY;
const KEY2: &str = support::KEY2;
const KEY3: &str = "rotated-primary-key-0003";
const LONG: Patience = Patience::LONG;

// ---------------------------------------------------------------------------------------
// Pods

/// How an EndpointSlice lists a pod.
#[derive(Clone, Copy)]
enum Pod {
    /// Ready: takes new requests.
    Ready,
    /// Not ready (failing its readiness probe).
    Unready,
    /// Shutting down but still serving, as during a rolling update.
    Terminating,
}

/// Fake models standing in for the pods of one Service: one port, one address each.
struct Pods {
    models: Vec<support::Model>,
    port: u16,
}

impl Pods {
    /// `n` models named `{name}-{i}` on 127.0.{subnet}.{2 + i}, all on one port.
    async fn start(name: &str, subnet: u8, n: usize) -> Pods {
        let ip = |i: usize| format!("127.0.{subnet}.{}", 2 + i);
        'again: loop {
            let first = TcpListener::bind(format!("{}:0", ip(0))).await.unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for i in 1..n {
                match TcpListener::bind(format!("{}:{port}", ip(i))).await {
                    Ok(l) => listeners.push(l),
                    // Someone else has that port on that address: pick another port.
                    Err(_) => continue 'again,
                }
            }
            let models = (listeners.into_iter().enumerate())
                .map(|(i, l)| support::Model::serve(&format!("{name}-{i}"), l))
                .collect();
            return Pods { models, port };
        }
    }

    /// `blue` pods on subnet `subnet` and `green` ones on the next, with slices of
    /// Services `blue` (its first two pods ready) and `green` (its first pod ready).
    async fn blue_green(api: &KubeApi, subnet: u8, blue: usize, green: usize) -> (Pods, Pods) {
        let blue = Pods::start("blue", subnet, blue).await;
        let green = Pods::start("green", subnet + 1, green).await;
        api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready), (1, Pod::Ready)]));
        api.apply(green.slice(NS, "green-1", "green", &[(0, Pod::Ready)]));
        (blue, green)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.models[i].addr
    }

    fn requests(&self, i: usize) -> usize {
        self.models[i].requests()
    }

    /// An EndpointSlice `name` of `service` in `ns` listing the pods `pods`.
    fn slice(&self, ns: &str, name: &str, service: &str, pods: &[(usize, Pod)]) -> Value {
        let listed: Vec<(String, bool, bool, bool)> = pods
            .iter()
            .map(|&(i, pod)| {
                let (ready, serving, terminating) = match pod {
                    Pod::Ready => (true, true, false),
                    Pod::Unready => (false, false, false),
                    Pod::Terminating => (false, true, true),
                };
                (self.addr(i).ip().to_string(), ready, serving, terminating)
            })
            .collect();
        let listed: Vec<(&str, bool, bool, bool)> = (listed.iter())
            .map(|(ip, r, s, t)| (ip.as_str(), *r, *s, *t))
            .collect();
        endpoint_slice(ns, name, service, Some("http"), self.port, &listed)
    }
}

// ---------------------------------------------------------------------------------------
// Objects

/// A version of a ScoringEndpoint on the Service `service`, port `http`.
fn version(name: &str, service: &str, percent: u32, default: bool) -> Value {
    json!({
        "name": name,
        "service": service,
        "port": "http",
        "trafficPercentile": percent,
        "isDefault": default,
    })
}

/// `blue` and `green` on their Services, splitting `blue`/`green` percent; the default is
/// the version at 100, else `blue`.
fn blue_green(blue: u32, green: u32) -> [Value; 2] {
    [
        version("blue", "blue", blue, green != 100),
        version("green", "green", green, green == 100),
    ]
}

/// Endpoint `fraud` with key auth from `fraud-keys`, split as [`blue_green`] says.
fn fraud(blue: u32, green: u32) -> Value {
    scoring_endpoint(NS, "fraud", keyed("fraud-keys", &blue_green(blue, green)))
}

/// A spec with key auth from the Secret `keys`.
fn keyed(keys: &str, versions: &[Value]) -> Value {
    json!({"keysSecret": keys, "versions": versions})
}

/// A spec without auth.
fn open(versions: &[Value]) -> Value {
    json!({"authMode": "none", "versions": versions})
}

/// A key Secret, labelled so the router watches it.
fn keys(ns: &str, name: &str, primary: &str, secondary: &str) -> Value {
    secret(
        ns,
        name,
        &[(KEYS_LABEL, "true")],
        &[("primaryKey", primary), ("secondaryKey", secondary)],
    )
}

/// The `.status` of the ScoringEndpoint `ns/name`, if it has one.
fn status(api: &KubeApi, ns: &str, name: &str) -> Option<Value> {
    api.get("scoringendpoints", ns, name)?
        .get("status")
        .cloned()
}

/// The condition `type_` of a status.
fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// PATCH requests to the status of `ns/name` the API server has received.
fn status_writes(api: &KubeApi, ns: &str, name: &str) -> usize {
    let path = format!("/apis/scorefront.io/v1/namespaces/{ns}/scoringendpoints/{name}/status");
    (api.requests().iter())
        .filter(|r| r.method == http::Method::PATCH && r.path == path)
        .count()
}

// ---------------------------------------------------------------------------------------
// The router

fn kubeconfig(api: &KubeApi) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: test\n  cluster: {{server: '{}'}}\n\
         users:\n- name: test\n  user: {{token: '{}'}}\n\
         contexts:\n- name: test\n  context: {{cluster: test, user: test}}\n\
         current-context: test\n",
        api.url(),
        api.token()
    )
}

/// A router watching `namespaces` through `api`.
async fn start_router(api: &KubeApi, namespaces: &[&str]) -> Router {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = format!(
        "endpoints:\n  kubernetes: {{namespaces: [{}], kubeconfig: kubeconfig}}\n\
         shutdownGracePeriodSeconds: 5\n",
        namespaces.join(", ")
    );
    let kubeconfig = kubeconfig(api);
    Router::try_start(&config, "", &[("kubeconfig", kubeconfig.as_bytes())], false)
        .await
        .expect("router starts")
}

async fn readyz(router: &Router) -> u16 {
    let url = format!("http://{}/readyz", router.admin);
    support::get(&url).await.0.status.as_u16()
}

async fn wait_ready(router: &Router) {
    eventually("/readyz answers 200", LONG, || async {
        (readyz(router).await == 200).then_some(())
    })
    .await;
}

/// One scoring answer: its status, and the model that answered it or the router's error
/// code.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    /// The model's name, or the router's `error.code`.
    from: String,
    /// The `azureml-model-deployment` header.
    version: String,
}

fn scoring_request(router: &Router, endpoint: &str, key: Option<&str>) -> http::request::Builder {
    let url = router.url(&format!("/api/v1/endpoint/{endpoint}/score"));
    let req = Request::post(url);
    match key {
        Some(key) => req.header("authorization", format!("Bearer {key}")),
        None => req,
    }
}

async fn answer_of(resp: http::Response<hyper::body::Incoming>) -> Answer {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let from = json["model"]
        .as_str()
        .or(json["error"]["code"].as_str())
        .unwrap_or_default()
        .to_owned();
    let version = (parts.headers.get("azureml-model-deployment"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Answer {
        status: parts.status.as_u16(),
        from,
        version,
    }
}

/// Scores `endpoint` once, pinned to `pin` if given.
async fn score(router: &Router, endpoint: &str, key: Option<&str>, pin: Option<&str>) -> Answer {
    let mut req = scoring_request(router, endpoint, key);
    if let Some(pin) = pin {
        req = req.header("azureml-model-deployment", pin);
    }
    let resp = support::client()
        .request(req.body(support::body("{}")).unwrap())
        .await
        .expect("response");
    answer_of(resp).await
}

/// Scores `endpoint` `n` times; counts the answers by the version that gave them.
async fn tally(
    router: &Router,
    endpoint: &str,
    key: Option<&str>,
    n: usize,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let a = score(router, endpoint, key, None).await;
        assert_eq!(a.status, 200, "{a:?}");
        *counts.entry(a.version).or_insert(0) += 1;
    }
    counts
}

/// The routable replicas of `endpoint`'s `version` in the live routing table, sorted.
fn routable(router: &Router, endpoint: &str, version: &str) -> Vec<SocketAddr> {
    let table = router.app().proxy.table();
    let mut addrs: Vec<SocketAddr> = (table.endpoint(endpoint))
        .and_then(|ep| ep.versions().iter().find(|v| v.name() == version).cloned())
        .map(|v| v.slots.replicas().iter().map(|r| r.addr).collect())
        .unwrap_or_default();
    addrs.sort();
    addrs
}

async fn wait_routable(router: &Router, endpoint: &str, version: &str, want: &[SocketAddr]) {
    let mut want = want.to_vec();
    want.sort();
    let what = format!("{endpoint}/{version} routes to exactly {want:?}");
    eventually(&what, LONG, || async {
        (routable(router, endpoint, version) == want).then_some(())
    })
    .await;
}

/// Waits until `router`'s metric `name{labels}` is above zero.
async fn metric_positive(router: &Router, name: &str, labels: &[(&str, &str)]) -> f64 {
    let what = format!("{name}{labels:?} > 0");
    eventually(&what, LONG, || async {
        metric(&router.metrics().await, name, labels).filter(|v| *v > 0.0)
    })
    .await
}

/// Concurrent scoring clients, each sending one request after the other.
struct Load {
    stop: Arc<AtomicBool>,
    /// Requests each client has finished.
    done: Arc<Vec<AtomicUsize>>,
    /// Every answer other than a 200.
    failures: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The most requests one load client sends, so a test gone wrong still ends.
const MAX_REQUESTS_PER_CLIENT: usize = 20_000;

impl Load {
    /// `clients` clients scoring `endpoint`, each request held `delay_ms` by the model.
    fn start(
        router: &Router,
        endpoint: &str,
        key: Option<&str>,
        clients: usize,
        delay_ms: u32,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Vec<AtomicUsize>> =
            Arc::new((0..clients).map(|_| AtomicUsize::new(0)).collect());
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
                let (url, key) = (
                    router.url(&format!("/api/v1/endpoint/{endpoint}/score")),
                    key.map(str::to_owned),
                );
                tokio::spawn(async move {
                    let client = support::client();
                    for _ in 0..MAX_REQUESTS_PER_CLIENT {
                        if stop.load(SeqCst) {
                            return;
                        }
                        let mut req =
                            Request::post(&url).header("x-delay-ms", delay_ms.to_string());
                        if let Some(key) = &key {
                            req = req.header("authorization", format!("Bearer {key}"));
                        }
                        let answer =
                            match client.request(req.body(support::body("{}")).unwrap()).await {
                                Ok(resp) => answer_of(resp).await,
                                Err(e) => Answer {
                                    status: 0,
                                    from: e.to_string(),
                                    version: String::new(),
                                },
                            };
                        if answer.status != 200 {
                            failures.lock().unwrap().push(answer);
                        }
                        done[i].fetch_add(1, SeqCst);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failures,
            tasks,
        }
    }

    fn completed(&self) -> usize {
        self.done.iter().map(|d| d.load(SeqCst)).sum()
    }

    /// Waits until `n` more requests have been answered.
    async fn more(&self, n: usize) {
        let target = self.completed() + n;
        eventually(&format!("{n} more answers"), LONG, || async {
            (self.completed() >= target).then_some(())
        })
        .await;
    }

    /// Waits until every client has finished the request it had in flight, so that every
    /// request after this was sent after this was called.
    async fn quiesce(&self) {
        let marks: Vec<usize> = self.done.iter().map(|d| d.load(SeqCst)).collect();
        eventually("each client finishes its request", LONG, || async {
            let moved = self
                .done
                .iter()
                .zip(&marks)
                .all(|(d, m)| d.load(SeqCst) > *m);
            moved.then_some(())
        })
        .await;
    }

    /// Stops the clients; returns how many requests they sent, and asserts every one of
    /// them was answered 200.
    async fn finish(self) -> usize {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} failed requests: {failures:?}",
            failures.len()
        );
        self.done.iter().map(|d| d.load(SeqCst)).sum()
    }
}

// ---------------------------------------------------------------------------------------
// 1. Endpoints appear, change and disappear

#[tokio::test]
async fn endpoints_appear_change_and_disappear() {
    let api = KubeApi::start().await;
    let (blue, green) = Pods::blue_green(&api, 1, 2, 1).await;
    api.apply(keys(NS, "fraud-keys", KEY, KEY2));
    api.apply(fraud(90, 10));
    let router = start_router(&api, &[NS]).await;

    // It appears, with its keys from the Secret.
    wait_ready(&router).await;
    eventually("fraud is served", LONG, || async {
        (score(&router, "fraud", Some(KEY), None).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(score(&router, "fraud", Some(KEY2), None).await.status, 200);
    let refused = score(&router, "fraud", Some("not-the-key-at-all"), None).await;
    assert_eq!(
        (refused.status, refused.from.as_str()),
        (401, "Unauthorized")
    );

    // 90/10 over both versions, and both blue pods take requests.
    let counts = tally(&router, "fraud", Some(KEY), 200).await;
    let (b, g) = (
        counts.get("blue").copied().unwrap_or(0),
        counts.get("green").copied().unwrap_or(0),
    );
    assert_eq!(b + g, 200, "{counts:?}");
    assert!((4..=50).contains(&g), "about 10% green: {counts:?}");
    assert!(blue.requests(0) > 0 && blue.requests(1) > 0);

    // Pins reach each version.
    for (pin, pods) in [("green", &green), ("blue", &blue)] {
        for _ in 0..20 {
            let a = score(&router, "fraud", Some(KEY), Some(pin)).await;
            assert_eq!((a.status, a.version.as_str()), (200, pin), "{a:?}");
            assert!(pods.models.iter().any(|m| m.name == a.from), "{a:?}");
        }
    }
    let unknown = score(&router, "fraud", Some(KEY), Some("red")).await;
    assert_eq!(
        (unknown.status, unknown.from.as_str()),
        (404, "VersionNotFound")
    );

    // The split changes in place, at once: once the new table is out, every answer comes
    // from the new split (all green), none from the old one.
    let mut generation = router.app().generation.clone();
    let before = *generation.borrow_and_update();
    api.apply(fraud(0, 100));
    tokio::time::timeout(LONG.within, generation.wait_for(|g| *g > before))
        .await
        .expect("the new split is published")
        .unwrap();
    let counts = tally(&router, "fraud", Some(KEY), 100).await;
    assert_eq!(counts, HashMap::from([("green".to_owned(), 100)]));
    let pinned = score(&router, "fraud", Some(KEY), Some("blue")).await;
    assert_eq!((pinned.status, pinned.version.as_str()), (200, "blue"));

    // Keys rotate without a restart: the new primary works, the old primary stays as the
    // secondary, and the old secondary is refused from the moment the new key works.
    api.apply(keys(NS, "fraud-keys", KEY3, KEY));
    eventually("the rotated key works", LONG, || async {
        (score(&router, "fraud", Some(KEY3), None).await.status == 200).then_some(())
    })
    .await;
    let old = score(&router, "fraud", Some(KEY2), None).await;
    assert_eq!((old.status, old.from.as_str()), (401, "Unauthorized"));
    assert_eq!(score(&router, "fraud", Some(KEY), None).await.status, 200);

    // Deleting the object removes the endpoint.
    api.delete("scoringendpoints", NS, "fraud");
    let gone = eventually("fraud is gone", LONG, || async {
        let a = score(&router, "fraud", Some(KEY3), None).await;
        (a.status == 404).then_some(a)
    })
    .await;
    assert_eq!(gone.from, "EndpointNotFound");
    router.shutdown().await;
}

#[tokio::test]
async fn a_version_picks_its_port_by_name_by_number_or_as_the_only_one() {
    let api = KubeApi::start().await;
    let pods = Pods::start("pod", 18, 2).await;
    let unused = support::unused_addr().port();
    // A Service with two ports, the model on `http`; and one with a single unnamed port.
    let mut two = pods.slice(NS, "two-1", "two", &[(0, Pod::Ready)]);
    two["ports"] = json!([
        {"name": "metrics", "port": unused, "protocol": "TCP"},
        {"name": "http", "port": pods.port, "protocol": "TCP"},
    ]);
    api.apply(two);
    let one = endpoint_slice(
        NS,
        "one-1",
        "one",
        None,
        pods.port,
        &[(&pods.addr(1).ip().to_string(), true, true, false)],
    );
    api.apply(one);
    let on = |name: &str, service: &str, port: Value| {
        let mut v = version(name, service, 0, false);
        match port {
            Value::Null => v.as_object_mut().unwrap().remove("port"),
            port => v.as_object_mut().unwrap().insert("port".into(), port),
        };
        v
    };
    let versions = [
        on("by-name", "two", json!("http")),
        on("by-number", "two", json!(pods.port)),
        on("only", "one", Value::Null),
        on("ambiguous", "two", Value::Null),
    ];
    api.apply(scoring_endpoint(NS, "ports", open(&versions)));
    let router = start_router(&api, &[NS]).await;
    wait_routable(&router, "ports", "by-name", &[pods.addr(0)]).await;
    assert_eq!(routable(&router, "ports", "by-number"), [pods.addr(0)]);
    assert_eq!(routable(&router, "ports", "only"), [pods.addr(1)]);
    // Two ports and none named: no replicas (and the status says which version).
    assert_eq!(routable(&router, "ports", "ambiguous"), []);
    for (pin, model) in [
        ("by-name", "pod-0"),
        ("by-number", "pod-0"),
        ("only", "pod-1"),
    ] {
        let a = score(&router, "ports", None, Some(pin)).await;
        assert_eq!((a.status, a.from.as_str()), (200, model), "{a:?}");
    }
    let s = eventually("the status", LONG, || async {
        status(&api, NS, "ports").filter(|s| condition(s, "Ready").is_some())
    })
    .await;
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(ready["reason"], "NoReadyReplicas", "{s}");
    assert!(
        ready["message"].as_str().unwrap().contains("ambiguous"),
        "{s}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn with_no_namespaces_listed_every_namespace_is_watched() {
    let api = KubeApi::start().await;
    let pods = Pods::start("pod", 19, 2).await;
    for (i, ns) in ["team-a", "team-b"].into_iter().enumerate() {
        api.apply(pods.slice(ns, "blue-1", "blue", &[(i, Pod::Ready)]));
        let name = format!("ep-{i}");
        api.apply(scoring_endpoint(
            ns,
            &name,
            open(&[version("blue", "blue", 100, true)]),
        ));
    }
    let router = start_router(&api, &[]).await;
    wait_ready(&router).await;
    assert_eq!(score(&router, "ep-0", None, None).await.from, "pod-0");
    assert_eq!(score(&router, "ep-1", None, None).await.from, "pod-1");
    // Every watch is cluster-wide.
    let watched: Vec<String> = (api.requests().iter())
        .filter(|r| r.method == http::Method::GET && !r.path.contains("/namespaces/"))
        .map(|r| r.path.clone())
        .collect();
    for path in [
        "/apis/scorefront.io/v1/scoringendpoints",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/secrets",
    ] {
        assert!(watched.iter().any(|p| p == path), "{path} in {watched:?}");
    }
    assert!(
        (api.requests().iter())
            .all(|r| r.method != http::Method::GET || !r.path.contains("/namespaces/")),
        "no namespaced reads"
    );
    // And each status lands in its own namespace.
    eventually("both statuses", LONG, || async {
        (status(&api, "team-a", "ep-0").is_some() && status(&api, "team-b", "ep-1").is_some())
            .then_some(())
    })
    .await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 2. Pods become ready, unready and terminating under load

#[tokio::test]
async fn pods_come_and_go_under_load_without_a_failed_request() {
    let api = KubeApi::start().await;
    let pods = Pods::start("pod", 3, 5).await;
    let ready = |ids: &[usize]| ids.iter().map(|&i| (i, Pod::Ready)).collect::<Vec<_>>();
    api.apply(pods.slice(NS, "blue-1", "blue", &ready(&[0, 1, 2, 3])));
    let mut blue = version("blue", "blue", 100, true);
    blue["maxConcurrentRequestsPerContainer"] = 4.into();
    api.apply(scoring_endpoint(NS, "churn", open(&[blue])));
    let router = start_router(&api, &[NS]).await;
    let addrs = |ids: &[usize]| ids.iter().map(|&i| pods.addr(i)).collect::<Vec<_>>();
    wait_routable(&router, "churn", "blue", &addrs(&[0, 1, 2, 3])).await;

    let load = Load::start(&router, "churn", None, 6, 2);
    load.more(100).await;

    // A pod is added, in a second slice of the Service.
    api.apply(pods.slice(NS, "blue-2", "blue", &ready(&[4])));
    wait_routable(&router, "churn", "blue", &addrs(&[0, 1, 2, 3, 4])).await;
    eventually("the new pod takes requests", LONG, || async {
        (pods.requests(4) > 0).then_some(())
    })
    .await;

    // One turns unready, another terminating (still serving), and one leaves its slice
    // (it keeps listening, so requests already sent to it finish). Once the router has
    // applied each change and every client has sent a request since, the pod gets no
    // more requests.
    let mut frozen = Vec::new();
    type Step<'a> = (usize, &'a [(usize, Pod)], &'a [usize]);
    let steps: [Step; 3] = [
        (
            1,
            &[
                (0, Pod::Ready),
                (1, Pod::Unready),
                (2, Pod::Ready),
                (3, Pod::Ready),
            ],
            &[0, 2, 3, 4],
        ),
        (
            2,
            &[
                (0, Pod::Ready),
                (1, Pod::Unready),
                (2, Pod::Terminating),
                (3, Pod::Ready),
            ],
            &[0, 3, 4],
        ),
        (
            0,
            &[(1, Pod::Unready), (2, Pod::Terminating), (3, Pod::Ready)],
            &[3, 4],
        ),
    ];
    for (pod, listed, routed) in steps {
        let before = pods.requests(pod);
        assert!(before > 0, "pod {pod} took requests before its change");
        api.apply(pods.slice(NS, "blue-1", "blue", listed));
        wait_routable(&router, "churn", "blue", &addrs(routed)).await;
        load.quiesce().await;
        frozen.push((pod, pods.requests(pod)));
        load.more(100).await;
    }
    let (three, four) = (pods.requests(3), pods.requests(4));
    load.more(300).await;
    let sent = load.finish().await;
    for (pod, count) in frozen {
        assert_eq!(
            pods.requests(pod),
            count,
            "pod {pod} got requests after it left"
        );
    }
    assert!(
        pods.requests(3) + pods.requests(4) - three - four >= 300,
        "the last 300 requests went to the two pods left"
    );
    assert!(sent >= 800, "{sent}");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 3. The API server goes away, things change while it is away, and it comes back

#[tokio::test]
async fn an_api_server_outage_keeps_traffic_flowing_and_converges_after() {
    let api = KubeApi::start().await;
    let (blue, green) = Pods::blue_green(&api, 4, 3, 2).await;
    api.apply(keys(NS, "fraud-keys", KEY, KEY2));
    api.apply(fraud(100, 0));
    api.apply(scoring_endpoint(
        NS,
        "stale",
        open(&[version("blue", "blue", 100, true)]),
    ));
    let router = start_router(&api, &[NS]).await;
    wait_ready(&router).await;
    wait_routable(&router, "fraud", "blue", &[blue.addr(0), blue.addr(1)]).await;
    assert_eq!(score(&router, "stale", None, None).await.status, 200);

    let load = Load::start(&router, "fraud", Some(KEY), 3, 1);
    load.more(50).await;

    // The API server stops. While it is away: the split moves to green, blue loses a pod
    // (which keeps listening) and gains one, green gains one, one endpoint goes and
    // another comes, the keys rotate (the old primary stays as the secondary), and the
    // server's history is compacted past what the router has seen.
    api.stop().await;
    api.apply(fraud(0, 100));
    api.apply(blue.slice(NS, "blue-1", "blue", &[(1, Pod::Ready), (2, Pod::Ready)]));
    api.apply(green.slice(NS, "green-1", "green", &[(0, Pod::Ready), (1, Pod::Ready)]));
    api.delete("scoringendpoints", NS, "stale");
    api.apply(scoring_endpoint(
        NS,
        "fresh",
        open(&[version("green", "green", 100, true)]),
    ));
    api.apply(keys(NS, "fraud-keys", KEY3, KEY));
    api.compact();

    // Traffic flows with the last table, and the router stays ready.
    metric_positive(
        &router,
        "scorefront_kubernetes_watch_errors_total",
        &[("reason", "unreachable")],
    )
    .await;
    load.more(200).await;
    assert_eq!(readyz(&router).await, 200);
    assert_eq!(score(&router, "stale", None, None).await.status, 200);
    assert_eq!(
        routable(&router, "fraud", "blue"),
        [blue.addr(0), blue.addr(1)]
    );

    // Back: the router relists and serves what the cluster holds now.
    api.restart().await;
    eventually("the router catches up", LONG, || async {
        let caught_up = routable(&router, "fraud", "blue") == [blue.addr(1), blue.addr(2)]
            && routable(&router, "fraud", "green") == [green.addr(0), green.addr(1)]
            && score(&router, "fresh", None, None).await.status == 200
            && score(&router, "stale", None, None).await.status == 404
            && score(&router, "fraud", Some(KEY3), None).await.status == 200;
        caught_up.then_some(())
    })
    .await;
    let counts = tally(&router, "fraud", Some(KEY), 50).await;
    assert_eq!(counts, HashMap::from([("green".to_owned(), 50)]));
    assert_eq!(score(&router, "fraud", Some(KEY2), None).await.status, 401);
    // It had to relist: the history it resumed from was gone.
    let expired = metric_positive(
        &router,
        "scorefront_kubernetes_watch_errors_total",
        &[("reason", "expired")],
    );
    expired.await;
    load.more(50).await;
    load.finish().await;
    router.shutdown().await;
}

#[tokio::test]
async fn traffic_moved_to_a_new_service_during_an_outage_moves_without_a_gap() {
    move_to_a_new_service_during_an_outage(6, false).await;
}

#[tokio::test]
async fn and_so_it_does_when_the_history_was_compacted_meanwhile() {
    move_to_a_new_service_during_an_outage(16, true).await;
}

/// The watches come back one by one after an outage (each after its own backoff); the
/// router must not apply the new definition before the new Service's pods are known, nor
/// the old Service's pods leaving before the definition that stops using them. With
/// `compact`, the watches must relist; without, they replay what they missed.
async fn move_to_a_new_service_during_an_outage(subnet: u8, compact: bool) {
    let api = KubeApi::start().await;
    let blue = Pods::start("blue", subnet, 2).await;
    let green = Pods::start("green", subnet + 1, 2).await;
    api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready), (1, Pod::Ready)]));
    // Room for every client at once: a request queued for blue when blue goes away
    // would wait for a slot that never comes, which is not what this test is about.
    let roomy = |name: &str, service: &str| {
        let mut v = version(name, service, 100, true);
        v["maxConcurrentRequestsPerContainer"] = 4.into();
        v
    };
    api.apply(scoring_endpoint(
        NS,
        "fraud",
        open(&[roomy("blue", "blue")]),
    ));
    let router = start_router(&api, &[NS]).await;
    wait_routable(&router, "fraud", "blue", &[blue.addr(0), blue.addr(1)]).await;
    let load = Load::start(&router, "fraud", None, 3, 1);
    load.more(50).await;

    // While the API server is away, green is deployed, all traffic moves to it, and blue
    // is scaled to zero (its pods keep listening here, but the router is told they left).
    api.stop().await;
    api.apply(green.slice(NS, "green-1", "green", &[(0, Pod::Ready), (1, Pod::Ready)]));
    api.apply(scoring_endpoint(
        NS,
        "fraud",
        open(&[roomy("green", "green")]),
    ));
    api.delete("endpointslices", NS, "blue-1");
    if compact {
        api.compact();
    }
    metric_positive(
        &router,
        "scorefront_kubernetes_watch_errors_total",
        &[("reason", "unreachable")],
    )
    .await;
    load.more(50).await;
    api.restart().await;

    eventually("the router moves to green", LONG, || async {
        (routable(&router, "fraud", "green") == [green.addr(0), green.addr(1)]).then_some(())
    })
    .await;
    let counts = tally(&router, "fraud", None, 20).await;
    assert_eq!(counts, HashMap::from([("green".to_owned(), 20)]));
    load.more(100).await;
    load.finish().await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. RBAC denies one resource

/// Log lines written through `tracing` on this thread, as text.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Collects what this thread logs (every task of a current-thread runtime) until the
    /// guard is dropped.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    fn lines(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(str::to_owned).collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test]
async fn a_resource_rbac_denies_leaves_the_rest_served_and_says_what_is_missing() {
    let (logs, _guard) = Logs::capture();
    let api = KubeApi::start().await;
    let pods = Pods::start("pod", 8, 1).await;
    api.apply(pods.slice(NS, "blue-1", "blue", &[(0, Pod::Ready)]));
    api.apply(keys(NS, "locked-keys", KEY, KEY2));
    let blue = [version("blue", "blue", 100, true)];
    api.apply(scoring_endpoint(NS, "open", open(&blue)));
    api.apply(scoring_endpoint(NS, "locked", keyed("locked-keys", &blue)));
    api.deny("list", "secrets", None);
    api.deny("watch", "secrets", None);
    let router = start_router(&api, &[NS]).await;

    // Ready anyway, serving what needs no Secret.
    wait_ready(&router).await;
    assert_eq!(score(&router, "open", None, None).await.status, 200);
    let locked = score(&router, "locked", Some(KEY), None).await;
    assert_eq!(
        (locked.status, locked.from.as_str()),
        (404, "EndpointNotFound")
    );
    metric_positive(
        &router,
        "scorefront_kubernetes_watch_errors_total",
        &[("reason", "forbidden"), ("resource", "secrets")],
    )
    .await;

    // The key endpoint's status says why it is not served: the router may not read its
    // Secret (not that the Secret is missing; it is there).
    let status = eventually("locked has a status", LONG, || async {
        status(&api, NS, "locked").filter(|s| condition(s, "Accepted").is_some())
    })
    .await;
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(accepted["status"], "False", "{status}");
    let message = accepted["message"].as_str().unwrap();
    assert!(message.contains("spec.keysSecret"), "{message}");
    assert!(message.contains("may not list secrets"), "{message}");
    assert_eq!(condition(&status, "Ready").unwrap()["reason"], "NotServed");

    // One error line names the permission and where it is missing.
    let explained: Vec<String> = (logs.lines().into_iter())
        .filter(|l| l.contains("ERROR") && l.contains("RBAC"))
        .collect();
    assert!(
        explained.iter().any(|l| l.contains("may not list secrets")
            && l.contains("in namespace models")
            && l.contains("grant get, list and watch")),
        "{explained:#?}"
    );

    // Granted, the key endpoint is served with no restart.
    api.allow_all();
    eventually(
        "locked is served once the router may read Secrets",
        LONG,
        || async { (score(&router, "locked", Some(KEY), None).await.status == 200).then_some(()) },
    )
    .await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 5. Invalid changes, never-valid objects and duplicate names

#[tokio::test]
async fn invalid_changes_keep_the_last_good_definition_and_duplicates_are_refused() {
    let api = KubeApi::start().await;
    let ours = Pods::start("ours", 9, 1).await;
    let theirs = Pods::start("theirs", 10, 1).await;
    api.apply(ours.slice(NS, "blue-1", "blue", &[(0, Pod::Ready)]));
    api.apply(theirs.slice("a-team", "blue-1", "blue", &[(0, Pod::Ready)]));
    let blue = [version("blue", "blue", 100, true)];
    let created = api.apply(scoring_endpoint(NS, "fraud", open(&blue)));
    // Never valid: a version without a Service.
    let mut no_service = version("blue", "blue", 100, true);
    no_service.as_object_mut().unwrap().remove("service");
    api.apply(scoring_endpoint(NS, "broken", open(&[no_service])));
    let router = start_router(&api, &["a-team", NS]).await;
    wait_ready(&router).await;
    assert_eq!(score(&router, "fraud", None, None).await.from, "ours-0");
    let broken = score(&router, "broken", None, None).await;
    assert_eq!(
        (broken.status, broken.from.as_str()),
        (404, "EndpointNotFound")
    );
    let status_of =
        |ns: &'static str, name: &'static str, type_: &'static str, want: &'static str| {
            let api = &api;
            async move {
                let what = format!("{ns}/{name} has {type_}={want}");
                eventually(&what, LONG, || async {
                    let s = status(api, ns, name)?;
                    let c = condition(&s, type_)?;
                    (c["status"] == want).then(|| c.clone())
                })
                .await
            }
        };
    let c = status_of(NS, "broken", "Accepted", "False").await;
    assert_eq!(c["reason"], "Invalid");
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("spec.versions[0].service"), "{message}");
    assert!(
        !message.contains("deployment"),
        "one error, not its echo: {message}"
    );

    // Percentiles adding up to 120 (the API server here runs no CEL, so the router sees
    // it): the last good definition stays in force and the status says why.
    let bad = [
        version("blue", "blue", 60, true),
        version("green", "blue", 60, false),
    ];
    api.apply(scoring_endpoint(NS, "fraud", open(&bad)));
    let c = status_of(NS, "fraud", "Accepted", "False").await;
    assert_eq!(
        (c["reason"].as_str(), c["observedGeneration"].as_i64()),
        (Some("Invalid"), Some(2))
    );
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("spec.versions") && message.contains("120"),
        "{message}"
    );
    assert!(
        message.contains("the last valid spec stays in force"),
        "{message}"
    );
    for _ in 0..20 {
        let a = score(&router, "fraud", None, None).await;
        assert_eq!((a.status, a.version.as_str()), (200, "blue"), "{a:?}");
    }
    let green = score(&router, "fraud", None, Some("green")).await;
    assert_eq!(green.from, "VersionNotFound");

    // A second object with the name, made later in another namespace, is refused while
    // the older one keeps serving. The namespace sorts first, so only the age decides;
    // creation times count whole seconds, so make it in a later second.
    let first = created["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("a later second", LONG, || async {
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .unwrap();
        (now.as_str().unwrap() > first.as_str()).then_some(())
    })
    .await;
    api.apply(scoring_endpoint("a-team", "fraud", open(&blue)));
    let c = status_of("a-team", "fraud", "Accepted", "False").await;
    assert_eq!(c["reason"], "DuplicateName");
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("models/fraud"), "{message}");
    let s = status(&api, "a-team", "fraud").unwrap();
    assert_eq!(condition(&s, "Ready").unwrap()["reason"], "NotServed");
    for _ in 0..20 {
        assert_eq!(score(&router, "fraud", None, None).await.from, "ours-0");
    }

    // The holder goes; the other one takes the name over.
    api.delete("scoringendpoints", NS, "fraud");
    eventually("a-team/fraud serves", LONG, || async {
        (score(&router, "fraud", None, None).await.from == "theirs-0").then_some(())
    })
    .await;
    status_of("a-team", "fraud", "Accepted", "True").await;
    status_of("a-team", "fraud", "Ready", "True").await;
    router.shutdown().await;
}

#[tokio::test]
async fn a_refused_object_is_logged_once_not_at_every_change() {
    let (logs, _guard) = Logs::capture();
    let api = KubeApi::start().await;
    let blue = Pods::start("blue", 15, 1).await;
    api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready)]));
    let mut no_service = version("blue", "blue", 100, true);
    no_service.as_object_mut().unwrap().remove("service");
    api.apply(scoring_endpoint(NS, "broken", open(&[no_service])));
    api.apply(scoring_endpoint(
        NS,
        "fraud",
        open(&[version("blue", "blue", 100, true)]),
    ));
    let router = start_router(&api, &[NS]).await;
    eventually("broken's status", LONG, || async {
        status(&api, NS, "broken")
    })
    .await;

    // Other objects change, and the router writes their statuses: nothing new to say
    // about the broken one.
    for percent in [90, 80] {
        let spec = open(&[version("blue", "blue", percent, true)]);
        let generation =
            api.apply(scoring_endpoint(NS, "fraud", spec))["metadata"]["generation"].clone();
        eventually("fraud's status catches up", LONG, || async {
            status(&api, NS, "fraud").filter(|s| s["observedGeneration"] == generation)
        })
        .await;
    }
    let refusals: Vec<String> = (logs.lines().into_iter())
        .filter(|l| l.contains("ScoringEndpoint refused") && l.contains("broken"))
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    // And one Warning event on the object, for `kubectl describe`.
    let about_broken = || -> Vec<Value> {
        (api.requests().iter())
            .filter(|r| r.method == http::Method::POST && r.path.ends_with("/events"))
            .map(|r| r.json())
            .filter(|e| e["regarding"]["name"] == "broken")
            .collect()
    };
    eventually("a Warning event on the refused object", LONG, || async {
        (!about_broken().is_empty()).then_some(())
    })
    .await;
    let events = about_broken();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "Invalid");
    assert_eq!(events[0]["regarding"]["kind"], "ScoringEndpoint");
    let note = events[0]["note"].as_str().unwrap();
    assert!(note.contains("spec.versions[0].service"), "{note}");
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 6. Status

#[tokio::test]
async fn status_reports_what_is_served_and_is_written_only_when_it_changes() {
    let api = KubeApi::start().await;
    let (blue, _green) = Pods::blue_green(&api, 11, 2, 1).await;
    api.apply(scoring_endpoint(NS, "fraud", open(&blue_green(90, 10))));
    let router = start_router(&api, &[NS]).await;

    let want = |blue: u32, green: u32| {
        json!({
            "observedGeneration": 1,
            "readyReplicas": blue + green,
            "traffic": "blue=90 green=10",
            "versions": [
                {"name": "blue", "readyReplicas": blue},
                {"name": "green", "readyReplicas": green},
            ],
        })
    };
    let without_conditions = |mut s: Value| {
        s.as_object_mut().unwrap().remove("conditions");
        s
    };
    let s = eventually("fraud's status", LONG, || async {
        status(&api, NS, "fraud").filter(|s| without_conditions(s.clone()) == want(2, 1))
    })
    .await;
    for (type_, reason) in [("Accepted", "Valid"), ("Ready", "ReplicasReady")] {
        let c = condition(&s, type_).unwrap();
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some(reason)),
            "{s}"
        );
        assert_eq!(c["observedGeneration"], 1);
    }
    // Written by the router's field manager, on the status subresource.
    let writes = api.requests();
    let write = writes
        .iter()
        .rev()
        .find(|r| r.path.ends_with("/scoringendpoints/fraud/status"))
        .unwrap();
    assert_eq!(write.param("fieldManager"), Some("scorefront"));

    // A pod goes unready: the status follows.
    api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready), (1, Pod::Unready)]));
    eventually("fraud's status counts one blue pod", LONG, || async {
        status(&api, NS, "fraud").filter(|s| without_conditions(s.clone()) == want(1, 1))
    })
    .await;
    let ready = condition(&status(&api, NS, "fraud").unwrap(), "Ready")
        .unwrap()
        .clone();
    let before = condition(&s, "Ready").unwrap();
    assert_eq!(
        ready["lastTransitionTime"], before["lastTransitionTime"],
        "Ready stayed True"
    );

    // Another object appears and then changes; the writer writes its status twice, and
    // in none of those passes writes fraud's, which did not change.
    let fraud_writes = status_writes(&api, NS, "fraud");
    api.apply(scoring_endpoint(
        NS,
        "other",
        open(&[version("blue", "blue", 100, true)]),
    ));
    eventually("other's status", LONG, || async {
        status(&api, NS, "other").filter(|s| s["observedGeneration"] == 1)
    })
    .await;
    api.apply(scoring_endpoint(
        NS,
        "other",
        open(&[version("green", "green", 100, true)]),
    ));
    eventually("other's status, again", LONG, || async {
        status(&api, NS, "other")
            .filter(|s| s["observedGeneration"] == 2 && s["traffic"] == "green=100")
    })
    .await;
    assert_eq!(status_writes(&api, NS, "other"), 2);
    assert_eq!(status_writes(&api, NS, "fraud"), fraud_writes);
    router.shutdown().await;
}

#[tokio::test]
async fn an_object_deleted_and_made_again_gets_a_status() {
    let api = KubeApi::start().await;
    let blue = Pods::start("blue", 13, 1).await;
    api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready)]));
    let spec = open(&[version("blue", "blue", 100, true)]);
    api.apply(scoring_endpoint(NS, "fraud", spec.clone()));
    let router = start_router(&api, &[NS]).await;
    eventually("fraud's status", LONG, || async {
        status(&api, NS, "fraud")
    })
    .await;

    // Deleted and made again at once (as `kubectl replace --force` does): the new object
    // starts without a status, and gets one.
    api.delete("scoringendpoints", NS, "fraud");
    let made = api.apply(scoring_endpoint(NS, "fraud", spec));
    assert!(made.get("status").is_none());
    eventually("the new fraud's status", LONG, || async {
        status(&api, NS, "fraud")
    })
    .await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 7. Readiness and check-config

#[tokio::test]
async fn readyz_waits_for_the_first_full_list() {
    let api = KubeApi::start().await;
    let blue = Pods::start("blue", 14, 1).await;
    api.apply(blue.slice(NS, "blue-1", "blue", &[(0, Pod::Ready)]));
    api.apply(scoring_endpoint(
        NS,
        "fraud",
        open(&[version("blue", "blue", 100, true)]),
    ));
    api.stop().await;

    let router = start_router(&api, &[NS]).await;
    metric_positive(
        &router,
        "scorefront_kubernetes_watch_errors_total",
        &[("reason", "unreachable")],
    )
    .await;
    assert_eq!(readyz(&router).await, 503);
    assert_eq!(
        score(&router, "fraud", None, None).await.from,
        "EndpointNotFound"
    );

    api.restart().await;
    wait_ready(&router).await;
    assert_eq!(score(&router, "fraud", None, None).await.from, "blue-0");
    router.shutdown().await;
}

#[tokio::test]
async fn check_config_explains_a_missing_or_broken_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scorefront.yaml");
    std::fs::write(
        &config,
        "endpoints:\n  kubernetes: {namespaces: [models], kubeconfig: kubeconfig}\n",
    )
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");

    // Missing.
    let (code, _, stderr) = support::check_config(&config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("endpoints.kubernetes.kubeconfig"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&kubeconfig.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("No such file"), "{stderr}");

    // Not YAML.
    std::fs::write(&kubeconfig, "clusters: [unterminated\n").unwrap();
    let (code, _, stderr) = support::check_config(&config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&kubeconfig.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("yaml"), "{stderr}");

    // YAML, but naming a context it does not have.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n",
    )
    .unwrap();
    let (code, _, stderr) = support::check_config(&config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("current context is not usable"), "{stderr}");
    assert!(stderr.contains("nowhere"), "{stderr}");

    // Good: it names the server it would talk to (and talks to nothing).
    let api = KubeApi::start().await;
    std::fs::write(&kubeconfig, self::kubeconfig(&api)).unwrap();
    let (code, stdout, stderr) = support::check_config(&config).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("namespaces models") && stdout.contains(&api.url()),
        "{stdout}"
    );
    assert!(api.requests().is_empty());
}
