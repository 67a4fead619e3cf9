//! The index: folds discovery events into its state and publishes routing tables.
//!
//! It owns what is routable; it starts and stops nothing. The definitions it accepts are
//! published on a watch channel for the process supervisor, which reports back the local
//! replicas it runs, and the health of fixed addresses, as events like any other source.
//! A version's local replicas are the ready ones of every command set the supervisor
//! reports (while a changed command rolls out, the previous command's and the new one's);
//! its fixed addresses are routable from the start until their probes fail (only once a
//! probe passed with `requireReadyReplicas`).
//!
//! It owns the identity of capacity: one [`VersionSlots`] per (endpoint, version), kept
//! across reloads, so in-flight counts and queues survive a table swap; a version that
//! disappears has its replicas withdrawn (its running requests finish). Replica membership
//! is published into each version's slots directly; a new table is built only when the
//! endpoint definitions change, so pod churn in a cluster costs one slots update per
//! affected version and no table rebuild.
//!
//! A pod's [`Replica`] keeps its identity for as long as its address is listed for the
//! version, ready or not, so a pod that flaps between ready and unready keeps its in-flight
//! count and its pooled connections.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::{mpsc, watch};

use super::process::ProcessKey;
use crate::{
    proxy::{
        Proxy,
        slots::{Replica, VersionSlots},
        table::RoutingTable,
    },
    spec::{self, PortRef, ReplicaSource},
};

/// What discovery tells the index.
#[derive(Debug)]
pub enum Event {
    /// A whole, validated set of endpoints replacing the previous one.
    Endpoints(Vec<spec::Endpoint>),
    /// A local replica became ready (`true`) or stopped being ready (`false`).
    Replica {
        key: ProcessKey,
        replica: Arc<Replica>,
        ready: bool,
    },
    /// The pods behind a Kubernetes Service changed (from its EndpointSlices).
    Pods {
        service: ServiceKey,
        pods: Arc<ServicePods>,
    },
    /// These pods of a version take no new requests (the autoscaler is about to remove
    /// them); replaces the version's previous set.
    Withdraw {
        version: (String, String),
        addrs: HashSet<SocketAddr>,
    },
}

/// A Service: `(namespace, name)`.
pub type ServiceKey = (String, String);

/// The pods behind one Service, slice by slice (each slice lists its own ports).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServicePods {
    pub slices: Vec<SlicePods>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlicePods {
    /// `(name, number)` of each port of the slice.
    pub ports: Vec<(Option<String>, u16)>,
    /// Each pod address, and whether it takes new requests (ready and not terminating).
    pub addresses: Vec<(IpAddr, bool)>,
}

impl ServicePods {
    /// Every pod address on `port` (`None`: the slice's only port), and whether it takes
    /// new requests. A slice without that port contributes nothing.
    pub fn resolve(&self, port: Option<&PortRef>) -> Vec<(SocketAddr, bool)> {
        let mut out = Vec::new();
        for slice in &self.slices {
            let number = match (port, slice.ports.as_slice()) {
                (None, [(_, n)]) => Some(*n),
                (None, _) => None,
                (Some(PortRef::Number(want)), ports) => {
                    ports.iter().find(|(_, n)| n == want).map(|(_, n)| *n)
                }
                (Some(PortRef::Name(want)), ports) => ports
                    .iter()
                    .find(|(name, _)| name.as_deref() == Some(want.as_str()))
                    .map(|(_, n)| *n),
            };
            if let Some(number) = number {
                out.extend(
                    (slice.addresses.iter()).map(|(ip, ok)| (SocketAddr::new(*ip, number), *ok)),
                );
            }
        }
        out
    }
}

/// Brings `known`, the replicas of a version by address, in line with `pods` on `port`;
/// returns the routable ones. A replica whose address stays keeps its identity.
fn sync_pods(
    pods: Option<&ServicePods>,
    port: Option<&PortRef>,
    known: &mut HashMap<SocketAddr, Arc<Replica>>,
) -> Vec<Arc<Replica>> {
    let addresses = pods.map_or_else(Vec::new, |p| p.resolve(port));
    let mut routable = Vec::new();
    let next: HashMap<SocketAddr, Arc<Replica>> = addresses
        .into_iter()
        .map(|(addr, ok)| {
            let replica = known
                .remove(&addr)
                .unwrap_or_else(|| Arc::new(Replica::new(addr)));
            if ok {
                routable.push(replica.clone());
            }
            (addr, replica)
        })
        .collect();
    *known = next;
    routable
}

