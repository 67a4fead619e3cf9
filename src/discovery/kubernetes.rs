//! The Kubernetes source: `ScoringEndpoint` objects, the EndpointSlices of the Services
//! they name, and their key Secrets, watched through the API server.
//!
//! One task owns the watches and folds their events into stores, as a reflector does:
//! - a change of a ScoringEndpoint or a key Secret re-validates the endpoint definitions
//!   and, when the set of served endpoints changed, sends it whole to the index;
//! - a change of an EndpointSlice recomputes the pods of that one Service and sends only
//!   those ([`Event::Pods`]): pod churn never rebuilds the routing table.
//!
//! Invariants:
//! - nothing is sent before every watch has listed once, so a half-listed cluster never
//!   becomes a routing table (and `synced` stays false until then, for `/readyz`);
//! - an object that fails validation keeps its last good definition in force (or is not
//!   served if it never had one); a deleted object stops being served;
//! - endpoint names are unique across what one router serves: of two objects with one
//!   name the older wins, the other is refused and says so in its status;
//! - losing the API server changes nothing that is served: watches back off and resume,
//!   and an expired resourceVersion relists without a gap in routing;
//! - what changed while the API server was away is applied in one step: the watches
//!   come back one by one, each after its own backoff, and applied one by one they
//!   would route, say, to a new Service before its pods are known (or to an old one
//!   after its pods left). So when a watch that lost the server hears from it again,
//!   every watch is started afresh and relists at once, and changes are held until all
//!   have listed (at most [`RELIST_HOLD`]), then sent: definitions first, then pods.
//!
//! What each object looks like to the router is published as [`Observed`] snapshots; the
//! status writer ([`write_status`]) turns them and the live routing table into each
//! object's `.status`, written with server-side apply only when it changed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Secret},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, events, watcher},
};
use tokio::sync::{mpsc, watch};

use super::index::{Event, ServiceKey, ServicePods, SlicePods};
use crate::{
    config::KubernetesSource,
    metrics::Metrics,
    proxy::Proxy,
    spec::{self, EndpointSpec, KeysSpec, Origin, ScoringEndpoint, ScoringEndpointStatus},
};

/// The label that marks a Secret as holding endpoint keys; only such Secrets are watched,
/// so the router never caches the other Secrets of a namespace.
pub const KEYS_LABEL: &str = "scorefront.io/keys";
/// The label EndpointSlices carry with the name of their Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// The field manager of the status the router writes.
const FIELD_MANAGER: &str = "scorefront";
/// Statuses are written at most this often (each only when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// After an outage, changes wait at most this long for every watch to relist.
pub const RELIST_HOLD: Duration = Duration::from_secs(5);

/// Publishes Kubernetes Events (`kubectl describe` shows them) without holding up the
/// caller: each is sent by a task of its own, and one that fails is only logged.
#[derive(Clone)]
pub struct Recorder(Arc<events::Recorder>);

impl Recorder {
    pub fn new(client: Client) -> Self {
        // The pod's name, where Kubernetes sets it, tells router instances apart.
        let instance = std::env::var("HOSTNAME").ok();
        let reporter = events::Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Recorder(Arc::new(events::Recorder::new(client, reporter)))
    }

    pub fn warn(&self, on: ObjectReference, reason: &str, note: String) {
        self.publish(on, events::EventType::Warning, reason, note);
    }

    pub fn normal(&self, on: ObjectReference, reason: &str, note: String) {
        self.publish(on, events::EventType::Normal, reason, note);
    }

    fn publish(&self, on: ObjectReference, type_: events::EventType, reason: &str, note: String) {
        let event = events::Event {
            type_,
            reason: reason.into(),
            // At most 1 kB, as the Events API wants.
            note: Some(truncate(note, 1000)),
            action: reason.into(),
            secondary: None,
        };
        let recorder = self.0.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &on).await {
                tracing::debug!("Kubernetes Event not recorded: {e}");
            }
        });
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A reference to a ScoringEndpoint, for its Events.
fn object_reference(obj: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some(spec::API_VERSION.into()),
        kind: Some(spec::KIND.into()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// Builds a client from `kubeconfig`, or else from the in-cluster service account, then
/// `KUBECONFIG` and `~/.kube/config`. Connects to nothing.
pub async fn client_config(cfg: &KubernetesSource) -> anyhow::Result<kube::Config> {
    match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("endpoints.kubernetes.kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "endpoints.kubernetes.kubeconfig {}: its current context is not usable",
                        path.display()
                    )
                })
        }
        None => kube::Config::infer().await.context(
            "endpoints.kubernetes: no cluster to talk to: not in a pod (no service account \
             token and KUBERNETES_SERVICE_HOST), and no usable KUBECONFIG or ~/.kube/config; \
             set endpoints.kubernetes.kubeconfig",
        ),
    }
}

