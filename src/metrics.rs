//! The Prometheus registry and every metric scorefront exports, in one place.
//!
//! Label values come only from configured endpoint and version names (or the empty string
//! for a request that matched no endpoint), so cardinality is bounded by the config; a
//! version's series appear at its first request and leave when it leaves the config.
//! Counters and histograms are recorded when a request ends; the gauges (in flight,
//! queued, replicas) are read from the live slot accounting at scrape time, so the request
//! path never updates them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, MetricVec, MetricVecBuilder},
};

/// The live gauges of one version, read from its slot accounting at scrape time.
pub struct VersionGauges<'a> {
    pub endpoint: &'a str,
    pub version: &'a str,
    pub in_flight: usize,
    pub queued: usize,
    /// Routable replicas.
    pub ready: usize,
    /// Routable replicas with a request in flight.
    pub busy: usize,
    /// Routable replicas ejected by outlier detection now.
    pub ejected: usize,
}

/// Latency buckets in seconds: fine below a millisecond, up to the 300 s timeout ceiling.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_wait: HistogramVec,
    upstream_duration: HistogramVec,
    auth_failures: IntCounterVec,
    in_flight: IntGaugeVec,
    queued: IntGaugeVec,
    replicas: IntGaugeVec,
    /// Set by whoever loads the https certificate; absent without one.
    cert_expiry: IntGauge,
    kube_watch_errors: IntCounterVec,
    kube_last_sync: IntGaugeVec,
    kube_objects: IntGaugeVec,
    kube_status_writes: IntCounterVec,
    utilization: GaugeVec,
    desired_replicas: IntGaugeVec,
    scale_events: IntCounterVec,
    outliers: OutlierMetrics,
    log_drops: LogDrops,
    pub clients: ClientMetrics,
    /// Serializes scrapes: each one resets and refills the gauges.
    scrape: Mutex<()>,
}

/// Statuses whose request counters each version resolves up front, so counting the usual
/// outcomes takes no lookup in the counter family (and no lock).
const COMMON_STATUSES: [u16; 12] = [200, 201, 204, 400, 404, 413, 422, 429, 500, 502, 503, 504];

/// Metric handles of one version, resolved at its first request (a version nobody calls
/// exports no series, and costs no memory: with thousands of versions in a cluster, the
/// series are most of the registry) and then kept for the life of the routing tables.
#[derive(Clone)]
pub struct VersionMetrics {
    handles: Arc<OnceLock<Handles>>,
    /// The families and labels, to resolve the handles and for rare statuses.
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_wait: HistogramVec,
    upstream_duration: HistogramVec,
    ejections: IntCounterVec,
    endpoint: String,
    version: String,
}

pub struct Handles {
    pub request_duration: Histogram,
    pub queue_wait: Histogram,
    pub upstream_duration: Histogram,
    requests: [IntCounter; COMMON_STATUSES.len()],
}

