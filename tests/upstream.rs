//! The replica side of an exchange, byte for byte: raw TCP replicas send exact responses,
//! split at awkward places, and record the exact requests they get. Every way HTTP/1.1
//! delimits a response body, interim responses, early answers, header limits, keep-alive
//! and the connections that must not be reused.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// What a raw replica answers to one request.
struct Reply {
    /// Written one after the other, with a short pause between them, so that the router
    /// reads them apart.
    pieces: Vec<Vec<u8>>,
    /// Close the connection after the reply.
    close: bool,
    /// Answer as soon as the request head is in, before reading the request body.
    early: bool,
}

impl Reply {
    fn new(pieces: &[&[u8]]) -> Reply {
        Reply {
            pieces: pieces.iter().map(|p| p.to_vec()).collect(),
            close: false,
            early: false,
        }
    }

    fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// A request as a raw replica read it: its connection's number, its head, and its body
/// bytes as they came on the wire (chunked encoding included).
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    head: String,
    body: Vec<u8>,
}

type Script = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

struct Raw {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Raw {
    /// A replica answering each request (given its head) with `script`'s reply.
    async fn start(script: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            for conn in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).unwrap();
                tokio::spawn(serve(stream, conn, script.clone(), log.clone()));
            }
        });
        Raw { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(mut s: TcpStream, conn: usize, script: Script, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
        let lower = head.to_ascii_lowercase();
        let reply = script(&head);
        if reply.early {
            write_pieces(&mut s, &reply.pieces).await;
        }
        let body = if lower.contains("transfer-encoding: chunked") {
            let Some(end) = read_until(&mut s, &mut buf, b"0\r\n\r\n").await else {
                return;
            };
            buf.drain(..end).collect()
        } else {
            let len = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            while buf.len() < len {
                if read_more(&mut s, &mut buf).await == 0 {
                    return;
                }
            }
            buf.drain(..len).collect()
        };
        log.lock().unwrap().push(Seen { conn, head, body });
        if !reply.early {
            write_pieces(&mut s, &reply.pieces).await;
        }
        if reply.close {
            return;
        }
    }
}

async fn write_pieces(s: &mut TcpStream, pieces: &[Vec<u8>]) {
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if s.write_all(p).await.is_err() {
            return;
        }
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// Reads until `buf` holds `pat`; the length up to its end.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(i + pat.len());
        }
        if read_more(s, buf).await == 0 {
            return None;
        }
    }
}

/// A replica's first connection once it has read a request head and answered with a
/// chunked 200 head of its own, before any of the request body; with what it read after
/// the request head.
async fn answer_head_at_once(listener: TcpListener) -> (TcpStream, Vec<u8>) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let end = read_until(&mut s, &mut buf, b"\r\n\r\n").await.unwrap();
    buf.drain(..end);
    s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    (s, buf)
}

async fn router_for(replica: &Raw) -> Router {
    Router::start(&one_version("up", &[replica.addr], "")).await
}

/// A router that forwards a request body as it comes, without reading its start first.
async fn streaming_router(replica: SocketAddr) -> Router {
    Router::start_with(
        &router_config("clients: {requestBufferBytes: 0}\n"),
        &one_version("up", &[replica], ""),
    )
    .await
}

fn url(router: &Router) -> String {
    router.url("/api/v1/service/up/score")
}

fn post(router: &Router, payload: &'static str) -> Request<TestBody> {
    scoring_post(&url(router), KEY, &[], payload)
}

#[tokio::test]
async fn content_length_bodies_split_anywhere_keep_the_connection() {
    let replica = Raw::start(|_| {
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"ngth: 11\r\nx-a: 1\r",
            b"\n\r",
            b"\nhello",
            b" world",
        ])
    })
    .await;
    let router = router_for(&replica).await;
    for _ in 0..3 {
        let (parts, body) = send_ok(post(&router, "{\"x\":1}")).await;
        assert_eq!(body, "hello world");
        assert_eq!(parts.headers["content-length"], "11");
        assert_eq!(parts.headers["x-a"], "1");
    }
    let seen = replica.seen();
    assert!(seen.iter().all(|s| s.conn == 0), "one connection: {seen:?}");
    assert_eq!(seen[0].body, b"{\"x\":1}");
    let head = seen[0].head.to_ascii_lowercase();
    assert!(head.starts_with("post /score http/1.1\r\n"), "{head}");
    assert!(head.contains("content-length: 7\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    router.shutdown().await;
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_arrive_whole() {
    let replica = Raw::start(|_| {
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5;name=val",
            b"ue;x\r\nhel",
            b"lo\r",
            b"\n",
            b"6\r\n wor",
            b"ld\r\n0\r\nx-checksum: ab",
            b"c\r\n\r\n",
        ])
    })
    .await;
    let router = router_for(&replica).await;
    for _ in 0..2 {
        let (parts, body) = send_ok(post(&router, "{}")).await;
        assert_eq!(body, "hello world");
        assert!(parts.headers.get("transfer-encoding").is_some());
    }
    // Trailers reach an h2 client.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let resp = h2.request(post(&router, "{}")).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), "hello world");
    let seen = replica.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.conn == 0), "one connection: {seen:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn close_delimited_bodies_end_with_the_connection_and_it_is_not_reused() {
    let replica = Raw::start(|_| {
        Reply::new(&[b"HTTP/1.1 200 OK\r\nx-b: 2\r\n\r\nuntil", b" the end"]).closing()
    })
    .await;
    let router = router_for(&replica).await;
    for _ in 0..2 {
        let (_, body) = send_ok(post(&router, "{}")).await;
        assert_eq!(body, "until the end");
    }
    let conns: Vec<_> = replica.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, [0, 1]);
    router.shutdown().await;
}

