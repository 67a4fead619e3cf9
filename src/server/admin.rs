//! The admin port: `/healthz` (the process answers), `/readyz` (a routing table is loaded
//! and the router is not draining) and `/metrics` (Prometheus text format).

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use crate::proxy::Proxy;

/// Whether the router wants new traffic: set once the first table is published, cleared
/// when draining starts.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(SeqCst)
    }
}

pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    ready: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            () = crate::until_true(&mut stop) => return,
        };
        let (proxy, ready) = (proxy.clone(), ready.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let resp = answer(&req, &proxy, &ready);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

fn answer(req: &Request<Incoming>, proxy: &Proxy, ready: &Readiness) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, kind: &'static str| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" if ready.get() => text(StatusCode::OK, "ready\n".into(), PLAIN),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), PLAIN),
        "/metrics" => text(
            StatusCode::OK,
            proxy.metrics().render(&proxy.table()),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}
