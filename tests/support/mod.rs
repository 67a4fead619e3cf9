//! Test support: fake models on real sockets, a router started on port 0 from real files,
//! and a small HTTP client.
#![allow(dead_code)] // each test binary uses a different part of this module

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
use tokio::net::TcpListener;

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
        return Ok(resp.body(BoxBody::new(chunks(n))).unwrap());
    }
    let body = serde_json::json!({"model": name, "path": target, "body": received}).to_string();
    Ok(resp
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body))))
        .unwrap())
}

/// A body of `n` chunks, 20 ms apart.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn chunks(n: usize) -> Chunks {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..n {
            if tx.send(Bytes::from(format!("chunk-{i}\n"))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Chunks(rx)
}

/// A router started in this process from real files in a temporary folder, listening on
/// port 0.
pub struct Router {
    pub app: Option<App>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// Router config used by the tests: fast reloads, a short grace period.
pub fn router_config(extra: &str) -> String {
    format!(
        "endpoints: {{file: endpoints.yaml}}\nreloadIntervalMs: 20\nshutdownGracePeriodSeconds: 5\n{extra}"
    )
}

/// One endpoint document. `versions` is the YAML flow list of versions.
pub fn endpoint(name: &str, versions: &str) -> String {
    format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: {name}}}\n\
         spec:\n  keys: {{primaryKey: {KEY}, secondaryKey: {KEY2}}}\n  versions: {versions}\n"
    )
}

impl Router {
    pub async fn start(endpoints: &str) -> Router {
        Self::start_with(&router_config(""), endpoints).await
    }

    pub async fn start_with(config: &str, endpoints: &str) -> Router {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("scorefront.yaml"), config).unwrap();
        std::fs::write(dir.path().join("endpoints.yaml"), endpoints).unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (h, a) = (http.local_addr().unwrap(), admin.local_addr().unwrap());
        let app = app::start(
            &dir.path().join("scorefront.yaml"),
            Listeners { http, admin },
        )
        .await
        .expect("router starts");
        Router {
            app: Some(app),
            http: h,
            admin: a,
            dir,
        }
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

pub async fn get(url: &str) -> (http::response::Parts, Bytes) {
    send(Request::get(url).body(body("")).unwrap()).await
}

/// The `error.code` of a router-generated JSON body.
pub fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    v["error"]["code"].as_str().expect("error.code").to_string()
}

/// The model name of a fake model's JSON answer.
pub fn model_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON model answer");
    v["model"].as_str().unwrap().to_string()
}
