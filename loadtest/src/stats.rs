//! The recorder every slot reports to: HDR histograms in microseconds, counters, and a
//! per-second timeline rolled by the ticker.

use std::{collections::BTreeMap, fmt::Display, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::schedule::Timing;

/// Longest latency a histogram holds (one hour, in microseconds); longer ones saturate.
pub const MAX_US: u64 = 3_600_000_000;

/// A microsecond histogram with three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Whole microseconds, at least 1 (the histogram's lowest bucket).
pub fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(MAX_US)) as u64).max(1)
}

/// One second (roughly: one tick of the ticker) of the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// End of the interval, seconds since the start of the measured run.
    pub t: f64,
    /// Length of the interval in seconds.
    pub dt: f64,
    /// Responses received in the interval (any status).
    pub responses: u64,
    pub throughput_rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Transport errors (no response) in the interval.
    pub errors: u64,
    /// Responses with a status outside 2xx.
    pub non_2xx: u64,
}

struct Interval {
    latency: Histogram<u64>,
    errors: u64,
    non_2xx: u64,
}

impl Interval {
    fn new() -> Self {
        Interval {
            // Two significant digits are plenty for a per-second p99 and keep it small.
            latency: Histogram::new_with_bounds(1, MAX_US, 2).expect("valid histogram bounds"),
            errors: 0,
            non_2xx: 0,
        }
    }
}

/// A transport error kind with its count and the first message seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub count: u64,
    pub example: String,
}

pub struct Recorder {
    t0: Instant,
    late_threshold: Duration,
    pub latency: Histogram<u64>,
    /// Open loop: how long after its intended time each request left.
    pub lag: Histogram<u64>,
    /// Time to open a connection: TCP, TLS and the HTTP/2 preface.
    pub connect: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    versions: Vec<(Vec<u8>, u64)>,
    pub errors: BTreeMap<&'static str, ErrorCount>,
    /// Open loop: sent more than `late_threshold` after the intended time.
    pub late: u64,
    /// Open loop: every slot was busy at the intended time.
    pub waited_for_slot: u64,
    pub bytes_received: u64,
    pub connect_errors: u64,
    interval: Interval,
    last_roll: Instant,
    pub timeline: Vec<TimelinePoint>,
}

impl Recorder {
    pub fn new(t0: Instant, late_threshold: Duration) -> Self {
        Recorder {
            t0,
            late_threshold,
            latency: histogram(),
            lag: histogram(),
            connect: histogram(),
            statuses: BTreeMap::new(),
            versions: Vec::new(),
            errors: BTreeMap::new(),
            late: 0,
            waited_for_slot: 0,
            bytes_received: 0,
            connect_errors: 0,
            interval: Interval::new(),
            last_roll: t0,
            timeline: Vec::new(),
        }
    }

    /// Restarts the clock (after warmup): the timeline counts from `t0`.
    pub fn start_at(&mut self, t0: Instant) {
        self.t0 = t0;
        self.last_roll = t0;
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    fn record_schedule(&mut self, timing: &Timing) {
        if let Some(lag) = timing.lag() {
            self.lag.saturating_record(micros(lag));
            if lag > self.late_threshold {
                self.late += 1;
            }
            if timing.waited_for_slot() {
                self.waited_for_slot += 1;
            }
        }
    }

    /// A response: its status, the `azureml-model-deployment` value if any, body size.
    pub fn record_response(
        &mut self,
        timing: &Timing,
        status: u16,
        version: Option<&[u8]>,
        bytes: u64,
    ) {
        let us = micros(timing.latency());
        self.latency.saturating_record(us);
        self.interval.latency.saturating_record(us);
        *self.statuses.entry(status).or_default() += 1;
        if !(200..300).contains(&status) {
            self.interval.non_2xx += 1;
        }
        let version = version.unwrap_or(b"-");
        match self.versions.iter_mut().find(|(v, _)| v == version) {
            Some((_, n)) => *n += 1,
            None => self.versions.push((version.to_vec(), 1)),
        }
        self.bytes_received += bytes;
        self.record_schedule(timing);
    }

    /// A request that got no response; `message` is formatted only for the first of a kind.
    pub fn record_error(&mut self, timing: &Timing, kind: &'static str, message: &dyn Display) {
        match self.errors.get_mut(kind) {
            Some(e) => e.count += 1,
            None => {
                self.errors.insert(
                    kind,
                    ErrorCount {
                        count: 1,
                        example: message.to_string(),
                    },
                );
            }
        }
        self.interval.errors += 1;
        self.record_schedule(timing);
    }

    pub fn record_connect(&mut self, d: Duration) {
        self.connect.saturating_record(micros(d));
    }

    pub fn responses(&self) -> u64 {
        self.latency.len()
    }

    pub fn succeeded(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|e| e.count).sum()
    }