/// Connects a client as [`client_config`] describes.
pub async fn client(cfg: &KubernetesSource) -> anyhow::Result<Client> {
    Client::try_from(client_config(cfg).await?)
        .context("endpoints.kubernetes: cannot build a client")
}

/// How one ScoringEndpoint object looks to the router, for its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub namespace: String,
    pub name: String,
    /// Tells an object from one deleted before it under the same name.
    pub uid: Option<String>,
    pub generation: Option<i64>,
    /// `Ok`: the current spec is valid; `Err((reason, message))`: why it is not.
    pub verdict: Result<(), (&'static str, String)>,
    /// Whether the router serves this object's definition (the current one or its last
    /// good one) under its name.
    pub served: bool,
    /// The status in the cluster now, as last seen through the watch.
    pub status: Option<ScoringEndpointStatus>,
}

/// The three kinds of object watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Endpoints,
    Slices,
    Secrets,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Endpoints, Kind::Slices, Kind::Secrets];

    /// The resource, as RBAC and the metrics name it.
    fn resource(self) -> &'static str {
        match self {
            Kind::Endpoints => "scoringendpoints",
            Kind::Slices => "endpointslices",
            Kind::Secrets => "secrets",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Endpoints => "scorefront.io",
            Kind::Slices => "discovery.k8s.io",
            Kind::Secrets => "\"\" (core)",
        }
    }
}

/// `(namespace, name)` of an object.
type Key = (String, String);

/// The replica counts the autoscaler asks for, by `(endpoint, version)`.
pub type Desired = HashMap<(String, String), u32>;

fn key_of<K: Resource>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// One watch: a kind in a namespace (`None`: every namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Scope {
    kind: Kind,
    namespace: Option<String>,
}

