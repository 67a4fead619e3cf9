//! Kubernetes discovery at scale: the real router binary, as a child process, against the
//! test API server (`tests/support/kubeapi.rs`) in this process, filled with N
//! ScoringEndpoints of two versions each, one Service and one Deployment per version, one
//! EndpointSlice per Service and 5 pods per slice: by default 1,000 endpoints and 10,000
//! pods. Every version is autoscaled with its Deployment's count as the minimum, so the
//! autoscaler reads and follows every Deployment and changes none.
//!
//! What it measures, and how:
//! - **first sync**: the time and the router's CPU (user + system, `/proc/PID/stat`) from
//!   starting the process to `/readyz` answering 200, then to the first routing table (a
//!   request to endpoint 0 is routed);
//! - **status writes**: the router then writes each ScoringEndpoint's status, and sees each
//!   write come back through its watch; the time and CPU until it has written them all,
//!   every status reports the pods ready, and it has been quiet (under 5 % of a core) for
//!   a second;
//! - **memory**: VmRSS and VmHWM (`/proc/PID/status`) at each stage. `/metrics` is first
//!   scraped after the idle period, because a scrape at this size allocates tens of MiB;
//!   that scrape must show every endpoint, version and pod (asserted);
//! - **idle CPU** over a quiet period after the status writes;
//! - **a slice change reaching routing**, on endpoint 0's `green` version, whose pods are
//!   fake models on loopback addresses in this process:
//!   - *a new ready pod*, and *an unready pod ready again*: a scoring request pinned to
//!     `green` waits in the router while `green` has no ready pod; the figure is the time
//!     from applying the slice to that request reaching the pod;
//!   - *a pod turning unready*: pinned requests are sent back to back after applying it;
//!     the figure is the time from applying it to sending the first request that the router
//!     no longer routes to the pod (it waits instead); the request before it was still
//!     routed there, so the figure is exact to within one request's round trip;
//!   - the same, once while the router works through the echo of its status writes;
//! - **the same change seen from `/metrics`**: a pod of another endpoint turns unready or
//!   ready again, and `/metrics` is scraped back to back until
//!   `scorefront_replicas{state="ready"}` shows it (a scrape's own time included), as a
//!   monitoring system would see it; the size and time of one scrape are reported too;
//! - **a new ScoringEndpoint**: the time from applying it to a request to it being routed
//!   (404 until then), right after the status writes and when the router is quiet;
//! - **steal**: the hypervisor's share of the machine's busy time during the run.
//!
//! Everything is bounded in time; the router is stopped at the end, and killed if this
//! process fails or runs out of time.
//!
//! Run: `cargo bench --bench kube_scale` (it builds the release router first). Settings,
//! from the environment:
//! - `KSCALE_ENDPOINTS` (1000): ScoringEndpoints, each with 2 versions;
//! - `KSCALE_PODS` (5): pods per Service;
//! - `KSCALE_NAMESPACES` (1): namespaces the endpoints are spread over;
//! - `KSCALE_CHANGES` (50): new pods on the probe version, each made unready, ready again
//!   and unready again;
//! - `KSCALE_METRICS_CHANGES` (20): changes observed through `/metrics`;
//! - `KSCALE_IDLE_SECONDS` (10): the idle period;
//! - `KSCALE_TIMEOUT_SECONDS` (900): the whole run, after which the router is killed;
//! - `KSCALE_ROUTER`: the router binary (default: this build's `scorefront`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::kubeapi::{self, KubeApi};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

/// The key label the router watches Secrets by.
const KEYS_LABEL: &str = "scorefront.io/keys";
/// The slice port of every version but the probe.
const MODEL_PORT: u16 = 5001;
/// The endpoint whose `green` version is the probe.
const PROBE: usize = 0;
/// A pinned request without an answer after this long is taken to be waiting for a pod.
const PARKED_AFTER: Duration = Duration::from_millis(200);
/// How long the probe version's requests may wait for a pod, in the router.
const PROBE_WAIT_MS: u64 = 15_000;
/// The Service of the endpoints added while the router runs, in the probe's namespace.
const LATE_SERVICE: &str = "svc-late";

