//! Local model replicas: processes scorefront starts from a version's `command`, probes,
//! restarts, replaces and stops; and the health checks of fixed replica addresses.
//!
//! Each replica is one task that owns one child process at a time: a guard (the
//! `guard` module) running `sh -c "exec <command>"` with `{port}` replaced by a free
//! loopback port. The guard puts the command in a process group of its own and kills that
//! whole group (workers a gunicorn-style server started included) when the command exits,
//! when the replica is stopped, and when scorefront is gone however it ended (exit,
//! SIGKILL, abort): it watches a pipe only scorefront holds open, so no thread's life
//! matters. A replica is ready when `GET /` answers 200 within the probe timeout (a port
//! that only accepts TCP is not ready); three failed probes in a row make it unready; an
//! exit restarts it with exponential backoff.
//! Stopping a replica withdraws it from routing, waits for its requests to finish, then
//! sends SIGTERM to its guard, which passes it on and sends SIGKILL after a grace period.
//!
//! A changed `command` is a new set of replicas, started make-before-break: the previous
//! command's replicas serve until the new set has all the replicas it wants ready, then
//! are withdrawn, drain and stop. A new command that is still not ready after
//! 60 s is logged as stalled, and the previous replicas keep serving (as a
//! Deployment's old ReplicaSet does past its progress deadline) until it is ready or the
//! command changes again. At most two sets run for a version: the one serving and the
//! newest (a change during a rollout replaces the set being started).
//!
//! Fixed replica addresses are health-checked with the same probe: routable from the
//! start, withdrawn after three failed probes (no answer, or a 5xx), back after one pass.
//! A router in front of its own model (`readiness.requireReadyReplicas`), whose readiness
//! must mean the model answers, routes to an address only once `GET /` answered 200.

use std::{
    collections::{HashMap, HashSet},
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
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep, sleep_until},
};

use super::{
    guard::{COMMAND_ENV, GUARD_ENV, TERM_GRACE},
    index::Event,
};
use crate::{
    proxy::slots::Replica,
    spec::{self, PORT_PLACEHOLDER, ReplicaSource},
};

/// The `User-Agent` of probes, so a model can tell them from scoring traffic.
pub const PROBE_USER_AGENT: &str = "scorefront-probe";
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_WHILE_STARTING: Duration = Duration::from_millis(100);
const PROBE_WHILE_READY: Duration = Duration::from_secs(1);
const FAILED_PROBES_UNREADY: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a version's new command may take to have all its replicas ready before a
/// warning says the rollout is stalled; the previous command's replicas serve meanwhile.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(60);
/// A replica that ran this long before exiting restarts without accumulated backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// Time a stopping replica keeps serving after its withdrawal, before its requests are
/// counted down: the routing table without it is published in far less.
const WITHDRAW_SETTLE: Duration = Duration::from_millis(250);

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

    /// Whether the set runs local processes (a command template holds the port
    /// placeholder; a list of addresses cannot).
    pub fn is_command(&self) -> bool {
        self.source.contains(PORT_PLACEHOLDER)
    }
}

struct ReplicaTask {
    stop: watch::Sender<bool>,
    join: JoinHandle<()>,
    /// The replica the task runs now, if any: scaling down stops the least busy.
    replica: watch::Receiver<Option<Arc<Replica>>>,
    /// Whether that replica is ready.
    ready: watch::Receiver<bool>,
}

