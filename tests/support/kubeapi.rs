//! A Kubernetes API server for tests, on a real loopback socket. The real `kube` client
//! lists, watches, gets, creates, replaces, patches (JSON merge and server-side apply) and
//! deletes namespaced objects through it, including the `status` and `scale` subresources.
//!
//! It owns an in-memory store of JSON objects with the metadata the real server maintains
//! (one global `resourceVersion` counter, `uid`, `creationTimestamp`, `generation`), a watch
//! history that a test can compact to force every watcher to relist, a bearer-token and a
//! deny-list knob answering 401 and 403 like the real server, a log of every request it
//! saw, and a listener that a test can stop (cutting every open connection and watch) and
//! restart on the same port with the same store.
//!
//! Not served: cluster-scoped resources, discovery (`/api`, `/apis`, `/version`), protobuf,
//! JSON patch, `fieldSelector` beyond plain field equality, finalizers and graceful
//! deletion, `stringData`, and schema validation. Server-side apply merges the applied
//! object in (RFC 7386, lists replaced whole) and never removes fields a manager stopped
//! applying; only apply patches record field ownership.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use http::{HeaderMap, Method, Response, header};
use http_body_util::BodyExt;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use super::{ChannelBody, TestBody, body};

/// The user named in 403 answers.
pub const USER: &str = "system:serviceaccount:scorefront:scorefront";

/// The bearer token [`KubeApi::client`] and [`KubeApi::kubeconfig`] present unless
/// [`KubeApi::require_token`] names another.
pub const TOKEN: &str = "kubeapi-test-token";

/// One resource the server serves. All are namespaced.
#[derive(Debug)]
pub struct Resource {
    pub plural: &'static str,
    /// `""` for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Of `status` and `scale`. With `status`, writes to the main resource keep the stored
    /// `.status` and writes to `/status` change nothing else.
    pub subresources: &'static [&'static str],
}

/// What the server serves; add a line to serve another namespaced resource.
pub const RESOURCES: &[Resource] = &[
    resource("secrets", "", "v1", "Secret", &[]),
    resource("pods", "", "v1", "Pod", &["status"]),
    resource("events", "", "v1", "Event", &[]),
    resource(
        "endpointslices",
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        &[],
    ),
    // kube's event recorder writes these rather than core events.
    resource("events", "events.k8s.io", "v1", "Event", &[]),
    resource(
        "deployments",
        "apps",
        "v1",
        "Deployment",
        &["status", "scale"],
    ),
    resource(
        "horizontalpodautoscalers",
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        &["status"],
    ),
    resource(
        "scoringendpoints",
        "scorefront.io",
        "v1",
        "ScoringEndpoint",
        &["status"],
    ),
];

const fn resource(
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    subresources: &'static [&'static str],
) -> Resource {
    Resource {
        plural,
        group,
        version,
        kind,
        subresources,
    }
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name the real server uses in messages: `secrets`, `deployments.apps`.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn has(&self, subresource: &str) -> bool {
        self.subresources.contains(&subresource)
    }
}

/// The index in [`RESOURCES`] of `name`: a plural (the first resource with it) or a
/// qualified plural such as `events.events.k8s.io`.
fn resource_named(name: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.plural == name || r.qualified() == name)
        .unwrap_or_else(|| panic!("no resource {name:?} in RESOURCES"))
}

fn resource_of_type(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

/// One request as the server received it, query values decoded.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of the query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics when it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("request body is not JSON ({e}): {:?}", self.body))
    }
}

/// The test API server. Dropping it stops it.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        if let Some(server) = self.server.get_mut().unwrap().take() {
            server.task.abort();
        }
    }
}

