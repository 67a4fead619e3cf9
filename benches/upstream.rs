//! One scoring exchange through the router, in process, against a replica that answers
//! fixed bytes at once: the cost of the upstream side (writing the request, reading and
//! framing the response) on top of the rest of the request path. One bench per way a
//! response body is delimited: `Content-Length`, and chunked with trailers.
//!
//! Run: `cargo bench --bench upstream`.

mod client;

use std::net::SocketAddr;

use client::{KEY, connect, score};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Mutex,
};

const LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"result\": [0.5]}";
const CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
    b\r\n{\"result\": \r\n6\r\n[0.5]}\r\n0\r\nx-check: 1\r\n\r\n";

/// A replica answering every request on a connection with `reply`, once it has the
/// request's head and its `Content-Length` body.
async fn replica(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + len);
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn upstream(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let router = rt.block_on(async {
        let (length, chunked) = (replica(LENGTH).await, replica(CHUNKED).await);
        let endpoint = |name: &str, replica: SocketAddr| {
            format!(
                "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: {name}}}\n\
                 spec:\n  keys: {{primaryKey: {KEY}}}\n  versions:\n\
                 \x20   - {{name: blue, maxConcurrentRequestsPerContainer: 64, replicas: ['{replica}']}}\n"
            )
        };
        let endpoints = format!(
            "{}---\n{}",
            endpoint("length", length),
            endpoint("chunked", chunked)
        );
        client::router(dir.path(), &endpoints).await
    });
    let client = Mutex::new(rt.block_on(connect(router)));
    for name in ["length", "chunked"] {
        let path = format!("/api/v1/endpoint/{name}/score");
        c.bench_function(&format!("upstream/{name}"), |b| {
            b.to_async(&rt)
                .iter(|| async { score(&mut *client.lock().await, &path).await })
        });
    }
}

criterion_group!(benches, upstream);
criterion_main!(benches);
