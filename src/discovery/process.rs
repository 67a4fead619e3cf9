//! Local model replicas: processes scorefront starts from a version's `command`, probes,
//! restarts and stops.
//!
//! Each replica is one task that owns one child process at a time. A child runs
//! `sh -c "exec <command>"` with `{port}` replaced by a free loopback port, in its own
//! process group, with `PR_SET_PDEATHSIG` so that it dies with scorefront even if
//! scorefront is killed outright: there are no orphans. A replica is ready when `GET /`
//! answers 200 within the probe timeout (a port that only accepts TCP is not ready); three
//! failed probes in a row make it unready; an exit restarts it with exponential backoff.
//! Stopping a replica withdraws it from routing, waits for its requests to finish, then
//! sends SIGTERM to its group and SIGKILL after a grace period.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep},
};

use super::index::Event;
use crate::{
    proxy::slots::Replica,
    spec::{self, PORT_PLACEHOLDER, ReplicaSource},
};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_WHILE_STARTING: Duration = Duration::from_millis(100);
const PROBE_WHILE_READY: Duration = Duration::from_secs(1);
const FAILED_PROBES_UNREADY: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A replica that ran this long before exiting restarts without accumulated backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// A set of identical replicas: same endpoint, version and command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub endpoint: String,
    pub version: String,
    pub command: String,
}

impl ProcessKey {
    pub fn of(ep: &spec::Endpoint, v: &spec::Version) -> Self {
        let command = match &v.replicas {
            ReplicaSource::Command { template, .. } => template.clone(),
            ReplicaSource::Fixed(_) | ReplicaSource::Service(_) => String::new(),
        };
        ProcessKey {
            endpoint: ep.name.clone(),
            version: v.name.clone(),
            command,
        }
    }
}

struct ReplicaTask {
    stop: watch::Sender<bool>,
    join: JoinHandle<()>,
}

impl ReplicaTask {
    fn retire(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.join
    }
}

/// Starts and stops replica tasks to match the endpoints. Owned by the index.
pub struct Supervisor {
    workdir: PathBuf,
    events: mpsc::UnboundedSender<Event>,
    sets: HashMap<ProcessKey, Vec<ReplicaTask>>,
    /// Tasks told to stop, still draining or terminating their process.
    retiring: Vec<JoinHandle<()>>,
}

impl Supervisor {
    pub fn new(workdir: PathBuf, events: mpsc::UnboundedSender<Event>) -> Self {
        Supervisor {
            workdir,
            events,
            sets: HashMap::new(),
            retiring: Vec::new(),
        }
    }

    /// Whether replicas of `key` are still wanted.
    pub fn is_current(&self, key: &ProcessKey) -> bool {
        self.sets.contains_key(key)
    }

