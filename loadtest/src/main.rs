//! `loadtest`: closed-loop load against one URL.
//!
//! N connections each send requests back to back (HTTP/1.1 keep-alive, reconnecting when
//! the server closes) until the request budget or the time limit is spent, so a run always
//! ends by itself. Prints throughput, latency percentiles (HDR histogram, microsecond
//! precision), status counts, and which version served (`azureml-model-deployment`).
//!
//! Example: `cargo run --release -p loadtest -- --url http://127.0.0.1:8080/api/v1/endpoint/sample/score
//! --header "Authorization: Bearer KEY" --body '{"x":1}' --connections 16 --requests 20000`

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

#[derive(Parser, Clone)]
#[command(about = "Closed-loop HTTP/1.1 load generator")]
struct Args {
    /// Target URL (http only), e.g. http://127.0.0.1:8080/api/v1/endpoint/sample/score
    #[arg(long)]
    url: Uri,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Total requests to send.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Extra request header, "Name: value"; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Request body; with a body the method defaults to POST.
    #[arg(long)]
    body: Option<String>,
    /// HTTP method (default GET, or POST with --body).
    #[arg(long)]
    method: Option<Method>,
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    versions: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.url.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported");
    }
    let authority = args.url.authority().context("URL needs host:port")?.clone();
    let addr: SocketAddr = tokio::net::lookup_host(authority.as_str())
        .await?
        .next()
        .context("host did not resolve")?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').context("header must be 'Name: value'")?;
        headers.push((
            HeaderName::try_from(name.trim())?,
            HeaderValue::try_from(value.trim())?,
        ));
    }
    let method = args.method.clone().unwrap_or(if args.body.is_some() {
        Method::POST
    } else {
        Method::GET
    });
    let body = Bytes::from(args.body.clone().unwrap_or_default());
    let per_conn = args.requests.div_ceil(args.connections as u64);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);

    let started = Instant::now();
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            let (uri, method, headers, body) = (
                args.url.clone(),
                method.clone(),
                headers.clone(),
                body.clone(),
            );
            let host =
                HeaderValue::from_str(authority.as_str()).expect("authority is a valid header");
            tokio::spawn(async move {
                let mut tally = Tally {
                    latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
                    ..Tally::default()
                };
                let mut conn: Option<http1::SendRequest<Full<Bytes>>> = None;
                for _ in 0..per_conn {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let mut req = Request::builder()
                        .method(method.clone())
                        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                        .header(http::header::HOST, host.clone());
                    for (n, v) in &headers {
                        req = req.header(n, v);
                    }
                    let req = req.body(Full::new(body.clone())).unwrap();
                    let t0 = Instant::now();
                    let result = send(&mut conn, addr, req).await;
                    let micros = t0.elapsed().as_micros() as u64;
                    match result {
                        Ok((status, version)) => {
                            tally
                                .latency
                                .as_mut()
                                .unwrap()
                                .record(micros.max(1))
                                .unwrap();
                            *tally.statuses.entry(status).or_default() += 1;
                            *tally.versions.entry(version).or_default() += 1;
                        }
                        Err(e) => {
                            conn = None;
                            *tally.errors.entry(e.to_string()).or_default() += 1;
                        }
                    }
                }
                tally
            })
        })
        .collect();

    let mut total = Tally {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Tally::default()
    };
    for w in workers {
        let t = w.await?;
        total.latency.as_mut().unwrap().add(t.latency.unwrap())?;
        for (k, v) in t.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        for (k, v) in t.versions {
            *total.versions.entry(k).or_default() += v;
        }
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = total.latency.unwrap();
    println!(
        "requests: {} in {elapsed:.2} s = {:.0} req/s over {} connections",
        h.len(),
        h.len() as f64 / elapsed,
        args.connections
    );
    for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
        println!("{label:>6}: {:>9} us", h.value_at_quantile(q));
    }
    println!("{:>6}: {:>9} us", "max", h.max());
    println!("status: {:?}", total.statuses);
    println!("versions: {:?}", total.versions);
    if !total.errors.is_empty() {
        println!("errors: {:?}", total.errors);
    }
    Ok(())
}

/// Sends on the open connection, opening one if needed; returns status and version.
async fn send(
    conn: &mut Option<http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(u16, String)> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, driver) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        *conn = Some(send);
    }
    let c = conn.as_mut().expect("just opened");
    c.ready().await?;
    let resp = c.send_request(req).await?;
    let status = resp.status().as_u16();
    let version = resp
        .headers()
        .get("azureml-model-deployment")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    resp.into_body().collect().await?;
    Ok((status, version))
}
