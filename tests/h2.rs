//! Router answers over h2 (h2c with prior knowledge, and h2 over TLS) to clients that are
//! still sending their request body: 404, 401, 413, 429 and 503 must arrive whole, and the
//! stream must not be reset while a body of ordinary size is still on its way. curl 7.88
//! and other clients fail the whole exchange ("(92) Stream error in the HTTP/2 framing
//! layer") when the stream is reset under their upload, even with NO_ERROR after a
//! complete response; the client here behaves the same way, so it can tell.
//! Draining such a body is bounded: the last tests check the bounds.

mod support;

use std::{
    future::poll_fn, net::SocketAddr, sync::atomic::Ordering::SeqCst, task::Poll, time::Duration,
};

use bytes::Bytes;
use h2::{
    Reason,
    client::{self, SendRequest},
};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use scorefront::proxy::body::{DRAIN_MAX_BYTES, DRAIN_MAX_TIME};
use support::{tls::TestCa, *};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::{Instant, timeout},
};

/// Rounds of each kind (one after the other, and all at once) per body size.
const ROUNDS: usize = 50;
/// Body sizes: tiny, one default h2 window, several windows.
const SIZES: [usize; 3] = [2, 64 * 1024, 300 * 1024];
/// The most any one step of an exchange may take before the test calls it stuck.
const IO_LIMIT: Duration = Duration::from_secs(10);
/// Body bytes the client writes per DATA frame.
const CHUNK: usize = 16 * 1024;
/// The receive window hyper's h2 server grants each stream: what a client may send that
/// nobody reads.
const STREAM_WINDOW: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// A client that uploads like curl

/// How the client sends its request body.
#[derive(Clone, Copy, Debug)]
enum Upload {
    /// `n` bytes with a `content-length`, ending the stream with the last one.
    Whole(usize),
    /// No `content-length`; keeps sending until the router stops it (or 256 MiB).
    Endless,
    /// No `content-length`; sends `n` bytes and then nothing, never ending the stream.
    Stalled(usize),
}

/// One exchange as the client saw it.
#[derive(Debug)]
struct Exchange {
    status: http::StatusCode,
    content_type: String,
    body: Bytes,
    /// The response ended with END_STREAM; `Err` says how it ended otherwise.
    ended: Result<(), String>,
    /// Body bytes handed to the connection before the upload stopped.
    sent: usize,
    /// Why the upload stopped early: the stream was reset or closed under it.
    cut: Option<String>,
    /// How the router reset the stream, for an upload that did not end (waited for).
    reset: Option<Reason>,
    /// From the request head to the end of the response.
    took: Duration,
}

impl Exchange {
    /// What curl would report instead of the response, if anything: the upload cut off
    /// by a reset, or a response that did not end.
    fn failure(&self) -> Option<String> {
        if let Some(cut) = &self.cut {
            return Some(format!(
                "stream reset after {} body bytes: {cut}",
                self.sent
            ));
        }
        self.ended.clone().err()
    }
}

/// An h2 connection over `io`; its driver runs until every sender is gone.
async fn h2_over<T>(io: T) -> SendRequest<Bytes>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// An h2c (prior knowledge) connection to `addr`.
async fn h2c(addr: SocketAddr) -> SendRequest<Bytes> {
    h2_over(TcpStream::connect(addr).await.unwrap()).await
}