/// A version: `(endpoint, version)`.
type VersionKey = (String, String);

/// Whether the reports of replica set `key` count, given the versions the supervisor
/// reports on (see [`Index::local`]).
fn counts(local: &HashMap<VersionKey, Option<ProcessKey>>, key: &ProcessKey) -> bool {
    match local.get(&(key.endpoint.clone(), key.version.clone())) {
        Some(None) => key.is_command(),
        Some(Some(current)) => current == key,
        None => false,
    }
}

pub struct Index {
    proxy: Arc<Proxy>,
    slots: HashMap<VersionKey, Arc<VersionSlots>>,
    /// Ready local replicas, and routable fixed addresses, of each set the supervisor
    /// runs or probes.
    ready: HashMap<ProcessKey, Vec<Arc<Replica>>>,
    /// The pods of every Service discovery reported, used by a version or not yet.
    pods: HashMap<ServiceKey, Arc<ServicePods>>,
    /// The versions each Service serves, with the port they use.
    services: HashMap<ServiceKey, Vec<(VersionKey, Option<PortRef>)>>,
    /// The replicas of each Service-backed version, routable or not, by address.
    pod_replicas: HashMap<VersionKey, HashMap<SocketAddr, Arc<Replica>>>,
    /// Pods of each version withdrawn from routing ahead of their removal.
    withdrawn: HashMap<VersionKey, HashSet<SocketAddr>>,
    /// Whether fixed addresses are routable only once a probe passed, rather than from
    /// the start until probes fail (the supervisor probes them either way and reports
    /// them like local replicas).
    require_ready: bool,
    /// The versions whose replicas the supervisor reports, with the set whose reports
    /// count: `None` for local processes, where every command's set counts (a previous
    /// command's replicas serve until the new command's are ready, then report
    /// themselves gone), or the key of the version's fixed addresses.
    local: HashMap<VersionKey, Option<ProcessKey>>,
    /// The definitions in force, for the supervisor.
    definitions: watch::Sender<Arc<Vec<spec::Endpoint>>>,
    /// Counts published tables, for whoever wants to know a reload took effect.
    generation: watch::Sender<u64>,
}

