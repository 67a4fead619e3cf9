//! One scoring request through the whole router, in process: a client connection over
//! loopback, the key check, the version split, a slot, the pooled upstream connection to a
//! model server in the same process, the response body, metrics and the access log (off
//! here, so the bench prints nothing). The model answers at once, so the time is the
//! router's and loopback's; `direct` is the same request sent straight to the model.
//!
//! Run: `cargo bench --bench pipeline`.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use scorefront::app::{self, Listeners};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Mutex,
};

const KEY: &str = "bench-primary-key-0123456789";

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

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn score(sender: &mut SendRequest<Full<Bytes>>, path: &str) {
    let req = Request::post(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"data\": [1, 2, 3]}")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (router, model) = rt.block_on(async {
        let model = model().await;
        std::fs::write(
            dir.path().join("scorefront.yaml"),
            "endpoints: {file: endpoints.yaml}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("endpoints.yaml"),
            format!(
                "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: bench}}\n\
                 spec:\n  keys: {{primaryKey: {KEY}}}\n  versions:\n\
                 \x20   - {{name: blue, trafficPercentile: 90, maxConcurrentRequestsPerContainer: 64, replicas: ['{model}']}}\n\
                 \x20   - {{name: green, trafficPercentile: 10, maxConcurrentRequestsPerContainer: 64, replicas: ['{model}']}}\n"
            ),
        )
        .unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let listeners = Listeners {
            http: Some(http),
            https: None,
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let app = app::start(&dir.path().join("scorefront.yaml"), listeners)
            .await
            .unwrap();
        // Keep the app (and its tasks) alive for the whole bench.
        std::mem::forget(app);
        (addr, model)
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
