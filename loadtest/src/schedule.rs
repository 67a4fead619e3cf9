//! Which request goes next, and when.
//!
//! Every in-flight slot (a connection, or an h2 stream) runs [`drive`]: it claims the
//! next request index from the shared [`Claims`], waits for that request's intended send
//! time (open loop only), sends it, and records its timing. Slots claim indices in order
//! as soon as they are free, so in open loop a request whose intended time comes while
//! every slot is busy is taken by the first slot to free up and sent at once: its wait
//! for a connection counts in its latency, which is measured from the intended send time
//! `t0 + i / rate`, not from when it was sent (no coordinated omission).

use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// The request budget shared by every slot of one phase (warmup or the measured run).
#[derive(Debug)]
pub struct Claims {
    next: AtomicU64,
    stopped: AtomicBool,
    t0: Instant,
    requests: u64,
    duration: Option<Duration>,
    rate: Option<f64>,
}

/// One claimed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub index: u64,
    /// When the request should be sent (open loop); `None` in closed loop: at once.
    pub intended: Option<Instant>,
    /// When a slot took it.
    pub claimed: Instant,
}

/// When a request was due, taken, sent and answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub intended: Option<Instant>,
    pub claimed: Instant,
    pub sent: Instant,
    pub done: Instant,
}

impl Timing {
    /// Latency as the client sees it: from the intended send time in open loop (so a
    /// request that waited for a slot, or for a slow generator, is charged for the wait),
    /// from the send in closed loop.
    pub fn latency(&self) -> Duration {
        self.done
            .saturating_duration_since(self.intended.unwrap_or(self.sent))
    }

    /// How long after its intended time the request actually left (open loop).
    pub fn lag(&self) -> Option<Duration> {
        self.intended
            .map(|t| self.sent.saturating_duration_since(t))
    }

    /// True when no slot was free at the intended send time: the request had to wait
    /// for one.
    pub fn waited_for_slot(&self) -> bool {
        self.intended.is_some_and(|t| self.claimed > t)
    }
}

/// Offset of request `i` from the start at `rate` requests per second.
pub fn offset(rate: f64, i: u64) -> Duration {
    Duration::from_nanos((i as f64 * 1e9 / rate).round() as u64)
}

impl Claims {
    /// Closed loop: up to `requests` requests (None: unlimited) sent back to back, none
    /// claimed after `t0 + duration`.
    pub fn closed(t0: Instant, requests: Option<u64>, duration: Option<Duration>) -> Self {
        Self::new(t0, requests, duration, None)
    }

    /// Open loop: request `i` is due at `t0 + i / rate`, for the first `requests` of them
    /// and those due before `t0 + duration`.
    pub fn open(t0: Instant, rate: f64, requests: Option<u64>, duration: Option<Duration>) -> Self {
        assert!(rate.is_finite() && rate > 0.0, "rate must be positive");
        Self::new(t0, requests, duration, Some(rate))
    }