impl Index {
    /// With `require_ready`, fixed addresses are routable only once a probe passed.
    pub fn new(proxy: Arc<Proxy>, require_ready: bool) -> Self {
        Index {
            proxy,
            slots: HashMap::new(),
            ready: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            pod_replicas: HashMap::new(),
            withdrawn: HashMap::new(),
            require_ready,
            local: HashMap::new(),
            definitions: watch::Sender::new(Arc::new(Vec::new())),
            generation: watch::Sender::new(0),
        }
    }

    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The definitions in force, published whole each time they change.
    pub fn definitions(&self) -> watch::Receiver<Arc<Vec<spec::Endpoint>>> {
        self.definitions.subscribe()
    }

    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Endpoints(endpoints) => self.set_endpoints(endpoints),
            Event::Replica {
                key,
                replica,
                ready,
            } => {
                if !counts(&self.local, &key) {
                    return; // a replica of a set that has since been replaced
                }
                let version = (key.endpoint.clone(), key.version.clone());
                let list = self.ready.entry(key.clone()).or_default();
                list.retain(|r| r.addr != replica.addr);
                if ready {
                    list.push(replica);
                }
                if key.is_command() && list.is_empty() {
                    self.ready.remove(&key);
                }
                if let Some(slots) = self.slots.get(&version) {
                    slots.set_replicas(self.local_replicas(&version));
                }
            }
            Event::Pods { service, pods } => {
                if pods.slices.is_empty() {
                    self.pods.remove(&service);
                } else {
                    self.pods.insert(service.clone(), pods);
                }
                for (version, port) in self.services.get(&service).cloned().into_iter().flatten() {
                    self.sync_version(&service, &version, port.as_ref());
                }
            }
            Event::Withdraw { version, addrs } => {
                self.withdrawn.insert(version.clone(), addrs);
                let service = (self.services.iter())
                    .find(|(_, vs)| vs.iter().any(|(v, _)| *v == version))
                    .map(|(s, vs)| {
                        let port = vs
                            .iter()
                            .find(|(v, _)| *v == version)
                            .and_then(|(_, p)| p.clone());
                        (s.clone(), port)
                    });
                if let Some((service, port)) = service {
                    self.sync_version(&service, &version, port.as_ref());
                }
            }
        }
    }

    /// Brings the routable pods of `version` in line with `service` and what is withdrawn.
    fn sync_version(&mut self, service: &ServiceKey, version: &VersionKey, port: Option<&PortRef>) {
        let routable = self.pod_replicas_of(service, version, port);
        if let Some(slots) = self.slots.get(version) {
            slots.set_replicas(routable);
        }
    }

    /// The routable replicas of `version` on the pods of `service`.
    fn pod_replicas_of(
        &mut self,
        service: &ServiceKey,
        version: &VersionKey,
        port: Option<&PortRef>,
    ) -> Vec<Arc<Replica>> {
        let pods = self.pods.get(service).map(|p| &**p);
        let known = self.pod_replicas.entry(version.clone()).or_default();
        let mut routable = sync_pods(pods, port, known);
        if let Some(withdrawn) = self.withdrawn.get_mut(version) {
            // A withdrawn pod that is gone will not come back under that address.
            withdrawn.retain(|a| known.contains_key(a));
            routable.retain(|r| !withdrawn.contains(&r.addr));
        }
        routable
    }

    /// The ready replicas of every set of `version` the supervisor reports.
    fn local_replicas(&self, version: &VersionKey) -> Vec<Arc<Replica>> {
        (self.ready.iter())
            .filter(|(k, _)| (&k.endpoint, &k.version) == (&version.0, &version.1))
            .flat_map(|(_, list)| list.iter().cloned())
            .collect()
    }

    fn set_endpoints(&mut self, endpoints: Vec<spec::Endpoint>) {
        self.local.clear();
        for ep in &endpoints {
            for v in &ep.versions {
                let version = (ep.name.clone(), v.name.clone());
                let key = ProcessKey::of(ep, v);
                match &v.replicas {
                    ReplicaSource::Command { .. } => {
                        self.local.insert(version, None);
                    }
                    ReplicaSource::Fixed(addrs) => {
                        if !self.require_ready && !self.ready.contains_key(&key) {
                            // Routable from the start, until probes fail.
                            let all = addrs.iter().map(|a| Arc::new(Replica::new(*a)));
                            self.ready.insert(key.clone(), all.collect());
                        }
                        self.local.insert(version, Some(key));
                    }
                    ReplicaSource::Service(_) => {}
                }
            }
        }
        let local = &self.local;
        self.ready.retain(|k, _| counts(local, k));
        self.services.clear();
        for ep in &endpoints {
            for v in &ep.versions {
                if let ReplicaSource::Service(s) = &v.replicas {
                    self.services
                        .entry((s.namespace.clone(), s.service.clone()))
                        .or_default()
                        .push(((ep.name.clone(), v.name.clone()), s.port.clone()));
                }
            }
        }
        let used: HashSet<&VersionKey> = self.services.values().flatten().map(|(v, _)| v).collect();
        self.pod_replicas
            .retain(|version, _| used.contains(version));
        self.withdrawn.retain(|version, _| used.contains(version));

        let mut kept = HashMap::new();
        for ep in &endpoints {
            for v in &ep.versions {
                let id = (ep.name.clone(), v.name.clone());
                let slots = match self.slots.remove(&id) {
                    Some(s) => {
                        s.set_limits(v.slots_per_replica, v.max_pending);
                        s
                    }
                    None => VersionSlots::new(&v.name, v.slots_per_replica, v.max_pending),
                };
                slots.set_replicas(match &v.replicas {
                    ReplicaSource::Fixed(_) | ReplicaSource::Command { .. } => {
                        self.local_replicas(&id)
                    }
                    ReplicaSource::Service(s) => {
                        let service = (s.namespace.clone(), s.service.clone());
                        self.pod_replicas_of(&service, &id, s.port.as_ref())
                    }
                });
                kept.insert(id, slots);
            }
        }
        let metrics = self.proxy.metrics();
        for ((endpoint, version), gone) in self.slots.drain() {
            gone.set_replicas(Vec::new());
            if endpoints.iter().any(|ep| ep.name == endpoint) {
                metrics.forget(&endpoint, Some(&version));
            } else {
                metrics.forget(&endpoint, None);
            }
        }
        self.slots = kept;

        let table = RoutingTable::build(&endpoints, self.proxy.metrics(), |ep, v| {
            self.slots[&(ep.name.clone(), v.name.clone())].clone()
        });
        tracing::info!(endpoints = table.len(), "routing table published");
        self.proxy.publish(table);
        self.definitions.send_replace(Arc::new(endpoints));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Applies events until `stop` turns true.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.apply(event),
                () = crate::until_true(&mut stop) => return,
            }
        }
    }
}
