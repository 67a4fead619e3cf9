//! Sleeps with sub-millisecond precision.
//!
//! The tokio timer ticks once a millisecond and rounds deadlines up to the next tick, so
//! a request due at 2.1 ms would leave at ~3 ms: half a millisecond of error on average,
//! more than a proxy adds. On Linux a [`TimerFd`] arms a kernel high-resolution timer and
//! waits for it on the runtime's own reactor (no thread, no spinning); [`set_timer_slack`]
//! lowers the kernel's default 50 us timer slack. Elsewhere the tokio timer is used.

use std::time::Duration;

use tokio::time::Instant;

use crate::schedule::Pacer;

/// Asks the kernel to fire this thread's timers (and those of threads it starts) within
/// `slack` of their deadline rather than the default 50 us. Best effort.
pub fn set_timer_slack(slack: Duration) {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and touches no memory.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            slack.as_nanos().max(1) as libc::c_ulong,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = slack;
}

#[cfg(target_os = "linux")]
mod imp {
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    use tokio::{
        io::{Interest, unix::AsyncFd},
        time::Instant,
    };

    /// A one-shot kernel timer waited on through the runtime's reactor.
    pub struct TimerFd {
        fd: AsyncFd<OwnedFd>,
    }

    impl TimerFd {
        /// Needs a running tokio runtime with IO enabled.
        pub fn new() -> io::Result<Self> {
            // SAFETY: plain syscall; the result is checked before use.
            let raw = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: the descriptor is owned by the AsyncFd for its whole life.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
            Ok(TimerFd { fd })
        }

        /// Returns at `t` (within the timer slack plus a wakeup), or at once if it passed.
        pub async fn sleep_until(&mut self, t: Instant) -> io::Result<()> {
            let now = Instant::now();
            if t <= now {
                return Ok(());
            }
            let d = t - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: valid descriptor and a valid itimerspec; the old value is not asked for.
            let rc = unsafe {
                libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            loop {
                let mut guard = self.fd.readable().await?;
                let read = guard.try_io(|fd| {
                    let mut expirations = 0u64;
                    // SAFETY: reads 8 bytes into a u64 that lives across the call.
                    let n = unsafe {
                        libc::read(
                            fd.as_raw_fd(),
                            (&raw mut expirations).cast::<libc::c_void>(),
                            8,
                        )
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match read {
                    Ok(result) => return result,
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
pub use imp::TimerFd;

/// A pacer for one slot: a timerfd where there is one, else the tokio timer.
pub enum PrecisePacer {
    #[cfg(target_os = "linux")]
    Fd(TimerFd),
    Tokio,
}

impl Default for PrecisePacer {
    fn default() -> Self {
        Self::new()
    }
}

impl PrecisePacer {
    /// Needs a running tokio runtime.
    pub fn new() -> Self {
        #[cfg(target_os = "linux")]
        if let Ok(fd) = TimerFd::new() {
            return PrecisePacer::Fd(fd);
        }
        PrecisePacer::Tokio
    }
}

impl Pacer for PrecisePacer {
    async fn sleep_until(&mut self, t: Instant) {
        match self {
            #[cfg(target_os = "linux")]
            PrecisePacer::Fd(fd) => {
                if fd.sleep_until(t).await.is_err() {
                    tokio::time::sleep_until(t).await;
                }
            }
            PrecisePacer::Tokio => tokio::time::sleep_until(t).await,
        }
    }
}

/// Precise sleeps for many concurrent requests: a free list of timers, one taken per
/// sleeping request and put back after, so only as many exist as ever slept at once.
#[derive(Default)]
pub struct TimerPool {
    #[cfg(target_os = "linux")]
    free: std::sync::Mutex<Vec<TimerFd>>,
}

impl TimerPool {
    pub fn new() -> Self {
        Self::default()
    }

    pub async fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        #[cfg(target_os = "linux")]
        {
            let taken = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(mut fd) = taken.or_else(|| TimerFd::new().ok())
                && fd.sleep_until(until).await.is_ok()
            {
                self.free.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
                return;
            }
        }
        tokio::time::sleep_until(until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn precise_sleeps_land_close_to_the_deadline() {
        set_timer_slack(Duration::from_micros(1));
        let mut pacer = PrecisePacer::new();
        let mut worst = Duration::ZERO;
        for i in 0..20u64 {
            let t = Instant::now() + Duration::from_micros(300 + 50 * i);
            pacer.sleep_until(t).await;
            let now = Instant::now();
            assert!(now >= t, "woke early");
            worst = worst.max(now - t);
        }
        // Generous: a loaded machine may preempt, but never a full millisecond tick
        // on each of 20 sleeps.
        assert!(worst < Duration::from_millis(50), "{worst:?}");
    }

    #[tokio::test]
    async fn past_deadlines_return_at_once_and_the_pool_reuses_timers() {
        let mut pacer = PrecisePacer::new();
        pacer
            .sleep_until(Instant::now() - Duration::from_millis(5))
            .await;
        let pool = TimerPool::new();
        let start = Instant::now();
        tokio::join!(
            pool.sleep(Duration::from_micros(500)),
            pool.sleep(Duration::from_micros(700))
        );
        pool.sleep(Duration::from_micros(200)).await;
        assert!(start.elapsed() >= Duration::from_micros(900));
        #[cfg(target_os = "linux")]
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}
