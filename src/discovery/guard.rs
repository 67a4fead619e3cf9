//! The replica guard: a small process between scorefront and each replica command, so that
//! no process of a replica outlives scorefront, however scorefront ends.
//!
//! scorefront starts the guard by executing its own binary (`/proc/self/exe`, so a binary
//! replaced on disk meanwhile does not matter) with [`GUARD_ENV`] naming the read end of a
//! pipe whose write end only scorefront holds (it is close-on-exec, so no replica inherits
//! it), and [`COMMAND_ENV`] the command. The guard runs from a constructor, before `main`,
//! so any binary linking this library can serve as one (the test harnesses too); it never
//! returns to `main`.
//!
//! The guard runs `sh -c COMMAND` in a new process group and then:
//! - on end of file on the pipe (scorefront is gone: exited, killed with SIGKILL, aborted)
//!   it kills the command's whole group with SIGKILL at once (nobody is left to serve);
//! - on SIGTERM, SIGINT or SIGHUP (scorefront stopping the replica) it sends SIGTERM to the
//!   group and SIGKILL after [`TERM_GRACE`] if the command has not exited;
//! - when the command exits, it kills what is left of the group (workers the command
//!   started) and exits with the command's exit code (128 + the signal that killed it).
//!
//! The guard is single-threaded, so the command's `PR_SET_PDEATHSIG` (SIGKILL when the
//! guard dies) cannot fire early; it is the last resort should the guard itself be killed.
//! A process that leaves the group on purpose (`setsid`) escapes the guard.

use std::{
    ffi::OsString,
    os::{
        fd::RawFd,
        unix::process::{CommandExt, ExitStatusExt},
    },
    process::{Command, Stdio},
    time::Duration,
};

use tokio::time::Instant;

/// Names the guard's end of the pipe to scorefront; its presence makes a process a guard.
pub const GUARD_ENV: &str = "SCOREFRONT_REPLICA_GUARD_FD";
/// The command the guard runs through `sh -c`.
pub const COMMAND_ENV: &str = "SCOREFRONT_REPLICA_COMMAND";
/// Time between SIGTERM and SIGKILL when a replica is stopped.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

// Runs the guard instead of `main` in a process started as one. A constructor rather than
// a subcommand, so that every binary linking scorefront (tests included) can be a guard.
#[used]
#[unsafe(link_section = ".init_array")]
static ENTER_GUARD: extern "C" fn() = enter_guard;

extern "C" fn enter_guard() {
    let Some(fd) = std::env::var_os(GUARD_ENV) else {
        return;
    };
    let command = std::env::var_os(COMMAND_ENV).unwrap_or_default();
    let code = match fd.to_str().and_then(|s| s.parse::<RawFd>().ok()) {
        Some(fd) => run(fd, command),
        None => {
            eprintln!("scorefront replica guard: bad {GUARD_ENV} {fd:?}");
            127
        }
    };
    std::process::exit(code);
}

/// Runs `command`, watching `lifeline`; returns the exit code to report.
fn run(lifeline: RawFd, command: OsString) -> i32 {
    // SAFETY: plain system calls on a signal set and descriptors this process owns.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::fcntl(lifeline, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if signals < 0 {
        eprintln!(
            "scorefront replica guard: signalfd: {}",
            std::io::Error::last_os_error()
        );
        return 127;
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env_remove(GUARD_ENV)
        .env_remove(COMMAND_ENV)
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: prctl and sigprocmask are async-signal-safe; the guard has a single thread,
    // so the death signal comes when the guard process dies, not when some thread ends.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The guard blocks the signals it reads from its signalfd; a blocked mask
            // survives exec, and a command that never sees SIGTERM cannot stop gracefully.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scorefront replica guard: cannot run sh: {e}");
            return 127;
        }
    };
    let group = -(child.id() as libc::pid_t);
    let kill = |signal| {
        // SAFETY: kill(2) on the group the command leads.
        unsafe { libc::kill(group, signal) };
    };
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let timeout = kill_at.map_or(-1, |at| {
            at.saturating_duration_since(Instant::now()).as_millis() as i32
        });
        let mut fds = [
            libc::pollfd {
                fd: lifeline,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if fds[0].revents != 0 {
            // scorefront is gone (the pipe only ever ends): nobody is left to serve.
            kill(libc::SIGKILL);
            break child.wait();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // SAFETY: reads one signalfd_siginfo into a buffer of that size.
            let signo = unsafe {
                let mut info: libc::signalfd_siginfo = std::mem::zeroed();
                let size = std::mem::size_of_val(&info);
                let n = libc::read(signals, (&raw mut info).cast(), size);
                if n == size as isize {
                    info.ssi_signo as i32
                } else {
                    0
                }
            };
            if signo != libc::SIGCHLD && kill_at.is_none() {
                kill(libc::SIGTERM);
                kill_at = Some(Instant::now() + TERM_GRACE);
            }
        }
        if kill_at.is_some_and(|at| at <= Instant::now()) {
            kill(libc::SIGKILL);
        }
    };
    // Workers the command started would outlive it and hold its port or memory.
    kill(libc::SIGKILL);
    match status {
        Ok(status) => status
            .code()
            .or(status.signal().map(|s| 128 + s))
            .unwrap_or(127),
        Err(e) => {
            eprintln!("scorefront replica guard: cannot wait for the command: {e}");
            127
        }
    }
}