    pub fn reconcile(&mut self, endpoints: &[spec::Endpoint]) {
        let mut wanted = HashMap::new();
        for ep in endpoints {
            for v in &ep.versions {
                if let ReplicaSource::Command { count, .. } = v.replicas {
                    wanted.insert(ProcessKey::of(ep, v), (count as usize, v.scoring_timeout));
                }
            }
        }
        self.retiring.retain(|j| !j.is_finished());
        let stale: Vec<ProcessKey> = self
            .sets
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            tracing::info!(
                endpoint = key.endpoint,
                version = key.version,
                "stopping replicas"
            );
            for task in self.sets.remove(&key).unwrap_or_default() {
                self.retiring.push(task.retire());
            }
        }
        for (key, (count, drain)) in wanted {
            let set = self.sets.entry(key.clone()).or_default();
            while set.len() > count {
                let task = set.pop().expect("len > count >= 0");
                self.retiring.push(task.retire());
            }
            while set.len() < count {
                let (stop, stop_rx) = watch::channel(false);
                let run = ReplicaRun {
                    key: key.clone(),
                    workdir: self.workdir.clone(),
                    events: self.events.clone(),
                    drain,
                };
                let join = tokio::spawn(run.run(stop_rx));
                set.push(ReplicaTask { stop, join });
            }
        }
    }

    /// Stops every replica and waits until their processes are gone.
    pub async fn shutdown(&mut self) {
        let tasks: Vec<JoinHandle<()>> = self
            .sets
            .drain()
            .flat_map(|(_, set)| set)
            .map(ReplicaTask::retire)
            .chain(self.retiring.drain(..))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One replica's life: start, probe, report, restart, stop.
struct ReplicaRun {
    key: ProcessKey,
    workdir: PathBuf,
    events: mpsc::UnboundedSender<Event>,
    /// Longest wait for running requests before stopping the process.
    drain: Duration,
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stopped,
}

impl ReplicaRun {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_FIRST;
        while !*stop.borrow() {
            let started = Instant::now();
            match self.start() {
                Ok((child, replica)) => match self.supervise(child, &replica, &mut stop).await {
                    Ended::Stopped => return,
                    Ended::Exited(status) => {
                        if started.elapsed() >= STABLE_RUN {
                            backoff = BACKOFF_FIRST;
                        }
                        tracing::warn!(
                            endpoint = self.key.endpoint,
                            version = self.key.version,
                            replica = %replica.addr,
                            status = ?status,
                            "replica exited; restarting in {backoff:?}"
                        );
                    }
                },
                Err(e) => tracing::error!(
                    endpoint = self.key.endpoint,
                    version = self.key.version,
                    "cannot start replica '{}': {e}; retrying in {backoff:?}",
                    self.key.command
                ),
            }
            tokio::select! {
                () = sleep(backoff) => {}
                () = crate::until_true(&mut stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn start(&self) -> std::io::Result<(Child, Arc<Replica>)> {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let command = self
            .key
            .command
            .replace(PORT_PLACEHOLDER, &port.to_string());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec {command}"))
            .current_dir(&self.workdir)
            .env("PORT", port.to_string())
            .env("SCOREFRONT_ENDPOINT", &self.key.endpoint)
            .env("SCOREFRONT_VERSION", &self.key.version)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, kill).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(forward_output(out, self.key.clone(), port));
        }
        tracing::info!(
            endpoint = self.key.endpoint,
            version = self.key.version,
            replica = %addr,
            pid = child.id(),
            "replica started"
        );
        Ok((child, Arc::new(Replica::new(addr))))
    }

    async fn supervise(
        &self,
        mut child: Child,
        replica: &Arc<Replica>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut ready = false;
        let mut failures = 0;
        let ended = loop {
            let every = if ready {
                PROBE_WHILE_READY
            } else {
                PROBE_WHILE_STARTING
            };
            tokio::select! {
                status = child.wait() => break Ended::Exited(status),
                () = crate::until_true(stop) => break Ended::Stopped,
                () = sleep(every) => {}
            }
            if probe(replica.addr).await {
                failures = 0;
                if !ready {
                    ready = true;
                    tracing::info!(
                        endpoint = self.key.endpoint,
                        version = self.key.version,
                        replica = %replica.addr,
                        "replica ready"
                    );
                    self.report(replica, true);
                }
            } else if ready {
                failures += 1;
                if failures >= FAILED_PROBES_UNREADY {
                    ready = false;
                    tracing::warn!(replica = %replica.addr, "replica failed {failures} probes; not ready");
                    self.report(replica, false);
                }
            }
        };
        if ready {
            self.report(replica, false);
        }
        if let Ended::Stopped = ended {
            let deadline = Instant::now() + self.drain;
            while replica.in_flight() > 0 && Instant::now() < deadline {
                sleep(Duration::from_millis(10)).await;
            }
            terminate(&mut child).await;
            tracing::info!(replica = %replica.addr, "replica stopped");
        }
        ended
    }

    fn report(&self, replica: &Arc<Replica>, ready: bool) {
        let _ = self.events.send(Event::Replica {
            key: self.key.clone(),
            replica: replica.clone(),
            ready,
        });
    }
}

/// SIGTERM to the child's process group, SIGKILL if it is still there after the grace.
async fn terminate(child: &mut Child) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    let group = -(pid as i32);
    // SAFETY: kill(2) with a negative pid signals the group the child leads.
    unsafe { libc::kill(group, libc::SIGTERM) };
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = child.wait().await;
    }
}

/// Whether `GET /` answers 200 within the probe timeout.
pub async fn probe(addr: SocketAddr) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        Some(resp.status() == http::StatusCode::OK)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Some(true))
    )
}

async fn forward_output(out: Box<dyn AsyncRead + Send + Unpin>, key: ProcessKey, port: u16) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(
            target: "scorefront::replica",
            endpoint = key.endpoint,
            version = key.version,
            port,
            "{line}"
        );
    }
}
