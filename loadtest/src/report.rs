//! The result of a run: the JSON document written by `--json` and the text summary.

use std::{collections::BTreeMap, io};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{ErrorCount, TimelinePoint};

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub config: RunConfig,
    /// Wall-clock start of the measured run (after warmup), Unix milliseconds.
    pub started_unix_ms: u64,
    /// From the start of the measured run to the last response.
    pub elapsed_seconds: f64,
    /// Responses received, any status.
    pub responses: u64,
    /// Responses with a 2xx status.
    pub succeeded: u64,
    /// Requests that got no response (see `errors_by_kind`).
    pub errors: u64,
    /// Requests still in flight when the run was cut short.
    pub unfinished: u64,
    /// Responses per second over `elapsed_seconds`.
    pub throughput_rps: f64,
    /// 2xx responses per second.
    pub success_rps: f64,
    pub bytes_received: u64,
    /// Latency of all responses, microseconds.
    pub latency_us: Summary,
    /// Latency by percentile (HDR "percentile distribution"), for plotting.
    pub spectrum: Vec<SpectrumPoint>,
    /// Response counts by status code.
    pub statuses: BTreeMap<String, u64>,
    /// Response counts by `azureml-model-deployment` header ("-" when absent).
    pub versions: BTreeMap<String, u64>,
    pub errors_by_kind: BTreeMap<String, ErrorCount>,
    pub connections: ConnectionsReport,
    /// Open loop only.
    pub schedule: Option<ScheduleReport>,
    pub timeline: Vec<TimelinePoint>,
    pub metrics: Option<MetricsReport>,
    pub warmup: Option<WarmupReport>,
    /// Why the run ended before its budget: "interrupted" or "max-seconds".
    pub stopped_early: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub url: String,
    pub method: String,
    pub protocol: String,
    /// "closed" or "open".
    pub mode: String,
    /// Open loop: intended requests per second.
    pub rate: Option<f64>,
    pub connections: usize,
    pub streams_per_connection: usize,
    /// Requests that can be in flight at once (connections x streams).
    pub concurrency: usize,
    pub requests: Option<u64>,
    pub duration_seconds: Option<f64>,
    pub max_seconds: f64,
    pub warmup_requests: u64,
    pub new_connection_per_request: bool,
    pub timeout_seconds: f64,
    pub late_threshold_ms: f64,
    pub threads: usize,
    /// Request headers as given, credentials masked.
    pub headers: Vec<String>,
    pub body_bytes: usize,
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub stdev: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub p99_99: u64,
    pub max: u64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            stdev: (h.stdev() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            p99_99: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }
}

/// One step of the percentile spectrum.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpectrumPoint {
    /// 0..=100.
    pub percentile: f64,
    pub latency_us: u64,
    /// Responses at or below this latency.
    pub count: u64,
}

