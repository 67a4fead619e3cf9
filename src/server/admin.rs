//! The admin port: `/healthz` (the process answers), `/readyz` (every endpoint source has
//! loaded, the router is not draining and, if asked, every endpoint has a ready replica)
//! and `/metrics` (Prometheus text format).

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

use crate::{
    metrics::VersionGauges,
    proxy::{Proxy, table::RoutingTable},
};

/// Whether the router wants new traffic. Owned by the app: it marks the sources synced
/// once, and draining when shutdown starts; draining wins, whatever the order.
#[derive(Debug, Default)]
pub struct Readiness {
    synced: AtomicBool,
    draining: AtomicBool,
    /// Every endpoint must also have a version with a ready replica.
    require_replicas: bool,
}

impl Readiness {
    pub fn new(require_replicas: bool) -> Self {
        Readiness {
            require_replicas,
            ..Readiness::default()
        }
    }

    /// Every endpoint source has delivered its first complete set.
    pub fn set_synced(&self) {
        self.synced.store(true, SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, SeqCst);
    }

    pub fn is_ready(&self, table: &RoutingTable) -> bool {
        self.synced.load(SeqCst)
            && !self.draining.load(SeqCst)
            && (!self.require_replicas
                || table
                    .endpoints()
                    .all(|ep| (ep.versions().iter()).any(|v| !v.slots.replicas().is_empty())))
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

/// The metrics, with each served version's gauges read from its slots.
fn render_metrics(proxy: &Proxy) -> String {
    let table = proxy.table();
    let versions = table.endpoints().flat_map(|ep| {
        ep.versions().iter().map(|v| {
            let replicas = v.slots.replicas();
            VersionGauges {
                endpoint: &ep.name,
                version: v.name(),
                in_flight: v.slots.in_flight(),
                queued: v.slots.queued(),
                ready: replicas.len(),
                busy: replicas.iter().filter(|r| r.in_flight() > 0).count(),
                ejected: v.slots.ejected(),
            }
        })
    });
    proxy.metrics().render(versions)
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
        "/readyz" if ready.is_ready(&proxy.table()) => {
            text(StatusCode::OK, "ready\n".into(), PLAIN)
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), PLAIN),
        "/metrics" => text(
            StatusCode::OK,
            render_metrics(proxy),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}