impl KubeApi {
    /// Starts an empty server on 127.0.0.1, port 0.
    pub async fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (changed, _) = watch::channel(0);
        let api = KubeApi {
            shared: Arc::new(Shared {
                store: Mutex::default(),
                changed,
                knobs: Mutex::new(Knobs {
                    token: None,
                    denied: Vec::new(),
                    bookmark_interval: Duration::from_secs(1),
                }),
                requests: Mutex::default(),
            }),
            addr: listener.local_addr().unwrap(),
            server: Mutex::default(),
        };
        api.serve(listener);
        api
    }

    fn serve(&self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(listener, self.shared.clone(), stopped));
        *self.server.lock().unwrap() = Some(Server { stop, task });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token clients built from here present.
    pub fn token(&self) -> String {
        let knobs = self.shared.knobs.lock().unwrap();
        knobs.token.clone().unwrap_or_else(|| TOKEN.to_string())
    }

    /// Answers 401 to requests without `Authorization: Bearer {token}`; `None` accepts any
    /// request (the default).
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.knobs.lock().unwrap().token = token.map(str::to_owned);
    }

    /// Writes `dir/kubeconfig`: one cluster at [`KubeApi::url`], one user with
    /// [`KubeApi::token`], namespace `default`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster: {{server: '{}'}}\n\
             users:\n- name: test\n  user: {{token: '{}'}}\n\
             contexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\n\
             current-context: test\n",
            self.url(),
            self.token()
        );
        std::fs::write(&path, config).unwrap();
        path
    }

    /// A kube client for this server, with [`KubeApi::token`].
    pub fn client(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = kube::Config::new(self.url().parse().unwrap());
        config.auth_info = serde_json::from_value(json!({"token": self.token()})).unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces `obj` in the store as it is, status included, the way a
    /// controller elsewhere would have written it: the server fills in its metadata, bumps
    /// the resourceVersion and sends the watch event. `obj` needs `apiVersion`, `kind`,
    /// `metadata.name` and `metadata.namespace`. Returns the stored object.
    pub fn apply(&self, obj: Value) -> Value {
        let (api_version, kind) = (str_at(&obj, "/apiVersion"), str_at(&obj, "/kind"));
        let res = resource_of_type(api_version, kind)
            .unwrap_or_else(|| panic!("no resource for {api_version} {kind}"));
        assert!(
            !str_at(&obj, "/metadata/name").is_empty()
                && !str_at(&obj, "/metadata/namespace").is_empty(),
            "apply needs metadata.name and metadata.namespace: {obj}"
        );
        self.shared.update(|st| st.write(res, obj))
    }

    /// Deletes an object of `resource` (see [`RESOURCES`]; a plural or `plural.group`);
    /// watches see DELETED with its last state. Returns it, if it was there.
    pub fn delete(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let key = (resource_named(resource), ns.to_string(), name.to_string());
        self.shared.update(|st| st.remove(&key))
    }

    /// The stored object, with `apiVersion` and `kind`.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let key = (resource_named(resource), ns.to_string(), name.to_string());
        self.shared.store.lock().unwrap().objects.get(&key).cloned()
    }

    /// Forgets the watch history, as when the real server's watch cache or etcd has moved
    /// on: every watch from a resourceVersion issued before this call, whether it resumes
    /// later or is open now, gets an in-stream 410 Expired and must relist. Continue
    /// tokens from before it get 410 too.
    pub fn compact(&self) {
        self.shared.update(|st| {
            st.rv += 1;
            st.compacted = st.rv;
            st.history.clear();
        });
    }

    /// Answers 403 to `verb` (get, list, watch, create, update, patch, delete,
    /// deletecollection) on `resource` (a plural, or `plural/status`, `plural/scale`: as in
    /// RBAC, a subresource is a resource of its own) in namespace `ns`, or in all
    /// namespaces with `None`. A denial in one namespace also denies the all-namespaces
    /// collection.
    pub fn deny(&self, verb: &str, resource: &str, ns: Option<&str>) {
        self.shared.knobs.lock().unwrap().denied.push(Denial {
            verb: verb.to_string(),
            resource: resource.to_string(),
            namespace: ns.map(str::to_owned),
        });
    }

    /// Lifts every [`KubeApi::deny`].
    pub fn allow_all(&self) {
        self.shared.knobs.lock().unwrap().denied.clear();
    }

    /// How often open watches that asked for bookmarks get one (1 s by default).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.knobs.lock().unwrap().bookmark_interval = every;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Closes the listener and every open connection, watches included, and returns once
    /// they are closed: clients then get "connection refused". The store is kept.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// Listens again on the same port with the same store (stopping first if running).
    pub async fn restart(&self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("listening again on {}: {e}", self.addr));
        self.serve(listener);
    }
}

// ---------------------------------------------------------------------------------------
// Builders for the objects tests need

/// An EndpointSlice of `service` as the endpointslice controller writes it: one port
/// (`name` is `""` for an unnamed service port, as on a real cluster) and one endpoint per
/// `(address, ready, serving, terminating)`.
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    port_name: Option<&str>,
    port: u16,
    endpoints: &[(&str, bool, bool, bool)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(address, ready, serving, terminating)| {
            json!({
                "addresses": [address],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port_name.unwrap_or(""), "port": port, "protocol": "TCP"}],
    })
}

/// An Opaque Secret; `data` values are stored base64-encoded, as the real server does.
pub fn secret(ns: &str, name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> Value {
    let data: Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), BASE64.encode(v).into()))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": string_map(labels)},
        "type": "Opaque",
        "data": data,
    })
}

/// A Deployment of one container selecting pods labelled `app: {name}`, without status.
pub fn deployment(ns: &str, name: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "model", "image": "model:test"}]},
            },
        },
    })
}

/// A ScoringEndpoint with `spec`.
pub fn scoring_endpoint(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "scorefront.io/v1",
        "kind": "ScoringEndpoint",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect::<Map<_, _>>()
        .into()
}

// ---------------------------------------------------------------------------------------
// State

struct Shared {
    store: Mutex<Store>,
    /// The newest resourceVersion; open watches wake when it moves.
    changed: watch::Sender<u64>,
    knobs: Mutex<Knobs>,
    requests: Mutex<Vec<RecordedRequest>>,
}

struct Knobs {
    token: Option<String>,
    denied: Vec<Denial>,
    bookmark_interval: Duration,
}

struct Denial {
    verb: String,
    resource: String,
    namespace: Option<String>,
}