struct Settings {
    endpoints: usize,
    pods: usize,
    namespaces: usize,
    changes: usize,
    metrics_changes: usize,
    idle: Duration,
    timeout: Duration,
    router: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let number = |name: &str, default: usize| -> usize {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        };
        let s = Settings {
            endpoints: number("KSCALE_ENDPOINTS", 1000),
            pods: number("KSCALE_PODS", 5),
            namespaces: number("KSCALE_NAMESPACES", 1),
            changes: number("KSCALE_CHANGES", 50),
            metrics_changes: number("KSCALE_METRICS_CHANGES", 20),
            idle: Duration::from_secs(number("KSCALE_IDLE_SECONDS", 10) as u64),
            timeout: Duration::from_secs(number("KSCALE_TIMEOUT_SECONDS", 900) as u64),
            router: std::env::var_os("KSCALE_ROUTER")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_scorefront"))),
        };
        assert!(s.endpoints >= 2, "KSCALE_ENDPOINTS must be at least 2");
        assert!(s.pods >= 1, "KSCALE_PODS must be at least 1");
        assert!(
            (1..=s.endpoints).contains(&s.namespaces),
            "KSCALE_NAMESPACES must be within 1..=KSCALE_ENDPOINTS"
        );
        s
    }

    fn namespace(&self, endpoint: usize) -> String {
        if self.namespaces == 1 {
            "models".to_owned()
        } else {
            format!("models-{}", endpoint % self.namespaces)
        }
    }

    fn namespaces(&self) -> Vec<String> {
        (0..self.namespaces).map(|i| self.namespace(i)).collect()
    }

    fn pods_total(&self) -> usize {
        self.endpoints * 2 * self.pods
    }
}

fn endpoint_name(i: usize) -> String {
    format!("ep-{i:05}")
}

/// The Service of version `green` (or blue) of endpoint `i`.
fn service(i: usize, green: bool) -> String {
    if green {
        format!("svc-{i}-g")
    } else {
        format!("svc-{i}")
    }
}

/// A distinct 10.x.y.z address for pod `pod` of Service number `service` (data only: the
/// router never connects to it, as no request is scored there).
fn data_pod(service: usize, pod: usize, pods: usize) -> String {
    let n = (service * pods + pod + 1) as u32;
    Ipv4Addr::from(0x0a00_0000 | n).to_string()
}

/// The loopback address of probe pod `k`.
fn probe_pod(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (k / 250) as u8, 1 + (k % 250) as u8)
}

/// The only slice of `service`, with every pod `(address, ready)`; a pod not ready is not
/// serving either, and not terminating.
fn slice(ns: &str, service: &str, port: u16, pods: &[(String, bool)]) -> Value {
    let endpoints: Vec<(&str, bool, bool, bool)> = pods
        .iter()
        .map(|(ip, ready)| (ip.as_str(), *ready, *ready, false))
        .collect();
    kubeapi::endpoint_slice(
        ns,
        &format!("{service}-s1"),
        service,
        Some("http"),
        port,
        &endpoints,
    )
}

