//! Local model replicas: processes scorefront starts from a version's `command`, probes,
//! restarts and stops.
//!
//! Each replica is one task that owns one child process at a time. A child runs
//! `sh -c "exec <command>"` with `{port}` replaced by a free loopback port, in its own
//! process group, with `PR_SET_PDEATHSIG` so that it dies with scorefront even if
//! scorefront is killed outright. (Processes the child starts itself, such as a
//! gunicorn-style server's workers, are killed with its group when it exits or is
//! stopped, but not yet when scorefront itself is killed outright.) A replica is ready
//! when `GET /` answers 200 within the probe timeout (a port that only accepts TCP is not
//! ready); three failed probes in a row make it unready; an exit restarts it with
//! exponential backoff.
//! Stopping a replica withdraws it from routing, waits for its requests to finish, then
//! sends SIGTERM to its group and SIGKILL after a grace period.
//!
//! When asked to (a router in front of its own model, whose readiness must mean the model
//! answers), fixed replica addresses are probed the same way: routable once `GET /`
//! answers 200, withdrawn after three failed probes.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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

use super::{
    guard::{COMMAND_ENV, GUARD_ENV, TERM_GRACE},
    index::Event,
};
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

/// A set of identical replicas: same endpoint, version and source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub endpoint: String,
    pub version: String,
    /// The command template of local replicas, or the list of fixed addresses probed.
    pub source: String,
}

impl ProcessKey {
    pub fn of(ep: &spec::Endpoint, v: &spec::Version) -> Self {
        let source = match &v.replicas {
            ReplicaSource::Command { template, .. } => template.clone(),
            ReplicaSource::Fixed(addrs) => (addrs.iter())
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            ReplicaSource::Service(_) => String::new(),
        };
        ProcessKey {
            endpoint: ep.name.clone(),
            version: v.name.clone(),
            source,
        }
    }
}

struct ReplicaTask {
    stop: watch::Sender<bool>,
    join: JoinHandle<()>,
    /// The replica the task runs now, if any: scaling down stops the least busy.
    replica: watch::Receiver<Option<Arc<Replica>>>,
}

impl ReplicaTask {
    fn in_flight(&self) -> u32 {
        self.replica.borrow().as_ref().map_or(0, |r| r.in_flight())
    }
}

impl ReplicaTask {
    fn retire(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.join
    }
}

/// A replica count for an autoscaled set, from the autoscaler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    pub key: ProcessKey,
    pub replicas: u32,
}

/// Starts and stops replica tasks to match the definitions the index publishes, with the
/// counts of autoscaled sets from the autoscaler. Owned by its task ([`Supervisor::run`]);
/// it reports replicas to the index as events.
pub struct Supervisor {
    workdir: PathBuf,
    /// Whether fixed addresses are probed (and routable only while they pass).
    probe_fixed: bool,
    events: mpsc::UnboundedSender<Event>,
    sets: HashMap<ProcessKey, Vec<ReplicaTask>>,
    /// Tasks told to stop, still draining or terminating their process.
    retiring: Vec<JoinHandle<()>>,
    /// The count the autoscaler last asked for, per autoscaled set.
    scaled: HashMap<ProcessKey, u32>,
}

impl Supervisor {
    pub fn new(workdir: PathBuf, probe_fixed: bool, events: mpsc::UnboundedSender<Event>) -> Self {
        Supervisor {
            workdir,
            probe_fixed,
            events,
            sets: HashMap::new(),
            retiring: Vec::new(),
            scaled: HashMap::new(),
        }
    }

    /// Follows `definitions` and `scale` requests until `stop` turns true, then stops
    /// every replica and returns once their processes are gone.
    pub async fn run(
        mut self,
        mut definitions: watch::Receiver<Arc<Vec<spec::Endpoint>>>,
        mut scale: mpsc::UnboundedReceiver<Scale>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut current = definitions.borrow_and_update().clone();
        self.reconcile(&current);
        loop {
            tokio::select! {
                Ok(()) = definitions.changed() => {
                    current = definitions.borrow_and_update().clone();
                }
                Some(Scale { key, replicas }) = scale.recv() => {
                    self.scaled.insert(key, replicas);
                }
                () = crate::until_true(&mut stop) => break,
            }
            self.reconcile(&current);
        }
        self.shutdown().await;
    }

