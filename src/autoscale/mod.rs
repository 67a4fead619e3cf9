//! The autoscaler: each version's replica count follows how busy its replicas are
//! (DESIGN.md 1.5).
//!
//! One task samples every autoscaled version's demand (requests in flight plus waiting,
//! read from its [`VersionSlots`](crate::proxy::slots::VersionSlots), never from the
//! request path) several times per refresh, so a burst shorter than a refresh is seen;
//! each refresh the pure [`policy`] decides from the peak, and an [`Actuator`] applies the
//! count: the process supervisor for local replicas, the Deployment's `scale` subresource
//! in a cluster. The autoscaler owns the decisions; it never starts or stops anything
//! itself.

pub mod actuator;
pub mod kube;
pub mod policy;

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

pub use actuator::{Actuator, Target};
use policy::{Reason, Settings, State};

use crate::{
    discovery::kubernetes::Desired,
    proxy::{Proxy, table::VersionRoute},
    spec::{self, ReplicaSource},
};

/// How often demand is sampled; a refresh is at least a second, so at least four samples
/// go into each decision.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One autoscaled version as the autoscaler follows it.
struct Tracked {
    target: Target,
    /// Where its routing lives now; replaced when a table swap brings new settings.
    route: Arc<VersionRoute>,
    /// `None` until the replica count in force is known.
    state: Option<State>,
    /// Highest demand sampled since the last decision.
    peak: u32,
    next: Instant,
    /// What the actuator was last asked for.
    asked: Option<u32>,
    /// The last step that saw the version in the routing table.
    seen: u64,
}

/// The versions followed, by endpoint and version name.
type Versions = HashMap<String, HashMap<String, Tracked>>;

/// Follows every autoscaled version of the routing table. Owned by its task.
pub struct Autoscaler {
    pub proxy: Arc<Proxy>,
    pub actuator: Arc<dyn Actuator>,
    /// The count asked for each version, for whoever reports it (the status writer).
    pub desired: watch::Sender<Arc<Desired>>,
}

impl Autoscaler {
    /// Samples and decides until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tracked = Versions::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for step in 1.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::until_true(&mut stop) => return,
            }
            self.step(&mut tracked, step, Instant::now());
        }
    }

    /// One sample of every version, and a decision for those whose refresh came. A step
    /// allocates nothing unless the table or a count changed: with thousands of versions
    /// it runs four times a second.
    fn step(&self, tracked: &mut Versions, step: u64, now: Instant) {
        let table = self.proxy.table();
        let mut changed = false;
        for ep in table.endpoints() {
            for v in ep.versions() {
                let Some(a) = v.spec.autoscale else { continue };
                if !tracked.contains_key(&ep.name) {
                    tracked.insert(ep.name.clone(), HashMap::new());
                }
                let versions = tracked.get_mut(&ep.name).expect("inserted above");
                if versions
                    .get(v.name())
                    .is_none_or(|t| !Arc::ptr_eq(&t.route, v))
                {
                    // A new table: the version may have another command or Deployment.
                    let Some(target) = Target::of(&ep.name, &v.spec) else {
                        continue;
                    };
                    match versions.get_mut(v.name()) {
                        Some(t) if t.target == target => t.route = v.clone(),
                        _ => {
                            let fresh = Tracked {
                                target,
                                route: v.clone(),
                                state: None,
                                peak: 0,
                                next: now,
                                asked: None,
                                seen: step,
                            };
                            versions.insert(v.name().to_owned(), fresh);
                            changed = true;
                        }
                    }
                }
                let t = versions.get_mut(v.name()).expect("tracked above");
                t.seen = step;
                let demand = v.slots.in_flight() + v.slots.queued();
                t.peak = t.peak.max(u32::try_from(demand).unwrap_or(u32::MAX));
                if now < t.next {
                    continue;
                }
                t.next = now + a.refresh;
                changed |= self.decide(&ep.name, t, a, now);
            }
        }
        let metrics = self.proxy.metrics();
        tracked.retain(|endpoint, versions| {
            versions.retain(|version, t| {
                let keep = t.seen == step;
                if !keep {
                    metrics.forget_autoscaled(endpoint, version);
                    changed = true;
                }
                keep
            });
            !versions.is_empty()
        });
        if changed {
            let desired: Desired = (tracked.iter())
                .flat_map(|(endpoint, versions)| {
                    (versions.iter()).filter_map(move |(version, t)| {
                        Some((
                            (endpoint.clone(), version.clone()),
                            t.state.as_ref()?.desired,
                        ))
                    })
                })
                .collect();
            self.desired.send_replace(Arc::new(desired));
        }
    }

    /// Decides the count of one version; returns whether it changed (or became known).
    fn decide(&self, endpoint: &str, t: &mut Tracked, a: spec::Autoscale, now: Instant) -> bool {
        let v = &t.route;
        let initial = match &v.spec.replicas {
            ReplicaSource::Command { count, .. } => *count,
            _ => a.min_replicas,
        };
        let Some(current) = (match &t.state {
            Some(s) => Some(s.desired),
            None => self.actuator.current(&t.target, initial),
        }) else {
            return false; // the count in force is not known yet
        };
        let known = t.state.is_some();
        let state = t.state.get_or_insert_with(|| State::new(current));
        let settings = Settings {
            min: a.min_replicas,
            max: a.max_replicas,
            target: a.target_utilization,
            slots_per_replica: v.spec.slots_per_replica,
            scale_down_delay: a.scale_down_delay,
        };
        let demand = std::mem::take(&mut t.peak);
        let before = state.desired;
        let d = policy::decide(&settings, state, demand, now);
        let ready = v.slots.replicas().len() as u32;
        let slots = f64::from(ready.max(1) * v.spec.slots_per_replica.max(1));
        let utilization = f64::from(demand) / slots;
        let metrics = self.proxy.metrics();
        metrics.set_autoscaled(endpoint, v.name(), utilization, d.desired);
        let starting = d.desired.saturating_sub(ready);
        if d.desired != before {
            let direction = if d.desired > before { "up" } else { "down" };
            metrics.count_scale_event(endpoint, v.name(), direction);
        }
        macro_rules! decision {
            ($level:ident) => {
                tracing::$level!(
                    endpoint,
                    version = v.name(),
                    demand,
                    ready,
                    starting,
                    window_peak = d.window_peak,
                    need = d.need,
                    from = before,
                    desired = d.desired,
                    reason = d.reason.as_str(),
                    "autoscale decision"
                )
            };
        }
        match d.reason {
            Reason::Steady | Reason::Waiting => decision!(debug),
            Reason::Up | Reason::Down | Reason::Limits => decision!(info),
        }
        if t.asked != Some(d.desired) {
            t.asked = Some(d.desired);
            self.actuator.scale(&t.target, d.desired, &v.slots);
        }
        !known || d.desired != before
    }
}
