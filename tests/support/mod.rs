//! Test support: fake models on real sockets, a router started on port 0 from real files,
//! endpoint documents, a small HTTP client, bounded polling and a Prometheus text reader.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod kubeapi;
pub mod tls;
pub mod tokens;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use scorefront::app::{self, App, Listeners};
use tokio::{net::TcpListener, time::Instant};

pub const KEY: &str = "primary-key-for-tests-0001";
pub const KEY2: &str = "secondary-key-for-tests-0002";

pub type TestBody = BoxBody<Bytes, Infallible>;

/// A fake model. Per-request behaviour comes from request headers:
/// - `x-delay-ms: N` waits before answering;
/// - `x-status: N` answers with that status;
/// - `x-close-early: 1` drops the connection without answering;
/// - `x-stream: N` answers with N chunks of `chunk-i\n`, 20 ms apart.
///
/// It answers `{"model": name, "path": ..., "body": <bytes received>}` and records what it saw.
pub struct Model {
    pub addr: SocketAddr,
    pub name: String,
    pub state: Arc<ModelState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct ModelState {
    pub requests: AtomicUsize,
    pub current: AtomicUsize,
    pub max_concurrent: AtomicUsize,
    pub connections: AtomicUsize,
    /// Headers and target of the last request.
    pub last: Mutex<Option<(HeaderMap, String)>>,
    /// Answer with `Connection: close`, like the AzureML scoring server.
    pub close_always: std::sync::atomic::AtomicBool,
}

impl Drop for Model {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Model {
    pub async fn start(name: &str) -> Model {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    pub fn serve(name: &str, listener: TcpListener) -> Model {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ModelState::default());
        let (st, nm) = (state.clone(), name.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, SeqCst);
                let (st, nm) = (st.clone(), nm.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), nm.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Model {
            addr,
            name: name.to_string(),
            state,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(SeqCst)
    }

    pub fn max_concurrent(&self) -> usize {
        self.state.max_concurrent.load(SeqCst)
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.state.last.lock().unwrap().as_ref().unwrap().0.clone()
    }

    pub fn last_target(&self) -> String {
        self.state.last.lock().unwrap().as_ref().unwrap().1.clone()
    }
}

struct Current(Arc<ModelState>);
impl Drop for Current {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, SeqCst);
    }
}

async fn answer(
    st: Arc<ModelState>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    if (req.headers().get(http::header::USER_AGENT))
        .is_some_and(|ua| ua == scorefront::discovery::process::PROBE_USER_AGENT)
    {
        // Health probes are not traffic: a test counts and inspects scoring requests and
        // their connections (a probe brings its own).
        st.connections.fetch_sub(1, SeqCst);
        return Ok(Response::new(BoxBody::new(Full::new(Bytes::from(
            "Healthy",
        )))));
    }
    st.requests.fetch_add(1, SeqCst);
    let now = st.current.fetch_add(1, SeqCst) + 1;
    st.max_concurrent.fetch_max(now, SeqCst);
    let _current = Current(st.clone());
    let (parts, body) = req.into_parts();
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    *st.last.lock().unwrap() = Some((parts.headers.clone(), target.clone()));
    let received = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if header("x-close-early").is_some() {
        return Err(std::io::Error::other("closing without an answer"));
    }
    let status = header("x-status")
        .and_then(|v| v.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut resp = Response::builder().status(status).header("x-model", &name);
    if st.close_always.load(SeqCst) {
        resp = resp.header("connection", "close");
    }
    if let Some(n) = header("x-stream").and_then(|v| v.parse::<usize>().ok()) {
        let chunks = (0..n).map(|i| Bytes::from(format!("chunk-{i}\n")));
        return Ok(resp
            .body(chunked(chunks, Duration::from_millis(20)))
            .unwrap());
    }
    let body = serde_json::json!({"model": name, "path": target, "body": received}).to_string();
    Ok(resp
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body))))
        .unwrap())
}

/// The sample model's script (examples/sample_model.py), for replica commands.
pub fn sample_model() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sample_model.py");
    assert!(path.exists(), "{} exists", path.display());
    path.display().to_string()
}

