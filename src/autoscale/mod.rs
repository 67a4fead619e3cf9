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
}

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
        let mut tracked: HashMap<(String, String), Tracked> = HashMap::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::until_true(&mut stop) => return,
            }
            self.step(&mut tracked, Instant::now());
        }
    }

    /// One sample of every version, and a decision for those whose refresh came.
    fn step(&self, tracked: &mut HashMap<(String, String), Tracked>, now: Instant) {
        let table = self.proxy.table();
        let metrics = self.proxy.metrics();
        let mut seen = Vec::new();
        for ep in table.endpoints() {
            for v in ep.versions() {
                let Some(a) = v.spec.autoscale else { continue };
                let Some(target) = Target::of(&ep.name, &v.spec) else {
                    continue;
                };
                let key = (ep.name.clone(), v.name().to_owned());
                seen.push(key.clone());
                let t = tracked.entry(key).or_insert_with(|| Tracked {
                    target: target.clone(),
                    route: v.clone(),
                    state: None,
                    peak: 0,
                    next: now,
                    asked: None,
                });
                if t.target != target {
                    // Another command or Deployment: a new set, counted afresh.
                    *t = Tracked {
                        target,
                        route: v.clone(),
                        state: None,
                        peak: 0,
                        next: now,
                        asked: None,
                    };
                }
                t.route = v.clone();
                let demand = v.slots.in_flight() + v.slots.queued();
                t.peak = t.peak.max(u32::try_from(demand).unwrap_or(u32::MAX));
                if now < t.next {
                    continue;
                }
                t.next = now + a.refresh;
                self.decide(&ep.name, t, a, now);
            }
        }
        tracked.retain(|key, _| {
            let keep = seen.contains(key);
            if !keep {
                metrics.forget_autoscaled(&key.0, &key.1);
            }
            keep
        });
        let desired: Desired = (tracked.iter())
            .filter_map(|(key, t)| Some((key.clone(), t.state.as_ref()?.desired)))
            .collect();
        self.desired.send_if_modified(|old| {
            let changed = **old != desired;
            if changed {
                *old = Arc::new(desired);
            }
            changed
        });
    }

    fn decide(&self, endpoint: &str, t: &mut Tracked, a: spec::Autoscale, now: Instant) {
        let v = &t.route;
        let initial = match &v.spec.replicas {
            ReplicaSource::Command { count, .. } => *count,
            _ => a.min_replicas,
        };
        let Some(current) = (match &t.state {
            Some(s) => Some(s.desired),
            None => self.actuator.current(&t.target, initial),
        }) else {
            return; // the count in force is not known yet
        };
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
    }
}