    fn reconcile(&mut self, endpoints: &[spec::Endpoint]) {
        let mut wanted = HashMap::new();
        for ep in endpoints {
            for v in &ep.versions {
                let what = match &v.replicas {
                    ReplicaSource::Command { count, .. } => {
                        let count = match v.autoscale {
                            Some(a) => (self.scaled.get(&ProcessKey::of(ep, v)))
                                .map_or(*count, |n| (*n).clamp(a.min_replicas, a.max_replicas)),
                            None => *count,
                        };
                        Want::Processes(count as usize)
                    }
                    ReplicaSource::Fixed(addrs) if self.probe_fixed => Want::Probes(addrs.clone()),
                    _ => continue,
                };
                wanted.insert(ProcessKey::of(ep, v), (what, v.scoring_timeout));
            }
        }
        self.retiring.retain(|j| !j.is_finished());
        self.scaled.retain(|k, _| wanted.contains_key(k));
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
        for (key, (what, drain)) in wanted {
            let set = self.sets.entry(key.clone()).or_default();
            let count = match what {
                Want::Processes(count) => count,
                Want::Probes(addrs) => {
                    // The key names the addresses: a set once started never changes.
                    if set.is_empty() {
                        for addr in addrs {
                            let (stop, stop_rx) = watch::channel(false);
                            let replica = Arc::new(Replica::new(addr));
                            let (_, current) = watch::channel(Some(replica.clone()));
                            let join = tokio::spawn(probe_fixed(
                                key.clone(),
                                replica,
                                self.events.clone(),
                                stop_rx,
                            ));
                            set.push(ReplicaTask {
                                stop,
                                join,
                                replica: current,
                            });
                        }
                    }
                    continue;
                }
            };
            if set.len() != count {
                tracing::info!(
                    endpoint = key.endpoint,
                    version = key.version,
                    from = set.len(),
                    to = count,
                    "replica count changes"
                );
            }
            while set.len() > count {
                // The least busy goes: it is withdrawn first, its requests finish, then
                // its process stops.
                let least = (0..set.len())
                    .min_by_key(|&i| set[i].in_flight())
                    .expect("len > count >= 0");
                self.retiring.push(set.swap_remove(least).retire());
            }
            while set.len() < count {
                let (stop, stop_rx) = watch::channel(false);
                let (current, replica) = watch::channel(None);
                let run = ReplicaRun {
                    key: key.clone(),
                    workdir: self.workdir.clone(),
                    events: self.events.clone(),
                    drain,
                    current,
                };
                let join = tokio::spawn(run.run(stop_rx));
                set.push(ReplicaTask {
                    stop,
                    join,
                    replica,
                });
            }
        }
    }