/// Whether process `pid` is gone, or dead and only waiting for whoever adopted it to reap it.
pub fn proc_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// `scorefront serve` run as its own process on free loopback ports, from a folder holding
/// its config and `endpoints`; its output goes to `scorefront.log` there.
pub struct Served {
    pub child: tokio::process::Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Served {
    /// Runs with the config named as `name` answers for the folder holding both files:
    /// from which folder (or this process's), by which path. `extra` goes after
    /// `serve --config FILE`.
    pub async fn start_at(
        endpoints: &str,
        extra: &[&str],
        name: impl Fn(&std::path::Path) -> (Option<PathBuf>, PathBuf),
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let (http, admin) = (unused_addr(), unused_addr());
        std::fs::write(
            dir.path().join("scorefront.yaml"),
            format!(
                "listen: {{http: '{http}', admin: '{admin}'}}\nendpoints: {{file: endpoints.yaml}}\n\
                 reloadIntervalMs: 50\nshutdownGracePeriodSeconds: 5\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("endpoints.yaml"), endpoints).unwrap();
        let log = std::fs::File::create(dir.path().join("scorefront.log")).unwrap();
        let (cwd, config) = name(dir.path());
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_scorefront"));
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("scorefront starts");
        Served {
            child,
            http,
            admin,
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scorefront.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on the scorefront process this test started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("scorefront did not exit within 15 s; log:\n{}", self.log()),
        }
    }
}

/// Serves every connection `listener` accepts (HTTP/1.1 or h2c) with a clone of `svc`,
/// until the returned task is aborted.
pub fn serve_connections<S, B>(listener: TcpListener, svc: S) -> tokio::task::JoinHandle<()>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = svc.clone();
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// A raw HTTP/1.1 scoring request to `endpoint` with the test key, keep-alive, with
/// `extra_headers` (each ending in CRLF) and `body`.
pub fn raw_request(endpoint: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST /api/v1/service/{endpoint}/score HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {KEY}\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

/// Reads one HTTP/1.1 response with a `content-length` off `stream`: (status, body).
pub async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(stream, &mut chunk)
            .await
            .expect("read");
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("content-length");
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(stream, &mut chunk)
            .await
            .expect("read");
        assert!(n > 0, "closed in the middle of a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap();
    (status, body)
}

/// A body fed from a channel: it has no Content-Length, so HTTP/1.1 sends it chunked; it
/// ends when the sender is dropped.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A chunked body of `chunks`, sent one after the other with `gap` after each
/// (`Duration::ZERO`: back to back). Stops early if the receiver goes away.
pub fn chunked<I>(chunks: I, gap: Duration) -> TestBody
where
    I: IntoIterator<Item = Bytes>,
    I::IntoIter: Send + 'static,
{
    let chunks = chunks.into_iter();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for c in chunks {
            if tx.send(c).await.is_err() {
                return;
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    });
    BoxBody::new(ChannelBody(rx))
}

/// A router started in this process from real files in a temporary folder, listening on
/// port 0.
pub struct Router {
    pub app: Option<App>,
    pub http: SocketAddr,
    /// Set when started with an https listener.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// Router config used by the tests: fast reloads, a short grace period.
pub fn router_config(extra: &str) -> String {
    format!(
        "endpoints: {{file: endpoints.yaml}}\nreloadIntervalMs: 20\nshutdownGracePeriodSeconds: 5\n{extra}"
    )
}

/// One endpoint document with the test keys [`KEY`] and [`KEY2`]. `versions` is the YAML
/// flow list of versions (see [`version`]).
pub fn endpoint(name: &str, versions: &str) -> String {
    endpoint_with_keys(name, KEY, KEY2, versions)
}

/// One endpoint document with the given primary and secondary keys.
pub fn endpoint_with_keys(name: &str, primary: &str, secondary: &str, versions: &str) -> String {
    format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: {name}}}\n\
         spec:\n  keys: {{primaryKey: {primary}, secondaryKey: {secondary}}}\n  versions: {versions}\n"
    )
}

/// One version as a YAML flow mapping, `{name: NAME, replicas: ['A', ...], SETTINGS}`:
/// `settings` holds any further fields (`"maxRequestWaitTimeMs: 100"`), or is empty.
pub fn version(name: &str, replicas: &[SocketAddr], settings: &str) -> String {
    let list = replicas
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if settings.is_empty() {
        format!("{{name: {name}, replicas: [{list}]}}")
    } else {
        format!("{{name: {name}, replicas: [{list}], {settings}}}")
    }
}

/// An endpoint `name` with a single version `blue` on `replicas`, with extra version
/// `settings` (see [`version`]).
pub fn one_version(name: &str, replicas: &[SocketAddr], settings: &str) -> String {
    endpoint(name, &format!("[{}]", version("blue", replicas, settings)))
}

/// A loopback address nothing listens on: a port the system just handed out and that was
/// released at once. Connecting to it is refused; binding it again works.
pub fn unused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Router {
    pub async fn start(endpoints: &str) -> Router {
        Self::start_with(&router_config(""), endpoints).await
    }

    pub async fn start_with(config: &str, endpoints: &str) -> Router {
        Self::try_start(config, endpoints, &[], false)
            .await
            .expect("router starts")
    }

    /// Starts a router from `config` and `endpoints`, with each of `files` (a path relative
    /// to the router's folder, and its contents) written first, and an https listener on
    /// port 0 besides the http one when `https` is set.
    pub async fn try_start(
        config: &str,
        endpoints: &str,
        files: &[(&str, &[u8])],
        https: bool,
    ) -> anyhow::Result<Router> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("scorefront.yaml"), config).unwrap();
        std::fs::write(dir.path().join("endpoints.yaml"), endpoints).unwrap();
        for (path, contents) in files {
            std::fs::write(dir.path().join(path), contents).unwrap();
        }
        let bind = || TcpListener::bind("127.0.0.1:0");
        let http = bind().await.unwrap();
        let admin = bind().await.unwrap();
        let tls = if https {
            Some(bind().await.unwrap())
        } else {
            None
        };
        let (h, a) = (http.local_addr().unwrap(), admin.local_addr().unwrap());
        let s = tls.as_ref().map(|l| l.local_addr().unwrap());
        let app = app::start(
            &dir.path().join("scorefront.yaml"),
            Listeners {
                http: Some(http),
                https: tls,
                admin,
            },
        )
        .await?;
        Ok(Router {
            app: Some(app),
            http: h,
            https: s,
            admin: a,
            dir,
        })
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Rewrites the endpoints file and waits until the router has published a new table.
    pub async fn reload(&self, endpoints: &str) {
        let mut generation = self.app().generation.clone();
        let before = *generation.borrow_and_update();
        write_atomically(self.path("endpoints.yaml"), endpoints).unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            generation.wait_for(|g| *g > before),
        )
        .await
        .expect("reload applied within 10 s")
        .unwrap();
    }