impl Shared {
    /// Runs `f` on the store and wakes the open watches if it moved the resourceVersion.
    fn update<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, moved) = {
            let mut st = self.store.lock().unwrap();
            let before = st.rv;
            let out = f(&mut st);
            (out, (st.rv != before).then_some(st.rv))
        };
        if let Some(rv) = moved {
            self.changed.send_replace(rv);
        }
        out
    }
}

/// Resource index in [`RESOURCES`], namespace, name: the map order is the list order.
type Key = (usize, String, String);

/// A field path inside an object, for server-side apply ownership.
type FieldPath = Vec<String>;

#[derive(Default)]
struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Watches and continue tokens from a resourceVersion below this are expired.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change after `compacted`, in resourceVersion order.
    history: Vec<Change>,
    /// Per object, the fields each (field manager, subresource) applied.
    owners: HashMap<Key, BTreeMap<(String, String), BTreeSet<FieldPath>>>,
}

struct Change {
    rv: u64,
    res: usize,
    kind: ChangeKind,
    /// The new state (for a deletion, the last state at the deletion's resourceVersion).
    object: Value,
}

enum ChangeKind {
    Added,
    /// Keeps the state before, so a label-selected watch can tell an object entering or
    /// leaving its selection.
    Modified(Value),
    Deleted,
}

impl Store {
    /// Stores `obj` as the new state of its object (`metadata.name` and `namespace` set),
    /// fills in the metadata the server owns and records the change. A write that changes
    /// nothing keeps the resourceVersion and sends no event, as on the real server;
    /// controllers rely on that not to wake themselves up.
    fn write(&mut self, res: usize, mut obj: Value) -> Value {
        let r = &RESOURCES[res];
        obj["apiVersion"] = r.api_version().into();
        obj["kind"] = r.kind.into();
        let key = key_of(res, &obj);
        let previous = self.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        match &previous {
            Some(old) => {
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    meta[field] = old["metadata"][field].clone();
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bump = i64::from(desired_state(old) != desired_state(&obj));
                obj["metadata"]["generation"] = (generation + bump).into();
                if obj == *old {
                    return obj;
                }
            }
            None => {
                meta["uid"] = uuid::Uuid::new_v4().to_string().into();
                meta["creationTimestamp"] = now();
                meta["generation"] = 1.into();
            }
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.objects.insert(key, obj.clone());
        self.history.push(Change {
            rv: self.rv,
            res,
            kind: previous.map_or(ChangeKind::Added, ChangeKind::Modified),
            object: obj.clone(),
        });
        obj
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.owners.remove(key);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.history.push(Change {
            rv: self.rv,
            res: key.0,
            kind: ChangeKind::Deleted,
            object: obj.clone(),
        });
        Some(obj)
    }

    /// Server-side apply bookkeeping for `manager` applying `patch` on `sub` (`""` or
    /// `"status"`) of the object at `key`, whose state is `live`. A field of the patch
    /// conflicts when another manager applied it (or a field inside or around it) and the
    /// patch changes its value; without `force` that is a 409, with it the others lose
    /// the field. On success the manager owns exactly the patch's fields on `sub`.
    fn take_fields(
        &mut self,
        key: &Key,
        (manager, sub): (&str, &str),
        patch: &Value,
        live: Option<&Value>,
        force: bool,
    ) -> Result<(), Failure> {
        let mut fields = Vec::new();
        leaves(&owned_part(patch), &mut Vec::new(), &mut fields);
        let owners = self.owners.entry(key.clone()).or_default();
        let mut conflicts = Vec::new();
        for field in &fields {
            if live.and_then(|l| at(l, field)) == at(patch, field) {
                continue;
            }
            for ((other, other_sub), theirs) in owners.iter() {
                let mine = other == manager && other_sub == sub;
                if !mine && theirs.iter().any(|f| related(f, field)) {
                    conflicts.push((other.clone(), field.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(apply_conflict(&RESOURCES[key.0], &key.2, &conflicts));
        }
        for (other, field) in &conflicts {
            for ((m, _), theirs) in owners.iter_mut() {
                if m == other {
                    theirs.retain(|f| !related(f, field));
                }
            }
        }
        owners.insert(
            (manager.to_string(), sub.to_string()),
            fields.into_iter().collect(),
        );
        Ok(())
    }
}

fn key_of(res: usize, obj: &Value) -> Key {
    let (ns, name) = (
        str_at(obj, "/metadata/namespace"),
        str_at(obj, "/metadata/name"),
    );
    (res, ns.to_string(), name.to_string())
}

/// What `generation` counts changes of: everything but metadata and status (for most
/// kinds, that is `spec`).
fn desired_state(obj: &Value) -> Value {
    let mut rest = obj.clone();
    if let Some(m) = rest.as_object_mut() {
        for field in ["apiVersion", "kind", "metadata", "status"] {
            m.remove(field);
        }
    }
    rest
}

/// The part of an applied object whose fields a manager owns: not the type, and of the
/// metadata only labels and annotations.
fn owned_part(patch: &Value) -> Value {
    let mut owned = patch.clone();
    if let Some(m) = owned.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| k == "labels" || k == "annotations");
        }
    }
    owned
}

/// The leaf fields of `v`: maps are walked, anything else (lists too) is one field.
fn leaves(v: &Value, path: &mut FieldPath, out: &mut Vec<FieldPath>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(k.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        _ if path.is_empty() => {}
        _ => out.push(path.clone()),
    }
}

fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Now, formatted as Kubernetes formats times.
fn now() -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap()
}

// ---------------------------------------------------------------------------------------
// Errors: every one is a Status object

struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

type Answer = Result<Response<TestBody>, Failure>;

fn fail(code: u16, reason: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        reason,
        message: message.into(),
        details: None,
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    fail(400, "BadRequest", message)
}

fn not_found(r: &Resource, name: &str) -> Failure {
    Failure {
        details: Some(json!({"name": name, "group": r.group, "kind": r.plural})),
        ..fail(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
    }
}

fn modified(r: &Resource, name: &str) -> Failure {
    fail(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            r.qualified()
        ),
    )
}

fn apply_conflict(r: &Resource, name: &str, conflicts: &[(String, FieldPath)]) -> Failure {
    let (mut causes, mut listed) = (Vec::new(), Vec::new());
    for (manager, field) in conflicts {
        let message = format!("conflict with \"{manager}\" using {}", r.api_version());
        let field = format!(".{}", field.join("."));
        listed.push(format!("{message}: {field}"));
        causes.push(json!({"reason": "FieldManagerConflict", "message": message, "field": field}));
    }
    let plural = if conflicts.len() == 1 { "" } else { "s" };
    Failure {
        details: Some(json!({"name": name, "group": r.group, "kind": r.plural, "causes": causes})),
        ..fail(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict{plural}: {}",
                conflicts.len(),
                listed.join("; ")
            ),
        )
    }
}