/// POSTs to `uri` with `key`, sending the body as `upload` says the way curl does (head
/// first, the body after it in chunks, without waiting for the response, and giving up
/// when the stream is reset under it), then reads the response.
async fn exchange(sender: &SendRequest<Bytes>, uri: &str, key: &str, upload: Upload) -> Exchange {
    let mut sender = timeout(IO_LIMIT, sender.clone().ready())
        .await
        .expect("a stream free within the limit")
        .expect("connection open");
    let mut req = Request::post(uri).header("authorization", format!("Bearer {key}"));
    if let Upload::Whole(n) = upload {
        req = req.header("content-length", n);
    }
    let start = Instant::now();
    let (response, mut stream) = sender
        .send_request(req.body(()).unwrap(), false)
        .expect("request sent");

    let (total, ends) = match upload {
        Upload::Whole(n) => (n, true),
        Upload::Endless => (256 << 20, false),
        Upload::Stalled(n) => (n, false),
    };
    let (mut sent, mut cut) = (0, None);
    while sent < total {
        // Each chunk is a separate step after the head, as in curl's transfer loop: a
        // reset that arrives meanwhile ends the upload.
        tokio::task::yield_now().await;
        if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(stream.poll_reset(cx))).await {
            cut = Some(format!("{r:?}"));
            break;
        }
        let want = (total - sent).min(CHUNK);
        stream.reserve_capacity(want);
        while stream.capacity() == 0 {
            match timeout(IO_LIMIT, poll_fn(|cx| stream.poll_capacity(cx))).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    cut = Some(e.to_string());
                    break;
                }
                Ok(None) => {
                    cut = Some("stream closed".into());
                    break;
                }
                Err(_) => panic!("no send window within {IO_LIMIT:?} after {sent} bytes"),
            }
        }
        if cut.is_some() {
            break;
        }
        let n = want.min(stream.capacity());
        let last = ends && sent + n == total;
        if let Err(e) = stream.send_data(Bytes::from(vec![b'x'; n]), last) {
            cut = Some(e.to_string());
            break;
        }
        sent += n;
    }

    let resp = timeout(IO_LIMIT, response)
        .await
        .expect("response head within the limit");
    let (parts, mut body) = match resp {
        Ok(r) => r.into_parts(),
        Err(e) => {
            return Exchange {
                status: http::StatusCode::IM_A_TEAPOT,
                content_type: String::new(),
                body: Bytes::new(),
                ended: Err(format!("no response: {e}")),
                sent,
                cut,
                reset: None,
                took: start.elapsed(),
            };
        }
    };
    let mut bytes = Vec::new();
    let ended = loop {
        match timeout(IO_LIMIT, body.data()).await {
            Err(_) => break Err(format!("response not ended within {IO_LIMIT:?}")),
            Ok(None) => break Ok(()),
            Ok(Some(Ok(chunk))) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            Ok(Some(Err(e))) => break Err(format!("response body: {e}")),
        }
    };
    let took = start.elapsed();
    let reset = if ends && cut.is_none() {
        None
    } else {
        match timeout(IO_LIMIT, poll_fn(|cx| stream.poll_reset(cx))).await {
            Ok(Ok(reason)) => Some(reason),
            Ok(Err(e)) => panic!("the stream failed instead of being reset: {e}"),
            Err(_) => panic!("an unfinished upload was not reset within {IO_LIMIT:?}"),
        }
    };
    Exchange {
        status: parts.status,
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: bytes.into(),
        ended,
        sent,
        cut,
        reset,
        took,
    }
}

/// Whether `ex` is the router's complete answer `status` / `code`, received without the
/// upload being cut: `None` if so, else what was wrong.
fn wrong(ex: &Exchange, status: u16, code: &str) -> Option<String> {
    if let Some(f) = ex.failure() {
        return Some(f);
    }
    let text = String::from_utf8_lossy(&ex.body);
    if ex.status != status || ex.content_type != "application/json" {
        return Some(format!("{} {}: {text}", ex.status, ex.content_type));
    }
    let v: serde_json::Value = match serde_json::from_slice(&ex.body) {
        Ok(v) => v,
        Err(e) => return Some(format!("not JSON ({e}): {text}")),
    };
    (v["error"]["code"] != code || !v["error"]["message"].is_string())
        .then(|| format!("wrong body: {text}"))
}

/// Sends [`ROUNDS`] POSTs of each of `sizes` one after the other, then [`ROUNDS`] at
/// once, all on one connection, and asserts that every one got the router's answer
/// `status` / `code` whole without its upload being cut off.
async fn assert_answers_arrive_whole(
    sender: &SendRequest<Bytes>,
    uri: &str,
    key: &str,
    sizes: &[usize],
    status: u16,
    code: &str,
) {
    // Per group (size, in turn or at once): how many failed, and the first failure.
    let mut failed: Vec<(String, usize, String)> = Vec::new();
    let mut note = |group: String, w: Option<String>| {
        if let Some(w) = w {
            match failed.iter_mut().find(|(g, ..)| *g == group) {
                Some((_, n, _)) => *n += 1,
                None => failed.push((group, 1, w)),
            }
        }
    };
    for &size in sizes {
        for _ in 0..ROUNDS {
            let ex = exchange(sender, uri, key, Upload::Whole(size)).await;
            note(format!("{size} B in turn"), wrong(&ex, status, code));
        }
        let at_once: Vec<_> = (0..ROUNDS)
            .map(|_| {
                let (sender, uri, key) = (sender.clone(), uri.to_owned(), key.to_owned());
                tokio::spawn(
                    async move { exchange(&sender, &uri, &key, Upload::Whole(size)).await },
                )
            })
            .collect();
        for t in at_once {
            let ex = t.await.unwrap();
            note(format!("{size} B at once"), wrong(&ex, status, code));
        }
    }
    let report: Vec<String> = failed
        .iter()
        .map(|(g, n, first)| format!("{g}: {n} of {ROUNDS} failed, first: {first}"))
        .collect();
    assert!(
        report.is_empty(),
        "{status} {code} did not arrive whole:\n{}",
        report.join("\n")
    );
}

