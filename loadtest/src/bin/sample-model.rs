//! `sample-model`: a fast stand-in for a model replica, with the routes of the AzureML
//! scoring server: `GET /` answers 200 `Healthy`, `GET|POST /score` a JSON body,
//! `GET /swagger.json` a small OpenAPI document. Latency, errors, concurrency and
//! connection reuse are configurable; see the package README.
//!
//! It is the "direct" baseline of the load scenarios, so the request path is lean: the
//! bodies are built once at start, a request is answered from them without copying, and
//! the default runtime is a single thread. It serves HTTP/1.1 and h2c (prior knowledge)
//! on the same port, and both over TLS with `--tls-cert`/`--tls-key`.

use std::{
    cell::RefCell, convert::Infallible, net::SocketAddr, path::PathBuf, process::ExitCode,
    sync::Arc,
};

use anyhow::Context;
use bytes::Bytes;
use clap::{CommandFactory, Parser, error::ErrorKind};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use loadtest::{dist::LatencyDist, precise::TimerPool, rng::Rng};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;

const EXAMPLES: &str = "\
Examples:
  sample-model --listen 127.0.0.1:0                      # prints 'listening on 127.0.0.1:PORT'
  sample-model --port 5001 --latency-ms 20 --concurrency 1 --close
  sample-model --port 5002 --latency-dist exp:5 --error-rate 0.01 --response-bytes 4096

Latency distributions (milliseconds): MS or fixed:MS, uniform:LO:HI, exp:MEAN,
lognormal:MEDIAN:SIGMA.";

/// A fast sample model server (HTTP/1.1 and h2c) for load tests.
#[derive(Parser, Debug)]
#[command(name = "sample-model", version, after_help = EXAMPLES)]
struct Args {
    /// Address to listen on; port 0 picks a free port. The first line on stdout is
    /// `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Shorthand for --listen 127.0.0.1:PORT (what scorefront's `{port}` fills in).
    #[arg(long, conflicts_with = "listen")]
    port: Option<u16>,
    /// Fixed time each scoring request takes, in milliseconds.
    #[arg(long, alias = "delay-ms", conflicts_with = "latency_dist")]
    latency_ms: Option<f64>,
    /// Random time each scoring request takes: fixed:MS, uniform:LO:HI, exp:MEAN or
    /// lognormal:MEDIAN:SIGMA (milliseconds).
    #[arg(long, value_name = "SPEC")]
    latency_dist: Option<LatencyDist>,
    /// Size of the /score response body in bytes (still valid JSON from 2 bytes up)
    /// [default: a short JSON object].
    #[arg(long)]
    response_bytes: Option<usize>,
    /// Scoring requests in service at once; more wait in arrival order, like requests
    /// queued for a busy gunicorn worker. 0: unlimited.
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    /// Fraction of scoring requests answered 500 with {"message": ...}, drawn at random
    /// per request.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Answer every request with `Connection: close`, as the AzureML scoring server does.
    #[arg(long)]
    close: bool,
    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Version name put in the /score body [default: $SCOREFRONT_VERSION, else "sample"].
    #[arg(long)]
    name: Option<String>,
    /// PEM certificate chain: serve TLS (ALPN h2 and http/1.1).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl Args {
    fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "--error-rate must be between 0 and 1, got {}",
                self.error_rate
            ));
        }
        if let Some(ms) = self.latency_ms
            && !(ms.is_finite() && ms >= 0.0)
        {
            return Err(format!("--latency-ms must be a number >= 0, got {ms}"));
        }
        if self.threads == 0 || self.threads > 1024 {
            return Err(format!("--threads must be 1..=1024, got {}", self.threads));
        }
        Ok(())
    }

    fn latency(&self) -> Result<Option<LatencyDist>, String> {
        let dist = match (&self.latency_dist, self.latency_ms) {
            (Some(d), _) => d.clone(),
            (None, Some(ms)) => format!("fixed:{ms}").parse()?,
            (None, None) => return Ok(None),
        };
        Ok((!dist.is_zero()).then_some(dist))
    }
}

