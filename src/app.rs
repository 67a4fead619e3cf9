//! Wiring and lifecycle: load the config, publish the first table, start the tasks, and on
//! shutdown drain in a fixed order: stop accepting and report not-ready, let in-flight
//! requests finish within the grace period, stop local replicas, stop the rest.

use std::{path::Path, sync::Arc, time::SystemTime};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    autoscale::{
        Actuator, Autoscaler,
        actuator::{Actuators, DryRun},
        kube::KubeScaler,
    },
    config::ClusterPurpose,
    discovery::{
        file::{self, Watcher},
        index::{Event, Index},
        kubernetes,
        process::Supervisor,
    },
    metrics::Metrics,
    proxy::Proxy,
    server::{
        self,
        admin::Readiness,
        tls::{CertStore, LoadedCert},
    },
    token,
};

/// Listeners bound by the caller. At least one of `http` and `https` is needed; `https`
/// needs `tls` in the router config.
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
    pub admin: TcpListener,
}

/// The cluster endpoints come from, in Kubernetes mode.
struct Cluster {
    client: kube::Client,
    namespaces: Vec<String>,
    /// Token issuers the router config configures, for validating endpoints.
    issuers: Vec<String>,
    /// Where the source and the Deployment scaler send events for the index.
    events: mpsc::UnboundedSender<Event>,
    /// Kubernetes Events, shared by the source and the scaler.
    recorder: kubernetes::Recorder,
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
    data: Vec<JoinHandle<()>>,
    index: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
}

