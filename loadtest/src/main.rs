//! `loadtest`: HTTP load against one URL, closed or open loop, with HDR latency
//! percentiles, a JSON result and an SVG chart. See the package README for the options.
//!
//! Example: `loadtest --url http://127.0.0.1:8080/api/v1/endpoint/sample/score
//! -H 'Authorization: Bearer KEY' --body '{"data":[1]}' --connections 16 --requests 20000`

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{CommandFactory, Parser, error::ErrorKind};
use http::{HeaderName, HeaderValue, Method, Uri};
use loadtest::{
    chart::{self, ChartInput},
    client::{RequestTemplate, Target, TlsOptions, get_text, parse_header},
    precise::PrecisePacer,
    prom::Matcher,
    report::{
        ConnectionsReport, MetricSample, MetricsReport, Report, RunConfig, ScheduleReport, Summary,
        WarmupReport, connections_phrase, mask_header, spectrum,
    },
    schedule::{Claims, drive},
    stats::Recorder,
    worker::{H2Conn, Shared, Worker},
};
use tokio::{task::JoinHandle, time::Instant};

const EXAMPLES: &str = "\
Examples:
  # closed loop: 16 connections back to back, 20000 requests
  loadtest --url http://127.0.0.1:8080/api/v1/endpoint/sample/score \\
    -H 'Authorization: Bearer KEY' --body '{\"data\":[1]}' -c 16 -n 20000
  # open loop: 2000 req/s for 30 s over at most 64 connections, JSON and chart
  loadtest --url http://127.0.0.1:8000/score --rate 2000 -d 30 -c 64 \\
    --json out.json --chart out.svg
  # h2 over TLS: 2 connections x 8 streams, trusting a test CA
  loadtest --url https://localhost:8443/score --http2 -c 2 --streams-per-connection 8 \\
    --ca-file ca.pem -n 10000";

/// HTTP load generator: closed loop (N connections back to back) or open loop (a fixed
/// arrival rate, latency counted from each request's intended send time).
#[derive(Parser, Debug)]
#[command(name = "loadtest", version, after_help = EXAMPLES)]
struct Args {
    /// Target URL: http:// (HTTP/1.1, or h2c by prior knowledge with --http2) or
    /// https:// (TLS; ALPN offers h2 with --http2, else http/1.1).
    #[arg(long)]
    url: Uri,
    /// TCP connections. Closed loop: each sends back to back. Open loop: the pool a
    /// request takes a free connection from; when none is free it waits, and the wait
    /// counts in its latency.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// With --http2: requests in flight at once on each connection (streams); the
    /// concurrency is connections x streams.
    #[arg(long, alias = "streams", value_name = "N", default_value_t = 1)]
    streams_per_connection: usize,
    /// Open loop: send at this many requests per second (constant spacing, from t0 + i/R).
    /// Without it the run is a closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests to send (default 10000 when no --duration-seconds is given).
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Stop sending after this many seconds (the first of this and --requests ends it).
    #[arg(long, short = 'd')]
    duration_seconds: Option<f64>,
    /// Hard cap on the whole run including warmup; requests still in flight then are
    /// reported as unfinished [default: the planned run time + 30 s, at least 60 s].
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Requests sent (closed loop, over the same connections) before measuring.
    #[arg(long, default_value_t = 0)]
    warmup_requests: u64,
    /// Speak HTTP/2: h2c with prior knowledge on http://, ALPN h2 on https://.
    #[arg(long)]
    http2: bool,
    /// PEM file of CA certificates to trust for https:// (default: the system's roots).
    /// The chain and the host name are verified.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Verify the certificate against this name instead of the URL's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Allow TLS session resumption (by default every handshake is a full one).
    #[arg(long)]
    tls_resume: bool,
    /// Open a new connection for every request (TCP, TLS, HTTP handshake) and close it
    /// after; the setup counts in the latency.
    #[arg(long, alias = "no-keepalive")]
    new_connection_per_request: bool,
    /// Request header "Name: value"; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body (sent as application/json unless a Content-Type header is given).
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// HTTP method [default: GET, or POST with a body].
    #[arg(long, short = 'X')]
    method: Option<Method>,
    /// A request with no complete response by then counts as a "timeout" error.
    #[arg(long, default_value_t = 30.0)]
    timeout_seconds: f64,
    /// Open loop: a request sent more than this many ms after its intended time counts
    /// as late.
    #[arg(long, default_value_t = 1.0)]
    late_ms: f64,
    /// Runtime threads (1: a single-threaded runtime, the cheapest per request).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Write the full result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG chart (latency by percentile; throughput, latency and sampled
    /// metrics over time) to this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Prometheus text endpoint (http://) to scrape once a second during the run.
    #[arg(long)]
    sample_metrics: Option<Uri>,
    /// Metric to record from each scrape: NAME or NAME{label="value",...}; the value is
    /// the sum of the matching series. Repeatable [default: scorefront_replicas{state="ready"}].
    #[arg(
        long = "sample-metric",
        value_name = "MATCHER",
        requires = "sample_metrics"
    )]
    sample_metric: Vec<Matcher>,
}

