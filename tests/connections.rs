//! Client connections and request bodies: the h2c preface sniff, the connection limit,
//! idle timeouts, clients that stop reading, and request bodies buffered before a slot is
//! taken. Real sockets throughout: raw TCP clients, hyper clients, fake models on loopback.

mod support;

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep, timeout},
};

const CONNECTIONS: &str = "scorefront_client_connections";
const LIMIT_REACHED: &str = "scorefront_client_connection_limit_reached_total";
const SEND_TIMEOUTS: &str = "scorefront_client_send_timeouts_total";
const IN_FLIGHT: &str = "scorefront_in_flight_requests";

/// A router with `clients: {CLIENTS}` in its config and one endpoint `conn` whose version
/// `blue` runs on `replicas` with `settings`.
async fn router(clients: &str, replicas: &[SocketAddr], settings: &str) -> Router {
    Router::start_with(
        &router_config(&format!("clients: {{{clients}}}\n")),
        &one_version("conn", replicas, settings),
    )
    .await
}

/// Waits up to `within` for the peer to close `stream` (reads nothing more than EOF).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The value of an unlabelled router metric.
async fn value(router: &Router, name: &str) -> Option<f64> {
    metric(&router.metrics().await, name, &[])
}

/// A model served by `answer` on a loopback port, over HTTP/1.1.
async fn serve_model<F>(answer: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Response<TestBody> + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let resp = answer(req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------
// The h2c preface sniff

/// A stream whose first `slow` bytes are written one at a time, `gap` apart.
struct Trickle {
    stream: TcpStream,
    slow: usize,
    gap: Duration,
    pause: Option<Pin<Box<Sleep>>>,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.slow == 0 {
            return Pin::new(&mut self.stream).poll_write(cx, buf);
        }
        let gap = self.gap;
        let pause = self
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
        ready!(pause.as_mut().poll(cx));
        self.pause = None;
        let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &buf[..1]))?;
        self.slow -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An h2c client connection over `io`; the connection runs in a task whose handle
/// resolves when the connection ends.
async fn h2c_over<T>(
    io: T,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2c handshake");
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

fn score_request(router: &Router, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut req = scoring("POST", &router.url("/api/v1/service/conn/score"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body("{}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_preface_trickled_byte_by_byte_is_served() {
    let model = Model::start("m").await;
    let router = router("headerReadTimeoutMs: 5000", &[model.addr], "").await;
    let stream = TcpStream::connect(router.http).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let trickle = Trickle {
        stream,
        slow: 24,
        gap: Duration::from_millis(5),
        pause: None,
    };
    let (mut sender, _conn) = h2c_over(trickle).await;
    let resp = sender
        .send_request(score_request(&router, &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(model_of(&body), "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_split_across_writes_is_served() {
    let model = Model::start("m").await;
    let router = router("headerReadTimeoutMs: 5000", &[model.addr], "").await;
    let mut stream = TcpStream::connect(router.http).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = raw_request("conn", "", "{}");
    // "P" matches the h2 preface, "PO" no longer does; then the rest in two writes.
    for piece in [
        &request[..1],
        &request[1..2],
        &request[2..20],
        &request[20..],
    ] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(model_of(body.as_bytes()), "m");
}

/// A router whose header read timeout (300 ms) is far shorter than its idle timeout, and
/// its model.
async fn with_header_read_timeout_300ms() -> (Model, Router) {
    let model = Model::start("m").await;
    let router = router(
        "headerReadTimeoutMs: 300, idleTimeoutMs: 60000",
        &[model.addr],
        "",
    )
    .await;
    (model, router)
}

/// A client that stalls partway through the h2c preface or a request head is cut at the
/// header read timeout, on a fresh connection and on a keep-alive connection between
/// requests alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_preface_or_head_is_closed_at_the_header_read_timeout() {
    let (_model, router) = with_header_read_timeout_300ms().await;
    let request = raw_request("conn", "", "{}");
    let half_head = &request.as_bytes()[..request.find("\r\n").unwrap() + 2];
    let cases: [(&str, &[u8], bool); 3] = [
        ("part of the h2c preface", b"PRI", false),
        ("half a head", half_head, false),
        ("half a head after a request", half_head, true),
    ];
    for (case, stalled, served_first) in cases {
        // Before the timer can start: at the connection's start, or at the end of the
        // request before.
        let started = Instant::now();
        let mut stream = TcpStream::connect(router.http).await.unwrap();
        if served_first {
            stream.write_all(request.as_bytes()).await.unwrap();
            assert_eq!(read_response(&mut stream).await.0, 200, "{case}");
        }
        stream.write_all(stalled).await.unwrap();
        assert!(
            closed_within(&mut stream, Duration::from_secs(10)).await,
            "{case}: the connection is cut"
        );
        assert!(started.elapsed() >= Duration::from_millis(250), "{case}");
    }
    metric_eventually(&router, Patience::SHORT, CONNECTIONS, &[], 0.0).await;
}

/// A head trickled a byte at a time, never silent for long, is still cut when the header
/// read timeout has run out, long before its last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_http1_head_is_closed_at_the_header_read_timeout() {
    let (_model, router) = with_header_read_timeout_300ms().await;
    let stream = TcpStream::connect(router.http).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut read, mut write) = stream.into_split();
    let request = raw_request("conn", "", "{}");
    let started = Instant::now();
    // 50 ms a byte: the head would take seconds to arrive.
    let trickle = tokio::spawn(async move {
        for byte in request.as_bytes() {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut byte = [0u8; 1];
    let read = timeout(Duration::from_secs(10), read.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "cut after {elapsed:?}"
    );
    trickle.abort();
}

// ---------------------------------------------------------------------------------------
// The connection limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_new_connections_wait_until_one_closes() {
    let model = Model::start("m").await;
    let router = router("maxConnections: 2", &[model.addr], "").await;
    let first = TcpStream::connect(router.http).await.unwrap();
    let _second = TcpStream::connect(router.http).await.unwrap();
    metric_eventually(&router, Patience::SHORT, CONNECTIONS, &[], 2.0).await;
    metric_eventually(&router, Patience::SHORT, LIMIT_REACHED, &[], 1.0).await;

    // The third connects (the kernel's backlog holds it) but is not served.
    let mut third = TcpStream::connect(router.http).await.unwrap();
    third
        .write_all(raw_request("conn", "", "{}").as_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(300), third.peek(&mut byte))
            .await
            .is_err(),
        "the connection over the limit is not served"
    );
    assert_eq!(value(&router, CONNECTIONS).await, Some(2.0));

    drop(first);
    let (status, body) = timeout(Duration::from_secs(10), read_response(&mut third))
        .await
        .expect("served once a connection closed");
    assert_eq!(status, 200, "{body}");
    assert_eq!(value(&router, CONNECTIONS).await, Some(2.0));
}

// ---------------------------------------------------------------------------------------
// Idle timeouts

/// An idle HTTP/1.1 keep-alive connection is closed after the idle timeout; the header read
/// timer also runs while such a connection waits for its next request, so that timeout
/// bounds idle HTTP/1.1 connections too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_keep_alive_connection_is_closed_after_either_timeout() {
    let model = Model::start("m").await;
    for clients in [
        "idleTimeoutMs: 300, headerReadTimeoutMs: 60000",
        "idleTimeoutMs: 60000, headerReadTimeoutMs: 300",
    ] {
        let router = router(clients, &[model.addr], "").await;
        let mut stream = TcpStream::connect(router.http).await.unwrap();
        stream
            .write_all(raw_request("conn", "", "{}").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200, "{clients}");
        assert!(
            closed_within(&mut stream, Duration::from_secs(10)).await,
            "{clients}: the idle connection is closed"
        );
    }
}

/// A drain closes an HTTP/1.1 connection that has not sent a whole request head yet,
/// rather than waiting out the grace period for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_for_a_connection_without_a_request() {
    let model = Model::start("m").await;
    let router = router("", &[model.addr], "").await;
    let mut partial = TcpStream::connect(router.http).await.unwrap();
    partial.write_all(b"POST /api").await.unwrap();
    // Connections are accepted in order: once this one is answered, the partial one has
    // been told from h2c and waits for the rest of its head.
    let mut other = TcpStream::connect(router.http).await.unwrap();
    let request = raw_request("conn", "", "{}");
    other.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200);
    let started = Instant::now();
    router.shutdown().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(closed_within(&mut partial, Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
    let model = Model::start("m").await;
    let router = router("idleTimeoutMs: 300", &[model.addr], "").await;
    let stream = TcpStream::connect(router.http).await.unwrap();
    let (mut sender, conn) = h2c_over(stream).await;
    let resp = sender
        .send_request(score_request(&router, &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    // The client keeps its handle: only the server can end the connection.
    timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle h2 connection is closed")
        .unwrap();
    assert!(sender.ready().await.is_err(), "no new streams after GOAWAY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_a_long_request_in_flight_stay_open() {
    let model = Model::start("m").await;
    let router = router(
        "idleTimeoutMs: 300, headerReadTimeoutMs: 60000",
        &[model.addr],
        "",
    )
    .await;
    // HTTP/1.1: a slow answer, then a response body streaming for longer than the timeout.
    let mut stream = TcpStream::connect(router.http).await.unwrap();
    stream
        .write_all(raw_request("conn", "x-delay-ms: 1000\r\n", "{}").as_bytes())
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    let (parts, body) = send(score_request(&router, &[("x-stream", "40")])).await;
    assert_eq!(parts.status, 200);
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 40);

    // h2: the same, on one connection.
    let (mut sender, _conn) = h2c_over(TcpStream::connect(router.http).await.unwrap()).await;
    let resp = sender
        .send_request(score_request(&router, &[("x-delay-ms", "1000")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let resp = sender
        .send_request(score_request(&router, &[("x-stream", "40")]))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 40);
}

// ---------------------------------------------------------------------------------------
// Slow clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_send_timeout_and_frees_its_slot() {
    // `x-endless` answers forever; anything else answers "ok".
    let (addr, _model) = serve_model(|req| {
        if req.headers().contains_key("x-endless") {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            Response::new(chunked(std::iter::repeat(chunk), Duration::ZERO))
        } else {
            Response::new(body("ok"))
        }
    })
    .await;
    let router = router("sendTimeoutMs: 500", &[addr], "maxRequestWaitTimeMs: 10000").await;
    let mut reader = TcpStream::connect(router.http).await.unwrap();
    reader
        .write_all(raw_request("conn", "x-endless: 1\r\n", "{}").as_bytes())
        .await
        .unwrap();
    let labels = [("endpoint", "conn")];
    metric_eventually(&router, Patience::SHORT, IN_FLIGHT, &labels, 1.0).await;
    // The client never reads: once every buffer is full, nothing moves for 500 ms.
    metric_eventually(&router, Patience::LONG, SEND_TIMEOUTS, &[], 1.0).await;
    metric_eventually(&router, Patience::SHORT, IN_FLIGHT, &labels, 0.0).await;
    let (parts, body) = send(score_request(&router, &[])).await;
    assert_eq!(parts.status, 200, "the slot is free again: {body:?}");
    assert_eq!(body, "ok");
    drop(reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_holds_no_slot_and_gets_408_at_the_body_timeout() {
    let model = Model::start("m").await;
    let router = router(
        "bodyReadTimeoutMs: 1000",
        &[model.addr],
        "maxRequestWaitTimeMs: 500",
    )
    .await;
    // Half of a 100-byte body, then nothing.
    let mut stalled = TcpStream::connect(router.http).await.unwrap();
    let request = raw_request("conn", "", &"x".repeat(100));
    stalled
        .write_all(&request.as_bytes()[..request.len() - 50])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The one slot is free for another client.
    let (parts, body) = send(score_request(&router, &[])).await;
    assert_eq!(parts.status, 200, "{body:?}");
    assert_eq!(model.requests(), 1);

    let (status, body) = timeout(Duration::from_secs(10), read_response(&mut stalled))
        .await
        .expect("the stalled upload is answered");
    assert_eq!(status, 408, "{body}");
    assert_eq!(error_code(body.as_bytes()), "RequestTimeout");
    assert_eq!(
        model.requests(),
        1,
        "the stalled request never reached the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_the_buffer_streams_whole() {
    let (addr, _model) =
        serve_model(|req| Response::new(BodyExt::boxed(Echo(req.into_body())))).await;
    let router = router("requestBufferBytes: 4096", &[addr], "").await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let chunks: Vec<Bytes> = payload.chunks(10_000).map(Bytes::copy_from_slice).collect();
    let req = scoring("POST", &router.url("/api/v1/service/conn/echo"))
        .body(chunked(chunks, Duration::ZERO))
        .unwrap();
    let (parts, echoed) = send(req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "the body arrives unchanged");

    // A small body is read whole before the slot, and forwarded as it was.
    let (parts, echoed) = send(
        scoring("POST", &router.url("/api/v1/service/conn/echo"))
            .body(body("small"))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(echoed, "small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_within_the_buffer_is_413_before_any_slot() {
    let model = Model::start("m").await;
    let router = Router::start_with(
        &router_config("maxRequestBodyBytes: 1000\n"),
        &one_version("conn", &[model.addr], ""),
    )
    .await;
    let chunks = vec![Bytes::from(vec![b'a'; 600]), Bytes::from(vec![b'b'; 600])];
    let (parts, body) = send(
        scoring("POST", &router.url("/api/v1/service/conn/score"))
            .body(chunked(chunks, Duration::ZERO))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 413, "{body:?}");
    assert_eq!(error_code(&body), "PayloadTooLarge");
    assert_eq!(model.requests(), 0, "the model never sees it");
}

/// A request body, echoed back as the response body.
struct Echo(Incoming);

impl hyper::body::Body for Echo {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match ready!(Pin::new(&mut self.0).poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(_)) | None => Poll::Ready(None),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Accept errors

/// The real binary, limited to 64 file descriptors, under more connections than that:
/// accepting fails with EMFILE, backs off 50 ms each time, counts every failure and logs
/// at most one a second; once connections close it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_accepting_backs_off_counts_and_logs_sparingly() {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (unused_addr(), unused_addr());
    std::fs::write(
        dir.path().join("scorefront.yaml"),
        format!(
            "listen: {{http: '{http}', admin: '{admin}'}}\nendpoints: {{file: endpoints.yaml}}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("endpoints.yaml"), "").unwrap();
    let log_path = dir.path().join("scorefront.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_scorefront"));
    command
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("scorefront.yaml"))
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: setrlimit(2) only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let metrics_url = format!("http://{admin}/metrics");
    let scrape = || async {
        let resp = client()
            .request(Request::get(metrics_url.as_str()).body(body("")).unwrap())
            .await
            .ok()?;
        let text = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8(text.to_vec()).unwrap())
    };
    eventually("the router to answer", Patience::LONG, scrape).await;

    // More connections than descriptors: each accepted one waits in the preface sniff.
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(TcpStream::connect(http).await.unwrap());
    }
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    until("an accept to fail", Patience::LONG, || {
        read_log().contains("accept failed")
    })
    .await;
    let failing_since = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(clients);
    let text = eventually("the router to answer again", Patience::LONG, scrape).await;
    let elapsed = failing_since.elapsed();
    let errors = metric(&text, "scorefront_client_accept_errors_total", &[]).unwrap();
    let most = elapsed.as_secs_f64() / 0.05 + 4.0;
    assert!(
        errors >= 1.0 && errors <= most,
        "{errors} accept errors in {elapsed:?}: a 50 ms backoff allows {most}"
    );
    let logged = read_log().matches("accept failed").count();
    assert!(
        logged as f64 <= elapsed.as_secs_f64() + 2.0,
        "{logged} warnings in {elapsed:?}"
    );
    child.kill().await.unwrap();
}
