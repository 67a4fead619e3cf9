//! The Kubernetes actuator: a Deployment's replica count through its `scale` subresource.
//!
//! Each Deployment gets a worker task that owns everything about it:
//! - at start it reads the count in force (a router restart never resets a scaled
//!   Deployment to its minimum) and warns once if a HorizontalPodAutoscaler targets the
//!   same Deployment (two controllers would fight);
//! - it PATCHes the absolute count, only when it changes; errors (403, 404, 409, the API
//!   server away) are logged and retried with backoff, the newest count winning;
//! - before lowering the count it takes the least busy pods out of routing, lets their
//!   requests finish, and gives them a low `controller.kubernetes.io/pod-deletion-cost`,
//!   so the ReplicaSet removes those and not pods that are serving.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ObjectReference, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::{Instant, sleep},
};

use super::actuator::{Actuator, Target};
use crate::{
    discovery::{index::Event, kubernetes::Recorder},
    proxy::slots::VersionSlots,
};

/// The annotation the ReplicaSet controller reads to choose which pods to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost given to pods the router wants removed (lower goes first).
const REMOVE_FIRST: &str = "-1000";
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long withdrawn pods get to finish their requests before the count is lowered.
const DRAIN_MAX: Duration = Duration::from_secs(300);
/// API calls of all workers at once: thousands of Deployments read at start must not
/// open thousands of connections to the API server (each holding its buffers after).
const CALLS_AT_ONCE: usize = 8;

/// What a worker is asked: a count, and the version's slots to pick pods from.
type Want = Option<(u32, Arc<VersionSlots>)>;

struct Worker {
    want: watch::Sender<Want>,
    /// The count in force, once read.
    current: Arc<Mutex<Option<u32>>>,
}

/// Scales Deployments. Owned by the autoscaler (through [`Actuator`]); its workers stop
/// when it is dropped.
pub struct KubeScaler {
    client: Client,
    /// Where pods to be removed are withdrawn from routing.
    events: mpsc::UnboundedSender<Event>,
    /// Kubernetes Events on the Deployments it scales.
    recorder: Recorder,
    workers: Mutex<HashMap<Target, Worker>>,
    /// Permits for API calls, shared by the workers.
    calls: Arc<Semaphore>,
}

impl KubeScaler {
    pub fn new(client: Client, events: mpsc::UnboundedSender<Event>, recorder: Recorder) -> Self {
        KubeScaler {
            client,
            events,
            recorder,
            workers: Mutex::new(HashMap::new()),
            calls: Arc::new(Semaphore::new(CALLS_AT_ONCE)),
        }
    }

    /// The worker of `target`, started on first use.
    fn worker<T>(&self, target: &Target, with: impl FnOnce(&Worker) -> T) -> Option<T> {
        let Target::Deployment {
            namespace,
            name,
            endpoint,
            version,
        } = target
        else {
            return None;
        };
        let mut workers = self.workers.lock().expect("workers poisoned");
        let worker = workers.entry(target.clone()).or_insert_with(|| {
            let (want, want_rx) = watch::channel(None);
            let current = Arc::new(Mutex::new(None));
            let run = Run {
                client: self.client.clone(),
                events: self.events.clone(),
                recorder: self.recorder.clone(),
                calls: self.calls.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                version: (endpoint.clone(), version.clone()),
                current: current.clone(),
                last_failure: Mutex::new(None),
            };
            tokio::spawn(run.run(want_rx));
            Worker { want, current }
        });
        Some(with(worker))
    }
}

impl Actuator for KubeScaler {
    fn current(&self, target: &Target, _initial: u32) -> Option<u32> {
        self.worker(target, |w| *w.current.lock().expect("count poisoned"))
            .flatten()
    }

    fn scale(&self, target: &Target, replicas: u32, slots: &Arc<VersionSlots>) {
        self.worker(target, |w| {
            w.want.send_replace(Some((replicas, slots.clone())))
        });
    }
}

/// One Deployment's worker.
struct Run {
    client: Client,
    events: mpsc::UnboundedSender<Event>,
    recorder: Recorder,
    calls: Arc<Semaphore>,
    namespace: String,
    name: String,
    /// The version whose pods these are: `(endpoint, version)`.
    version: (String, String),
    current: Arc<Mutex<Option<u32>>>,
    /// The last failure logged at length.
    last_failure: Mutex<Option<String>>,
}

impl Run {
    async fn run(self, mut want: watch::Receiver<Want>) {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut backoff = Backoff::default();
        let mut applied = loop {
            match self.call(deployments.get_scale(&self.name)).await {
                Ok(scale) => {
                    self.succeeded();
                    let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
                    break u32::try_from(n).unwrap_or(0);
                }
                Err(e) => {
                    self.failed("read the scale of", &e);
                    if !backoff.wait(&mut want).await {
                        return;
                    }
                }
            }
        };
        *self.current.lock().expect("count poisoned") = Some(applied);
        tracing::info!(
            namespace = self.namespace,
            deployment = self.name,
            replicas = applied,
            "autoscaling Deployment from its current count"
        );
        Box::pin(self.warn_if_hpa()).await;
        loop {
            if want.changed().await.is_err() {
                return;
            }
            let Some((replicas, slots)) = want.borrow_and_update().clone() else {
                continue;
            };
            if replicas == applied {
                self.withdraw(Vec::new());
                continue;
            }
            if replicas < applied {
                Box::pin(self.prepare_scale_down(applied - replicas, &slots, &want)).await;
                if want.has_changed().unwrap_or(true) {
                    continue; // asked again meanwhile: decide on the newest
                }
            } else {
                self.withdraw(Vec::new());
            }
            let patch = serde_json::json!({"spec": {"replicas": replicas}});
            let params = PatchParams::default();
            match self
                .call(deployments.patch_scale(&self.name, &params, &Patch::Merge(&patch)))
                .await
            {
                Ok(_) => {
                    self.succeeded();
                    tracing::info!(
                        namespace = self.namespace,
                        deployment = self.name,
                        from = applied,
                        to = replicas,
                        "Deployment scaled"
                    );
                    let on = ObjectReference {
                        api_version: Some("apps/v1".into()),
                        kind: Some("Deployment".into()),
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectReference::default()
                    };
                    let (endpoint, version) = &self.version;
                    self.recorder.normal(
                        on,
                        "Scaled",
                        format!(
                            "scaled from {applied} to {replicas} replicas for version {version} \
                             of scoring endpoint {endpoint}"
                        ),
                    );
                    applied = replicas;
                    *self.current.lock().expect("count poisoned") = Some(applied);
                    backoff = Backoff::default();
                }
                Err(e) => {
                    self.failed("scale", &e);
                    // Ask again after the backoff (the newest request wins meanwhile).
                    if !backoff.wait(&mut want).await {
                        return;
                    }
                    want.mark_changed();
                }
            }
        }
    }