/// Fills the API server: the key Secret in each namespace, then each endpoint and the
/// slices of its two Services. Endpoint [`PROBE`]'s `green` pods are the first probe pods.
fn fill(api: &KubeApi, s: &Settings, probe_port: u16) {
    for ns in s.namespaces() {
        api.apply(kubeapi::secret(
            &ns,
            "keys",
            &[(KEYS_LABEL, "true")],
            &[
                ("primaryKey", support::KEY),
                ("secondaryKey", support::KEY2),
            ],
        ));
    }
    for i in 0..s.endpoints {
        let ns = s.namespace(i);
        let probe = i == PROBE;
        // Each version is autoscaled, at its Deployment's current count as the minimum, so
        // the autoscaler reads every Deployment and follows every version but changes none.
        let autoscale = json!({"minReplicas": s.pods, "maxReplicas": s.pods + 5});
        let mut green = json!({
            "name": "green",
            "service": service(i, true),
            "port": if probe { probe_port } else { MODEL_PORT },
            "autoscale": autoscale,
        });
        if probe {
            green["maxRequestWaitTimeMs"] = PROBE_WAIT_MS.into();
        }
        let spec = json!({
            "keysSecret": "keys",
            "versions": [
                {"name": "blue", "service": service(i, false), "port": MODEL_PORT,
                 "trafficPercentile": 90, "autoscale": autoscale},
                green,
            ],
        });
        api.apply(kubeapi::scoring_endpoint(&ns, &endpoint_name(i), spec));
        for green in [false, true] {
            api.apply(kubeapi::deployment(&ns, &service(i, green), s.pods as i32));
        }
        for (v, green) in [false, true].into_iter().enumerate() {
            let pods: Vec<(String, bool)> = (0..s.pods)
                .map(|p| {
                    if probe && green {
                        (probe_pod(p).to_string(), true)
                    } else {
                        (data_pod(2 * i + v, p, s.pods), true)
                    }
                })
                .collect();
            let port = if probe && green {
                probe_port
            } else {
                MODEL_PORT
            };
            api.apply(slice(&ns, &service(i, green), port, &pods));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Probe pods: fake models on loopback addresses that note when each request arrives

struct Arrival {
    pod: IpAddr,
    at: Instant,
}

/// Listens on `count` probe addresses, all on one port; returns the port and the arrivals.
async fn start_probe_pods(count: usize) -> (u16, mpsc::UnboundedReceiver<Arrival>) {
    'port: for _ in 0..20 {
        let first = TcpListener::bind((probe_pod(0), 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for k in 1..count {
            match TcpListener::bind((probe_pod(k), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for listener in listeners {
            tokio::spawn(serve_probe_pod(listener, tx.clone()));
        }
        return (port, rx);
    }
    panic!("no port free on all {count} probe addresses");
}

async fn serve_probe_pod(listener: TcpListener, arrivals: mpsc::UnboundedSender<Arrival>) {
    let pod = listener.local_addr().unwrap().ip();
    let answer = Bytes::from(json!({ "pod": pod.to_string() }).to_string());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (arrivals, answer) = (arrivals.clone(), answer.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let _ = arrivals.send(Arrival {
                pod,
                at: Instant::now(),
            });
            let answer = answer.clone();
            async move {
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(answer)))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The router process

struct Router {
    child: Child,
    pid: u32,
    http: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Router {
    fn spawn(bin: &Path, config: &Path, log: PathBuf, http: SocketAddr, admin: SocketAddr) -> Self {
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Router {
            pid: child.id(),
            child,
            http,
            admin,
            log,
        }
    }

    /// Fails with the end of the router's log if it has exited.
    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the router exited ({status}):\n{}", self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.pid))
    }

    fn memory(&self) -> Memory {
        Memory::of(&format!("/proc/{}/status", self.pid))
    }

    /// SIGTERM, then SIGKILL if it has not exited after 10 s.
    async fn stop(mut self) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("the router did not stop within 10 s of SIGTERM; killing it");
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system CPU seconds of a process, from its `/proc/.../stat`.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap();
    // Fields after the command name, which is in parentheses: state is field 3, utime 14.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(status_path: &str) -> Memory {
        let status = std::fs::read_to_string(status_path).unwrap();
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {status_path}"));
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap()
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    fn show(self) -> String {
        format!(
            "{:.1} MiB (peak so far {:.1} MiB)",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        )
    }
}

/// The machine's CPU time so far (all but idle and iowait) and the part of it stolen by
/// the hypervisor, in clock ticks, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = cpu.iter().take(8).sum();
    (total - cpu[3] - cpu[4], cpu[7])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// A keep-alive HTTP/1.1 connection to the admin port

struct Admin {
    addr: SocketAddr,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

impl Admin {
    fn new(addr: SocketAddr) -> Admin {
        Admin { addr, conn: None }
    }

    /// `GET path`: the status and body, or `None` if the router did not answer (the
    /// connection is then made again next time).
    async fn get(&mut self, path: &str) -> Option<(StatusCode, Bytes)> {
        let got = self.try_get(path).await;
        if got.is_none() {
            self.conn = None;
        }
        got
    }

    async fn try_get(&mut self, path: &str) -> Option<(StatusCode, Bytes)> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(self.addr).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            self.conn = Some(sender);
        }
        let sender = self.conn.as_mut()?;
        sender.ready().await.ok()?;
        let req = Request::get(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    }

    async fn metrics(&mut self) -> String {
        let (status, body) = self.get("/metrics").await.expect("/metrics answers");
        assert_eq!(status, 200, "/metrics");
        String::from_utf8(body.to_vec()).expect("/metrics is UTF-8")
    }
}

/// What `/metrics` says is routable: endpoints and versions with a ready-replicas gauge,
/// and the ready replicas of all of them.
#[derive(Debug, PartialEq)]
struct Routable {
    endpoints: usize,
    versions: usize,
    ready: u64,
}

fn routable(metrics: &str) -> Routable {
    let mut endpoints = std::collections::HashSet::new();
    let (mut versions, mut ready) = (0, 0);
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("scorefront_replicas{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|l| l == "state=\"ready\"") {
            continue;
        }
        let endpoint = labels
            .split(',')
            .find_map(|l| l.strip_prefix("endpoint=\""))
            .unwrap_or("")
            .trim_end_matches('"');
        endpoints.insert(endpoint.to_owned());
        versions += 1;
        ready += value.parse::<f64>().unwrap() as u64;
    }
    Routable {
        endpoints: endpoints.len(),
        versions,
        ready,
    }
}

// ---------------------------------------------------------------------------------------
// Figures

struct Stage {
    at: Duration,
    cpu: f64,
}

/// The `q` quantile of `samples`, in ms (nearest rank).
fn percentile(samples: &[Duration], q: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms.get(((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len().max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// p50, p99 and max of `samples`, in ms.
fn spread(samples: &[Duration]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        percentile(samples, 1.0)
    )
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = k8s_openapi::jiff::Timestamp::now().to_string();
    format!(
        "{cores} x {model}, Linux {}, {}",
        kernel.trim(),
        &date[..10]
    )
}

/// Where one stage of the run must end.
fn deadline(what: &str, within: Duration) -> impl Fn() {
    let at = Instant::now() + within;
    let what = what.to_owned();
    move || assert!(Instant::now() < at, "timed out after {within:?}: {what}")
}

// ---------------------------------------------------------------------------------------
// The run

fn main() {
    // `cargo bench` passes `--bench`; the settings come from the environment.
    let s = Settings::from_env();
    let router_pid = Arc::new(AtomicU32::new(0));
    let watched = router_pid.clone();
    let timeout = s.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let pid = watched.load(SeqCst);
        if pid != 0 {
            // SAFETY: signalling the router child by its pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        eprintln!("kube_scale: out of time after {timeout:?}; router killed");
        std::process::exit(2);
    });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(s, router_pid));
}

async fn run(s: Settings, router_pid: Arc<AtomicU32>) {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |what: &str, value: String| {
        println!("  {what}: {value}");
        rows.push((what.to_owned(), value));
    };
    println!(
        "kube_scale: {} ScoringEndpoints in {} namespace(s), {} Services and EndpointSlices, \
         {} pods",
        s.endpoints,
        s.namespaces,
        2 * s.endpoints,
        s.pods_total()
    );
    let machine = machine();
    println!("  machine: {machine}");
    let ticks_before = machine_ticks();

    // The API server and the probe pods: the first `pods` are endpoint 0's green pods,
    // then one new pod per change.
    let api = KubeApi::start().await;
    // The last probe pod serves the endpoints added later ([`LATE_SERVICE`]).
    let late_pod = probe_pod(s.pods + s.changes);
    let (probe_port, mut arrivals) = start_probe_pods(s.pods + s.changes + 1).await;
    let filling = Instant::now();
    fill(&api, &s, probe_port);
    println!("  filled the API server in {:?}", filling.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let (http, admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let config = dir.path().join("scorefront.yaml");
    let namespaces: Vec<String> = s.namespaces().iter().map(|n| format!("'{n}'")).collect();
    std::fs::write(
        &config,
        format!(
            "listen: {{http: '{http}', admin: '{admin}'}}\n\
             endpoints:\n  kubernetes:\n    kubeconfig: '{}'\n    namespaces: [{}]\n\
             shutdownGracePeriodSeconds: 1\n",
            kubeconfig.display(),
            namespaces.join(", ")
        ),
    )
    .unwrap();

    // 1. First sync.
    let start = Instant::now();
    let mut router = Router::spawn(
        &s.router,
        &config,
        dir.path().join("router.log"),
        http,
        admin,
    );
    router_pid.store(router.pid, SeqCst);
    let mut adm = Admin::new(router.admin);
    let out_of_time = deadline("/readyz to answer 200", Duration::from_secs(300));
    loop {
        if let Some((StatusCode::OK, _)) = adm.get("/readyz").await {
            break;
        }
        router.check_alive();
        out_of_time();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ready = Stage {
        at: start.elapsed(),
        cpu: router.cpu(),
    };
    let before_scrape = router.memory();
    row(
        "start to /readyz 200 (first sync)",
        format!(
            "{:.3} s, router CPU {:.2} s",
            ready.at.as_secs_f64(),
            ready.cpu
        ),
    );
    row("router memory at /readyz", before_scrape.show());

    // Scoring requests pinned to the probe version; each answers its status and, from a
    // probe pod, the pod's address.
    let probe_ns = s.namespace(PROBE);
    let probe_service = service(PROBE, true);
    let probe_slice = |pods: &[(String, bool)]| slice(&probe_ns, &probe_service, probe_port, pods);
    let first_pods = |ready: bool| -> Vec<(String, bool)> {
        (0..s.pods)
            .map(|k| (probe_pod(k).to_string(), ready))
            .collect()
    };
    let client = support::client();
    let router_http = router.http;
    let send_to = |endpoint: &str,
                   pin: &[(&str, &str)]|
     -> JoinHandle<Option<(StatusCode, Option<String>)>> {
        let url = format!("http://{router_http}/api/v1/endpoint/{endpoint}/score");
        let req = support::scoring_post(&url, support::KEY, pin, "{}");
        let client = client.clone();
        tokio::spawn(async move {
            let resp = client.request(req).await.ok()?;
            let status = resp.status();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            let pod = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| Some(v["pod"].as_str()?.to_owned()));
            Some((status, pod))
        })
    };
    let probe_endpoint = endpoint_name(PROBE);
    let send = || -> JoinHandle<Option<(StatusCode, Option<String>)>> {
        send_to(&probe_endpoint, &[("azureml-model-deployment", "green")])
    };
    // A new ScoringEndpoint `name` with one version on the late Service; the time from
    // applying it until a request to it is routed (until then it is unknown: 404).
    let add_endpoint = |name: &'static str| {
        let (send_to, probe_ns, api) = (&send_to, &probe_ns, &api);
        async move {
            let spec = json!({
                "keysSecret": "keys",
                "versions": [{"name": "blue", "service": LATE_SERVICE, "port": probe_port}],
            });
            let applied = Instant::now();
            api.apply(kubeapi::scoring_endpoint(probe_ns, name, spec));
            let out_of_time = deadline("a new endpoint to be routed", Duration::from_secs(300));
            loop {
                match send_to(name, &[]).await.unwrap() {
                    Some((StatusCode::OK, _)) => return applied.elapsed(),
                    Some((StatusCode::NOT_FOUND, _)) => {}
                    other => panic!("a request to the new endpoint {name}: {other:?}"),
                }
                out_of_time();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    api.apply(slice(
        &probe_ns,
        LATE_SERVICE,
        probe_port,
        &[(late_pod.to_string(), true)],
    ));
    // The pod that answered a probe request, which must have been routed.
    let answered_by = |answer: Option<(StatusCode, Option<String>)>| -> String {
        match answer {
            Some((StatusCode::OK, Some(pod))) => pod,
            other => panic!("a probe request was not answered by a probe pod: {other:?}"),
        }
    };
    // Sends pinned requests back to back after a change at `applied` until one waits; the
    // time to that request's send, and to the send of the last one still routed to a pod.
    let until_waiting = |applied: Instant| {
        let (send, answered_by) = (&send, &answered_by);
        async move {
            let mut last_routed = None;
            let out_of_time = deadline("a probe request to wait", Duration::from_secs(60));
            loop {
                let sent = Instant::now();
                let mut req = send();
                match tokio::time::timeout(PARKED_AFTER, &mut req).await {
                    Ok(answer) => {
                        answered_by(answer.unwrap());
                        last_routed = Some(sent);
                    }
                    Err(_) => {
                        let routed = last_routed.map(|t: Instant| t - applied);
                        return (sent - applied, routed, req);
                    }
                }
                out_of_time();
            }
        }
    };

    // 2. The first routing table: a request to endpoint 0 is routed to one of its pods.
    let out_of_time = deadline("the first routing table", Duration::from_secs(120));
    loop {
        match send().await.unwrap() {
            Some((StatusCode::OK, Some(pod))) => {
                assert!(
                    (0..s.pods).any(|k| probe_pod(k).to_string() == pod),
                    "answered by {pod}"
                );
                break;
            }
            Some((StatusCode::NOT_FOUND, _)) | None => {}
            other => panic!("a probe request before the first table: {other:?}"),
        }
        router.check_alive();
        out_of_time();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let routed = Stage {
        at: start.elapsed(),
        cpu: router.cpu(),
    };
    row(
        "start to the first routing table (a request to endpoint 0 routed)",
        format!(
            "{:.3} s, router CPU {:.2} s",
            routed.at.as_secs_f64(),
            routed.cpu
        ),
    );
    row(
        "router memory at the first routing table",
        router.memory().show(),
    );

    // 3. The router writes every ScoringEndpoint's status, and each write comes back to it
    // through its watch. A slice change while it works through them: every probe pod turns
    // unready, and requests must stop reaching them.
    let status_writes = || {
        (api.requests().iter())
            .filter(|r| r.method == http::Method::PATCH && r.path.ends_with("/status"))
            .count()
    };
    let out_of_time = deadline("the status writes", Duration::from_secs(300));
    while status_writes() < s.endpoints {
        router.check_alive();
        out_of_time();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = Stage {
        at: start.elapsed(),
        cpu: router.cpu(),
    };
    let applied = Instant::now();
    api.apply(probe_slice(&first_pods(false)));
    let (waits, routed_before, waiting) = until_waiting(applied).await;
    waiting.abort();
    // A new ScoringEndpoint at the same time comes behind the status writes on its watch.
    let late_busy = add_endpoint("ep-late-1").await;
    row(
        "slice change to routing while the status writes come back (pods turned unready get no more requests)",
        match routed_before {
            Some(routed) => format!(
                "{:.2} ms (the request sent {:.2} ms earlier was still routed)",
                waits.as_secs_f64() * 1e3,
                (waits - routed).as_secs_f64() * 1e3
            ),
            None => format!(
                "{:.2} ms (the first request sent after the change already waited)",
                waits.as_secs_f64() * 1e3
            ),
        },
    );
    // Every status says what the router routes: all pods ready, but the probe's green.
    let expected = |i: usize| 2 * s.pods - if i == PROBE { s.pods } else { 0 };
    let out_of_time = deadline("every status to be written", Duration::from_secs(300));
    loop {
        let right = (0..s.endpoints)
            .filter(|&i| {
                let obj = api.get("scoringendpoints", &s.namespace(i), &endpoint_name(i));
                let ready = obj
                    .as_ref()
                    .and_then(|o| o.pointer("/status/readyReplicas"));
                ready.and_then(Value::as_u64) == Some(expected(i) as u64)
            })
            .count();
        if right == s.endpoints {
            break;
        }
        router.check_alive();
        out_of_time();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out_of_time = deadline("the router to go quiet", Duration::from_secs(300));
    let quiet = loop {
        let (t, cpu) = (start.elapsed(), router.cpu());
        tokio::time::sleep(Duration::from_secs(1)).await;
        if router.cpu() - cpu < 0.05 {
            break Stage { at: t, cpu };
        }
        out_of_time();
    };
    row(
        "new ScoringEndpoint to routing, applied right after the status writes",
        format!("{:.3} s", late_busy.as_secs_f64()),
    );
    row(
        "status writes",
        format!(
            "{} written {:.3} s after start (router CPU {:.2} s); every status right and \
             the router quiet from {:.3} s (router CPU {:.2} s)",
            s.endpoints,
            written.at.as_secs_f64(),
            written.cpu,
            quiet.at.as_secs_f64(),
            quiet.cpu
        ),
    );
    row(
        "router memory after the status writes (no /metrics scrape yet)",
        router.memory().show(),
    );

    // 4. Idle.
    let (t, cpu) = (Instant::now(), router.cpu());
    tokio::time::sleep(s.idle).await;
    let idle = (router.cpu() - cpu) / t.elapsed().as_secs_f64();
    row(
        "router CPU while idle",
        format!(
            "{:.2} % of a core over {} s",
            idle * 100.0,
            s.idle.as_secs()
        ),
    );
    row("router memory after idle", router.memory().show());
    let late_quiet = add_endpoint("ep-late-2").await;
    row(
        "new ScoringEndpoint to routing, applied when quiet",
        format!("{:.2} ms", late_quiet.as_secs_f64() * 1e3),
    );
    // Both go again, with their Service, so that the counts below are the configured ones.
    for name in ["ep-late-1", "ep-late-2"] {
        api.delete("scoringendpoints", &probe_ns, name);
    }
    api.delete("endpointslices", &probe_ns, &format!("{LATE_SERVICE}-s1"));
    let out_of_time = deadline("the new endpoints to go", Duration::from_secs(120));
    for name in ["ep-late-1", "ep-late-2"] {
        while send_to(name, &[]).await.unwrap().map(|a| a.0) != Some(StatusCode::NOT_FOUND) {
            out_of_time();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // 5. /metrics, with the probe pods ready again: every endpoint and pod is routable.
    api.apply(probe_slice(&first_pods(true)));
    let out_of_time = deadline("the probe pods to be ready again", Duration::from_secs(60));
    while send().await.unwrap().map(|a| a.0) != Some(StatusCode::OK) {
        out_of_time();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let want = Routable {
        endpoints: s.endpoints,
        versions: 2 * s.endpoints,
        ready: s.pods_total() as u64,
    };
    let t = Instant::now();
    let text = adm.metrics().await;
    let first_scrape = t.elapsed();
    assert_eq!(routable(&text), want, "what /metrics says is routable");
    for (kind, count) in [
        ("ScoringEndpoint", s.endpoints),
        ("EndpointSlice", 2 * s.endpoints),
        ("Secret", s.namespaces),
    ] {
        let got = support::metric(&text, "scorefront_kubernetes_objects", &[("kind", kind)]);
        assert_eq!(
            got,
            Some(count as f64),
            "scorefront_kubernetes_objects {kind}"
        );
    }
    row(
        "first /metrics scrape",
        format!(
            "{:.1} MB in {:.1} ms: {} endpoints, {} versions, {} ready pods",
            text.len() as f64 / 1e6,
            first_scrape.as_secs_f64() * 1e3,
            want.endpoints,
            want.versions,
            want.ready
        ),
    );
    row("router memory after one scrape", router.memory().show());
    let mut scrapes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        adm.metrics().await;
        scrapes.push(t.elapsed());
    }
    row(
        "5 more /metrics scrapes",
        format!("median {:.1} ms", percentile(&scrapes, 0.5)),
    );
    row("router memory after 6 scrapes", router.memory().show());

    // 6. Slice changes on the probe version, seen by routing. First every probe pod
    // unready again, so that a pinned request waits.
    let applied = Instant::now();
    api.apply(probe_slice(&first_pods(false)));
    let (_, _, mut waiting) = until_waiting(applied).await;
    // The pod a request was routed to, if it was.
    let routed_to = |answer: Option<(StatusCode, Option<String>)>| match answer {
        Some((StatusCode::OK, pod)) => pod,
        _ => None,
    };
    let (mut to_ready, mut to_unready, mut resolution) = (Vec::new(), Vec::new(), Vec::new());
    let mut misjudged = 0;
    let mut to_ready_again = Vec::new();
    for change in 0..s.changes {
        // A new pod, ready: the waiting request reaches it (over a new connection). Then
        // the same pod turns unready, ready again (the router keeps its connection to it
        // while it is listed), and unready again.
        let new = probe_pod(s.pods + change);
        for again in [false, true] {
            while arrivals.try_recv().is_ok() {}
            let applied = Instant::now();
            api.apply(probe_slice(&[(new.to_string(), true)]));
            let out_of_time = deadline(
                "the waiting request to reach the new pod",
                Duration::from_secs(20),
            );
            let new_pod = Some(new.to_string());
            let mut answered = None;
            let reached = loop {
                tokio::select! {
                    Some(a) = arrivals.recv() => {
                        if a.pod == IpAddr::V4(new) {
                            break Some(a.at);
                        }
                    }
                    pod = &mut waiting, if answered.is_none() => {
                        let pod = routed_to(pod.unwrap());
                        if pod != new_pod {
                            // The request taken for waiting had been routed to the old
                            // pod after all: nothing waited for this change.
                            break None;
                        }
                        answered = Some(pod);
                    }
                    () = tokio::time::sleep(Duration::from_secs(1)) => out_of_time(),
                }
            };
            if answered.is_none() && reached.is_some() {
                answered = Some(routed_to(waiting.await.unwrap()));
            }
            match reached {
                Some(at) if answered == Some(new_pod) => {
                    let samples = if again {
                        &mut to_ready_again
                    } else {
                        &mut to_ready
                    };
                    samples.push(at - applied);
                }
                _ => misjudged += 1,
            }
            // Unready: requests stop reaching it, and one waits again.
            let applied = Instant::now();
            api.apply(probe_slice(&[(new.to_string(), false)]));
            let (waits, routed, req) = until_waiting(applied).await;
            to_unready.push(waits);
            resolution.push(waits - routed.unwrap_or_default());
            waiting = req;
        }
    }
    waiting.abort();
    row(
        "slice change to routing: a new ready pod gets the waiting request",
        format!("{} ({} changes)", spread(&to_ready), to_ready.len()),
    );
    row(
        "slice change to routing: an unready pod turned ready again gets the waiting request",
        format!(
            "{} ({} changes)",
            spread(&to_ready_again),
            to_ready_again.len()
        ),
    );
    row(
        "slice change to routing: a pod turned unready gets no more requests",
        format!(
            "{} ({} changes); the last request still routed (or else the change) came \
             p50 {:.2} ms earlier",
            spread(&to_unready),
            to_unready.len(),
            percentile(&resolution, 0.5)
        ),
    );
    if misjudged > 0 {
        row(
            "probe requests taken for waiting but routed",
            format!("{misjudged} (their ready samples dropped)"),
        );
    }

    // 7. The same kind of change as /metrics shows it, on another endpoint.
    let target = s.endpoints / 2;
    let (ns, svc, ep) = (
        s.namespace(target),
        service(target, false),
        endpoint_name(target),
    );
    let labels = [
        ("endpoint", ep.as_str()),
        ("version", "blue"),
        ("state", "ready"),
    ];
    let (mut seen, mut scrape_times) = (Vec::new(), Vec::new());
    for change in 0..s.metrics_changes {
        // Pod 0 turns unready, then ready again, and so on.
        let ready0 = change % 2 == 1;
        let pods: Vec<(String, bool)> = (0..s.pods)
            .map(|p| (data_pod(2 * target, p, s.pods), p != 0 || ready0))
            .collect();
        let want = (s.pods - usize::from(!ready0)) as f64;
        let applied = Instant::now();
        api.apply(slice(&ns, &svc, MODEL_PORT, &pods));
        let out_of_time = deadline("/metrics to show a slice change", Duration::from_secs(30));
        loop {
            let t = Instant::now();
            let text = adm.metrics().await;
            let done = Instant::now();
            scrape_times.push(done - t);
            if support::metric(&text, "scorefront_replicas", &labels) == Some(want) {
                seen.push(done - applied);
                break;
            }
            out_of_time();
        }
    }
    row(
        "slice change to /metrics showing it (scraped back to back)",
        format!(
            "{} ({} changes); one scrape: {}",
            spread(&seen),
            seen.len(),
            spread(&scrape_times)
        ),
    );

    let end = router.memory();
    row("router memory at the end", end.show());
    row(
        "router CPU, whole run",
        format!(
            "{:.2} s; this process (API server, pods, clients): {:.2} s",
            router.cpu(),
            cpu_seconds("/proc/self/stat")
        ),
    );
    let ticks_after = machine_ticks();
    let busy = (ticks_after.0 - ticks_before.0).max(1);
    row(
        "steal during the run",
        format!(
            "{:.1} % of the machine's busy time",
            100.0 * (ticks_after.1 - ticks_before.1) as f64 / busy as f64
        ),
    );
    router.stop().await;

    println!();
    println!(
        "Kubernetes discovery, {} ScoringEndpoints, {} pods, {} namespace(s); {machine}",
        s.endpoints,
        s.pods_total(),
        s.namespaces
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    for (what, value) in &rows {
        println!("| {what} | {value} |");
    }
}