#[tokio::test]
async fn connection_close_replicas_get_a_connection_per_request() {
    let replica = Raw::start(|_| {
        Reply::new(&[b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"])
    })
    .await;
    let router = router_for(&replica).await;
    for _ in 0..3 {
        let (parts, body) = send_ok(post(&router, "{}")).await;
        assert_eq!(body, "ok");
        assert!(parts.headers.get("connection").is_none_or(|v| v != "close"));
    }
    let conns: Vec<_> = replica.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, [0, 1, 2]);
    router.shutdown().await;
}

#[tokio::test]
async fn interim_responses_are_skipped_and_101_is_a_502() {
    let replica = Raw::start(|head| {
        if head.contains("x-upgrade") {
            return Reply::new(&[b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"])
                .closing();
        }
        Reply::new(&[
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 10",
            b"3 Early Hints\r\nlink: </a>\r\n\r\n",
            b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
        ])
    })
    .await;
    let router = router_for(&replica).await;
    let (parts, body) = send(post(&router, "{}")).await;
    assert_eq!(parts.status, 201);
    assert_eq!(body, "done");
    assert!(parts.headers.get("link").is_none());

    let req = scoring_post(&url(&router), KEY, &[("x-upgrade", "1")], "{}");
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 502, "{body:?}");
    assert_eq!(error_code(&body), "ReplicaUnavailable");
    router.shutdown().await;
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_and_keep_the_connection() {
    let replica = Raw::start(|head| {
        if head.starts_with("HEAD") {
            Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n"])
        } else if head.contains("x-304") {
            Reply::new(&[b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n"])
        } else {
            Reply::new(&[b"HTTP/1.1 204 No Content\r\n\r\n"])
        }
    })
    .await;
    let router = router_for(&replica).await;
    let head = scoring("HEAD", &url(&router)).body(body("")).unwrap();
    let (parts, got) = send(head).await;
    assert_eq!((parts.status.as_u16(), got.len()), (200, 0));
    assert_eq!(parts.headers["content-length"], "50");
    let (parts, got) = send(post(&router, "{}")).await;
    assert_eq!((parts.status.as_u16(), got.len()), (204, 0));
    let req = scoring("GET", &url(&router))
        .header("x-304", "1")
        .body(body(""))
        .unwrap();
    let (parts, got) = send(req).await;
    assert_eq!((parts.status.as_u16(), got.len()), (304, 0));
    let seen = replica.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.conn == 0), "one connection: {seen:?}");
    // A GET without a body goes without framing headers.
    let get = seen[2].head.to_ascii_lowercase();
    assert!(
        !get.contains("content-length") && !get.contains("transfer-encoding"),
        "{get}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn bodies_without_a_length_are_sent_chunked() {
    let replica =
        Raw::start(|_| Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])).await;
    // Without the body read first, its length is not known when it is sent.
    let router = streaming_router(replica.addr).await;
    let chunks = ["ab", "cdef", "g"].map(Bytes::from);
    let req = scoring("POST", &url(&router))
        .body(chunked(chunks, Duration::ZERO))
        .unwrap();
    send_ok(req).await;
    let seen = replica.seen();
    let head = seen[0].head.to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let mut decoded = Vec::new();
    let mut rest = &seen[0].body[..];
    loop {
        let line = rest.iter().position(|b| *b == b'\n').unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line - 1]).unwrap(), 16);
        let size = size.unwrap();
        rest = &rest[line + 1..];
        if size == 0 {
            assert_eq!(rest, b"\r\n");
            break;
        }
        decoded.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
    }
    assert_eq!(decoded, b"abcdefg");
    router.shutdown().await;
}

