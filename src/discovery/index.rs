//! The index: folds discovery events into its state and publishes routing tables.
//!
//! It owns the identity of capacity: one [`VersionSlots`] per (endpoint, version), kept
//! across reloads, so in-flight counts and queues survive a table swap; a version that
//! disappears has its replicas withdrawn (its running requests finish). Replica membership
//! is published into each version's slots directly; a new table is built only when the
//! endpoint definitions change.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tokio::sync::{mpsc, watch};

use super::process::{ProcessKey, Supervisor};
use crate::{
    proxy::{
        Proxy,
        slots::{Replica, VersionSlots},
        table::RoutingTable,
    },
    spec::{self, ReplicaSource},
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
}

pub struct Index {
    proxy: Arc<Proxy>,
    slots: HashMap<(String, String), Arc<VersionSlots>>,
    /// Ready local replicas of each process set.
    ready: HashMap<ProcessKey, Vec<Arc<Replica>>>,
    supervisor: Supervisor,
    /// Counts published tables, for whoever wants to know a reload took effect.
    generation: watch::Sender<u64>,
}

impl Index {
    /// `workdir` is where replica commands run (the endpoints file's folder).
    pub fn new(proxy: Arc<Proxy>, workdir: PathBuf, events: mpsc::UnboundedSender<Event>) -> Self {
        Index {
            proxy,
            slots: HashMap::new(),
            ready: HashMap::new(),
            supervisor: Supervisor::new(workdir, events),
            generation: watch::Sender::new(0),
        }
    }

    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Endpoints(endpoints) => self.set_endpoints(endpoints),
            Event::Replica {
                key,
                replica,
                ready,
            } => {
                if !self.supervisor.is_current(&key) {
                    return; // a replica of a set that has since been replaced
                }
                let list = self.ready.entry(key.clone()).or_default();
                list.retain(|r| !Arc::ptr_eq(r, &replica));
                if ready {
                    list.push(replica);
                }
                if let Some(slots) = self.slots.get(&(key.endpoint.clone(), key.version.clone())) {
                    slots.set_replicas(list.clone());
                }
            }
        }
    }

    fn set_endpoints(&mut self, endpoints: Vec<spec::Endpoint>) {
        self.supervisor.reconcile(&endpoints);
        self.ready.retain(|k, _| self.supervisor.is_current(k));

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
                    ReplicaSource::Fixed(addrs) => {
                        addrs.iter().map(|a| Arc::new(Replica::new(*a))).collect()
                    }
                    ReplicaSource::Command { .. } => self
                        .ready
                        .get(&ProcessKey::of(ep, v))
                        .cloned()
                        .unwrap_or_default(),
                });
                kept.insert(id, slots);
            }
        }
        for (_, gone) in self.slots.drain() {
            gone.set_replicas(Vec::new());
        }
        self.slots = kept;

        let table = RoutingTable::build(&endpoints, self.proxy.metrics(), |ep, v| {
            self.slots[&(ep.name.clone(), v.name.clone())].clone()
        });
        tracing::info!(endpoints = table.len(), "routing table published");
        self.proxy.publish(table);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Applies events until `stop` turns true, then stops every local replica.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.apply(event),
                () = crate::until_true(&mut stop) => break,
            }
        }
        self.supervisor.shutdown().await;
    }
}