impl ReplicaTask {
    fn in_flight(&self) -> u32 {
        self.replica.borrow().as_ref().map_or(0, |r| r.in_flight())
    }

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

/// A version: `(endpoint, version)`.
type VersionKey = (String, String);

/// The replicas of a version's previous command, serving until those of its new command
/// are all ready.
struct Rollout {
    old: ProcessKey,
    tasks: Vec<ReplicaTask>,
    /// When a new command still not ready is reported as stalled (once).
    stalled_at: Option<Instant>,
}

/// Starts and stops replica tasks to match the definitions the index publishes, with the
/// counts of autoscaled sets from the autoscaler. Owned by its task ([`Supervisor::run`]);
/// it reports replicas to the index as events.
pub struct Supervisor {
    workdir: PathBuf,
    /// Whether fixed addresses are routable only once a probe passed (a sidecar router),
    /// rather than from the start until probes fail.
    require_ready: bool,
    events: mpsc::UnboundedSender<Event>,
    sets: HashMap<ProcessKey, Vec<ReplicaTask>>,
    /// Versions whose command changed and whose new replicas are not all ready yet.
    rollouts: HashMap<VersionKey, Rollout>,
    /// Told when a local replica's readiness changes, for the rollouts.
    readiness: Arc<Notify>,
    /// Tasks told to stop, still draining or terminating their process.
    retiring: Vec<JoinHandle<()>>,
    /// The count the autoscaler last asked for, per autoscaled set.
    scaled: HashMap<ProcessKey, u32>,
}

impl Supervisor {
    pub fn new(
        workdir: PathBuf,
        require_ready: bool,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Supervisor {
            workdir,
            require_ready,
            events,
            sets: HashMap::new(),
            rollouts: HashMap::new(),
            readiness: Arc::new(Notify::new()),
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
            let stalled_at = (self.rollouts.values()).filter_map(|r| r.stalled_at).min();
            tokio::select! {
                Ok(()) = definitions.changed() => {
                    current = definitions.borrow_and_update().clone();
                }
                Some(Scale { key, replicas }) = scale.recv() => {
                    self.scaled.insert(key, replicas);
                }
                () = self.readiness.notified() => {}
                () = sleep_until(stalled_at.unwrap_or_else(Instant::now)), if stalled_at.is_some() => {}
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
                    ReplicaSource::Fixed(addrs) => Want::Probes(addrs.clone()),
                    ReplicaSource::Service(_) => continue,
                };
                wanted.insert(ProcessKey::of(ep, v), (what, v.scoring_timeout));
            }
        }
        self.retiring.retain(|j| !j.is_finished());
        self.scaled.retain(|k, _| wanted.contains_key(k));
        let commands: HashSet<VersionKey> = (wanted.iter())
            .filter(|(_, (what, _))| matches!(what, Want::Processes(_)))
            .map(|(k, _)| (k.endpoint.clone(), k.version.clone()))
            .collect();
        // A command changed back while its successor was starting serves on as it was.
        let back: Vec<VersionKey> = (self.rollouts.iter())
            .filter(|(_, r)| wanted.contains_key(&r.old))
            .map(|(v, _)| v.clone())
            .collect();
        for version in back {
            let rollout = self.rollouts.remove(&version).expect("listed");
            self.sets.insert(rollout.old, rollout.tasks);
        }
        let stale: Vec<ProcessKey> = self
            .sets
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            let tasks = self.sets.remove(&key).unwrap_or_default();
            let version = (key.endpoint.clone(), key.version.clone());
            let successor = commands.contains(&version);
            let serving = tasks.iter().any(|t| *t.ready.borrow());
            if successor && serving && !self.rollouts.contains_key(&version) {
                // Make before break: the old command serves until the new one is ready.
                tracing::info!(
                    endpoint = key.endpoint,
                    version = key.version,
                    "command changed; the current replicas serve until the new ones are ready"
                );
                let stalled_at = Some(Instant::now() + ROLLOUT_DEADLINE);
                self.rollouts.insert(
                    version,
                    Rollout {
                        old: key,
                        tasks,
                        stalled_at,
                    },
                );
                continue;
            }
            tracing::info!(
                endpoint = key.endpoint,
                version = key.version,
                "stopping replicas"
            );
            // With a rollout under way, the set it waits for is replaced: at most two
            // generations run, the one serving and the newest.
            if let Some(rollout) = self.rollouts.get_mut(&version) {
                rollout.stalled_at = Some(Instant::now() + ROLLOUT_DEADLINE);
            }
            self.retiring
                .extend(tasks.into_iter().map(ReplicaTask::retire));
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
                            let (_, ready) = watch::channel(false);
                            let join = tokio::spawn(probe_fixed(
                                key.clone(),
                                replica,
                                self.require_ready,
                                self.events.clone(),
                                stop_rx,
                            ));
                            set.push(ReplicaTask {
                                stop,
                                join,
                                replica: current,
                                ready,
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
                let (ready_tx, ready) = watch::channel(false);
                let run = ReplicaRun {
                    key: key.clone(),
                    workdir: self.workdir.clone(),
                    events: self.events.clone(),
                    drain,
                    current,
                    ready: ready_tx,
                    readiness: self.readiness.clone(),
                };
                let join = tokio::spawn(run.run(stop_rx));
                set.push(ReplicaTask {
                    stop,
                    join,
                    replica,
                    ready,
                });
            }
            let version = (key.endpoint.clone(), key.version.clone());
            let Some(rollout) = self.rollouts.get_mut(&version) else {
                continue;
            };
            let ready = set.iter().filter(|t| *t.ready.borrow()).count();
            if ready >= count {
                tracing::info!(
                    endpoint = key.endpoint,
                    version = key.version,
                    "the new command's replicas are ready; stopping the previous command's"
                );
                let rollout = self.rollouts.remove(&version).expect("found");
                self.retiring
                    .extend(rollout.tasks.into_iter().map(ReplicaTask::retire));
            } else if rollout.stalled_at.is_some_and(|at| at <= Instant::now()) {
                tracing::warn!(
                    endpoint = key.endpoint,
                    version = key.version,
                    ready,
                    wanted = count,
                    "the new command's replicas are still not ready after {ROLLOUT_DEADLINE:?}; \
                     the previous command's replicas keep serving until they are, or until \
                     the command changes again: `{}`",
                    key.source
                );
                rollout.stalled_at = None;
            }
        }
        // A version removed, or no longer run from a command, has nothing to wait for.
        let (rolling, done) = (self.rollouts.drain()).partition(|(v, _)| commands.contains(v));
        self.rollouts = rolling;
        for (_, rollout) in done {
            self.retiring
                .extend(rollout.tasks.into_iter().map(ReplicaTask::retire));
        }
    }