#[tokio::test]
async fn an_answer_before_the_whole_request_body_reaches_the_client() {
    let replica = Raw::start(|_| Reply {
        early: true,
        ..Reply::new(&[b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig"])
    })
    .await;
    let router = streaming_router(replica.addr).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(Bytes::from("start of a body")).await.unwrap();
    let req = scoring("POST", &url(&router))
        .body(http_body_util::combinators::BoxBody::new(ChannelBody(rx)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    // The client may still send the rest; whether it gets through does not matter.
    let _ = tx.send(Bytes::from(" and its end")).await;
    drop(tx);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "big");
    router.shutdown().await;
}

#[tokio::test]
async fn a_replica_streaming_while_it_reads_gets_the_rest_of_the_body() {
    // The replica echoes each piece of the request body as a chunk as soon as it reads
    // it, after sending its head first: the router must go on sending the request body
    // while the response streams.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut s, mut buf) = answer_head_at_once(listener).await;
        // Echo the chunked request body's bytes until its last chunk, which may come
        // split over reads.
        let mut echoed = Vec::new();
        loop {
            if !buf.is_empty() {
                let piece = std::mem::take(&mut buf);
                echoed.extend_from_slice(&piece);
                let last = echoed.ends_with(b"0\r\n\r\n");
                s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(&piece).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
                if last {
                    s.write_all(b"0\r\n\r\n").await.unwrap();
                    return;
                }
            }
            if read_more(&mut s, &mut buf).await == 0 {
                return;
            }
        }
    });
    let router = streaming_router(addr).await;
    let (tx, rx) = mpsc::channel(4);
    let req = scoring("POST", &url(&router))
        .body(http_body_util::combinators::BoxBody::new(ChannelBody(rx)))
        .unwrap();
    tx.send(Bytes::from("ping-1")).await.unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    for (i, next) in ["ping-2", "ping-3", ""].iter().enumerate() {
        // The replica echoes `ping-{i+1}` only once it has it: the router sent it after
        // the response head.
        let want = format!("ping-{}", i + 1);
        while !got.windows(want.len()).any(|w| w == want.as_bytes()) {
            let frame = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        if next.is_empty() {
            break;
        }
        tx.send(Bytes::from(*next)).await.unwrap();
    }
    drop(tx);
    let rest = async {
        while body.frame().await.transpose().unwrap().is_some() {}
        echo.await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("the answer ends once the request body has");
    router.shutdown().await;
}

/// A client's `Connection` field may name `content-length`; that field then stays at the
/// router, and the request still goes to the replica framed, so the next request on the
/// same replica connection is read as its own.
#[tokio::test]
async fn a_length_the_connection_field_names_is_still_framed() {
    let replica =
        Raw::start(|_| Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"])).await;
    let router = router_for(&replica).await;
    for _ in 0..2 {
        let req = scoring_post(
            &url(&router),
            KEY,
            &[("connection", "content-length")],
            "{}",
        );
        let (_, body) = send_ok(req).await;
        assert_eq!(&body[..], b"ok");
    }
    let seen = replica.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert!(s.head.starts_with("POST /score "), "{s:?}");
        assert_eq!(s.body, b"{}", "{s:?}");
        assert_eq!(s.conn, seen[0].conn, "{seen:?}");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn heads_over_the_limits_and_invalid_framing_are_502() {
    let replica = Raw::start(|head| {
        let reply = |bytes: Vec<u8>| Reply {
            pieces: vec![bytes],
            close: true,
            early: false,
        };
        if head.contains("x-many") {
            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..101 {
                r.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
            }
            r.extend_from_slice(b"content-length: 0\r\n\r\n");
            reply(r)
        } else if head.contains("x-sixty") {
            // Within the limits, and more than fit in the parser's room on the stack.
            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..60 {
                r.extend_from_slice(format!("x-h{i}: v{i}\r\n").as_bytes());
            }
            r.extend_from_slice(b"content-length: 2\r\n\r\nok");
            reply(r)
        } else if head.contains("x-huge") {
            let mut r = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            r.resize(r.len() + 70 * 1024, b'a');
            r.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
            reply(r)
        } else if head.contains("x-lengths") {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec())
        } else if head.contains("x-control") {
            // A control byte inside a field value.
            reply(b"HTTP/1.1 200 OK\r\nx-bad: a\x01b\r\ncontent-length: 2\r\n\r\nok".to_vec())
        } else if head.contains("x-latin") {
            // Bytes over 0x7f are allowed in a value (obs-text), and passed on as they are.
            reply(
                b"HTTP/1.1 200 OK\r\nx-latin: caf\xe9 \tx\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            )
        } else {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        }
    })
    .await;
    let router = router_for(&replica).await;
    let (parts, body) = send_ok(post(&router, "{}")).await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    let sixty = scoring_post(&url(&router), KEY, &[("x-sixty", "1")], "{}");
    let (parts, body) = send_ok(sixty).await;
    assert_eq!(&body[..], b"ok");
    for i in 0..60 {
        assert_eq!(parts.headers[format!("x-h{i}").as_str()], format!("v{i}"));
    }
    let latin = scoring_post(&url(&router), KEY, &[("x-latin", "1")], "{}");
    let (parts, body) = send_ok(latin).await;
    assert_eq!(&body[..], b"ok");
    assert_eq!(parts.headers["x-latin"].as_bytes(), b"caf\xe9 \tx");
    for header in ["x-many", "x-huge", "x-lengths", "x-control"] {
        let req = scoring_post(&url(&router), KEY, &[(header, "1")], "{}");
        let (parts, body) = send(req).await;
        assert_eq!(parts.status, 502, "{header}: {body:?}");
        assert_eq!(error_code(&body), "ReplicaUnavailable", "{header}");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn bodies_cut_short_or_badly_chunked_fail_the_client_stream() {
    let replica = Raw::start(|head| {
        let pieces: &[&[u8]] = if head.contains("x-short") {
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]
        } else if head.contains("x-bare-cr") {
            // A CR before the chunk size line's CRLF: not a size line.
            &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\r\nabc\r\n0\r\n\r\n"]
        } else {
            &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"]
        };
        Reply::new(pieces).closing()
    })
    .await;
    let router = router_for(&replica).await;
    for header in ["x-short", "x-bad-chunk", "x-bare-cr"] {
        // The head may or may not have left the router before the body failed; either
        // way the client must not get a whole answer.
        let req = scoring_post(&url(&router), KEY, &[(header, "1")], "{}");
        if let Ok(resp) = client().request(req).await {
            assert_eq!(resp.status(), 200, "{header}");
            let body = resp.into_body().collect().await;
            assert!(body.is_err(), "{header}: {:?}", body.map(|c| c.to_bytes()));
        }
    }
    router.shutdown().await;
}

#[tokio::test]
async fn a_replicas_own_reason_phrase_reaches_the_client() {
    let replica =
        Raw::start(|_| Reply::new(&[b"HTTP/1.1 200 Scored Fine\r\ncontent-length: 2\r\n\r\nok"]))
            .await;
    let router = router_for(&replica).await;
    let mut client = TcpStream::connect(router.http).await.unwrap();
    let request = raw_request("up", "", "{}");
    client.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let end = read_until(&mut client, &mut buf, b"\r\n").await.unwrap();
    assert_eq!(&buf[..end], b"HTTP/1.1 200 Scored Fine\r\n");
    router.shutdown().await;
}

#[tokio::test]
async fn an_h2_body_without_a_length_goes_with_the_length_it_turned_out_to_have() {
    let replica =
        Raw::start(|_| Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])).await;
    let router = router_for(&replica).await;
    let tcp = TcpStream::connect(router.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // A body of unknown length: h2 sends no content-length for it.
    let (tx, rx) = mpsc::channel(1);
    let req = scoring("POST", &url(&router))
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let answer = tokio::spawn(sender.send_request(req));
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    drop(tx);
    assert_eq!(answer.await.unwrap().unwrap().status(), 200);
    // The router read all of it before forwarding, so it sends it with its length, as a
    // model server that cannot read a chunked request body needs.
    let head = replica.seen()[0].head.to_ascii_lowercase();
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(replica.seen()[0].body, b"hello");
    router.shutdown().await;
}

#[tokio::test]
async fn a_request_body_cut_after_an_early_answer_ends_the_answer_at_once() {
    // The replica sends its head at once and then reads the request body to its end
    // before it goes on: it waits for a body that will not come.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let replica = tokio::spawn(async move {
        let (mut s, mut buf) = answer_head_at_once(listener).await;
        while read_more(&mut s, &mut buf).await > 0 {}
    });
    let router = Router::start_with(
        &router_config("clients: {requestBufferBytes: 0}\nmaxRequestBodyBytes: 10\n"),
        &one_version("up", &[addr], ""),
    )
    .await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(Bytes::from("12345")).await.unwrap();
    let req = scoring("POST", &url(&router))
        .body(http_body_util::combinators::BoxBody::new(ChannelBody(rx)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Over the limit: the router stops sending, and the answer must end now, not at the
    // scoring timeout.
    tx.send(Bytes::from("67890-too-much")).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the answer ends before the scoring timeout");
    assert!(body.is_err(), "a cut answer must not look whole");
    drop(tx);
    router.shutdown().await;
    replica.abort();
}