/// Everything a request needs, built once.
struct State {
    healthy: Bytes,
    score: Bytes,
    error: Bytes,
    swagger: Bytes,
    not_found: Bytes,
    latency: Option<LatencyDist>,
    error_rate: f64,
    limit: Option<Semaphore>,
    close: bool,
    timers: TimerPool,
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const CLOSE: HeaderValue = HeaderValue::from_static("close");

thread_local! {
    static RNG: RefCell<Rng> = RefCell::new(Rng::from_entropy());
}

/// The /score body: a short JSON object, or exactly `size` bytes of JSON (padded with a
/// string field, or whitespace when too small for one).
fn score_body(name: &str, size: Option<usize>) -> Bytes {
    let name = serde_json::to_string(name).expect("a string serializes");
    let pid = std::process::id();
    let Some(size) = size else {
        return Bytes::from(format!(
            r#"{{"version":{name},"pid":{pid},"result":[0.5]}}"#
        ));
    };
    let prefix = format!(r#"{{"version":{name},"pid":{pid},"pad":""#);
    let suffix = r#""}"#;
    let body = if size >= prefix.len() + suffix.len() {
        format!(
            "{prefix}{}{suffix}",
            "x".repeat(size - prefix.len() - suffix.len())
        )
    } else if size >= 2 {
        format!("{{}}{}", " ".repeat(size - 2))
    } else {
        " ".repeat(size)
    };
    Bytes::from(body)
}

impl State {
    fn new(args: &Args) -> Result<State, String> {
        let name = args
            .name
            .clone()
            .or_else(|| std::env::var("SCOREFRONT_VERSION").ok())
            .unwrap_or_else(|| "sample".to_string());
        let title = serde_json::to_string(&name).expect("a string serializes");
        Ok(State {
            healthy: Bytes::from_static(b"Healthy"),
            score: score_body(&name, args.response_bytes),
            error: Bytes::from_static(br#"{"message":"simulated model failure"}"#),
            swagger: Bytes::from(format!(
                r#"{{"swagger":"2.0","info":{{"title":{title},"version":"1.0"}},"paths":{{"/score":{{"get":{{}},"post":{{}}}}}}}}"#
            )),
            not_found: Bytes::from_static(br#"{"message":"not found"}"#),
            latency: args.latency()?,
            error_rate: args.error_rate,
            limit: (args.concurrency > 0).then(|| Semaphore::new(args.concurrency)),
            close: args.close,
            timers: TimerPool::new(),
        })
    }

    fn respond(
        &self,
        status: StatusCode,
        content_type: HeaderValue,
        body: &Bytes,
    ) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(body.clone()));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, content_type);
        if self.close {
            headers.insert(header::CONNECTION, CLOSE);
        }
        resp
    }

    async fn score(&self) -> Response<Full<Bytes>> {
        let _permit = match &self.limit {
            Some(limit) => Some(
                limit
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            None => None,
        };
        let (delay, fail) = RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            let delay = self.latency.as_ref().map(|d| d.sample(&mut rng));
            (
                delay,
                self.error_rate > 0.0 && rng.next_f64() < self.error_rate,
            )
        });
        if let Some(d) = delay.filter(|d| !d.is_zero()) {
            self.timers.sleep(d).await;
        }
        if fail {
            self.respond(StatusCode::INTERNAL_SERVER_ERROR, JSON, &self.error)
        } else {
            self.respond(StatusCode::OK, JSON, &self.score)
        }
    }
}

/// Reads and drops a request body (no buffering).
async fn drain(mut body: Incoming) {
    while let Some(Ok(_)) = body.frame().await {}
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    enum Route {
        Health,
        Score,
        Swagger,
        NotFound,
    }
    let route = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => Route::Health,
        (&Method::GET | &Method::POST, "/score") => Route::Score,
        (&Method::GET, "/swagger.json") => Route::Swagger,
        _ => Route::NotFound,
    };
    drain(req.into_body()).await;
    Ok(match route {
        Route::Health => state.respond(StatusCode::OK, TEXT, &state.healthy),
        Route::Score => state.score().await,
        Route::Swagger => state.respond(StatusCode::OK, JSON, &state.swagger),
        Route::NotFound => state.respond(StatusCode::NOT_FOUND, JSON, &state.not_found),
    })
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("no private key in {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve(args: Args, state: Arc<State>) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let addr = match args.port {
        Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        None => args.listen,
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("listening on {}", listener.local_addr()?);
    let builder = auto::Builder::new(TokioExecutor::new());
    let accept = async {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, for instance: back off rather than spin.
                    eprintln!("sample-model: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (state, builder, tls) = (state.clone(), builder.clone(), tls.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(state.clone(), req));
                match tls {
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = loadtest::termination() => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Err(msg) = args.check() {
        Args::command()
            .error(ErrorKind::ValueValidation, msg)
            .exit();
    }
    let state = match State::new(&args) {
        Ok(s) => Arc::new(s),
        Err(msg) => Args::command()
            .error(ErrorKind::ValueValidation, msg)
            .exit(),
    };
    let result = loadtest::runtime(args.threads)
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(serve(args, state)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample-model: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_bodies_have_the_asked_size_and_stay_json() {
        let short = score_body("blue", None);
        let v: serde_json::Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(v["version"], "blue");
        for size in [2, 5, 30, 64, 1000, 65_536] {
            let b = score_body("blue", Some(size));
            assert_eq!(b.len(), size);
            serde_json::from_slice::<serde_json::Value>(&b)
                .unwrap_or_else(|e| panic!("{size}: {e}"));
        }
        assert_eq!(score_body("x", Some(0)).len(), 0);
        let quoted = score_body("a\"b", Some(100));
        let v: serde_json::Value = serde_json::from_slice(&quoted).unwrap();
        assert_eq!(v["version"], "a\"b");
    }

    #[test]
    fn latency_options_combine() {
        let parse = |argv: &[&str]| {
            Args::try_parse_from(std::iter::once("sample-model").chain(argv.iter().copied()))
        };
        let a = parse(&["--latency-ms", "2.5"]).unwrap();
        assert_eq!(a.latency().unwrap(), Some(LatencyDist::Fixed { ms: 2.5 }));
        let a = parse(&["--delay-ms", "0"]).unwrap();
        assert_eq!(a.latency().unwrap(), None);
        let a = parse(&["--latency-dist", "exp:3"]).unwrap();
        assert_eq!(
            a.latency().unwrap(),
            Some(LatencyDist::Exp { mean_ms: 3.0 })
        );
        assert!(parse(&["--latency-dist", "exp:3", "--latency-ms", "1"]).is_err());
        let e = parse(&["--latency-dist", "gauss:3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown latency distribution"), "{e}");
        assert!(parse(&["--error-rate", "1.5"]).unwrap().check().is_err());
        assert!(parse(&["--port", "1", "--listen", "127.0.0.1:2"]).is_err());
        assert!(parse(&["--tls-cert", "x.pem"]).is_err());
    }
}