/// Loads `config_path`, publishes the first routing table and starts serving.
/// Fails with every error found when either file is invalid.
pub async fn start(config_path: &Path, listeners: Listeners) -> anyhow::Result<App> {
    let (config, endpoints) = file::load_all(config_path)?;
    // Replica commands run in the endpoints file's folder.
    let workdir = match &config.endpoints.file {
        Some(file) => file
            .parent()
            .context("endpoints file has no folder")?
            .to_path_buf(),
        None => std::env::current_dir().context("no current folder")?,
    };
    if listeners.http.is_none() && listeners.https.is_none() {
        anyhow::bail!("no data listener: bind http, https or both");
    }
    let metrics = Arc::new(Metrics::new());
    let tls = match (&listeners.https, &config.tls) {
        (None, _) => None,
        (Some(_), None) => anyhow::bail!("an https listener needs tls in the router config"),
        (Some(_), Some(tls)) => {
            let cert = LoadedCert::load(&tls.cert_file, &tls.key_file, SystemTime::now())
                .map_err(|e| anyhow::anyhow!("TLS certificate: {e}"))?;
            metrics.set_cert_expiry(cert.not_after);
            let store = CertStore::new(cert);
            Some((
                store.clone(),
                server::Tls {
                    config: server::tls::server_config(store),
                    handshake_timeout: tls.handshake_timeout(),
                },
            ))
        }
    };
    let (drain, drain_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let tokens = Arc::new(token::Verifier::from_config(&config.auth)?);
    let proxy = Arc::new(Proxy::new(
        metrics,
        config.max_request_body_bytes,
        config.upstream,
        config.clients,
        tokens,
    ));
    let ready = Arc::new(Readiness::new(config.readiness.require_ready_replicas));
    let (events, events_rx) = mpsc::unbounded_channel();
    let kube = match &config.endpoints.kubernetes {
        Some(k) => {
            let client = kubernetes::client(k).await?;
            Some(Cluster {
                recorder: kubernetes::Recorder::new(client.clone()),
                client,
                namespaces: k.namespaces.clone(),
                issuers: crate::discovery::known_issuers(&config.auth),
                events: events.clone(),
            })
        }
        None => None,
    };

    let require_ready = config.readiness.require_ready_replicas;
    let mut index = Index::new(proxy.clone(), require_ready);
    index.apply(Event::Endpoints(endpoints));
    let generation = index.generation();
    let (scale, scale_rx) = mpsc::unbounded_channel();
    let desired = watch::Sender::new(Arc::new(kubernetes::Desired::new()));
    let supervisor = Supervisor::new(workdir, require_ready, events.clone());
    let supervising = supervisor.run(index.definitions(), scale_rx, stop_rx.clone());
    let autoscaler = match (config.cluster_purpose, config.autoscaler.dry_run) {
        (ClusterPurpose::DevTest, _) => {
            tracing::info!("clusterPurpose is DevTest: autoscaling is off");
            None
        }
        (_, dry_run) => {
            let cluster = kube.as_ref().map(|c| {
                let scaler =
                    KubeScaler::new(c.client.clone(), c.events.clone(), c.recorder.clone());
                Box::new(scaler) as Box<dyn Actuator>
            });
            let actuators = Actuators {
                local: scale,
                cluster,
            };
            let actuator: Arc<dyn Actuator> = if dry_run {
                tracing::info!("autoscaler in dry run: decisions are logged, not applied");
                Arc::new(DryRun(actuators))
            } else {
                Arc::new(actuators)
            };
            Some(Autoscaler {
                proxy: proxy.clone(),
                actuator,
                desired: desired.clone(),
            })
        }
    };

    let grace = config.grace_period();
    let clients = config.clients;
    let watcher = Watcher {
        config_path: config_path.to_path_buf(),
        config,
        proxy: proxy.clone(),
        events,
        certs: tls.as_ref().map(|(store, _)| store.clone()),
    };
    // Snapshot the files before the first JWKS fetches, which may take a while: a change
    // made meanwhile is then seen as one.
    let watching = watcher.run(stop_rx.clone());
    let mut others = proxy.tokens().spawn_refresh(&stop_rx).await;
    match kube {
        None => ready.set_synced(),
        Some(Cluster {
            client,
            namespaces,
            issuers,
            events,
            recorder,
        }) => {
            let (source, handles) =
                kubernetes::Source::new(events, proxy.metrics().clone(), issuers, recorder);
            others.push(tokio::spawn(source.run(
                client.clone(),
                namespaces,
                stop_rx.clone(),
            )));
            others.push(tokio::spawn(kubernetes::write_status(
                client,
                proxy.clone(),
                handles.observed,
                desired.subscribe(),
                stop_rx.clone(),
            )));
            let (ready, mut synced) = (ready.clone(), handles.synced);
            others.push(tokio::spawn(async move {
                if synced.wait_for(|s| *s).await.is_ok() {
                    ready.set_synced();
                }
            }));
        }
    }
    let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(
        http = ?addr(&listeners.http),
        https = ?addr(&listeners.https),
        admin = %listeners.admin.local_addr()?,
        "scorefront serving"
    );
    let mut data = Vec::new();
    let tls_settings = tls.map(|(_, settings)| settings);
    for (listener, tls) in [(listeners.http, None), (listeners.https, tls_settings)] {
        if let Some(listener) = listener {
            data.push(tokio::spawn(server::serve_data(
                listener,
                tls,
                proxy.clone(),
                clients,
                drain_rx.clone(),
                grace,
            )));
        }
    }
    others.extend([
        tokio::spawn(server::admin::serve_admin(
            listeners.admin,
            proxy.clone(),
            ready.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(watching),
        // Stops local replicas at shutdown, after the data plane has drained.
        tokio::spawn(supervising),
    ]);
    if let Some(autoscaler) = autoscaler {
        others.push(tokio::spawn(autoscaler.run(stop_rx.clone())));
    }
    Ok(App {
        data,
        index: tokio::spawn(index.run(events_rx, stop_rx)),
        others,
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
        self.ready.set_draining();
        let _ = self.drain.send(true);
        for t in self.data {
            let _ = t.await;
        }
        let _ = self.stop.send(true);
        let _ = self.index.await;
        for t in self.others {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}