    pub async fn metrics(&self) -> String {
        let resp = get(&format!("http://{}/metrics", self.admin)).await;
        String::from_utf8(resp.1.to_vec()).unwrap()
    }

    pub async fn shutdown(mut self) {
        self.app.take().unwrap().shutdown().await;
    }
}

/// Runs the real `scorefront` binary with `args`: (exit code, stdout, stderr).
pub async fn run_scorefront(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_scorefront"))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `scorefront check-config --config {config}`: (exit code, stdout, stderr).
pub async fn check_config(config: &std::path::Path) -> (Option<i32>, String, String) {
    run_scorefront(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ])
    .await
}

/// Replaces a file the way editors and Kubernetes volume updates do (write a new file,
/// rename it over the old), so the watcher never reads it half written.
pub fn write_atomically(
    path: impl AsRef<std::path::Path>,
    contents: impl AsRef<[u8]>,
) -> std::io::Result<()> {
    let tmp = path.as_ref().with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// An HTTP/1.1 client with a connection pool.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn body(bytes: impl Into<Bytes>) -> TestBody {
    BoxBody::new(Full::new(bytes.into()))
}

/// A scoring `POST` to `url` with `Authorization: Bearer {key}`, extra `headers` and
/// `payload` as the body.
pub fn scoring_post(
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    payload: impl Into<Bytes>,
) -> Request<TestBody> {
    let mut req = Request::post(url).header("authorization", format!("Bearer {key}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body(payload)).unwrap()
}

/// A scoring request with the test key.
pub fn scoring(method: &str, url: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {KEY}"))
}

/// Sends `req` and reads the whole response.
pub async fn send(req: Request<TestBody>) -> (http::response::Parts, Bytes) {
    let resp = client().request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts, bytes)
}

/// Sends `req`, asserts a 200 and returns the response.
pub async fn send_ok(req: Request<TestBody>) -> (http::response::Parts, Bytes) {
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 200, "{body:?}");
    (parts, body)
}