impl VersionMetrics {
    /// The version's handles, resolved on first use.
    pub fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| {
            let l = &[self.endpoint.as_str(), self.version.as_str()];
            Handles {
                request_duration: self.request_duration.with_label_values(l),
                queue_wait: self.queue_wait.with_label_values(l),
                upstream_duration: self.upstream_duration.with_label_values(l),
                requests: COMMON_STATUSES.map(|s| {
                    self.requests
                        .with_label_values(&[l[0], l[1], &s.to_string()])
                }),
            }
        })
    }

    pub fn count_request(&self, status: http::StatusCode) {
        match COMMON_STATUSES.iter().position(|s| *s == status.as_u16()) {
            Some(i) => self.handles().requests[i].inc(),
            None => self
                .requests
                .with_label_values(&[
                    self.endpoint.as_str(),
                    self.version.as_str(),
                    status.as_str(),
                ])
                .inc(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let ev = &["endpoint", "version"];
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), ev)
                .expect("valid histogram")
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
        };
        let m = Metrics {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "scorefront_requests_total",
                    "Scoring requests by endpoint, version and HTTP status sent to the client.",
                ),
                &["endpoint", "version", "code"],
            )
            .expect("valid counter"),
            request_duration: histogram(
                "scorefront_request_duration_seconds",
                "Time from request arrival to the end of the response body.",
            ),
            queue_wait: histogram(
                "scorefront_queue_wait_seconds",
                "Time a request waited for a free replica slot.",
            ),
            upstream_duration: histogram(
                "scorefront_upstream_duration_seconds",
                "Time from sending a request to a replica to the end of its response body.",
            ),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "scorefront_auth_failures_total",
                    "Requests refused with 401, by endpoint and reason.",
                ),
                &["endpoint", "reason"],
            )
            .expect("valid counter"),
            in_flight: gauge(
                "scorefront_in_flight_requests",
                "Requests at a replica now.",
                ev,
            ),
            queued: gauge(
                "scorefront_queued_requests",
                "Requests waiting for a replica slot now.",
                ev,
            ),
            replicas: gauge(
                "scorefront_replicas",
                "Replicas by state: ready (routable) and busy (ready with a request in flight).",
                &["endpoint", "version", "state"],
            ),
            cert_expiry: IntGauge::new(
                "scorefront_tls_cert_expiry_timestamp_seconds",
                "When the https certificate in use expires (notAfter, epoch seconds).",
            )
            .expect("valid gauge"),
            kube_watch_errors: IntCounterVec::new(
                Opts::new(
                    "scorefront_kubernetes_watch_errors_total",
                    "Failed Kubernetes lists and watches, by resource and reason (forbidden, \
                     unauthorized, expired, not_found, api_error, unreachable).",
                ),
                &["resource", "reason"],
            )
            .expect("valid counter"),
            kube_last_sync: gauge(
                "scorefront_kubernetes_last_sync_timestamp_seconds",
                "When a list or watch event of the resource last arrived (epoch seconds).",
                &["resource"],
            ),
            kube_objects: gauge(
                "scorefront_kubernetes_objects",
                "Kubernetes objects the router knows, by kind.",
                &["kind"],
            ),
            kube_status_writes: IntCounterVec::new(
                Opts::new(
                    "scorefront_kubernetes_status_writes_total",
                    "ScoringEndpoint status writes, by result (ok, error).",
                ),
                &["result"],
            )
            .expect("valid counter"),
            utilization: GaugeVec::new(
                Opts::new(
                    "scorefront_utilization_ratio",
                    "Autoscaled versions: peak requests in flight and waiting over the ready \
                     replicas' slots, at the last decision.",
                ),
                ev,
            )
            .expect("valid gauge"),
            desired_replicas: gauge(
                "scorefront_desired_replicas",
                "Autoscaled versions: the replica count the autoscaler asks for.",
                ev,
            ),
            scale_events: IntCounterVec::new(
                Opts::new(
                    "scorefront_scale_events_total",
                    "Changes of an autoscaled version's replica count, by direction (up, down).",
                ),
                &["endpoint", "version", "direction"],
            )
            .expect("valid counter"),
            outliers: OutlierMetrics::new(),
            log_drops: LogDrops::new(),
            clients: ClientMetrics::new(),
            scrape: Mutex::new(()),
        };
        m.clients.register(&m.registry);
        m.log_drops.register(&m.registry);
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.upstream_duration.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.queued.clone()),
            Box::new(m.replicas.clone()),
            Box::new(m.kube_watch_errors.clone()),
            Box::new(m.kube_last_sync.clone()),
            Box::new(m.kube_objects.clone()),
            Box::new(m.kube_status_writes.clone()),
            Box::new(m.utilization.clone()),
            Box::new(m.desired_replicas.clone()),
            Box::new(m.scale_events.clone()),
            Box::new(m.outliers.ejections.clone()),
            Box::new(m.outliers.ejected.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The metrics of a version; nothing is registered until its first request.
    pub fn version(&self, endpoint: &str, version: &str) -> VersionMetrics {
        VersionMetrics {
            handles: Arc::default(),
            requests: self.requests.clone(),
            request_duration: self.request_duration.clone(),
            queue_wait: self.queue_wait.clone(),
            upstream_duration: self.upstream_duration.clone(),
            ejections: self.outliers.ejections.clone(),
            endpoint: endpoint.to_owned(),
            version: version.to_owned(),
        }
    }

    /// Records the expiry of the https certificate now in use; the gauge appears then.
    pub fn set_cert_expiry(&self, not_after: i64) {
        if self.cert_expiry.get() == 0 {
            let _ = self.registry.register(Box::new(self.cert_expiry.clone()));
        }
        self.cert_expiry.set(not_after);
    }

    /// Counts a request refused with 401 (rare enough to resolve the labels each time).
    pub fn count_auth_failure(&self, endpoint: &str, reason: &str) {
        self.auth_failures
            .with_label_values(&[endpoint, reason])
            .inc();
    }

    /// Counts a request that ended before a version was chosen.
    pub fn count_unrouted(&self, endpoint: &str, code: &str) {
        self.requests.with_label_values(&[endpoint, "", code]).inc();
    }

    pub fn kube_watch_error(&self, resource: &str, reason: &str) {
        self.kube_watch_errors
            .with_label_values(&[resource, reason])
            .inc();
    }

    pub fn kube_synced(&self, resource: &str, epoch_seconds: i64) {
        self.kube_last_sync
            .with_label_values(&[resource])
            .set(epoch_seconds);
    }

    pub fn kube_objects(&self, kind: &str, count: usize) {
        self.kube_objects
            .with_label_values(&[kind])
            .set(count as i64);
    }

    pub fn kube_status_write(&self, result: &str) {
        self.kube_status_writes.with_label_values(&[result]).inc();
    }

    pub fn set_autoscaled(&self, endpoint: &str, version: &str, utilization: f64, desired: u32) {
        let l = &[endpoint, version];
        self.utilization.with_label_values(l).set(utilization);
        self.desired_replicas
            .with_label_values(l)
            .set(i64::from(desired));
    }

    pub fn count_scale_event(&self, endpoint: &str, version: &str, direction: &str) {
        self.scale_events
            .with_label_values(&[endpoint, version, direction])
            .inc();
    }

    /// Drops every series of a version that is no longer served (`version: None`: of an
    /// endpoint that is no longer served, including its unrouted requests and auth
    /// failures), so that endpoint churn does not grow the registry without bound.
    pub fn forget(&self, endpoint: &str, version: Option<&str>) {
        let ours = |labels: &HashMap<&str, &str>| {
            labels.get("endpoint") == Some(&endpoint)
                && version.is_none_or(|v| labels.get("version") == Some(&v))
        };
        remove_where(&self.requests, ours);
        remove_where(&self.request_duration, ours);
        remove_where(&self.queue_wait, ours);
        remove_where(&self.upstream_duration, ours);
        remove_where(&self.utilization, ours);
        remove_where(&self.desired_replicas, ours);
        remove_where(&self.scale_events, ours);
        remove_where(&self.outliers.ejections, ours);
        if version.is_none() {
            remove_where(&self.auth_failures, ours);
        }
    }

    /// Drops the autoscaling series of a version that is no longer autoscaled.
    pub fn forget_autoscaled(&self, endpoint: &str, version: &str) {
        let l = &[endpoint, version];
        let _ = self.utilization.remove_label_values(l);
        let _ = self.desired_replicas.remove_label_values(l);
        for direction in ["up", "down"] {
            let _ = self
                .scale_events
                .remove_label_values(&[endpoint, version, direction]);
        }
    }

    /// Renders every metric in the Prometheus text format, with the live gauges of every
    /// version served now.
    pub fn render<'a>(&self, versions: impl IntoIterator<Item = VersionGauges<'a>>) -> String {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock poisoned");
        self.in_flight.reset();
        self.queued.reset();
        self.replicas.reset();
        self.outliers.ejected.reset();
        self.log_drops.refresh();
        for v in versions {
            let l = &[v.endpoint, v.version];
            self.in_flight.with_label_values(l).set(v.in_flight as i64);
            self.queued.with_label_values(l).set(v.queued as i64);
            for (state, n) in [("ready", v.ready), ("busy", v.busy)] {
                self.replicas
                    .with_label_values(&[v.endpoint, v.version, state])
                    .set(n as i64);
            }
            self.outliers
                .ejected
                .with_label_values(l)
                .set(v.ejected as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

// ---------------------------------------------------------------------------------------
// Outlier ejection

/// The outlier detection families: ejections counted as they happen, ejected replicas
/// read from the slot accounting at scrape time like the other gauges.
struct OutlierMetrics {
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
}

impl OutlierMetrics {
    fn new() -> Self {
        let ev = &["endpoint", "version"];
        OutlierMetrics {
            ejections: IntCounterVec::new(
                Opts::new(
                    "scorefront_replica_ejections_total",
                    "Replicas ejected by outlier detection after transport failures in a row.",
                ),
                ev,
            )
            .expect("valid counter"),
            ejected: IntGaugeVec::new(
                Opts::new(
                    "scorefront_ejected_replicas",
                    "Routable replicas ejected by outlier detection now.",
                ),
                ev,
            )
            .expect("valid gauge"),
        }
    }
}

impl VersionMetrics {
    /// The endpoint's name, for logs.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counts an ejection of one of the version's replicas (rare: labels resolved here).
    pub fn count_ejection(&self) {
        self.ejections
            .with_label_values(&[self.endpoint.as_str(), self.version.as_str()])
            .inc();
    }
}

// --- Log writer: lines dropped because the log output was not read fast enough. ---

/// The log writer's drop counts (process-wide, kept by the log writer), brought up to date
/// at each scrape.
struct LogDrops {
    lines: IntCounter,
    bytes: IntCounter,
}

impl LogDrops {
    fn new() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        LogDrops {
            lines: counter(
                "scorefront_log_dropped_lines_total",
                "Log lines dropped because the log output (stderr) was not read fast enough.",
            ),
            bytes: counter(
                "scorefront_log_dropped_bytes_total",
                "Bytes of the log lines dropped because the log output was not read fast enough.",
            ),
        }
    }

    fn register(&self, registry: &Registry) {
        for c in [&self.lines, &self.bytes] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
        }
    }

    fn refresh(&self) {
        let now = crate::logwriter::dropped();
        for (c, total) in [(&self.lines, now.lines), (&self.bytes, now.bytes)] {
            c.inc_by(total.saturating_sub(c.get()));
        }
    }
}

// --- End of the log writer's metrics. ---

// --- Client connections -------------------------------------------------------------

/// Data plane connections from scoring clients, updated by the listeners as they happen.
#[derive(Clone)]
pub struct ClientMetrics {
    /// Open client connections, over every data listener.
    pub connections: IntGauge,
    /// Times a listener reached `clients.maxConnections` and paused accepting.
    pub connection_limit_reached: IntCounter,
    /// Failed accepts (out of file descriptors and the like).
    pub accept_errors: IntCounter,
    /// Connections closed because the client read nothing for `clients.sendTimeoutMs`.
    pub send_timeouts: IntCounter,
}

impl ClientMetrics {
    fn new() -> Self {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid gauge");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        ClientMetrics {
            connections: gauge(
                "scorefront_client_connections",
                "Open client connections on the data plane.",
            ),
            connection_limit_reached: counter(
                "scorefront_client_connection_limit_reached_total",
                "Times a data listener reached clients.maxConnections and paused accepting.",
            ),
            accept_errors: counter(
                "scorefront_client_accept_errors_total",
                "Failed accepts of client connections (such as out of file descriptors).",
            ),
            send_timeouts: counter(
                "scorefront_client_send_timeouts_total",
                "Client connections closed because the client read nothing for \
                 clients.sendTimeoutMs.",
            ),
        }
    }

    fn register(&self, registry: &Registry) {
        for c in [
            &self.connection_limit_reached,
            &self.accept_errors,
            &self.send_timeouts,
        ] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
        }
        registry
            .register(Box::new(self.connections.clone()))
            .expect("metric names are unique");
    }
}