impl Args {
    fn check(&self) -> Result<(), String> {
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(format!("{name} must be a positive number, got {x}"))
            }
            _ => Ok(()),
        };
        positive("--rate", self.rate)?;
        positive("--duration-seconds", self.duration_seconds)?;
        positive("--max-seconds", self.max_seconds)?;
        positive("--timeout-seconds", Some(self.timeout_seconds))?;
        if !(self.late_ms.is_finite() && self.late_ms >= 0.0) {
            return Err(format!("--late-ms must be >= 0, got {}", self.late_ms));
        }
        if self.connections == 0 || self.connections > 100_000 {
            return Err(format!(
                "--connections must be 1..=100000, got {}",
                self.connections
            ));
        }
        if self.streams_per_connection == 0 || self.streams_per_connection > 10_000 {
            return Err(format!(
                "--streams-per-connection must be 1..=10000, got {}",
                self.streams_per_connection
            ));
        }
        if self.streams_per_connection > 1 && !self.http2 {
            return Err(
                "--streams-per-connection needs --http2 (HTTP/1.1 carries one request at a time)"
                    .into(),
            );
        }
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".into());
        }
        if self.threads == 0 || self.threads > 1024 {
            return Err(format!("--threads must be 1..=1024, got {}", self.threads));
        }
        if let Some(u) = &self.sample_metrics
            && (u.scheme_str() != Some("http") || u.authority().is_none())
        {
            return Err(format!("--sample-metrics needs an http:// URL, got {u}"));
        }
        if self.url.authority().is_none()
            || !matches!(self.url.scheme_str(), Some("http" | "https"))
        {
            return Err(format!(
                "--url must be an http:// or https:// URL, got {}",
                self.url
            ));
        }
        if self.url.scheme_str() == Some("http")
            && (self.ca_file.is_some() || self.tls_server_name.is_some())
        {
            return Err("--ca-file and --tls-server-name need an https:// URL".into());
        }
        Ok(())
    }

    fn concurrency(&self) -> usize {
        self.connections * self.streams_per_connection
    }

    /// The request budget: as given, or 10000 when neither a count nor a duration is.
    fn request_budget(&self) -> Option<u64> {
        match (self.requests, self.duration_seconds) {
            (None, None) => Some(10_000),
            (r, _) => r,
        }
    }
}