/// Latency by percentile: points at 0, 50, 75, 87.5 ... percent (five per halving of
/// the remainder) up to the maximum.
pub fn spectrum(h: &Histogram<u64>) -> Vec<SpectrumPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<SpectrumPoint> = Vec::new();
    let mut count = 0;
    for v in h.iter_quantiles(5) {
        count += v.count_since_last_iteration();
        let p = SpectrumPoint {
            percentile: (v.quantile_iterated_to() * 100.0 * 1e6).round() / 1e6,
            latency_us: h.highest_equivalent(v.value_iterated_to()).min(h.max()),
            count,
        };
        if out.last().is_some_and(|l| l.percentile == p.percentile) {
            out.pop();
        }
        out.push(p);
    }
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionsReport {
    /// Connections opened during the measured run.
    pub opened: u64,
    /// Time to open one: TCP connect, TLS handshake, HTTP/2 preface.
    pub connect_us: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScheduleReport {
    pub rate: f64,
    /// Requests the schedule held (when known up front).
    pub planned: Option<u64>,
    /// Requests sent (answered or failed).
    pub sent: u64,
    /// Sent more than `late_threshold_ms` after their intended time.
    pub late: u64,
    pub late_threshold_ms: f64,
    /// Found every connection busy at their intended time and waited for one.
    pub waited_for_connection: u64,
    /// How long after the intended time requests left, microseconds.
    pub lag_us: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct MetricsReport {
    pub url: String,
    /// Per matcher, one sample a second: seconds since the start, and the sum of the
    /// matching series (null if the scrape failed or nothing matched).
    pub series: BTreeMap<String, Vec<MetricSample>>,
    pub scrape_errors: u64,
    pub first_scrape_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricSample {
    pub t: f64,
    pub value: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WarmupReport {
    pub requests: u64,
    pub errors: u64,
}

/// A header for the report with credentials masked: `Authorization: Bearer ***`.
pub fn mask_header(name: &str, value: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let secret = ["key", "token", "secret", "cookie", "password"]
        .iter()
        .any(|w| lower.contains(w));
    if lower == "authorization" || lower == "proxy-authorization" {
        match value.split_once(' ') {
            Some((scheme, _)) => format!("{name}: {scheme} ***"),
            None => format!("{name}: ***"),
        }
    } else if secret {
        format!("{name}: ***")
    } else {
        format!("{name}: {value}")
    }
}

/// "16 connections", "1 connection x 8 streams".
pub fn connections_phrase(c: &RunConfig) -> String {
    let conns = format!(
        "{} connection{}",
        c.connections,
        if c.connections == 1 { "" } else { "s" }
    );
    if c.streams_per_connection > 1 {
        format!("{conns} x {} streams", c.streams_per_connection)
    } else {
        conns
    }
}

fn join_counts<K: std::fmt::Display>(m: impl IntoIterator<Item = (K, u64)>) -> String {
    let parts: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" ")
    }
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn write_text(&self, out: &mut impl io::Write) -> io::Result<()> {
        let c = &self.config;
        let conns = connections_phrase(c);
        let mode = match c.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        let reuse = if c.new_connection_per_request {
            ", new connection per request"
        } else {
            ""
        };
        writeln!(
            out,
            "{} {} ({}{reuse}), {mode}, {conns}",
            c.method, c.url, c.protocol
        )?;
        if let Some(w) = &self.warmup {
            writeln!(out, "warmup: {} requests, {} errors", w.requests, w.errors)?;
        }
        writeln!(
            out,
            "requests: {} responses in {:.2} s = {:.0} req/s ({} 2xx, {} errors{})",
            self.responses,
            self.elapsed_seconds,
            self.throughput_rps,
            self.succeeded,
            self.errors,
            if self.unfinished > 0 {
                format!(", {} unfinished", self.unfinished)
            } else {
                String::new()
            }
        )?;
        let l = &self.latency_us;
        writeln!(
            out,
            "latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.0}",
            l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
        )?;
        writeln!(
            out,
            "statuses: {}",
            join_counts(self.statuses.iter().map(|(k, v)| (k, *v)))
        )?;
        writeln!(
            out,
            "versions: {}",
            join_counts(self.versions.iter().map(|(k, v)| (k, *v)))
        )?;
        let cn = &self.connections;
        if cn.opened > 0 {
            writeln!(
                out,
                "connections: {} opened, setup us: p50 {}  p99 {}  max {}",
                cn.opened, cn.connect_us.p50, cn.connect_us.p99, cn.connect_us.max
            )?;
        }
        if let Some(s) = &self.schedule {
            writeln!(
                out,
                "schedule: {} sent at {} req/s; {} late by more than {} ms, {} waited for a free connection; send lag us: p50 {}  p99 {}  max {}",
                s.sent,
                s.rate,
                s.late,
                s.late_threshold_ms,
                s.waited_for_connection,
                s.lag_us.p50,
                s.lag_us.p99,
                s.lag_us.max
            )?;
        }
        if let Some(m) = &self.metrics {
            for (name, samples) in &m.series {
                let values: Vec<f64> = samples.iter().filter_map(|s| s.value).collect();
                if values.is_empty() {
                    writeln!(out, "metric {name}: no value")?;
                } else {
                    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let last = values[values.len() - 1];
                    writeln!(out, "metric {name}: min {min} max {max} last {last}")?;
                }
            }
            if m.scrape_errors > 0 {
                writeln!(
                    out,
                    "metric scrapes failed: {} ({})",
                    m.scrape_errors,
                    m.first_scrape_error.as_deref().unwrap_or("")
                )?;
            }
        }
        if !self.errors_by_kind.is_empty() {
            let parts: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(k, e)| format!("{k}={} ({})", e.count, e.example))
                .collect();
            writeln!(out, "errors: {}", parts.join("; "))?;
        }
        if let Some(why) = &self.stopped_early {
            writeln!(out, "stopped early: {why}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::histogram;

    #[test]
    fn summary_and_spectrum_of_a_known_distribution() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let s = Summary::of(&h);
        assert_eq!((s.count, s.min, s.max), (1000, 1, 1000));
        assert_eq!((s.p50, s.p90, s.p99), (500, 900, 990));
        assert!((s.mean - 500.5).abs() < 0.01);
        let sp = spectrum(&h);
        assert_eq!(sp.first().unwrap().percentile, sp[0].percentile);
        assert!(sp.first().unwrap().percentile <= 0.1);
        let last = sp.last().unwrap();
        assert_eq!(
            (last.percentile, last.latency_us, last.count),
            (100.0, 1000, 1000)
        );
        assert!(sp.windows(2).all(|w| w[0].percentile < w[1].percentile));
        assert!(sp.windows(2).all(|w| w[0].latency_us <= w[1].latency_us));
        // The median point sits at the median.
        let mid = sp.iter().find(|p| p.percentile >= 50.0).unwrap();
        assert!((495..=505).contains(&mid.latency_us), "{mid:?}");
        assert_eq!(Summary::of(&histogram()), Summary::default());
        assert!(spectrum(&histogram()).is_empty());
    }

    #[test]
    fn credentials_are_masked() {
        assert_eq!(
            mask_header("Authorization", "Bearer abc"),
            "Authorization: Bearer ***"
        );
        assert_eq!(mask_header("authorization", "abc"), "authorization: ***");
        assert_eq!(mask_header("x-api-key", "abc"), "x-api-key: ***");
        assert_eq!(
            mask_header("azureml-model-deployment", "blue"),
            "azureml-model-deployment: blue"
        );
    }
}