    fn new(
        t0: Instant,
        requests: Option<u64>,
        duration: Option<Duration>,
        rate: Option<f64>,
    ) -> Self {
        Claims {
            next: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            t0,
            requests: requests.unwrap_or(u64::MAX),
            duration,
            rate,
        }
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// The intended send time of request `i` (open loop).
    pub fn intended(&self, i: u64) -> Option<Instant> {
        self.rate.map(|r| self.t0 + offset(r, i))
    }

    /// How many requests the schedule holds, if that is known up front.
    pub fn planned(&self) -> Option<u64> {
        match (self.rate, self.duration) {
            (Some(rate), Some(d)) => {
                // The indices i with offset(i) < d, as `claim` counts them.
                let mut n = (d.as_secs_f64() * rate).ceil() as u64;
                while n > 0 && offset(rate, n - 1) >= d {
                    n -= 1;
                }
                while offset(rate, n) < d {
                    n += 1;
                }
                Some(n.min(self.requests))
            }
            _ => (self.requests != u64::MAX).then_some(self.requests),
        }
    }

    /// How long the schedule runs, if that is known up front.
    pub fn planned_duration(&self) -> Option<Duration> {
        match self.rate {
            Some(rate) => {
                let by_count = (self.requests != u64::MAX).then(|| offset(rate, self.requests));
                match (by_count, self.duration) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            None => self.duration,
        }
    }

    /// Stops the schedule: no more claims succeed.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Takes the next request, or None when the budget or the time is spent.
    pub fn claim(&self, now: Instant) -> Option<Claim> {
        if self.is_stopped() {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.requests {
            return None;
        }
        let intended = match self.rate {
            Some(rate) => {
                let off = offset(rate, index);
                if self.duration.is_some_and(|d| off >= d) {
                    return None;
                }
                Some(self.t0 + off)
            }
            None => {
                if self.duration.is_some_and(|d| now >= self.t0 + d) {
                    return None;
                }
                None
            }
        };
        Some(Claim {
            index,
            intended,
            claimed: now,
        })
    }
}

/// One in-flight slot: sends a request and records what happened.
pub trait Slot {
    type Outcome;
    fn send(&mut self) -> impl Future<Output = Self::Outcome>;
    fn record(&mut self, timing: &Timing, outcome: Self::Outcome);
}

/// Waits until an instant.
pub trait Pacer {
    fn sleep_until(&mut self, t: Instant) -> impl Future<Output = ()>;
}

/// The runtime's own timer (millisecond ticks).
pub struct TokioPacer;

impl Pacer for TokioPacer {
    async fn sleep_until(&mut self, t: Instant) {
        tokio::time::sleep_until(t).await
    }
}

/// Runs one slot until the claims run out; returns how many requests it sent.
pub async fn drive<S: Slot, P: Pacer>(claims: &Claims, slot: &mut S, pacer: &mut P) -> u64 {
    let mut sent = 0;
    while let Some(claim) = claims.claim(Instant::now()) {
        if let Some(t) = claim.intended {
            if t > Instant::now() {
                pacer.sleep_until(t).await;
            }
            if claims.is_stopped() {
                break;
            }
        }
        let start = Instant::now();
        let outcome = slot.send().await;
        let timing = Timing {
            intended: claim.intended,
            claimed: claim.claimed,
            sent: start,
            done: Instant::now(),
        };
        slot.record(&timing, outcome);
        sent += 1;
    }
    sent
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;

    #[test]
    fn intended_times_follow_the_rate() {
        let t0 = Instant::now();
        let c = Claims::open(t0, 500.0, None, None);
        assert_eq!(c.intended(0), Some(t0));
        assert_eq!(c.intended(1), Some(t0 + Duration::from_millis(2)));
        assert_eq!(c.intended(500), Some(t0 + Duration::from_secs(1)));
        // No drift over a long run: the offset is computed from the index, not summed.
        let c = Claims::open(t0, 3.0, None, None);
        assert_eq!(
            c.intended(3_000_000),
            Some(t0 + Duration::from_secs(1_000_000))
        );
        assert_eq!(c.intended(1), Some(t0 + Duration::from_nanos(333_333_333)));
        assert_eq!(Claims::closed(t0, None, None).intended(5), None);
    }

    #[test]
    fn open_loop_claims_stop_at_the_duration_or_the_count() {
        let t0 = Instant::now();
        let c = Claims::open(t0, 500.0, None, Some(Duration::from_secs(1)));
        assert_eq!(c.planned(), Some(500));
        assert_eq!(c.planned_duration(), Some(Duration::from_secs(1)));
        let mut n = 0;
        // Claims do not depend on the current time in open loop: late requests are still
        // sent (and charged for their lateness).
        let late = t0 + Duration::from_secs(30);
        while let Some(claim) = c.claim(late) {
            assert_eq!(claim.index, n);
            assert_eq!(claim.intended, c.intended(n));
            n += 1;
        }
        assert_eq!(n, 500);
        assert!(c.claim(t0).is_none());

        let c = Claims::open(t0, 500.0, Some(120), Some(Duration::from_secs(1)));
        assert_eq!(c.planned(), Some(120));
        assert_eq!(c.planned_duration(), Some(Duration::from_millis(240)));
        assert_eq!(std::iter::from_fn(|| c.claim(t0)).count(), 120);

        // A fractional rate: 2.5/s for 1 s holds t = 0 and 0.4 and 0.8.
        let c = Claims::open(t0, 2.5, None, Some(Duration::from_secs(1)));
        assert_eq!(c.planned(), Some(3));
        assert_eq!(std::iter::from_fn(|| c.claim(t0)).count(), 3);
    }

    #[test]
    fn closed_loop_claims_stop_at_the_count_or_the_deadline() {
        let t0 = Instant::now();
        let c = Claims::closed(t0, Some(3), None);
        assert_eq!(c.planned(), Some(3));
        assert_eq!(std::iter::from_fn(|| c.claim(t0)).count(), 3);

        let c = Claims::closed(t0, None, Some(Duration::from_secs(2)));
        assert_eq!(c.planned(), None);
        assert!(c.claim(t0 + Duration::from_millis(1999)).is_some());
        assert!(c.claim(t0 + Duration::from_secs(2)).is_none());

        let c = Claims::closed(t0, Some(10), None);
        assert!(c.claim(t0).is_some());
        c.stop();
        assert!(c.claim(t0).is_none());
    }

    #[test]
    fn latency_counts_from_the_intended_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let t = Timing {
            intended: Some(t0 + ms(10)),
            claimed: t0 + ms(25),
            sent: t0 + ms(30),
            done: t0 + ms(31),
        };
        assert_eq!(t.latency(), ms(21));
        assert_eq!(t.lag(), Some(ms(20)));
        assert!(t.waited_for_slot());

        let closed = Timing {
            intended: None,
            ..t
        };
        assert_eq!(closed.latency(), ms(1));
        assert_eq!(closed.lag(), None);
        assert!(!closed.waited_for_slot());

        let early = Timing {
            intended: Some(t0 + ms(10)),
            claimed: t0,
            sent: t0 + ms(10),
            done: t0 + ms(12),
        };
        assert_eq!(early.latency(), ms(2));
        assert_eq!(early.lag(), Some(Duration::ZERO));
        assert!(!early.waited_for_slot());
    }

    /// A slot against a simulated server that takes `service` per request.
    struct SimSlot {
        service: Duration,
        log: Rc<RefCell<Vec<Timing>>>,
    }

    impl Slot for SimSlot {
        type Outcome = ();
        async fn send(&mut self) {
            tokio::time::sleep(self.service).await;
        }
        fn record(&mut self, timing: &Timing, _: ()) {
            self.log.borrow_mut().push(*timing);
        }
    }

    /// Runs `slots` slots at `rate` for `n` requests against a server taking `service_ms`,
    /// on the runtime's paused clock; returns latencies (ms) in index order and timings.
    async fn simulate(slots: usize, rate: f64, n: u64, service_ms: u64) -> (Vec<u64>, Vec<Timing>) {
        let t0 = Instant::now();
        let claims = Claims::open(t0, rate, Some(n), None);
        let log = Rc::new(RefCell::new(Vec::new()));
        let runs = (0..slots).map(|_| {
            let mut slot = SimSlot {
                service: Duration::from_millis(service_ms),
                log: log.clone(),
            };
            let claims = &claims;
            async move { drive(claims, &mut slot, &mut TokioPacer).await }
        });
        let sent: u64 = futures_join(runs.collect()).await.iter().sum();
        assert_eq!(sent, n);
        let mut timings = log.borrow().clone();
        timings.sort_by_key(|t| t.intended);
        let lat = timings
            .iter()
            .map(|t| t.latency().as_millis() as u64)
            .collect();
        (lat, timings)
    }

    /// Joins futures on one task (no spawn, so they may borrow).
    async fn futures_join<F: Future<Output = u64>>(futs: Vec<F>) -> Vec<u64> {
        let mut futs: Vec<_> = futs.into_iter().map(Box::pin).map(Some).collect();
        let mut out = vec![0; futs.len()];
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (i, f) in futs.iter_mut().enumerate() {
                if let Some(fut) = f {
                    match fut.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            out[i] = v;
                            *f = None;
                        }
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out
    }

    #[tokio::test(start_paused = true)]
    async fn enough_slots_means_no_queueing() {
        // 100/s (every 10 ms), 25 ms each, 3 slots: at most 3 in flight, never all busy.
        let (lat, timings) = simulate(3, 100.0, 20, 25).await;
        assert!(lat.iter().all(|&l| l == 25), "{lat:?}");
        assert!(timings.iter().all(|t| !t.waited_for_slot()));
        assert!(timings.iter().all(|t| t.lag() == Some(Duration::ZERO)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_slot_charges_the_wait_to_the_request() {
        // 100/s (every 10 ms), 25 ms each, one slot: request i is sent at 25 i ms but was
        // due at 10 i ms, so it waits 15 i ms, then takes 25.
        let (lat, timings) = simulate(1, 100.0, 6, 25).await;
        assert_eq!(lat, vec![25, 40, 55, 70, 85, 100]);
        // Measured from the send, every request would have looked like 25 ms.
        assert!(timings.iter().all(|t| (t.done - t.sent).as_millis() == 25));
        assert_eq!(timings.iter().filter(|t| t.waited_for_slot()).count(), 5);
        assert_eq!(timings[5].lag(), Some(Duration::from_millis(75)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_free_slot_takes_the_oldest_waiting_request() {
        // 200/s (every 5 ms), 12 ms each, two slots. Sends at 0, 5, then 12 (due 10),
        // 17 (due 15), 24 (due 20), 29 (due 25): the backlog grows by 1 ms per request.
        let (lat, _) = simulate(2, 200.0, 6, 12).await;
        assert_eq!(lat, vec![12, 12, 14, 14, 16, 16]);
    }
}
