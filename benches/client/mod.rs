//! What the in-process benches share: a router started from an endpoints document, a
//! client connection to it, and one scoring request.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use scorefront::app::{self, Listeners};
use tokio::net::{TcpListener, TcpStream};

pub const KEY: &str = "bench-primary-key-0123456789";

/// Starts a router in `dir` serving `endpoints` (the endpoints file's text) and returns
/// its http address. The router lives for the rest of the process.
pub async fn router(dir: &std::path::Path, endpoints: &str) -> SocketAddr {
    std::fs::write(
        dir.join("scorefront.yaml"),
        "endpoints: {file: endpoints.yaml}\n",
    )
    .unwrap();
    std::fs::write(dir.join("endpoints.yaml"), endpoints).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let listeners = Listeners {
        http: Some(http),
        https: None,
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let app = app::start(&dir.join("scorefront.yaml"), listeners)
        .await
        .unwrap();
    // Keep the app (and its tasks) alive for the whole bench.
    std::mem::forget(app);
    addr
}

pub async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn score(sender: &mut SendRequest<Full<Bytes>>, path: &str) {
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
