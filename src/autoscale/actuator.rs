//! Actuators: what applies a replica count the autoscaler decided.
//!
//! One small trait, asked without waiting: an actuator applies a count in the background
//! (retrying as it must) so a slow API server never holds up the decisions of other
//! versions.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{
    discovery::process::{ProcessKey, Scale},
    proxy::slots::VersionSlots,
    spec,
};

/// What a version's replica count is set on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Local processes the supervisor runs.
    Local(ProcessKey),
    /// A Deployment in a cluster, running the pods of `version` of `endpoint`.
    Deployment {
        namespace: String,
        name: String,
        endpoint: String,
        version: String,
    },
}

impl Target {
    /// The target of `v`, if its replica count is the router's to set.
    pub fn of(endpoint: &str, v: &spec::Version) -> Option<Target> {
        match &v.replicas {
            spec::ReplicaSource::Command { template, .. } => Some(Target::Local(ProcessKey {
                endpoint: endpoint.to_owned(),
                version: v.name.clone(),
                source: template.clone(),
            })),
            spec::ReplicaSource::Service(s) => Some(Target::Deployment {
                namespace: s.namespace.clone(),
                name: s.deployment.clone(),
                endpoint: endpoint.to_owned(),
                version: v.name.clone(),
            }),
            spec::ReplicaSource::Fixed(_) => None,
        }
    }
}

pub trait Actuator: Send + Sync {
    /// The replica count in force for `target`, once known; `initial` is what the
    /// definitions start it at.
    fn current(&self, target: &Target, initial: u32) -> Option<u32>;

    /// Asks for `replicas` of `target`, whose requests `slots` accounts (to remove the
    /// least busy replicas when scaling down).
    fn scale(&self, target: &Target, replicas: u32, slots: &Arc<VersionSlots>);
}

/// Sets counts on the local process supervisor and, in a cluster, on Deployments.
pub struct Actuators {
    /// The supervisor's scale requests.
    pub local: mpsc::UnboundedSender<Scale>,
    /// Deployments; `None` without a cluster.
    pub cluster: Option<Box<dyn Actuator>>,
}

impl Actuator for Actuators {
    fn current(&self, target: &Target, initial: u32) -> Option<u32> {
        match target {
            // The supervisor starts a set at its initial count.
            Target::Local(_) => Some(initial),
            Target::Deployment { .. } => self.cluster.as_ref()?.current(target, initial),
        }
    }

    fn scale(&self, target: &Target, replicas: u32, slots: &Arc<VersionSlots>) {
        match target {
            Target::Local(key) => {
                let _ = self.local.send(Scale {
                    key: key.clone(),
                    replicas,
                });
            }
            Target::Deployment { .. } => {
                if let Some(cluster) = &self.cluster {
                    cluster.scale(target, replicas, slots);
                }
            }
        }
    }
}

/// Decides and reports, and changes nothing (`autoscaler.dryRun`).
pub struct DryRun<A>(pub A);

impl<A: Actuator> Actuator for DryRun<A> {
    fn current(&self, target: &Target, initial: u32) -> Option<u32> {
        self.0.current(target, initial)
    }

    fn scale(&self, target: &Target, replicas: u32, _: &Arc<VersionSlots>) {
        tracing::info!(?target, replicas, "autoscaler dry run: not applied");
    }
}