/// Removes the series of `vec` whose labels `matches` accepts.
fn remove_where<T: MetricVecBuilder>(
    vec: &MetricVec<T>,
    matches: impl Fn(&HashMap<&str, &str>) -> bool,
) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = (metric.get_label().iter())
                .map(|l| (l.name(), l.value()))
                .collect();
            if matches(&labels) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_and_rare_statuses_land_in_the_same_family() {
        let m = Metrics::new();
        let v = m.version("fraud", "blue");
        v.count_request(http::StatusCode::OK);
        v.count_request(http::StatusCode::IM_A_TEAPOT);
        v.count_request(http::StatusCode::IM_A_TEAPOT);
        m.count_unrouted("", "404");
        let text = m.render([]);
        for line in [
            r#"scorefront_requests_total{code="200",endpoint="fraud",version="blue"} 1"#,
            r#"scorefront_requests_total{code="418",endpoint="fraud",version="blue"} 2"#,
            r#"scorefront_requests_total{code="404",endpoint="",version=""} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn series_of_what_is_gone_are_forgotten() {
        let m = Metrics::new();
        for (ep, v) in [("fraud", "blue"), ("fraud", "green"), ("spam", "blue")] {
            let vm = m.version(ep, v);
            vm.count_request(http::StatusCode::OK);
            vm.count_request(http::StatusCode::IM_A_TEAPOT);
            vm.handles().request_duration.observe(0.1);
            vm.count_ejection();
        }
        m.count_unrouted("fraud", "401");
        m.count_auth_failure("fraud", "invalid_key");
        m.set_autoscaled("fraud", "green", 0.5, 2);
        m.forget("fraud", Some("green"));
        let text = m.render([]);
        assert!(!text.contains(r#"version="green""#), "{text}");
        assert!(
            text.contains(r#"endpoint="fraud",version="blue""#),
            "{text}"
        );
        m.forget("fraud", None);
        let text = m.render([]);
        assert!(!text.contains(r#"endpoint="fraud""#), "{text}");
        assert!(text.contains(r#"endpoint="spam",version="blue""#), "{text}");
    }
}
