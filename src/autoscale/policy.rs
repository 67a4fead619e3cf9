//! The scaling decision: a pure function of a version's settings, what was observed since
//! the last decision, and the time (DESIGN.md 1.5).
//!
//! - Need: the replicas that would run the demand at the target utilization,
//!   `ceil(demand / (target x slots per replica))`; never zero while a request is in
//!   flight or waiting.
//! - Up, eagerly: as soon as the need is above the replicas already asked for. Replicas
//!   asked for but still starting count, so a queue that builds while pods start does not
//!   ask again for what is coming.
//! - Down, conservatively: only once the need stayed below for the whole scale-down
//!   delay, and then to the highest need seen in that window.
//! - Always within `[min, max]`.

use std::time::Duration;

use tokio::time::Instant;

/// A version's scaling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    /// Percent of slots busy that is the goal, 1..=100.
    pub target: u32,
    pub slots_per_replica: u32,
    pub scale_down_delay: Duration,
}

/// What a version's policy remembers between decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The replicas asked for (ready or starting).
    pub desired: u32,
    /// Since when the need has stayed below `desired`, and its peak since then.
    lower: Option<(Instant, u32)>,
}

impl State {
    pub fn new(desired: u32) -> Self {
        State {
            desired,
            lower: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The need is above what was asked for.
    Up,
    /// The need stayed below for the whole delay.
    Down,
    /// The need is below, for less than the delay so far.
    Waiting,
    /// The settings moved `[min, max]` past what was asked for.
    Limits,
    /// Nothing to change.
    Steady,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Up => "demand above target",
            Reason::Down => "demand below target for the whole delay",
            Reason::Waiting => "demand below target, waiting out the delay",
            Reason::Limits => "min/max changed",
            Reason::Steady => "steady",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub desired: u32,
    /// Replicas the demand needs now, before the `[min, max]` clamp.
    pub need: u32,
    /// The highest need while it stays below `desired` (what a scale-down would keep).
    pub window_peak: u32,
    pub reason: Reason,
}

/// Replicas that run `demand` concurrent requests with `target`% of their slots busy.
pub fn need(demand: u32, target: u32, slots_per_replica: u32) -> u32 {
    let per_replica = u64::from(target.clamp(1, 100)) * u64::from(slots_per_replica.max(1));
    let n = (u64::from(demand) * 100).div_ceil(per_replica);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decides the replica count from `demand`, the highest number of requests in flight plus
/// waiting seen since the last decision.
pub fn decide(s: &Settings, state: &mut State, demand: u32, now: Instant) -> Decision {
    let need = need(demand, s.target, s.slots_per_replica);
    let want = need.clamp(s.min, s.max.max(s.min));
    let decision = |state: &State, reason| Decision {
        desired: state.desired,
        need,
        window_peak: state.lower.map_or(want, |(_, peak)| peak),
        reason,
    };
    let bounded = state.desired.clamp(s.min, s.max.max(s.min));
    if bounded != state.desired {
        state.desired = bounded;
        state.lower = None;
        if want <= bounded {
            return decision(state, Reason::Limits);
        }
    }
    if want > state.desired {
        state.desired = want;
        state.lower = None;
        return decision(state, Reason::Up);
    }
    if want == state.desired {
        state.lower = None;
        return decision(state, Reason::Steady);
    }
    let (since, peak) = state.lower.get_or_insert((now, want));
    *peak = (*peak).max(want);
    if now.duration_since(*since) < s.scale_down_delay {
        return decision(state, Reason::Waiting);
    }
    let peak = *peak;
    let d = decision(state, Reason::Down);
    state.desired = peak;
    state.lower = None;
    Decision { desired: peak, ..d }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        min: 1,
        max: 10,
        target: 70,
        slots_per_replica: 1,
        scale_down_delay: Duration::from_secs(60),
    };

    /// Runs `demands`, one decision per second, returning the desired count after each.
    fn run(s: &Settings, start: u32, demands: &[u32]) -> Vec<u32> {
        let t0 = Instant::now();
        let mut state = State::new(start);
        (demands.iter().enumerate())
            .map(|(i, d)| decide(s, &mut state, *d, t0 + Duration::from_secs(i as u64)).desired)
            .collect()
    }

    #[test]
    fn need_follows_azureml_sizing() {
        // 20 requests/s of 10 s each: 200 in flight; at 70 % with one slot, 286 replicas.
        assert_eq!(need(200, 70, 1), 286);
        assert_eq!(need(0, 70, 1), 0);
        assert_eq!(need(1, 70, 1), 2, "one request at 70 % wants 1.43 replicas");
        assert_eq!(need(1, 100, 4), 1);
        assert_eq!(need(8, 100, 4), 2);
        let wide = Settings {
            max: 1000,
            ..SETTINGS
        };
        assert_eq!(run(&wide, 1, &[200]), [286]);
    }

    #[test]
    fn steady_load_holds() {
        assert_eq!(run(&SETTINGS, 3, &[2, 2, 2, 2]), [3, 3, 3, 3]);
    }

    #[test]
    fn a_step_up_is_answered_at_the_next_decision() {
        assert_eq!(run(&SETTINGS, 1, &[0, 1, 5, 5]), [1, 2, 8, 8]);
    }

    #[test]
    fn a_spike_shorter_than_the_window_scales_up_then_holds_for_the_delay() {
        let mut demands = vec![6];
        demands.extend([0; 61]);
        let desired = run(&SETTINGS, 1, &demands);
        assert_eq!(desired[0], 9, "up at once");
        assert!(desired[1..60].iter().all(|d| *d == 9), "{desired:?}");
        assert_eq!(
            desired[61], 1,
            "down to the window's peak once the delay passed"
        );
    }

    #[test]
    fn a_slow_ramp_down_steps_to_the_peak_of_each_window() {
        let s = Settings {
            scale_down_delay: Duration::from_secs(10),
            ..SETTINGS
        };
        // Demand 7 (need 10), then 5 (need 8) for 10 s, then 3 (need 5) for 10 s.
        let mut demands = vec![7];
        demands.extend([5; 11]);
        demands.extend([3; 11]);
        let desired = run(&s, 1, &demands);
        assert_eq!(desired[0], 10);
        assert_eq!(desired[10], 10, "not before the delay");
        assert_eq!(desired[11], 8);
        assert_eq!(desired[22], 5);
    }

    #[test]
    fn flapping_demand_does_not_flap_the_count() {
        let demands: Vec<u32> = (0..120).map(|i| if i % 2 == 0 { 5 } else { 1 }).collect();
        let desired = run(&SETTINGS, 1, &demands);
        assert!(desired.iter().all(|d| *d == 8), "{desired:?}");
    }

    #[test]
    fn min_and_max_clamp_and_waiting_requests_keep_a_replica() {
        let s = Settings {
            min: 0,
            max: 4,
            scale_down_delay: Duration::ZERO,
            ..SETTINGS
        };
        assert_eq!(run(&s, 0, &[100, 0, 1]), [4, 0, 2]);
        let floor = Settings { min: 3, ..s };
        assert_eq!(run(&floor, 1, &[0]), [3], "raised to min");
        let mut state = State::new(9);
        let d = decide(&floor, &mut state, 0, Instant::now());
        assert_eq!((d.desired, d.reason), (4, Reason::Limits), "lowered to max");
    }

    #[test]
    fn replicas_slow_to_start_are_not_asked_for_again() {
        // Demand stays at 10 while the replicas asked for start: the count is 15 once.
        let desired = run(&SETTINGS, 1, &[10, 10, 10, 10]);
        assert_eq!(desired, [10, 10, 10, 10]);
        let big = Settings {
            max: 100,
            ..SETTINGS
        };
        assert_eq!(run(&big, 1, &[10, 10, 10]), [15, 15, 15]);
    }
}
