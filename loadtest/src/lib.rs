//! Load tools for scorefront: the pieces shared by the `loadtest` generator and the
//! `sample-model` server, kept in a library so they can be unit-tested.
//!
//! - [`schedule`]: which request goes next and when (closed loop, or open loop at a
//!   constant rate with latency counted from the intended send time);
//! - [`stats`]: the recorder (HDR histograms, counters, per-second timeline);
//! - [`report`]: the JSON result and the text summary;
//! - [`chart`]: the hand-written SVG chart;
//! - [`prom`]: Prometheus text parsing for `--sample-metrics`;
//! - [`client`]: opening HTTP/1.1, h2c and TLS connections;
//! - [`worker`]: one in-flight slot of the generator;
//! - [`dist`] and [`rng`]: the sample model's latency distributions;
//! - [`precise`]: sub-millisecond sleeps on a timerfd (the runtime's timer ticks per ms).

pub mod chart;
pub mod client;
pub mod dist;
pub mod precise;
pub mod prom;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod stats;
pub mod worker;

/// Sets a binary up for precise load: sub-millisecond timer slack (see [`precise`]), the
/// open-file limit raised, and a runtime of `threads` (1: a current-thread runtime, the
/// cheapest per request).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    precise::set_timer_slack(std::time::Duration::from_micros(1));
    raise_fd_limit();
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Raises this process's open-file limit to the hard limit (best effort): a load test
/// holds a descriptor per connection and per timer.
fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct passed by reference.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