    /// Stops every replica and waits until their processes are gone.
    async fn shutdown(&mut self) {
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

/// What a version needs from the supervisor.
enum Want {
    /// This many local processes.
    Processes(usize),
    /// Probes of these fixed addresses.
    Probes(Vec<SocketAddr>),
}

/// Readiness from probes: ready on the first pass, unready after
/// [`FAILED_PROBES_UNREADY`] failures in a row.
#[derive(Default)]
struct Health {
    ready: bool,
    failures: u32,
}

impl Health {
    /// How long until the next probe.
    fn every(&self) -> Duration {
        if self.ready {
            PROBE_WHILE_READY
        } else {
            PROBE_WHILE_STARTING
        }
    }

    /// Folds in a probe result; returns the new readiness when it changed.
    fn observe(&mut self, passed: bool) -> Option<bool> {
        if passed {
            self.failures = 0;
            (!self.ready).then(|| {
                self.ready = true;
                true
            })
        } else {
            self.failures += 1;
            (self.ready && self.failures >= FAILED_PROBES_UNREADY).then(|| {
                self.ready = false;
                false
            })
        }
    }
}

/// Probes the fixed replica `addr` until `stop` turns true, reporting each change of its
/// readiness.
async fn probe_fixed(
    key: ProcessKey,
    replica: Arc<Replica>,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let addr = replica.addr;
    let report = |ready| {
        let _ = events.send(Event::Replica {
            key: key.clone(),
            replica: replica.clone(),
            ready,
        });
    };
    let mut health = Health::default();
    loop {
        if let Some(ready) = health.observe(probe(addr).await) {
            if ready {
                tracing::info!(endpoint = key.endpoint, version = key.version, replica = %addr, "replica ready");
            } else {
                tracing::warn!(replica = %addr, "replica failed {FAILED_PROBES_UNREADY} probes; not ready");
            }
            report(ready);
        }
        tokio::select! {
            () = crate::until_true(&mut stop) => return,
            () = sleep(health.every()) => {}
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
    /// The replica running now, for the supervisor.
    current: watch::Sender<Option<Arc<Replica>>>,
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
                Ok((child, lifeline, replica)) => {
                    self.current.send_replace(Some(replica.clone()));
                    match self.supervise(child, lifeline, &replica, &mut stop).await {
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
                    }
                }
                Err(e) => tracing::error!(
                    endpoint = self.key.endpoint,
                    version = self.key.version,
                    "cannot start replica '{}': {e}; retrying in {backoff:?}",
                    self.key.source
                ),
            }
            tokio::select! {
                () = sleep(backoff) => {}
                () = crate::until_true(&mut stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn start(&self) -> std::io::Result<(Child, OwnedFd, Arc<Replica>)> {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let command = self.key.source.replace(PORT_PLACEHOLDER, &port.to_string());
        let (guard_end, lifeline) = lifeline()?;
        let guard_fd = guard_end.as_raw_fd();
        // The guard (see [`super::guard`]) runs the command; the arguments only name it
        // in process listings.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("scorefront-replica-guard")
            .arg(&command)
            .env(GUARD_ENV, guard_fd.to_string())
            .env(COMMAND_ENV, format!("exec {command}"))
            .current_dir(&self.workdir)
            .env("PORT", port.to_string())
            .env("SCOREFRONT_ENDPOINT", &self.key.endpoint)
            .env("SCOREFRONT_VERSION", &self.key.version)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl,
        // which is async-signal-safe: the guard keeps its end of the pipe across exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(guard_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(guard_end);
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
            guard = child.id(),
            "replica started"
        );
        Ok((child, lifeline, Arc::new(Replica::new(addr))))
    }

    async fn supervise(
        &self,
        mut child: Child,
        lifeline: OwnedFd,
        replica: &Arc<Replica>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut health = Health::default();
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Ended::Exited(status),
                () = crate::until_true(stop) => break Ended::Stopped,
                () = sleep(health.every()) => {}
            }
            match health.observe(probe(replica.addr).await) {
                Some(true) => tracing::info!(
                    endpoint = self.key.endpoint,
                    version = self.key.version,
                    replica = %replica.addr,
                    "replica ready"
                ),
                Some(false) => tracing::warn!(
                    replica = %replica.addr,
                    "replica failed {FAILED_PROBES_UNREADY} probes; not ready"
                ),
                None => continue,
            }
            self.report(replica, health.ready);
        };
        if health.ready {
            self.report(replica, false);
        }
        if let Ended::Stopped = ended {
            let deadline = Instant::now() + self.drain;
            while replica.in_flight() > 0 && Instant::now() < deadline {
                sleep(Duration::from_millis(10)).await;
            }
            terminate(&mut child, lifeline).await;
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

/// SIGTERM to the guard, which passes it to the command's group and kills the group after
/// [`TERM_GRACE`]. Should the guard not end by then, closing `lifeline` makes it kill the
/// group at once; failing that, the guard itself is killed.
async fn terminate(child: &mut Child, lifeline: OwnedFd) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    // SAFETY: kill(2) on the guard this replica started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let patience = TERM_GRACE + Duration::from_secs(1);
    if tokio::time::timeout(patience, child.wait()).await.is_err() {
        drop(lifeline);
        if tokio::time::timeout(patience, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

/// A pipe for a guard: the guard's end and scorefront's, both close-on-exec. The guard
/// kills its replica when scorefront's end closes, however that happens.
fn lifeline() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors on success, owned from here on.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
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