impl Failure {
    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn response(&self) -> Response<TestBody> {
        json_response(self.code, &self.status())
    }
}

fn json_response(code: u16, v: &Value) -> Response<TestBody> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body(v.to_string()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Serving

async fn accept(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Ok((stream, _)) = listener.accept() => {
                connections.spawn(serve_connection(stream, shared.clone()));
            }
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    // Dropping a connection closes its socket and ends its watch streams.
    connections.shutdown().await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // As the real API server (Go sets TCP_NODELAY on every connection): a watch event is
    // sent at once, not held back until the client acknowledges the previous one.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(shared.clone(), req));
    // kube's client speaks HTTP/1.1 to the API server.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let (parts, incoming) = req.into_parts();
    let req = RecordedRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(parse_query).unwrap_or_default(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: incoming
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
    };
    shared.requests.lock().unwrap().push(req.clone());
    Ok(route(&shared, &parts.headers, &req).unwrap_or_else(|f| f.response()))
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `application/x-www-form-urlencoded` text, the way kube encodes query values.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(if b == b'+' { b' ' } else { b });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request path names.
struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] if namespace.is_some() => (*plural, Some(*name), None),
            [plural, name, sub] if namespace.is_some() => (*plural, Some(*name), Some(*sub)),
            _ => return None,
        };
        let res = RESOURCES
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)?;
        if subresource.is_some_and(|s| !RESOURCES[res].has(s)) {
            return None;
        }
        Some(Target {
            res,
            namespace,
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }

    fn resource(&self) -> &'static Resource {
        &RESOURCES[self.res]
    }

    /// The resource as RBAC names it: `deployments`, `deployments/scale`.
    fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource().plural),
            None => self.resource().plural.to_string(),
        }
    }

    fn key(&self) -> Key {
        let ns = self.namespace.clone().unwrap_or_default();
        (self.res, ns, self.name.clone().unwrap_or_default())
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

fn route(shared: &Arc<Shared>, headers: &HeaderMap, req: &RecordedRequest) -> Answer {
    let knobs = shared.knobs.lock().unwrap();
    if let Some(token) = &knobs.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if presented != Some(&format!("Bearer {token}")) {
            return Err(fail(401, "Unauthorized", "Unauthorized"));
        }
    }
    let target = Target::parse(&req.path).ok_or_else(|| {
        fail(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    })?;
    let collection = target.name.is_none();
    let namespaced = target.namespace.is_some();
    let verb = match req.method {
        Method::GET if collection && matches!(req.param("watch"), Some("true" | "1")) => "watch",
        Method::GET if collection => "list",
        Method::GET => "get",
        Method::POST if collection && namespaced => "create",
        Method::PUT if !collection => "update",
        Method::PATCH if !collection => "patch",
        Method::DELETE if collection && namespaced => "deletecollection",
        Method::DELETE if !collection && target.subresource.is_none() => "delete",
        _ => {
            return Err(fail(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    authorize(&knobs, &target, verb)?;
    drop(knobs);
    if verb == "watch" {
        return start_watch(shared, &target, req);
    }
    shared.update(|st| match (verb, target.subresource.as_deref()) {
        ("list", _) => list(st, &target, req),
        ("get", Some("scale")) => {
            let deployment = existing(st, &target)?;
            Ok(json_response(200, &scale_of(&deployment)))
        }
        ("get", _) => Ok(json_response(200, &existing(st, &target)?)),
        ("create", _) => create(st, &target, req),
        ("update" | "patch", Some("scale")) => write_scale(st, &target, req),
        ("update", sub) => replace(st, &target, req, sub == Some("status")),
        ("patch", sub) => patch(st, &target, req, sub == Some("status")),
        ("delete", _) => {
            let deleted = st.remove(&target.key());
            let deleted = deleted.ok_or_else(|| not_found(target.resource(), target.name()))?;
            Ok(json_response(200, &deleted))
        }
        _ => delete_collection(st, &target, req),
    })
}

fn authorize(knobs: &Knobs, target: &Target, verb: &str) -> Result<(), Failure> {
    let resource = target.rbac_resource();
    let denied = knobs.denied.iter().any(|d| {
        d.verb == verb
            && d.resource == resource
            && (d.namespace.is_none()
                || target.namespace.is_none()
                || d.namespace == target.namespace)
    });
    if !denied {
        return Ok(());
    }
    let r = target.resource();
    let subject = match &target.name {
        Some(name) => format!("{} \"{name}\"", r.qualified()),
        None => r.qualified(),
    };
    let scope = match &target.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    Err(Failure {
        details: Some(json!({"name": target.name(), "group": r.group, "kind": r.plural})),
        ..fail(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" \
                 in API group \"{}\" {scope}",
                r.group
            ),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Reads

/// Which objects a list or watch sees: its resource and namespace, `labelSelector` and
/// `fieldSelector`.
struct Filter {
    res: usize,
    namespace: Option<String>,
    labels: Vec<(String, LabelTest)>,
    fields: Vec<FieldTest>,
}

/// `path=value` (`equal`) or `path!=value` of a field selector; `pointer` is the path as
/// a JSON pointer.
struct FieldTest {
    pointer: String,
    equal: bool,
    value: String,
}

enum LabelTest {
    Exists,
    Absent,
    In(Vec<String>),
    NotIn(Vec<String>),
}

impl Filter {
    fn new(target: &Target, req: &RecordedRequest) -> Result<Filter, Failure> {
        let labels = split_terms(req.param("labelSelector").unwrap_or(""))
            .into_iter()
            .map(label_term)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_request("unable to parse requirement: invalid label selector"))?;
        let fields = split_terms(req.param("fieldSelector").unwrap_or(""))
            .into_iter()
            .map(|term| {
                let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                    (p, false, v)
                } else if let Some((p, v)) = term.split_once("==").or(term.split_once('=')) {
                    (p, true, v)
                } else {
                    return None;
                };
                Some(FieldTest {
                    pointer: format!("/{}", path.trim().replace('.', "/")),
                    equal,
                    value: trimmed(value),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_request("invalid field selector"))?;
        Ok(Filter {
            res: target.res,
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let ns = str_at(obj, "/metadata/namespace");
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        let label = |k: &str| obj["metadata"]["labels"].get(k).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|(k, test)| match test {
            LabelTest::Exists => label(k).is_some(),
            LabelTest::Absent => label(k).is_none(),
            LabelTest::In(values) => label(k).is_some_and(|v| values.iter().any(|w| w == v)),
            LabelTest::NotIn(values) => label(k).is_none_or(|v| values.iter().all(|w| w != v)),
        });
        labels_match
            && self.fields.iter().all(|test| {
                let have = match obj.pointer(&test.pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (have == test.value) == test.equal
            })
    }

    /// How the watch shows `change`, if at all. An object that starts matching shows as
    /// ADDED, one that stops matching as DELETED with its last matching state.
    fn event(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.res != self.res {
            return None;
        }
        let now = self.matches(&change.object);
        match &change.kind {
            ChangeKind::Added => now.then(|| ("ADDED", change.object.clone())),
            ChangeKind::Deleted => now.then(|| ("DELETED", change.object.clone())),
            ChangeKind::Modified(before) => match (self.matches(before), now) {
                (true, true) => Some(("MODIFIED", change.object.clone())),
                (false, true) => Some(("ADDED", change.object.clone())),
                (true, false) => {
                    let mut gone = before.clone();
                    gone["metadata"]["resourceVersion"] = change.rv.to_string().into();
                    Some(("DELETED", gone))
                }
                (false, false) => None,
            },
        }
    }
}

fn trimmed(value: &str) -> String {
    value.trim().to_string()
}

/// Splits a selector at the commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// One label requirement: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (v,w)`, `k notin (v)`.
fn label_term(term: &str) -> Option<(String, LabelTest)> {
    let values = |list: &str| -> Option<Vec<String>> {
        let inner = list.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(
            inner
                .split(',')
                .map(trimmed)
                .filter(|v| !v.is_empty())
                .collect(),
        )
    };
    let (key, test) = if let Some(key) = term.strip_prefix('!') {
        (key, LabelTest::Absent)
    } else if let Some((key, value)) = term.split_once("!=") {
        (key, LabelTest::NotIn(vec![trimmed(value)]))
    } else if let Some((key, value)) = term.split_once("==").or(term.split_once('=')) {
        (key, LabelTest::In(vec![trimmed(value)]))
    } else if let Some((key, rest)) = term.split_once(char::is_whitespace) {
        let rest = rest.trim_start();
        if let Some(list) = rest.strip_prefix("notin") {
            (key, LabelTest::NotIn(values(list)?))
        } else {
            (key, LabelTest::In(values(rest.strip_prefix("in")?)?))
        }
    } else {
        (term, LabelTest::Exists)
    };
    let key = key.trim();
    (!key.is_empty() && !key.contains(char::is_whitespace)).then(|| (key.to_string(), test))
}

fn existing(st: &Store, target: &Target) -> Result<Value, Failure> {
    st.objects
        .get(&target.key())
        .cloned()
        .ok_or_else(|| not_found(target.resource(), target.name()))
}

/// Continue tokens: the resourceVersion of the list's first page and the last key served.
fn continue_token(rv: u64, ns: &str, name: &str) -> String {
    BASE64.encode(json!({"rv": rv, "after": [ns, name]}).to_string())
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let v: Value = serde_json::from_slice(&BASE64.decode(token).ok()?).ok()?;
    let rv = v["rv"].as_u64()?;
    Some((
        rv,
        str_at(&v, "/after/0").into(),
        str_at(&v, "/after/1").into(),
    ))
}

fn list(st: &mut Store, target: &Target, req: &RecordedRequest) -> Answer {
    let filter = Filter::new(target, req)?;
    let limit = match req.param("limit") {
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| bad_request("invalid limit"))?,
        None => 0,
    };
    // Later pages keep the first page's resourceVersion, so that a watch from it replays
    // whatever changed while the pages were read.
    let (rv, after) = match req.param("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, ns, name) =
                parse_continue(token).ok_or_else(|| bad_request("continue key is not valid"))?;
            if rv < st.compacted {
                return Err(fail(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns, name)))
        }
        None => (st.rv, None),
    };
    let mut matching = st.objects.iter().filter(|((res, ns, name), obj)| {
        *res == target.res
            && after
                .as_ref()
                .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
            && filter.matches(obj)
    });
    let page: Vec<(&Key, &Value)> = matching
        .by_ref()
        .take(if limit == 0 { usize::MAX } else { limit })
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (true, Some(((_, ns, name), _))) = (matching.next().is_some(), page.last()) {
        metadata["continue"] = continue_token(rv, ns, name).into();
    }
    // The real server sends list items without apiVersion and kind.
    let items: Vec<Value> = page
        .into_iter()
        .map(|(_, obj)| {
            let mut item = obj.clone();
            let m = item.as_object_mut().unwrap();
            m.remove("apiVersion");
            m.remove("kind");
            item
        })
        .collect();
    Ok(list_response(target, metadata, items))
}

// ---------------------------------------------------------------------------------------
// Watches

struct Watch {
    filter: Filter,
    /// `None`: from now, after ADDED events for the current objects.
    from: Option<u64>,
    bookmarks: bool,
    /// Ends the initial ADDED events with the `k8s.io/initial-events-end` bookmark.
    initial_events_end: bool,
    timeout: Option<Duration>,
}

fn start_watch(shared: &Arc<Shared>, target: &Target, req: &RecordedRequest) -> Answer {
    let from = match req.param("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let timeout = match req.param("timeoutSeconds") {
        Some(s) => Some(Duration::from_secs(
            s.parse()
                .map_err(|_| bad_request("invalid timeoutSeconds"))?,
        )),
        None => None,
    };
    let watch = Watch {
        filter: Filter::new(target, req)?,
        from,
        bookmarks: req.param("allowWatchBookmarks") == Some("true"),
        initial_events_end: req.param("sendInitialEvents") == Some("true"),
        timeout,
    };
    let (lines, events) = mpsc::channel(64);
    tokio::spawn(stream_events(shared.clone(), watch, lines));
    // No Content-Length: hyper sends the body chunked, one event per line.
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(TestBody::new(ChannelBody(events)))
        .unwrap())
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn bookmark(res: usize, rv: u64, initial_events_end: bool) -> Bytes {
    let r = &RESOURCES[res];
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": metadata}),
    )
}

/// Feeds one watch: its events after its cursor, bookmarks, and the end (timeout, expiry,
/// or the client going away).
async fn stream_events(shared: Arc<Shared>, w: Watch, lines: mpsc::Sender<Bytes>) {
    let deadline = w.timeout.map(|t| Instant::now() + t);
    let mut changes = shared.changed.subscribe();
    let mut batch = Vec::new();
    let mut cursor = match w.from {
        Some(rv) => rv,
        None => {
            let st = shared.store.lock().unwrap();
            for ((res, _, _), obj) in &st.objects {
                if *res == w.filter.res && w.filter.matches(obj) {
                    batch.push(event_line("ADDED", obj));
                }
            }
            if w.initial_events_end {
                batch.push(bookmark(w.filter.res, st.rv, true));
            }
            st.rv
        }
    };
    let mut next_bookmark = Instant::now();
    let mut bookmark_due = false;
    loop {
        let expired = {
            let st = shared.store.lock().unwrap();
            changes.borrow_and_update();
            if cursor < st.compacted {
                let message = format!("too old resource version: {cursor} ({})", st.compacted);
                batch.push(event_line("ERROR", &fail(410, "Expired", message).status()));
                true
            } else {
                let first = st.history.partition_point(|c| c.rv <= cursor);
                for change in &st.history[first..] {
                    if let Some((kind, obj)) = w.filter.event(change) {
                        batch.push(event_line(kind, &obj));
                    }
                }
                cursor = cursor.max(st.rv);
                false
            }
        };
        if bookmark_due {
            batch.push(bookmark(w.filter.res, cursor, false));
            bookmark_due = false;
        }
        for line in batch.drain(..) {
            if lines.send(line).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        if w.bookmarks && next_bookmark <= Instant::now() {
            next_bookmark = Instant::now() + shared.knobs.lock().unwrap().bookmark_interval;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(next_bookmark), if w.bookmarks => bookmark_due = true,
            _ = sleep_until(deadline) => return,
            _ = lines.closed() => return,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------
// Writes

/// The request body as an object: JSON, or YAML for apply patches.
fn body_object(req: &RecordedRequest) -> Result<Value, Failure> {
    let parsed: Result<Value, String> = if is_apply(req) {
        serde_yaml_ng::from_slice(&req.body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&req.body).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(v) if v.is_object() && v.get("metadata").is_none_or(Value::is_object) => Ok(v),
        Ok(_) => Err(bad_request("the request body is not an object")),
        Err(e) => Err(bad_request(format!("error decoding the request body: {e}"))),
    }
}

fn is_apply(req: &RecordedRequest) -> bool {
    let content_type = req.content_type.as_deref().unwrap_or("");
    content_type.split(';').next().unwrap_or("").trim() == "application/apply-patch+yaml"
}

/// For a PATCH: the field manager of a server-side apply, `None` for a merge patch (a
/// strategic merge patch is taken as one). JSON patches are not supported.
fn apply_manager(req: &RecordedRequest) -> Result<Option<&str>, Failure> {
    let content_type = req.content_type.as_deref().unwrap_or("");
    match content_type.split(';').next().unwrap_or("").trim() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => Ok(None),
        "application/apply-patch+yaml" => match req.param("fieldManager") {
            Some(manager) if !manager.is_empty() => Ok(Some(manager)),
            _ => Err(bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: \
                 is required for apply patch",
            )),
        },
        _ => Err(fail(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: \
             application/merge-patch+json, application/strategic-merge-patch+json, \
             application/apply-patch+yaml",
        )),
    }
}

/// Checks a body's type against the resource (apply patches must name it, as on the real
/// server) and its name and namespace against the path, and fills them in.
fn checked(target: &Target, mut obj: Value, must_name_type: bool) -> Result<Value, Failure> {
    let r = target.resource();
    for (field, want) in [
        ("apiVersion", r.api_version()),
        ("kind", r.kind.to_string()),
    ] {
        match obj.get(field).and_then(Value::as_str) {
            Some(have) if have != want => {
                return Err(bad_request(format!(
                    "{field} {have:?} does not match {want:?}"
                )));
            }
            None if must_name_type => {
                return Err(bad_request(format!(
                    "{field} must be set in an apply patch"
                )));
            }
            _ => {}
        }
    }
    let ns = target.namespace.as_deref().unwrap_or("");
    let have = str_at(&obj, "/metadata/namespace");
    if !have.is_empty() && have != ns {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let Some(name) = &target.name {
        let have = str_at(&obj, "/metadata/name");
        if !have.is_empty() && have != name {
            return Err(bad_request(format!(
                "the name of the object ({have}) does not match the name on the URL ({name})"
            )));
        }
        obj["metadata"]["name"] = name.as_str().into();
    }
    obj["metadata"]["namespace"] = ns.into();
    Ok(obj)
}

/// Answers 409 when `body` names a resourceVersion other than the stored one.
fn check_precondition(r: &Resource, stored: &Value, body: &Value) -> Result<(), Failure> {
    let wanted = str_at(body, "/metadata/resourceVersion");
    if wanted.is_empty() || wanted == str_at(stored, "/metadata/resourceVersion") {
        Ok(())
    } else {
        Err(modified(r, str_at(stored, "/metadata/name")))
    }
}

/// `obj` with `status` taken from `from` (or none, if `from` has none).
fn with_status_of(mut obj: Value, from: Option<&Value>) -> Value {
    let status = from.and_then(|f| f.get("status")).cloned();
    let m = obj.as_object_mut().unwrap();
    match status {
        Some(status) => m.insert("status".into(), status),
        None => m.remove("status"),
    };
    obj
}

fn create(st: &mut Store, target: &Target, req: &RecordedRequest) -> Answer {
    let r = target.resource();
    let mut obj = checked(target, body_object(req)?, false)?;
    if str_at(&obj, "/metadata/name").is_empty() {
        let prefix = str_at(&obj, "/metadata/generateName");
        if prefix.is_empty() {
            return Err(fail(
                422,
                "Invalid",
                format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    r.kind
                ),
            ));
        }
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..5];
        obj["metadata"]["name"] = format!("{prefix}{suffix}").into();
    }
    let key = key_of(target.res, &obj);
    if st.objects.contains_key(&key) {
        return Err(Failure {
            details: Some(json!({"name": key.2, "group": r.group, "kind": r.plural})),
            ..fail(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", r.qualified(), key.2),
            )
        });
    }
    if r.has("status") {
        obj = with_status_of(obj, None);
    }
    Ok(json_response(201, &st.write(target.res, obj)))
}

fn replace(st: &mut Store, target: &Target, req: &RecordedRequest, status: bool) -> Answer {
    let r = target.resource();
    let stored = existing(st, target)?;
    let obj = checked(target, body_object(req)?, false)?;
    check_precondition(r, &stored, &obj)?;
    let new = if status {
        with_status_of(stored, Some(&obj))
    } else if r.has("status") {
        with_status_of(obj, Some(&stored))
    } else {
        obj
    };
    Ok(json_response(200, &st.write(target.res, new)))
}

fn patch(st: &mut Store, target: &Target, req: &RecordedRequest, status: bool) -> Answer {
    let r = target.resource();
    let manager = apply_manager(req)?;
    let apply = manager.is_some();
    let body = checked(target, body_object(req)?, apply)?;
    // The part of the patch this endpoint may change.
    let effective = if status {
        match body.get("status") {
            Some(status) => json!({"status": status}),
            None => json!({}),
        }
    } else if r.has("status") {
        with_status_of(body.clone(), None)
    } else {
        body.clone()
    };
    let key = target.key();
    let stored = st.objects.get(&key).cloned();
    if let Some(stored) = &stored {
        check_precondition(r, stored, &body)?;
    }
    let (base, code) = match stored {
        Some(stored) => (stored, 200),
        // Applying a missing object creates it; there is nothing to patch otherwise.
        None if apply && !status => (json!({"metadata": {}}), 201),
        None => return Err(not_found(r, target.name())),
    };
    if let Some(manager) = manager {
        let force = req.param("force") == Some("true");
        let sub = if status { "status" } else { "" };
        let live = (code == 200).then_some(&base);
        st.take_fields(&key, (manager, sub), &effective, live, force)?;
    }
    let mut new = base;
    merge(&mut new, &effective);
    Ok(json_response(code, &st.write(target.res, new)))
}

/// A `{Kind}List` of `items` with list `metadata`.
fn list_response(target: &Target, metadata: Value, items: Vec<Value>) -> Response<TestBody> {
    let r = target.resource();
    json_response(
        200,
        &json!({
            "apiVersion": r.api_version(),
            "kind": format!("{}List", r.kind),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn delete_collection(st: &mut Store, target: &Target, req: &RecordedRequest) -> Answer {
    let filter = Filter::new(target, req)?;
    let keys: Vec<Key> = st
        .objects
        .iter()
        .filter(|((res, _, _), obj)| *res == target.res && filter.matches(obj))
        .map(|(key, _)| key.clone())
        .collect();
    let items: Vec<Value> = keys.iter().filter_map(|key| st.remove(key)).collect();
    Ok(list_response(
        target,
        json!({"resourceVersion": st.rv.to_string()}),
        items,
    ))
}

/// The `autoscaling/v1` Scale of a Deployment.
fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    let mut scale = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": deployment.pointer("/spec/replicas").cloned().unwrap_or(1.into())},
        "status": {"replicas": deployment.pointer("/status/replicas").cloned().unwrap_or(0.into())},
    });
    if let Some(labels) = deployment
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
    {
        let selector: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        scale["status"]["selector"] = selector.join(",").into();
    }
    scale
}

/// PUT or PATCH (merge or apply) of a Deployment's scale: only `spec.replicas` counts.
fn write_scale(st: &mut Store, target: &Target, req: &RecordedRequest) -> Answer {
    let deployment = existing(st, target)?;
    let body = body_object(req)?;
    let mut scale = scale_of(&deployment);
    if req.method == Method::PATCH {
        let apply = apply_manager(req)?.is_some();
        if apply
            && (str_at(&body, "/apiVersion") != "autoscaling/v1"
                || str_at(&body, "/kind") != "Scale")
        {
            return Err(bad_request(
                "an apply patch of scale must be an autoscaling/v1 Scale",
            ));
        }
        merge(&mut scale, &body);
    } else {
        scale = body.clone();
    }
    check_precondition(target.resource(), &deployment, &body)?;
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| fail(422, "Invalid", "Scale.spec.replicas: Required value"))?;
    let mut new = deployment;
    new["spec"]["replicas"] = replicas.into();
    let stored = st.write(target.res, new);
    Ok(json_response(200, &scale_of(&stored)))
}