    /// Stops every replica and waits until their processes are gone.
    async fn shutdown(&mut self) {
        let tasks: Vec<JoinHandle<()>> = self
            .sets
            .drain()
            .flat_map(|(_, set)| set)
            .chain(self.rollouts.drain().flat_map(|(_, r)| r.tasks))
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
/// readiness. With `require_ready` it starts unready and a probe passes on 200 (a model
/// that must be seen to answer); else it starts ready (as the index publishes it) and a
/// probe passes on any answer below 500 (a backend that is up).
async fn probe_fixed(
    key: ProcessKey,
    replica: Arc<Replica>,
    require_ready: bool,
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
    let mut health = Health {
        ready: !require_ready,
        failures: 0,
    };
    loop {
        // An address routable from the start is first probed after the usual interval.
        tokio::select! {
            () = crate::until_true(&mut stop) => return,
            () = sleep(health.every()) => {}
        }
        let passed = match probe(addr).await {
            Some(status) if require_ready => status == http::StatusCode::OK,
            Some(status) => !status.is_server_error(),
            None => false,
        };
        if let Some(ready) = health.observe(passed) {
            if ready {
                tracing::info!(endpoint = key.endpoint, version = key.version, replica = %addr, "replica ready");
            } else {
                tracing::warn!(replica = %addr, "replica failed {FAILED_PROBES_UNREADY} probes; not ready");
            }
            report(ready);
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
    /// Whether it is ready, for the supervisor, which `readiness` wakes up.
    ready: watch::Sender<bool>,
    readiness: Arc<Notify>,
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
            let passed = probe(replica.addr).await == Some(http::StatusCode::OK);
            match health.observe(passed) {
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
            // The withdrawal reaches the routing table through the index: until the table
            // without this replica is published, requests may still choose it.
            sleep(WITHDRAW_SETTLE).await;
            while replica.in_flight() > 0 && Instant::now() < deadline {
                sleep(Duration::from_millis(10)).await;
            }
            terminate(&mut child, lifeline).await;
            tracing::info!(replica = %replica.addr, "replica stopped");
        }
        ended
    }

    fn report(&self, replica: &Arc<Replica>, ready: bool) {
        self.ready.send_replace(ready);
        self.readiness.notify_one();
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

/// The status `GET /` answers with within the probe timeout, if any.
async fn probe(addr: SocketAddr) -> Option<http::StatusCode> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, PROBE_USER_AGENT)
            .body(Empty::<Bytes>::new())
            .ok()?;
        Some(send.send_request(req).await.ok()?.status())
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt).await.ok()?
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