    /// Takes the `remove` least busy pods out of routing, waits for their requests, and
    /// marks them to be removed first.
    async fn prepare_scale_down(
        &self,
        remove: u32,
        slots: &Arc<VersionSlots>,
        want: &watch::Receiver<Want>,
    ) {
        let mut replicas: Vec<_> = slots.replicas().iter().cloned().collect();
        replicas.sort_by_key(|r| r.in_flight());
        replicas.truncate(remove as usize);
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        self.withdraw(addrs.clone());
        let deadline = Instant::now() + DRAIN_MAX;
        while replicas.iter().any(|r| r.in_flight() > 0) && Instant::now() < deadline {
            if want.has_changed().unwrap_or(true) {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({
            "metadata": {"annotations": {DELETION_COST: REMOVE_FIRST}}
        });
        for addr in addrs {
            let by_ip = ListParams::default().fields(&format!("status.podIP={}", addr.ip()));
            let names = match self.call(pods.list(&by_ip)).await {
                Ok(list) => list.items.into_iter().filter_map(|p| p.metadata.name),
                Err(e) => {
                    self.failed("find the pod of", &e);
                    continue;
                }
            };
            for name in names.collect::<Vec<_>>() {
                let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
                if let Err(e) = self.call(pods.patch(&name, &params, &patch)).await {
                    self.failed("mark for removal a pod of", &e);
                }
            }
        }
    }

    /// Tells the index which of the version's pods take no new requests.
    fn withdraw(&self, addrs: Vec<SocketAddr>) {
        let _ = self.events.send(Event::Withdraw {
            version: self.version.clone(),
            addrs: addrs.into_iter().collect::<HashSet<_>>(),
        });
    }

    /// Makes one API call, within the shared limit. Boxed: a worker idles between counts,
    /// and thousands of idle workers should not each hold room for the largest call.
    async fn call<T>(&self, call: impl Future<Output = kube::Result<T>>) -> kube::Result<T> {
        let _permit = self
            .calls
            .acquire()
            .await
            .expect("the semaphore is never closed");
        Box::pin(call).await
    }

    /// Logs a failed call with what to do about it: at length the first time, briefly
    /// while it keeps failing the same way.
    fn failed(&self, what: &str, e: &kube::Error) {
        let hint = match e {
            kube::Error::Api(s) if s.code == 403 => {
                " (RBAC: grant the router get and patch on deployments/scale, and list and \
                 patch on pods; see deploy/base)"
            }
            kube::Error::Api(s) if s.code == 404 => {
                " (no such Deployment: check the version's deployment, which defaults to its \
                 service)"
            }
            kube::Error::Api(s) if s.code == 409 => " (conflict: someone else changed it)",
            _ => "",
        };
        let message = format!(
            "cannot {what} Deployment {}/{}{hint}: {e}; retrying with backoff",
            self.namespace, self.name
        );
        let mut last = self.last_failure.lock().expect("failure poisoned");
        if last.as_deref() == Some(message.as_str()) {
            tracing::debug!("{message}");
        } else {
            tracing::warn!("{message}");
            *last = Some(message);
        }
    }

    /// Notes that a call went through after failures.
    fn succeeded(&self) {
        if self
            .last_failure
            .lock()
            .expect("failure poisoned")
            .take()
            .is_some()
        {
            tracing::info!(
                namespace = self.namespace,
                deployment = self.name,
                "Deployment calls go through again"
            );
        }
    }

    /// Warns once if an HPA scales the same Deployment: two controllers would fight.
    async fn warn_if_hpa(&self) {
        let hpas: Api<HorizontalPodAutoscaler> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let Ok(list) = self.call(hpas.list(&ListParams::default())).await else {
            return; // not allowed to look, or not there: nothing to warn about
        };
        for hpa in list.items {
            let target = hpa.spec.as_ref().map(|s| &s.scale_target_ref);
            if target.is_some_and(|t| t.kind == "Deployment" && t.name == self.name) {
                tracing::warn!(
                    namespace = self.namespace,
                    deployment = self.name,
                    hpa = hpa.metadata.name.as_deref().unwrap_or(""),
                    "a HorizontalPodAutoscaler also scales this Deployment; it and scorefront \
                     will fight over the count: delete the HPA, or turn off autoscale for the \
                     version"
                );
            }
        }
    }
}

/// Exponential backoff that a newer request cuts short.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    /// Waits out the backoff (or until `want` changes); false when the router stops.
    async fn wait(&mut self, want: &mut watch::Receiver<Want>) -> bool {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = sleep(wait) => true,
            changed = want.changed() => changed.is_ok(),
        }
    }
}