fn main() -> ExitCode {
    // One crypto provider, ring, for every TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Err(msg) = args.check() {
        Args::command()
            .error(ErrorKind::ValueValidation, msg)
            .exit();
    }
    let runtime = match loadtest::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) if report.succeeded > 0 => ExitCode::SUCCESS,
        Ok(report) => {
            let kinds: Vec<String> = report
                .errors_by_kind
                .iter()
                .map(|(k, e)| format!("{k}: {}", e.example))
                .collect();
            eprintln!(
                "error: no request succeeded ({} responses, none 2xx; {} errors{}{})",
                report.responses,
                report.errors,
                if kinds.is_empty() { "" } else { ": " },
                kinds.join("; ")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Metric samples taken during the run.
struct Sampler {
    url: Uri,
    matchers: Vec<Matcher>,
    samples: Mutex<Vec<(f64, Vec<Option<f64>>)>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Sampler {
    async fn scrape(&self, t: f64) {
        let values = match get_text(&self.url, Duration::from_millis(900)).await {
            Ok(text) => self.matchers.iter().map(|m| m.sum(&text)).collect(),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| format!("{e:#}"));
                vec![None; self.matchers.len()]
            }
        };
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, values));
    }

    fn latest(&self) -> Option<Vec<Option<f64>>> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, v)| v.clone())
    }

    fn report(&self) -> MetricsReport {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let series = self
            .matchers
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let points = samples
                    .iter()
                    .map(|(t, v)| MetricSample {
                        t: (t * 1000.0).round() / 1000.0,
                        value: v[i],
                    })
                    .collect();
                (m.to_string(), points)
            })
            .collect();
        MetricsReport {
            url: self.url.to_string(),
            series,
            scrape_errors: self.errors.load(Ordering::Relaxed),
            first_scrape_error: self
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// Runs every worker against `claims`; returns them (with their connections) when the
/// claims are spent, or None if `deadline` came first (the rest are aborted).
async fn run_phase(
    workers: Vec<Worker>,
    claims: &Arc<Claims>,
    measuring: bool,
    open_loop: bool,
    deadline: Instant,
) -> anyhow::Result<Option<Vec<Worker>>> {
    let mut handles: Vec<JoinHandle<Worker>> = workers
        .into_iter()
        .map(|mut w| {
            w.measuring = measuring;
            let claims = claims.clone();
            tokio::spawn(async move {
                let mut pacer = if open_loop {
                    PrecisePacer::new()
                } else {
                    PrecisePacer::Tokio
                };
                drive(&claims, &mut w, &mut pacer).await;
                w
            })
        })
        .collect();
    let mut done = Vec::with_capacity(handles.len());
    let joined = tokio::time::timeout_at(deadline, async {
        for h in handles.iter_mut() {
            done.push(h.await.context("a load worker failed")?);
        }
        anyhow::Ok(())
    })
    .await;
    match joined {
        Ok(r) => r.map(|()| Some(done)),
        Err(_) => {
            claims.stop();
            for h in &handles {
                h.abort();
            }
            Ok(None)
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => Some(Bytes::from(b.clone())),
        (None, Some(path)) => {
            Some(Bytes::from(std::fs::read(path).with_context(|| {
                format!("cannot read --body-file {}", path.display())
            })?))
        }
        (None, None) => None,
    };
    let method = args.method.clone().unwrap_or(if body.is_some() {
        Method::POST
    } else {
        Method::GET
    });
    let body = body.unwrap_or_default();
    let tls = TlsOptions {
        ca_file: args.ca_file.as_deref(),
        server_name: args.tls_server_name.as_deref(),
        resume: args.tls_resume,
    };
    let target = Target::new(args.url.clone(), args.http2, &tls).await?;
    let template = RequestTemplate::new(
        &target,
        method.clone(),
        &args.headers,
        body.clone(),
        args.new_connection_per_request,
    );
    let protocol = target.protocol();
    let late_threshold = Duration::from_secs_f64(args.late_ms / 1000.0);
    let shared = Arc::new(Shared {
        target,
        template,
        recorder: Mutex::new(Recorder::new(Instant::now(), late_threshold)),
        in_flight: AtomicI64::new(0),
        timeout: Duration::from_secs_f64(args.timeout_seconds),
        fresh_each: args.new_connection_per_request,
        warmup_errors: AtomicU64::new(0),
    });

    let mut workers = Vec::with_capacity(args.concurrency());
    for _ in 0..args.connections {
        if args.http2 {
            let conn = Arc::new(H2Conn::default());
            for _ in 0..args.streams_per_connection {
                workers.push(Worker::h2(shared.clone(), conn.clone()));
            }
        } else {
            workers.push(Worker::h1(shared.clone()));
        }
    }

    // The plan, to size the hard cap.
    let duration = args.duration_seconds.map(Duration::from_secs_f64);
    let budget = args.request_budget();
    let probe = match args.rate {
        Some(rate) => Claims::open(started, rate, budget, duration),
        None => Claims::closed(started, budget, duration),
    };
    let planned_duration = probe.planned_duration();
    let max_seconds = args
        .max_seconds
        .unwrap_or_else(|| planned_duration.map_or(60.0, |d| (d.as_secs_f64() + 30.0).max(60.0)));
    let hard_deadline = started + Duration::from_secs_f64(max_seconds);

    // Stop cleanly on Ctrl-C or SIGTERM: no new requests, in-flight ones finish.
    let interrupted = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<Arc<Claims>>>> = Arc::new(Mutex::new(None));
    let signals = {
        let (interrupted, current) = (interrupted.clone(), current.clone());
        tokio::spawn(async move {
            loadtest::termination().await;
            interrupted.store(true, Ordering::Relaxed);
            if let Some(c) = current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                c.stop();
            }
            eprintln!("loadtest: stopping (signal); waiting for requests in flight");
            loadtest::termination().await;
            eprintln!("loadtest: second signal, exiting without a report");
            std::process::exit(130);
        })
    };

    let mut warmup = None;
    if args.warmup_requests > 0 {
        let claims = Arc::new(Claims::closed(
            Instant::now(),
            Some(args.warmup_requests),
            None,
        ));
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(claims.clone());
        workers = match run_phase(workers, &claims, false, false, hard_deadline).await? {
            Some(w) => w,
            None => bail!("warmup did not finish within --max-seconds ({max_seconds} s)"),
        };
        warmup = Some(WarmupReport {
            requests: args.warmup_requests,
            errors: shared.warmup_errors.load(Ordering::Relaxed),
        });
    }

    // The measured run.
    let t0 = Instant::now();
    let started_unix_ms = unix_ms();
    shared
        .recorder
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .start_at(t0);
    let claims = Arc::new(match args.rate {
        Some(rate) => Claims::open(t0, rate, budget, duration),
        None => Claims::closed(t0, budget, duration),
    });
    *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(claims.clone());
    if interrupted.load(Ordering::Relaxed) {
        claims.stop();
    }
    let sampler = args.sample_metrics.clone().map(|url| {
        let matchers = if args.sample_metric.is_empty() {
            vec![
                r#"scorefront_replicas{state="ready"}"#
                    .parse()
                    .expect("valid matcher"),
            ]
        } else {
            args.sample_metric.clone()
        };
        Arc::new(Sampler {
            url,
            matchers,
            samples: Mutex::new(Vec::new()),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    });
    if let Some(s) = &sampler {
        let s = s.clone();
        tokio::spawn(async move { s.scrape(0.0).await });
    }
    let ticker = tokio::spawn(ticker(
        shared.clone(),
        t0,
        planned_duration,
        args.quiet,
        sampler.clone(),
    ));
    let phase = run_phase(workers, &claims, true, args.rate.is_some(), hard_deadline).await?;
    let t_end = Instant::now();
    ticker.abort();
    signals.abort();
    let phase_cut = phase.is_none();
    let unfinished = if phase_cut {
        shared.in_flight.load(Ordering::Relaxed).max(0) as u64
    } else {
        0
    };
    drop(phase);
    if let Some(s) = &sampler {
        s.scrape(t_end.duration_since(t0).as_secs_f64()).await;
    }
    let stopped_early = if phase_cut {
        Some("max-seconds".to_string())
    } else if interrupted.load(Ordering::Relaxed) {
        Some("interrupted".to_string())
    } else {
        None
    };

    let elapsed = t_end.duration_since(t0).as_secs_f64().max(1e-9);
    let report = {
        let mut rec = shared.lock();
        if !rec.interval_is_empty() {
            rec.roll(t_end);
        }
        let responses = rec.responses();
        let succeeded = rec.succeeded();
        let errors = rec.error_count();
        Report {
            config: RunConfig {
                url: args.url.to_string(),
                method: method.to_string(),
                protocol: protocol.to_string(),
                mode: if args.rate.is_some() {
                    "open"
                } else {
                    "closed"
                }
                .to_string(),
                rate: args.rate,
                connections: args.connections,
                streams_per_connection: args.streams_per_connection,
                concurrency: args.concurrency(),
                requests: budget,
                duration_seconds: args.duration_seconds,
                max_seconds,
                warmup_requests: args.warmup_requests,
                new_connection_per_request: args.new_connection_per_request,
                timeout_seconds: args.timeout_seconds,
                late_threshold_ms: args.late_ms,
                threads: args.threads,
                headers: args
                    .headers
                    .iter()
                    .map(|(n, v)| mask_header(n.as_str(), &String::from_utf8_lossy(v.as_bytes())))
                    .collect(),
                body_bytes: body.len(),
            },
            started_unix_ms,
            elapsed_seconds: (elapsed * 1e6).round() / 1e6,
            responses,
            succeeded,
            errors,
            unfinished,
            throughput_rps: (responses as f64 / elapsed * 10.0).round() / 10.0,
            success_rps: (succeeded as f64 / elapsed * 10.0).round() / 10.0,
            bytes_received: rec.bytes_received,
            latency_us: Summary::of(&rec.latency),
            spectrum: spectrum(&rec.latency),
            statuses: rec
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            versions: rec.versions(),
            errors_by_kind: rec
                .errors
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            connections: ConnectionsReport {
                opened: rec.connect.len(),
                connect_us: Summary::of(&rec.connect),
            },
            schedule: args.rate.map(|rate| ScheduleReport {
                rate,
                planned: claims.planned(),
                sent: responses + errors,
                late: rec.late,
                late_threshold_ms: args.late_ms,
                waited_for_connection: rec.waited_for_slot,
                lag_us: Summary::of(&rec.lag),
            }),
            timeline: rec.timeline.clone(),
            metrics: sampler.as_ref().map(|s| s.report()),
            warmup,
            stopped_early,
        }
    };

    let mut stdout = std::io::stdout().lock();
    report.write_text(&mut stdout)?;
    drop(stdout);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        let metrics: Vec<(String, Vec<(f64, f64)>)> = report
            .metrics
            .iter()
            .flat_map(|m| m.series.iter())
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.iter().filter_map(|p| Some((p.t, p.value?))).collect(),
                )
            })
            .collect();
        let title = format!("{} {}", report.config.method, report.config.url);
        let c = &report.config;
        let subtitle = format!(
            "{}, {}, {}: {} responses in {:.1} s = {:.0} req/s, p50 {} us, p99 {} us",
            c.protocol,
            match c.rate {
                Some(r) => format!("open loop at {r} req/s"),
                None => "closed loop".to_string(),
            },
            connections_phrase(c),
            report.responses,
            report.elapsed_seconds,
            report.throughput_rps,
            report.latency_us.p50,
            report.latency_us.p99,
        );
        let svg = chart::render(&ChartInput {
            title: &title,
            subtitle: &subtitle,
            spectrum: &report.spectrum,
            timeline: &report.timeline,
            metrics: &metrics,
        });
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

/// Once a second: closes the timeline interval, starts a metric scrape, and prints a
/// progress line (for runs planned longer than 3 s, or from the third second on).
async fn ticker(
    shared: Arc<Shared>,
    t0: Instant,
    planned: Option<Duration>,
    quiet: bool,
    sampler: Option<Arc<Sampler>>,
) {
    let long = planned.is_some_and(|d| d > Duration::from_secs(3));
    for k in 1u64.. {
        tokio::time::sleep_until(t0 + Duration::from_secs(k)).await;
        let now = Instant::now();
        let (point, total, errors) = {
            let mut rec = shared.lock();
            let point = rec.roll(now);
            (point, rec.responses(), rec.error_count())
        };
        if let Some(s) = &sampler {
            let s = s.clone();
            let t = now.duration_since(t0).as_secs_f64();
            tokio::spawn(async move { s.scrape(t).await });
        }
        if quiet || !(long || k >= 3) {
            continue;
        }
        let mut line = format!(
            "[{k:>4}s] {:>8.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  done {total}  errors {errors}  in flight {}",
            point.throughput_rps,
            point.p50_us as f64 / 1000.0,
            point.p99_us as f64 / 1000.0,
            shared.in_flight.load(Ordering::Relaxed).max(0),
        );
        if let Some(values) = sampler.as_ref().and_then(|s| s.latest()) {
            for (m, v) in sampler
                .as_ref()
                .map(|s| &s.matchers)
                .into_iter()
                .flatten()
                .zip(values)
            {
                line.push_str(&format!(
                    "  {}={}",
                    m.name,
                    v.map_or("?".to_string(), |v| v.to_string())
                ));
            }
        }
        eprintln!("{line}");
    }
}