impl Scope {
    fn covers(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

/// An object or the end of a relist, from one watch.
enum Change {
    Endpoint(watcher::Event<DynamicObject>),
    Slice(watcher::Event<EndpointSlice>),
    Secret(watcher::Event<Secret>),
}

type Update = (Scope, Result<Change, watcher::Error>);

/// The watches and what they fold into. Owned by its task.
pub struct Source {
    /// Where definitions and pods go.
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<Metrics>,
    /// Token issuers the router config configures, by name.
    issuers: Vec<String>,
    /// ScoringEndpoints as listed, less what the router never reads (managed fields and
    /// annotations, which can be larger than the rest) and their status, kept typed in
    /// `statuses`.
    endpoints: HashMap<Key, DynamicObject>,
    /// The status each ScoringEndpoint has in the cluster.
    statuses: HashMap<Key, ScoringEndpointStatus>,
    secrets: HashMap<Key, Secret>,
    /// The pods of each EndpointSlice, by Service and then by slice name, so that a slice
    /// change costs the slices of its own Service only.
    slices: HashMap<ServiceKey, BTreeMap<String, SlicePods>>,
    /// The Service of each slice, to find it again when it changes or goes.
    slice_service: HashMap<Key, ServiceKey>,
    /// Whether a definition may have changed since the endpoints were last sent: a
    /// ScoringEndpoint's spec, or a key Secret. (The router's own status writes come back
    /// as changes of the objects; they change no definition and cost nothing.)
    dirty: bool,
    /// Objects listed since a watch's last `Init`, replacing its scope at `InitDone`.
    relisting: HashMap<Scope, Vec<Change>>,
    /// Watches that have listed at least once.
    listed: HashSet<Scope>,
    scopes: usize,
    /// The last good definition of each ScoringEndpoint.
    good: HashMap<Key, spec::Endpoint>,
    /// What was last sent to the index.
    sent: Vec<spec::Endpoint>,
    sent_pods: HashMap<ServiceKey, Arc<ServicePods>>,
    /// Watches whose last item was an error, and errors already logged at length.
    failing: HashSet<Scope>,
    /// Watches whose last item was a refused list (RBAC): what they would hold is unknown,
    /// not absent, and statuses say so.
    refused: HashSet<Scope>,
    /// Watches that could not reach the API server since their last event. (Only that:
    /// an overloaded server answering 429 must not be answered with relists.)
    down: HashSet<Scope>,
    /// While every watch relists after an outage: those not done yet, and until when
    /// changes wait for them.
    held: Option<(HashSet<Scope>, tokio::time::Instant)>,
    explained: HashSet<(&'static str, Scope)>,
    /// The refusals logged last time, by object: this runs at every change of any
    /// ScoringEndpoint or key Secret (the router's own status writes too), and a refusal
    /// is logged when it is new, not each time.
    warned: HashSet<(Key, String)>,
    synced: watch::Sender<bool>,
    observed: watch::Sender<Arc<Vec<Observed>>>,
    /// Kubernetes Events about the objects.
    recorder: Recorder,
}

/// What a started source offers the app.
pub struct Handles {
    /// Turns true once every watch has listed once.
    pub synced: watch::Receiver<bool>,
    /// Each ScoringEndpoint as the router sees it.
    pub observed: watch::Receiver<Arc<Vec<Observed>>>,
}

impl Source {
    pub fn new(
        events: mpsc::UnboundedSender<Event>,
        metrics: Arc<Metrics>,
        issuers: Vec<String>,
        recorder: Recorder,
    ) -> (Self, Handles) {
        let (synced, synced_rx) = watch::channel(false);
        let (observed, observed_rx) = watch::channel(Arc::new(Vec::new()));
        let source = Source {
            events,
            metrics,
            issuers,
            endpoints: HashMap::new(),
            secrets: HashMap::new(),
            statuses: HashMap::new(),
            slices: HashMap::new(),
            slice_service: HashMap::new(),
            dirty: true,
            relisting: HashMap::new(),
            listed: HashSet::new(),
            scopes: 0,
            good: HashMap::new(),
            sent: Vec::new(),
            sent_pods: HashMap::new(),
            failing: HashSet::new(),
            refused: HashSet::new(),
            down: HashSet::new(),
            held: None,
            explained: HashSet::new(),
            warned: HashSet::new(),
            synced,
            observed,
            recorder,
        };
        let handles = Handles {
            synced: synced_rx,
            observed: observed_rx,
        };
        (source, handles)
    }

    /// Watches `namespaces` (empty: all) until `stop` turns true.
    pub async fn run(
        mut self,
        client: Client,
        namespaces: Vec<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let namespaces: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.into_iter().map(Some).collect()
        };
        let scopes: Vec<Scope> = (namespaces.iter())
            .flat_map(|ns| {
                (Kind::ALL.into_iter()).map(|kind| Scope {
                    kind,
                    namespace: ns.clone(),
                })
            })
            .collect();
        let watch_all = || {
            let streams: Vec<BoxStream<'static, Update>> = (scopes.iter())
                .map(|s| watch_stream(&client, s.kind, s.namespace.clone()))
                .collect();
            futures::stream::select_all(streams)
        };
        self.scopes = scopes.len();
        let mut updates = watch_all();
        loop {
            let hold_ends = self.held.as_ref().map(|(_, until)| *until);
            tokio::select! {
                Some((scope, update)) = updates.next() => {
                    if self.apply(scope, update) {
                        tracing::info!(
                            "the API server answers again; relisting every watch, to apply \
                             what changed meanwhile at once"
                        );
                        updates = watch_all();
                        self.relisting.clear();
                        self.failing.clear();
                        self.down.clear();
                        let until = tokio::time::Instant::now() + RELIST_HOLD;
                        self.held = Some((scopes.iter().cloned().collect(), until));
                    }
                }
                () = sleep_until(hold_ends), if hold_ends.is_some() => self.release(),
                () = crate::until_true(&mut stop) => return,
            }
        }
    }

    /// Folds one watch item in. Returns true when the API server answers a watch that had
    /// lost it, after the first full list: then every watch should relist (module docs),
    /// and this item is left to that relist.
    fn apply(&mut self, scope: Scope, update: Result<Change, watcher::Error>) -> bool {
        let back = |source: &mut Self, scope: &Scope| {
            source.down.remove(scope) && source.held.is_none() && *source.synced.borrow()
        };
        let change = match update {
            Ok(change) => change,
            Err(e) => {
                let (verb, reason) = self.failed(scope.clone(), e);
                if reason == "unreachable" {
                    self.down.insert(scope);
                    return false;
                }
                // Any other error is an answer from the API server.
                if back(self, &scope) {
                    return true;
                }
                // A list the router may not make is an answer, not an outage: it finds
                // nothing there, and the rest is served rather than held back forever.
                if reason == "forbidden" && verb == "list" {
                    let first = self.listed.insert(scope.clone());
                    self.refused.insert(scope.clone());
                    self.relisting.remove(&scope);
                    if let Some((waiting, _)) = &mut self.held {
                        waiting.remove(&scope);
                        if waiting.is_empty() {
                            self.release();
                        }
                    } else if first {
                        self.settle();
                    }
                }
                return false;
            }
        };
        if back(self, &scope) {
            return true;
        }
        self.refused.remove(&scope);
        if self.failing.remove(&scope) {
            tracing::info!(
                resource = scope.kind.resource(),
                namespace = scope.namespace.as_deref().unwrap_or("*"),
                "watch resumed"
            );
        }
        let phase = match &change {
            Change::Endpoint(e) => phase(e),
            Change::Slice(e) => phase(e),
            Change::Secret(e) => phase(e),
        };
        match phase {
            Phase::Init => {
                self.relisting.insert(scope, Vec::new());
                return false;
            }
            Phase::Listed => {
                if let Some(buffer) = self.relisting.get_mut(&scope) {
                    buffer.push(change);
                    return false;
                }
            }
            Phase::Done | Phase::Live => {}
        }
        let kind = scope.kind;
        let mut services = HashSet::new();
        if phase == Phase::Done {
            let listed = self.relisting.remove(&scope).unwrap_or_default();
            self.replace_scope(&scope, listed, &mut services);
            if let Some((waiting, _)) = &mut self.held {
                waiting.remove(&scope);
            }
            self.listed.insert(scope);
        } else {
            self.fold(change, &mut services);
        }
        self.metrics
            .kube_synced(kind.resource(), Timestamp::now().as_second());
        self.metrics
            .kube_objects("ScoringEndpoint", self.endpoints.len());
        self.metrics
            .kube_objects("EndpointSlice", self.slice_service.len());
        self.metrics.kube_objects("Secret", self.secrets.len());
        match &self.held {
            Some((waiting, _)) if waiting.is_empty() => self.release(),
            Some(_) => {}
            None => {
                for service in services {
                    self.send_pods(service);
                }
                self.settle();
            }
        }
        false
    }

    /// Ends a hold (module docs): sends the definitions, then every Service's pods, as
    /// they are now. Definitions first: a version that goes away stops taking requests
    /// before its pods leave, and requests waiting on a new version get its pods.
    fn release(&mut self) {
        let Some((waiting, _)) = self.held.take() else {
            return;
        };
        if !waiting.is_empty() {
            let names: Vec<String> = (waiting.iter())
                .map(|s| {
                    let ns = s.namespace.as_deref().unwrap_or("*");
                    format!("{} in {ns}", s.kind.resource())
                })
                .collect();
            tracing::warn!(
                "still relisting {} after {RELIST_HOLD:?}; applying what is listed",
                names.join(", ")
            );
        }
        self.send_endpoints();
        let services: HashSet<ServiceKey> = (self.slices.keys().cloned())
            .chain(self.sent_pods.keys().cloned())
            .collect();
        for service in services {
            self.send_pods(service);
        }
    }

    /// Once every watch has listed: sends the definitions if they may have changed, and
    /// reports the source synced the first time.
    fn settle(&mut self) {
        let synced = self.listed.len() == self.scopes;
        if synced && (self.dirty || !*self.synced.borrow()) {
            self.send_endpoints();
        }
        if synced && !*self.synced.borrow() {
            tracing::info!(
                endpoints = self.sent.len(),
                slices = self.slice_service.len(),
                "Kubernetes objects listed; serving them"
            );
            self.synced.send_replace(true);
        }
    }

    /// Replaces every object of `scope`'s kind in its namespace(s) with `listed`.
    fn replace_scope(
        &mut self,
        scope: &Scope,
        listed: Vec<Change>,
        services: &mut HashSet<ServiceKey>,
    ) {
        match scope.kind {
            Kind::Endpoints => {
                self.endpoints.retain(|(ns, _), _| !scope.covers(ns));
                self.statuses.retain(|(ns, _), _| !scope.covers(ns));
                self.dirty = true;
            }
            Kind::Secrets => {
                self.secrets.retain(|(ns, _), _| !scope.covers(ns));
                self.dirty = true;
            }
            Kind::Slices => {
                let gone: Vec<Key> = (self.slice_service.keys())
                    .filter(|(ns, _)| scope.covers(ns))
                    .cloned()
                    .collect();
                for key in gone {
                    self.remove_slice(&key, services);
                }
            }
        }
        for change in listed {
            self.fold(change, services);
        }
    }

    /// Folds one object event into the stores; notes the Services whose pods it touches.
    fn fold(&mut self, change: Change, services: &mut HashSet<ServiceKey>) {
        use watcher::Event as W;
        match change {
            Change::Endpoint(W::Apply(mut o) | W::InitApply(mut o)) => {
                o.metadata.managed_fields = None;
                o.metadata.annotations = None;
                let key = key_of(&o);
                let status = (o.data.as_object_mut())
                    .and_then(|data| data.remove("status"))
                    .and_then(|s| serde_json::from_value(s).ok());
                match status {
                    Some(status) => self.statuses.insert(key.clone(), status),
                    None => self.statuses.remove(&key),
                };
                let same = self.endpoints.get(&key).is_some_and(|old| {
                    old.metadata.uid == o.metadata.uid && old.data.get("spec") == o.data.get("spec")
                });
                self.dirty |= !same;
                self.endpoints.insert(key, o);
            }
            Change::Endpoint(W::Delete(o)) => {
                let key = key_of(&o);
                self.endpoints.remove(&key);
                self.statuses.remove(&key);
                self.good.remove(&key);
                self.dirty = true;
            }
            Change::Secret(W::Apply(o) | W::InitApply(o)) => {
                let key = key_of(&o);
                self.dirty |= self.secrets.get(&key).is_none_or(|old| old.data != o.data);
                self.secrets.insert(key, o);
            }
            Change::Secret(W::Delete(o)) => {
                self.secrets.remove(&key_of(&o));
                self.dirty = true;
            }
            Change::Slice(W::Apply(o) | W::InitApply(o)) => {
                let key = key_of(&o);
                self.remove_slice(&key, services);
                if let Some(service) = service_of(&o) {
                    (self.slices.entry(service.clone()).or_default())
                        .insert(key.1.clone(), slice_pods(&o));
                    self.slice_service.insert(key, service.clone());
                    services.insert(service);
                }
            }
            Change::Slice(W::Delete(o)) => self.remove_slice(&key_of(&o), services),
            Change::Endpoint(_) | Change::Secret(_) | Change::Slice(_) => {}
        }
    }

    /// Forgets the slice `key`; notes its Service.
    fn remove_slice(&mut self, key: &Key, services: &mut HashSet<ServiceKey>) {
        let Some(service) = self.slice_service.remove(key) else {
            return;
        };
        if let Some(slices) = self.slices.get_mut(&service) {
            slices.remove(&key.1);
            if slices.is_empty() {
                self.slices.remove(&service);
            }
        }
        services.insert(service);
    }

    /// Sends the pods of `service` if they changed.
    fn send_pods(&mut self, service: ServiceKey) {
        let pods = ServicePods {
            slices: (self.slices.get(&service).into_iter())
                .flat_map(|slices| slices.values().cloned())
                .collect(),
        };
        if self.sent_pods.get(&service).map(|p| &**p) == Some(&pods) {
            return;
        }
        let pods = Arc::new(pods);
        if pods.slices.is_empty() {
            self.sent_pods.remove(&service);
        } else {
            self.sent_pods.insert(service.clone(), pods.clone());
        }
        let _ = self.events.send(Event::Pods { service, pods });
    }

    /// Validates every ScoringEndpoint, settles duplicate names, sends the served set if
    /// it changed, and publishes what each object looks like.
    fn send_endpoints(&mut self) {
        self.dirty = false;
        let endpoints = &self.endpoints;
        self.good.retain(|key, _| endpoints.contains_key(key));
        let mut verdicts: HashMap<Key, Result<(), (&'static str, String)>> = HashMap::new();
        // Why each refused object is refused, to report what is new since last time.
        let mut refusals: Vec<(Key, &'static str, String)> = Vec::new();
        for (key, obj) in &self.endpoints {
            let verdict = match self.definition(key, obj) {
                Ok(ep) => {
                    self.good.insert(key.clone(), ep);
                    Ok(())
                }
                Err(errors) => {
                    let message = errors.join("; ");
                    refusals.push((key.clone(), "Invalid", message.clone()));
                    Err(("Invalid", message))
                }
            };
            verdicts.insert(key.clone(), verdict);
        }
        // Of the objects with something to serve, the oldest holds each name.
        let mut holders: BTreeMap<&str, (&Key, Option<&Time>)> = BTreeMap::new();
        let mut order: Vec<&Key> = self.good.keys().collect();
        order.sort_by(|a, b| {
            let created = |k: &Key| {
                self.endpoints
                    .get(k)
                    .and_then(|o| o.meta().creation_timestamp.clone())
            };
            (created(a), *a).cmp(&(created(b), *b))
        });
        let mut refused: HashMap<Key, String> = HashMap::new();
        for key in order {
            let name = key.1.as_str();
            let created = self
                .endpoints
                .get(key)
                .and_then(|o| o.meta().creation_timestamp.as_ref());
            match holders.get(name) {
                None => {
                    holders.insert(name, (key, created));
                }
                Some((holder, _)) => {
                    let message = format!(
                        "the endpoint name '{name}' is already served from {}/{}; scoring URLs \
                         have no namespace, so names must be unique across the namespaces one \
                         router watches",
                        holder.0, holder.1
                    );
                    refusals.push((key.clone(), "DuplicateName", message.clone()));
                    refused.insert(key.clone(), message);
                }
            }
        }
        let served: Vec<spec::Endpoint> = holders
            .values()
            .map(|(key, _)| self.good[*key].clone())
            .collect();
        let holders: HashSet<&Key> = holders.values().map(|(k, _)| *k).collect();
        let mut observed: Vec<Observed> = self
            .endpoints
            .iter()
            .map(|(key, obj)| Observed {
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: obj.meta().uid.clone(),
                generation: obj.meta().generation,
                verdict: match refused.get(key) {
                    Some(message) => Err(("DuplicateName", message.clone())),
                    None => verdicts.remove(key).unwrap_or(Ok(())),
                },
                served: holders.contains(key),
                status: self.statuses.get(key).cloned(),
            })
            .collect();
        observed.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let warned: HashSet<(Key, String)> = (refusals.iter())
            .map(|(key, _, message)| (key.clone(), message.clone()))
            .collect();
        for (key, reason, message) in refusals {
            if !self.warned.contains(&(key.clone(), message.clone())) {
                self.report_refusal(&key, reason, message, holders.contains(&key));
            }
        }
        self.warned = warned;
        self.observed.send_if_modified(|old| {
            let changed = **old != observed;
            if changed {
                *old = Arc::new(observed);
            }
            changed
        });
        if served != self.sent {
            tracing::info!(endpoints = served.len(), "ScoringEndpoints changed");
            self.sent = served.clone();
            let _ = self.events.send(Event::Endpoints(served));
        }
    }

    /// Logs a refused ScoringEndpoint once per reason, and tells its users with a
    /// Kubernetes Event on the object (`kubectl describe se NAME`).
    fn report_refusal(&self, key: &Key, reason: &'static str, message: String, kept: bool) {
        tracing::warn!(
            namespace = key.0,
            name = key.1,
            kept,
            "ScoringEndpoint refused: {message}"
        );
        let Some(obj) = self.endpoints.get(key) else {
            return;
        };
        let note = if kept {
            format!("{message} (the last valid spec stays in force)")
        } else {
            message
        };
        self.recorder.warn(object_reference(obj), reason, note);
    }

    /// The validated definition of one object, or every reason it has none.
    fn definition(&self, key: &Key, obj: &DynamicObject) -> Result<spec::Endpoint, Vec<String>> {
        let spec: EndpointSpec = obj
            .data
            .get("spec")
            .cloned()
            .map(serde_json::from_value)
            .unwrap_or_else(|| Ok(EndpointSpec::default()))
            .map_err(|e| vec![format!("spec: {e}")])?;
        let keys = spec
            .keys_secret
            .as_ref()
            .map(|name| self.keys(&key.0, name));
        let keys = match &keys {
            None => Err("no keysSecret"),
            Some(Ok(k)) => Ok(k),
            Some(Err(why)) => Err(why.as_str()),
        };
        let origin = Origin::Cluster {
            namespace: &key.0,
            keys,
        };
        let ep = spec::validate(&key.1, &spec, origin)
            .map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let unknown: Vec<String> = super::unknown_issuers(&ep, &self.issuers)
            .map(|e| e.to_string())
            .collect();
        if unknown.is_empty() {
            Ok(ep)
        } else {
            Err(unknown)
        }
    }

    /// The keys in the Secret `name` of `namespace`.
    fn keys(&self, namespace: &str, name: &str) -> Result<KeysSpec, String> {
        let refused = (self.refused.iter()).any(|s| s.kind == Kind::Secrets && s.covers(namespace));
        let secret = self
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| {
                // Not seeing the Secret is not knowing it is missing when the router may
                // not list Secrets; the fix is then RBAC, not the Secret.
                if refused {
                    format!(
                        "Secret '{name}' cannot be read: the router may not list secrets in \
                         namespace {namespace} (RBAC); grant get, list and watch on secrets \
                         to the router's service account (see deploy/base)"
                    )
                } else {
                    format!(
                        "Secret '{name}' not found among the Secrets labelled {KEYS_LABEL} in \
                         namespace {namespace}; create it, or label it: kubectl -n {namespace} \
                         label secret {name} {KEYS_LABEL}=true"
                    )
                }
            })?;
        let field = |field: &str| -> Result<Option<String>, String> {
            match secret.data.as_ref().and_then(|d| d.get(field)) {
                None => Ok(None),
                Some(bytes) => String::from_utf8(bytes.0.clone())
                    .map(Some)
                    .map_err(|_| format!("Secret '{name}': {field} is not UTF-8 text")),
            }
        };
        Ok(KeysSpec {
            primary_key: field("primaryKey")?,
            secondary_key: field("secondaryKey")?,
        })
    }

    /// Counts a watch error and logs it: at length once per cause, briefly after that.
    /// Returns the verb that failed and why (the metric's reason).
    fn failed(&mut self, scope: Scope, error: watcher::Error) -> (&'static str, &'static str) {
        let (verb, status) = match &error {
            watcher::Error::InitialListFailed(e) => ("list", api_status(e)),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                ("watch", api_status(e))
            }
            watcher::Error::WatchError(s) => ("watch", Some((s.code, s.reason.clone()))),
            watcher::Error::NoResourceVersion => ("list", None),
        };
        let reason = match &status {
            Some((403, _)) => "forbidden",
            Some((401, _)) => "unauthorized",
            Some((410, _)) => "expired",
            Some((404, _)) => "not_found",
            Some(_) => "api_error",
            None => "unreachable",
        };
        let resource = scope.kind.resource();
        self.metrics.kube_watch_error(resource, reason);
        let namespace = scope.namespace.clone();
        let where_ = match &namespace {
            Some(ns) => format!("in namespace {ns}"),
            None => "in any namespace (cluster-wide)".to_owned(),
        };
        let first = self.explained.insert((reason, scope.clone()));
        let (kind, group) = (scope.kind, scope.kind.group());
        self.failing.insert(scope);
        match reason {
            "expired" => tracing::info!(resource, "watch expired; relisting"),
            "forbidden" if first => tracing::error!(
                resource,
                namespace = namespace.as_deref().unwrap_or("*"),
                "RBAC: the router may not {verb} {resource} (API group {}) {where_}; grant \
                 get, list and watch on it to the router's service account (see \
                 deploy/base). Retrying with backoff; everything else keeps working: {error}",
                group,
            ),
            "not_found" if first && kind == Kind::Endpoints => tracing::error!(
                "the API server does not know {resource}.scorefront.io: install the CRD \
                 (scorefront crd | kubectl apply -f -). Retrying with backoff: {error}"
            ),
            _ if first => tracing::warn!(
                resource,
                namespace = namespace.as_deref().unwrap_or("*"),
                "cannot {verb} {resource} {where_}; serving what is known, retrying with \
                 backoff: {error}"
            ),
            _ => tracing::debug!(resource, "watch still failing: {error}"),
        }
        (verb, reason)
    }
}

/// Where a watch event stands in a watch's list-then-watch cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A (re)list starts.
    Init,
    /// An object of the list.
    Listed,
    /// The list is complete.
    Done,
    /// A change after the list.
    Live,
}

fn phase<K>(e: &watcher::Event<K>) -> Phase {
    use watcher::Event as W;
    match e {
        W::Init => Phase::Init,
        W::InitApply(_) => Phase::Listed,
        W::InitDone => Phase::Done,
        W::Apply(_) | W::Delete(_) => Phase::Live,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn api_status(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

fn service_of(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.labels().get(SERVICE_LABEL)?;
    Some((slice.namespace().unwrap_or_default(), service.clone()))
}

/// The pods of one slice: ready and not terminating pods take new requests.
fn slice_pods(slice: &EndpointSlice) -> SlicePods {
    let ports = (slice.ports.iter().flatten())
        .filter_map(|p| {
            Some((
                p.name.clone().filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let addresses = if matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        (slice.endpoints.iter())
            .filter_map(|e| {
                let ip: IpAddr = e.addresses.first()?.parse().ok()?;
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                Some((ip, ready && !terminating))
            })
            .collect()
    } else {
        Vec::new()
    };
    SlicePods { ports, addresses }
}

/// The watch of `kind` in `namespace` (`None`: every namespace), backing off on errors,
/// each item tagged with its scope.
fn watch_stream(
    client: &Client,
    kind: Kind,
    namespace: Option<String>,
) -> BoxStream<'static, Update> {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    fn tagged<K: Clone + std::fmt::Debug + Send + 'static>(
        stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        change: fn(watcher::Event<K>) -> Change,
        scope: Scope,
    ) -> BoxStream<'static, Update> {
        (stream.default_backoff())
            .map(move |r| (scope.clone(), r.map(change)))
            .boxed()
    }
    let scope = Scope {
        kind,
        namespace: namespace.clone(),
    };
    match kind {
        Kind::Endpoints => {
            let ar = ApiResource::erase::<ScoringEndpoint>(&());
            let api = match &namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            let config = watcher::Config::default();
            tagged(watcher(api, config), Change::Endpoint, scope)
        }
        Kind::Slices => {
            let config = watcher::Config::default().labels(SERVICE_LABEL);
            let api = api::<EndpointSlice>(client, &namespace);
            tagged(watcher(api, config), Change::Slice, scope)
        }
        Kind::Secrets => {
            let config = watcher::Config::default().labels(KEYS_LABEL);
            let api = api::<Secret>(client, &namespace);
            tagged(watcher(api, config), Change::Secret, scope)
        }
    }
}

/// Writes each ScoringEndpoint's `.status` from `observed` and the routing table, at most
/// once per [`STATUS_INTERVAL`] and only where it changed, until `stop` turns true.
pub async fn write_status(
    client: Client,
    proxy: Arc<Proxy>,
    observed: watch::Receiver<Arc<Vec<Observed>>>,
    desired: watch::Receiver<Arc<Desired>>,
    mut stop: watch::Receiver<bool>,
) {
    let ar = ApiResource::erase::<ScoringEndpoint>(&());
    // What was written last, by object (with its uid: an object deleted and made again
    // between two passes starts without a status); a write is skipped when nothing changed.
    let mut written: HashMap<Key, (Option<String>, ScoringEndpointStatus)> = HashMap::new();
    let mut explained = false;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::until_true(&mut stop) => return,
        }
        let objects = observed.borrow().clone();
        let desired = desired.borrow().clone();
        let table = proxy.table();
        let present: HashSet<(&str, &str)> = (objects.iter())
            .map(|o| (o.namespace.as_str(), o.name.as_str()))
            .collect();
        written.retain(|k, _| present.contains(&(k.0.as_str(), k.1.as_str())));
        for obj in objects.iter() {
            let key = (obj.namespace.clone(), obj.name.clone());
            let before = (written.get(&key))
                .filter(|(uid, _)| *uid == obj.uid)
                .map(|(_, status)| status)
                .or(obj.status.as_ref());
            let route = obj.served.then(|| table.endpoint(&obj.name)).flatten();
            let versions: Vec<Served> = route
                .map(|r| {
                    let total: u32 = r.versions().iter().map(|v| v.spec.traffic_percentile).sum();
                    (r.versions().iter())
                        .map(|v| {
                            // The default version also takes what no version claims.
                            let rest = if v.spec.is_default {
                                100 - total.min(100)
                            } else {
                                0
                            };
                            let key = (obj.name.clone(), v.name().to_owned());
                            Served {
                                name: v.name().to_owned(),
                                share: v.spec.traffic_percentile + rest,
                                ready: v.slots.replicas().len() as u32,
                                desired: desired.get(&key).copied(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let status = status_of(obj, &versions, before, Timestamp::now());
            if before == Some(&status) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &obj.namespace, &ar);
            let patch = serde_json::json!({
                "apiVersion": spec::API_VERSION,
                "kind": spec::KIND,
                "status": status,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&obj.name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    proxy.metrics().kube_status_write("ok");
                    written.insert(key, (obj.uid.clone(), status));
                }
                Err(e) => {
                    proxy.metrics().kube_status_write("error");
                    let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 403);
                    if forbidden && !explained {
                        explained = true;
                        tracing::error!(
                            "RBAC: the router may not patch scoringendpoints/status; grant \
                             patch on it to the router's service account (see deploy/base): {e}"
                        );
                    } else {
                        tracing::debug!(
                            namespace = obj.namespace,
                            name = obj.name,
                            "status not written: {e}"
                        );
                    }
                }
            }
        }
    }
}

/// The status of `obj` with `versions` (`name, share of traffic, ready replicas`) served.
/// A condition keeps its `lastTransitionTime` from `before` while its status stays.
/// A served version as its status shows it.
struct Served {
    name: String,
    /// Percent of unpinned traffic it takes.
    share: u32,
    ready: u32,
    /// What the autoscaler asks for, when it scales the version.
    desired: Option<u32>,
}

fn status_of(
    obj: &Observed,
    versions: &[Served],
    before: Option<&ScoringEndpointStatus>,
    now: Timestamp,
) -> ScoringEndpointStatus {
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = before
            .and_then(|b| b.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: obj.generation,
            last_transition_time: since,
        }
    };
    let accepted = match &obj.verdict {
        Ok(()) => condition(
            "Accepted",
            true,
            "Valid",
            "the spec is valid and served".into(),
        ),
        Err((reason, message)) => {
            let message = if obj.served {
                format!("{message} (the last valid spec stays in force)")
            } else {
                message.clone()
            };
            condition("Accepted", false, reason, message)
        }
    };
    let empty: Vec<&str> = versions
        .iter()
        .filter(|v| v.ready == 0)
        .map(|v| v.name.as_str())
        .collect();
    let ready = match (obj.served, versions.is_empty(), empty.as_slice()) {
        (false, _, _) => condition(
            "Ready",
            false,
            "NotServed",
            "the endpoint is not served".into(),
        ),
        (true, true, _) => condition(
            "Ready",
            false,
            "NoVersions",
            "the endpoint has no versions".into(),
        ),
        (true, false, []) => condition(
            "Ready",
            true,
            "ReplicasReady",
            "every version has a ready replica".into(),
        ),
        (true, false, names) => condition(
            "Ready",
            false,
            "NoReadyReplicas",
            format!("no ready pod behind version(s) {}", names.join(", ")),
        ),
    };
    let traffic: Vec<String> = (versions.iter())
        .map(|v| format!("{}={}", v.name, v.share))
        .collect();
    ScoringEndpointStatus {
        observed_generation: obj.generation,
        ready_replicas: versions.iter().map(|v| v.ready).sum(),
        traffic: traffic.join(" "),
        versions: versions
            .iter()
            .map(|v| spec::VersionStatus {
                name: v.name.clone(),
                ready_replicas: v.ready,
                desired_replicas: v.desired,
            })
            .collect(),
        conditions: vec![accepted, ready],
    }
}
