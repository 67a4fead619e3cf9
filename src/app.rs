//! Wiring and lifecycle: load the config, publish the first table, start the tasks, and on
//! shutdown drain in a fixed order: stop accepting and report not-ready, let in-flight
//! requests finish within the grace period, stop local replicas, stop the rest.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    discovery::{
        file::{self, Watcher},
        index::{Event, Index},
    },
    metrics::Metrics,
    proxy::Proxy,
    server::{self, admin::Readiness},
};

/// Listeners bound by the caller.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: TcpListener,
}

/// A running router. Dropping it without [`App::shutdown`] leaves its tasks running.
pub struct App {
    pub proxy: Arc<Proxy>,
    pub ready: Arc<Readiness>,
    /// Increments each time a routing table is published.
    pub generation: watch::Receiver<u64>,
    /// Turns true to stop accepting scoring connections and drain them.
    drain: watch::Sender<bool>,
    /// Turns true to stop the index (and its replicas), the watcher and the admin port.
    stop: watch::Sender<bool>,
    data: JoinHandle<()>,
    index: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
}

/// Loads `config_path`, publishes the first routing table and starts serving.
/// Fails with every error found when either file is invalid.
pub async fn start(config_path: &Path, listeners: Listeners) -> anyhow::Result<App> {
    let (config, endpoints) = file::load_all(config_path).map_err(|errors| {
        anyhow::anyhow!("configuration is invalid:\n  {}", errors.join("\n  "))
    })?;
    let workdir = config
        .endpoints
        .file
        .parent()
        .context("endpoints file has no folder")?
        .to_path_buf();
    let metrics = Arc::new(Metrics::new());
    let proxy = Arc::new(Proxy::new(
        metrics,
        config.max_request_body_bytes,
        config.upstream,
    ));
    let ready = Arc::new(Readiness::default());
    let (drain, drain_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let (events, events_rx) = mpsc::unbounded_channel();

    let mut index = Index::new(proxy.clone(), workdir, events.clone());
    index.apply(Event::Endpoints(endpoints));
    let generation = index.generation();
    ready.set(true);

    let grace = config.grace_period();
    let watcher = Watcher {
        config_path: config_path.to_path_buf(),
        config,
        proxy: proxy.clone(),
        events,
    };
    tracing::info!(
        http = %listeners.http.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        "scorefront serving"
    );
    Ok(App {
        data: tokio::spawn(server::serve_data(
            listeners.http,
            proxy.clone(),
            drain_rx,
            grace,
        )),
        index: tokio::spawn(index.run(events_rx, stop_rx.clone())),
        others: vec![
            tokio::spawn(server::admin::serve_admin(
                listeners.admin,
                proxy.clone(),
                ready.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(watcher.run(stop_rx)),
        ],
        proxy,
        ready,
        generation,
        drain,
        stop,
    })
}

impl App {
    /// Drains and stops everything; returns when local replicas are gone.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.ready.set(false);
        let _ = self.drain.send(true);
        let _ = self.data.await;
        let _ = self.stop.send(true);
        let _ = self.index.await;
        for t in self.others {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}
