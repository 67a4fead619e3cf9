//! One scoring request through the whole router, in process: a client connection over
//! loopback, the key check, the version split, a slot, the pooled upstream connection to a
//! model server in the same process, the response body, metrics and the access log (off
//! here, so the bench prints nothing). The model answers at once, so the time is the
//! router's and loopback's; `direct` is the same request sent straight to the model.
//!
//! Run: `cargo bench --bench pipeline`.

mod client;

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use client::{KEY, connect, score};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Mutex};

async fn model() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"{\"result\": [0.5]}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (router, model) = rt.block_on(async {
        let model = model().await;
        let endpoints = format!(
            "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: bench}}\n\
             spec:\n  keys: {{primaryKey: {KEY}}}\n  versions:\n\
             \x20   - {{name: blue, trafficPercentile: 90, maxConcurrentRequestsPerContainer: 64, replicas: ['{model}']}}\n\
             \x20   - {{name: green, trafficPercentile: 10, maxConcurrentRequestsPerContainer: 64, replicas: ['{model}']}}\n"
        );
        (client::router(dir.path(), &endpoints).await, model)
    });
    // One connection each, shared by the iterations (an async lock, as the sender is used
    // across an await).
    let through = Mutex::new(rt.block_on(connect(router)));
    let direct = Mutex::new(rt.block_on(connect(model)));
    for (name, sender, path) in [
        (
            "pipeline/scorefront",
            &through,
            "/api/v1/endpoint/bench/score",
        ),
        ("pipeline/direct", &direct, "/score"),
    ] {
        c.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { score(&mut *sender.lock().await, path).await })
        });
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