fn score_uri(addr: SocketAddr, endpoint: &str) -> String {
    format!("http://{addr}/api/v1/service/{endpoint}/score")
}

// ---------------------------------------------------------------------------------------
// Router answers arrive whole

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_answer_404_whole_over_h2c() {
    let router = Router::start("").await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "nope");
    assert_answers_arrive_whole(&sender, &uri, KEY, &SIZES, 404, "EndpointNotFound").await;

    // hyper's own client, which copes with a reset after a complete response, gets it too.
    let stream = TcpStream::connect(router.http).await.unwrap();
    let (mut hyper, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let driver = tokio::spawn(conn);
    for size in SIZES {
        let req = scoring_post(&uri, KEY, &[], vec![b'x'; size]);
        let resp = timeout(IO_LIMIT, hyper.send_request(req))
            .await
            .unwrap()
            .expect("h2 response");
        assert_eq!(resp.status(), 404);
        let body = resp.into_body().collect().await.expect("whole body");
        assert_eq!(error_code(&body.to_bytes()), "EndpointNotFound");
    }
    drop(hyper);
    driver.abort();
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_answer_401_whole_over_h2c() {
    let blue = Model::start("blue").await;
    let router = Router::start(&one_version("fraud", &[blue.addr], "")).await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "fraud");
    assert_answers_arrive_whole(&sender, &uri, "wrong-key", &SIZES, 401, "Unauthorized").await;
    assert_eq!(blue.requests(), 0);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_answer_413_whole_over_h2c() {
    let blue = Model::start("blue").await;
    let router = Router::start_with(
        &router_config("maxRequestBodyBytes: 1\n"),
        &one_version("fraud", &[blue.addr], ""),
    )
    .await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "fraud");
    assert_answers_arrive_whole(&sender, &uri, KEY, &SIZES, 413, "PayloadTooLarge").await;
    assert_eq!(blue.requests(), 0);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_a_queue_timeout_answer_429_and_503_whole_over_h2c() {
    let model = Model::start("m").await;
    let router = Router::start(&format!(
        "{}---\n{}",
        one_version("busy", &[model.addr], "maxPendingRequests: 0"),
        one_version(
            "slow",
            &[model.addr],
            "maxRequestWaitTimeMs: 0, maxPendingRequests: 1000",
        ),
    ))
    .await;
    // One request in each version's only slot, for the rest of the test.
    let holders: Vec<_> = ["busy", "slow"]
        .map(|e| {
            let req = scoring_post(
                &router.url(&format!("/api/v1/service/{e}/score")),
                KEY,
                &[("x-delay-ms", "60000")],
                "{}",
            );
            tokio::spawn(send(req))
        })
        .into();
    until("both holders at the model", Patience::SHORT, || {
        model.state.current.load(SeqCst) == 2
    })
    .await;
    let sender = h2c(router.http).await;
    let busy = score_uri(router.http, "busy");
    assert_answers_arrive_whole(&sender, &busy, KEY, &SIZES, 429, "TooManyPendingRequests").await;
    let slow = score_uri(router.http, "slow");
    assert_answers_arrive_whole(&sender, &slow, KEY, &SIZES, 503, "QueueTimeout").await;
    assert_eq!(model.requests(), 2, "only the holders reached the model");
    for h in holders {
        h.abort();
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_arrive_whole_over_h2_with_tls() {
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let files = leaf.files("server");
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let router = Router::try_start(
        &router_config("tls: {certFile: server.crt, keyFile: server.key}\n"),
        "",
        &files,
        true,
    )
    .await
    .expect("router starts");
    let addr = router.https.unwrap();
    let (tls, info) = ca.client().h2().handshake(addr).await.expect("handshake");
    assert_eq!(info.alpn.as_deref(), Some("h2"));
    let sender = h2_over(tls).await;
    let uri = format!(
        "https://localhost:{}/api/v1/service/nope/score",
        addr.port()
    );
    assert_answers_arrive_whole(&sender, &uri, KEY, &SIZES, 404, "EndpointNotFound").await;
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// With curl itself

/// Runs curl with `args`; `None` when curl is not installed.
async fn curl(args: &[&str]) -> Option<std::process::Output> {
    match tokio::process::Command::new("curl")
        .args(args)
        .output()
        .await
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running curl: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_router_answers_over_h2c_and_h2() {
    if curl(&["--version"]).await.is_none() {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let ca = TestCa::new("test root");
    let leaf = ca.leaf();
    let mut files: Vec<(String, &[u8])> = leaf.files("server").into();
    files.push(("ca.pem".into(), ca.root_pem.as_bytes()));
    let bodies: Vec<(String, Vec<u8>)> = SIZES
        .iter()
        .map(|&n| (format!("body-{n}"), vec![b'x'; n]))
        .collect();
    for (name, bytes) in &bodies {
        files.push((name.clone(), bytes));
    }
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let router = Router::try_start(
        &router_config("tls: {certFile: server.crt, keyFile: server.key}\n"),
        "",
        &files,
        true,
    )
    .await
    .expect("router starts");
    let https = router.https.unwrap();
    let resolve = format!("localhost:{}:127.0.0.1", https.port());
    let ca_file = router.path("ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let plain = score_uri(router.http, "nope");
    let tls = format!(
        "https://localhost:{}/api/v1/service/nope/score",
        https.port()
    );
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, _) in &bodies {
        let data = format!("@{}", router.path(name).to_str().unwrap());
        let out_file = router.path("out");
        let out_file = out_file.to_str().unwrap();
        let h2c = ["--http2-prior-knowledge", plain.as_str()];
        let h2 = [
            "--http2",
            "--cacert",
            ca_file,
            "--resolve",
            resolve.as_str(),
            tls.as_str(),
        ];
        for _ in 0..ROUNDS / 2 {
            for how in [&h2c[..], &h2[..]] {
                let mut args = vec!["-sS", "-o", out_file, "-w", "%{http_code} %{http_version}"];
                args.extend(["-X", "POST", "--data-binary", data.as_str()]);
                args.extend(how);
                let out = curl(&args).await.expect("curl");
                let said = String::from_utf8_lossy(&out.stdout);
                let body = std::fs::read(out_file).unwrap_or_default();
                total += 1;
                if !out.status.success() || said != "404 2" {
                    failures.push(format!(
                        "{name} {}: {} {said}: {}",
                        how[0],
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                } else if error_code(&body) != "EndpointNotFound" {
                    failures.push(format!("{name}: {}", String::from_utf8_lossy(&body)));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} curl runs failed; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    router.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Draining is bounded

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_end_is_drained_only_up_to_the_byte_bound() {
    let router = Router::start("").await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "nope");
    for _ in 0..3 {
        let ex = exchange(&sender, &uri, KEY, Upload::Endless).await;
        assert!(ex.cut.is_some(), "the upload was never stopped: {ex:?}");
        assert!(
            ex.sent <= DRAIN_MAX_BYTES as usize + STREAM_WINDOW + 2 * CHUNK,
            "the router let {} bytes in",
            ex.sent
        );
        assert_eq!(ex.ended, Ok(()), "{ex:?}");
        assert_eq!(ex.status, 404);
        assert_eq!(error_code(&ex.body), "EndpointNotFound");
        assert_eq!(ex.reset, Some(Reason::NO_ERROR), "{ex:?}");
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_larger_than_the_bound_is_not_read_at_all() {
    let router = Router::start("").await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "nope");
    let ex = exchange(&sender, &uri, KEY, Upload::Whole(64 << 20)).await;
    assert!(ex.cut.is_some(), "the upload was never stopped: {ex:?}");
    assert!(
        ex.sent <= STREAM_WINDOW,
        "the router read some of it: {} bytes got in",
        ex.sent
    );
    assert_eq!(ex.ended, Ok(()), "{ex:?}");
    assert_eq!(ex.status, 404);
    assert_eq!(ex.reset, Some(Reason::NO_ERROR), "{ex:?}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_gets_the_answer_ended_after_the_time_bound() {
    let router = Router::start("").await;
    let sender = h2c(router.http).await;
    let uri = score_uri(router.http, "nope");
    let ex = exchange(&sender, &uri, KEY, Upload::Stalled(2)).await;
    assert_eq!(ex.cut, None);
    assert_eq!(ex.ended, Ok(()), "{ex:?}");
    assert_eq!(ex.status, 404);
    assert_eq!(error_code(&ex.body), "EndpointNotFound");
    assert!(
        ex.took < DRAIN_MAX_TIME + Duration::from_secs(5),
        "the answer took {:?} to end",
        ex.took
    );
    assert_eq!(ex.reset, Some(Reason::NO_ERROR), "{ex:?}");

    // The connection carries on.
    let ex = exchange(&sender, &uri, KEY, Upload::Whole(2)).await;
    assert_eq!(wrong(&ex, 404, "EndpointNotFound"), None);
    router.shutdown().await;
}