    /// Responses by `azureml-model-deployment` value ("-" when absent).
    pub fn versions(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (v, n) in &self.versions {
            *out.entry(String::from_utf8_lossy(v).into_owned())
                .or_default() += n;
        }
        out
    }

    /// Closes the current interval at `now`, appends it to the timeline and returns it.
    pub fn roll(&mut self, now: Instant) -> TimelinePoint {
        let dt = now.saturating_duration_since(self.last_roll).as_secs_f64();
        let iv = std::mem::replace(&mut self.interval, Interval::new());
        let h = &iv.latency;
        let responses = h.len();
        let point = TimelinePoint {
            t: now.saturating_duration_since(self.t0).as_secs_f64(),
            dt,
            responses,
            throughput_rps: if dt > 0.0 { responses as f64 / dt } else { 0.0 },
            p50_us: if responses > 0 {
                h.value_at_quantile(0.5)
            } else {
                0
            },
            p99_us: if responses > 0 {
                h.value_at_quantile(0.99)
            } else {
                0
            },
            max_us: h.max(),
            errors: iv.errors,
            non_2xx: iv.non_2xx,
        };
        self.last_roll = now;
        self.timeline.push(point.clone());
        point
    }

    /// True when the current (unrolled) interval has anything in it.
    pub fn interval_is_empty(&self) -> bool {
        self.interval.latency.is_empty() && self.interval.errors == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(t0: Instant, intended_ms: Option<u64>, sent_ms: u64, done_ms: u64) -> Timing {
        let ms = Duration::from_millis;
        Timing {
            intended: intended_ms.map(|m| t0 + ms(m)),
            claimed: t0 + ms(sent_ms),
            sent: t0 + ms(sent_ms),
            done: t0 + ms(done_ms),
        }
    }

    #[test]
    fn records_latency_statuses_versions_and_lateness() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0, Duration::from_millis(1));
        r.record_response(&timing(t0, Some(0), 0, 2), 200, Some(b"blue"), 10);
        r.record_response(&timing(t0, Some(1), 5, 9), 200, Some(b"green"), 10);
        r.record_response(&timing(t0, Some(2), 2, 3), 503, None, 5);
        r.record_response(&timing(t0, None, 3, 4), 200, Some(b"blue"), 10);
        r.record_error(&timing(t0, None, 4, 5), "connect", &"refused");
        r.record_error(&timing(t0, None, 4, 5), "connect", &"other text");
        assert_eq!(r.responses(), 4);
        assert_eq!(r.succeeded(), 3);
        assert_eq!(r.error_count(), 2);
        assert_eq!(r.errors["connect"].example, "refused");
        assert_eq!(r.statuses[&200], 3);
        assert_eq!(r.statuses[&503], 1);
        let v = r.versions();
        assert_eq!((v["blue"], v["green"], v["-"]), (2, 1, 1));
        // Intended at 1 ms, sent at 5: late by 4 ms, latency 8 ms from the intended time.
        assert_eq!(r.late, 1);
        assert_eq!(r.bytes_received, 35);
        assert!(r.latency.max() >= 7_990 && r.latency.max() <= 8_010);
    }

    #[test]
    fn roll_closes_an_interval() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0, Duration::from_millis(1));
        for i in 0..100 {
            r.record_response(&timing(t0, None, i, i + 1 + i / 50), 200, None, 0);
        }
        r.record_response(&timing(t0, None, 0, 1), 500, None, 0);
        r.record_error(&timing(t0, None, 0, 1), "timeout", &"x");
        assert!(!r.interval_is_empty());
        let p = r.roll(t0 + Duration::from_millis(500));
        assert!(r.interval_is_empty());
        assert_eq!(p.responses, 101);
        assert_eq!(p.throughput_rps, 202.0);
        assert_eq!((p.errors, p.non_2xx), (1, 1));
        assert!(p.p50_us >= 1_000 && p.p50_us < 1_100, "{}", p.p50_us);
        assert!(p.p99_us >= 2_000, "{}", p.p99_us);
        let q = r.roll(t0 + Duration::from_millis(1500));
        assert_eq!((q.responses, q.p99_us, q.t, q.dt), (0, 0, 1.5, 1.0));
        assert_eq!(r.timeline.len(), 2);
    }
}