pub async fn get(url: &str) -> (http::response::Parts, Bytes) {
    send(Request::get(url).body(body("")).unwrap()).await
}

/// A JSON body, parsed; panics with the body when it is not JSON.
#[track_caller]
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// The `error.code` of a router-generated JSON body.
#[track_caller]
pub fn error_code(body: &[u8]) -> String {
    json(body)["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string()
}

/// The model name of a fake model's JSON answer.
#[track_caller]
pub fn model_of(body: &[u8]) -> String {
    json(body)["model"].as_str().expect("model").to_string()
}

/// The request body byte count a fake model's JSON answer reports.
#[track_caller]
pub fn body_len_of(body: &[u8]) -> u64 {
    json(body)["body"].as_u64().expect("body count")
}

// ---------------------------------------------------------------------------------------
// Metrics

/// The value of the first series `name{...}` in the Prometheus text `text` whose labels
/// include every one of `labels` (in any order). All series of a metric have the same
/// label names, so giving them all picks exactly one series.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let pairs: Vec<(&str, &str)> = rest
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    (k, v.trim_matches('"'))
                })
                .collect();
            labels
                .iter()
                .all(|want| pairs.contains(want))
                .then(|| value.parse().expect("numeric sample"))
        })
}

/// Scrapes the router's /metrics until [`metric`] finds `want` for `name{labels}`. Metrics
/// are written when a response body is dropped, which may be just after the client has
/// read it.
pub async fn metric_eventually(
    router: &Router,
    patience: Patience,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) {
    let deadline = Instant::now() + patience.within;
    loop {
        let text = router.metrics().await;
        let got = metric(&text, name, labels);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?}: {name}{labels:?} is {got:?}, want {want}\n{text}",
            patience.within
        );
        tokio::time::sleep(patience.every).await;
    }
}

// ---------------------------------------------------------------------------------------
// Polling

/// How long a polled condition may take before the test fails, and how often it is
/// looked at.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    pub within: Duration,
    pub every: Duration,
}

impl Patience {
    /// For state inside this process (a slot taken, a gauge updated): 3 s, every 5 ms.
    pub const SHORT: Patience = Patience {
        within: Duration::from_secs(3),
        every: Duration::from_millis(5),
    };
    /// For reloads, child processes and the real binary: 10 s, every 25 ms.
    pub const LONG: Patience = Patience {
        within: Duration::from_secs(10),
        every: Duration::from_millis(25),
    };
}

/// A bound on a hand-written polling loop: [`Deadline::tick`] fails the test once the
/// patience has run out, and otherwise waits before the next look.
pub struct Deadline {
    what: String,
    at: Instant,
    patience: Patience,
}

impl Deadline {
    pub fn new(what: impl Into<String>, patience: Patience) -> Deadline {
        Deadline {
            what: what.into(),
            at: Instant::now() + patience.within,
            patience,
        }
    }

    pub async fn tick(&self) {
        assert!(
            Instant::now() < self.at,
            "timed out after {:?} waiting for {}",
            self.patience.within,
            self.what
        );
        tokio::time::sleep(self.patience.every).await;
    }
}

/// Polls the async `check` until it returns `Some`, and returns that value.
pub async fn eventually<T, F, Fut>(what: &str, patience: Patience, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Deadline::new(what, patience);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        deadline.tick().await;
    }
}

/// Polls the plain condition `cond` until it holds.
pub async fn until(what: &str, patience: Patience, mut cond: impl FnMut() -> bool) {
    let deadline = Deadline::new(what, patience);
    while !cond() {
        deadline.tick().await;
    }
}
