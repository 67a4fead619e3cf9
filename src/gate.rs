//! [`Gated`]: a future that a task polls only after the future asked to be woken.
//!
//! A request's task waits on its exchange with the replica and, beside it, on the scoring
//! deadline; a connection's task serves requests and, beside them, waits for a drain or
//! for the idle timeout. A `select!` polls every branch on every wake-up of the task, and
//! the task wakes several times per request for the busy branch alone. Polling a timer or
//! a watch channel that has not fired re-registers its waker, some hundred instructions
//! each time. Gated, the quiet branch is polled again only when it woke the task itself.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

/// Polls `F` only on its own wake-ups (and on the first poll). Between them, a poll costs
/// one atomic swap and a waker comparison.
pub struct Gated<F> {
    fut: F,
    /// The waker `fut` is polled with: it notes the wake-up, then wakes the task.
    own: Waker,
    flag: Arc<Flag>,
    /// The task waker last handed to `flag`, to notice when the task's waker changes.
    task: Option<Waker>,
}

/// Shared by [`Gated`] and the waker its future registered wherever it waits.
struct Flag {
    /// Set by the future's waker; the next poll of [`Gated`] polls the future.
    woken: AtomicBool,
    /// Whom a wake-up of the future wakes.
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().expect("gate waker poisoned") {
            task.wake_by_ref();
        }
    }
}

impl<F: Future + Unpin> Gated<F> {
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Gated {
            fut,
            own: Waker::from(flag.clone()),
            flag,
            task: None,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            // The future keeps its registration with `own`; only whom it wakes changes.
            *this.flag.task.lock().expect("gate waker poisoned") = Some(cx.waker().clone());
            this.task = Some(cx.waker().clone());
        }
        // Cleared before polling, so a wake-up during the poll is kept for the next one.
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.fut).poll(&mut Context::from_waker(&this.own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::atomic::AtomicUsize, time::Duration};
    use tokio::time::Instant;

    /// Pending until `ready` is set; counts its polls and keeps the last waker.
    #[derive(Clone, Default)]
    struct Probe(Arc<ProbeState>);

    #[derive(Default)]
    struct ProbeState {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Probe {
        fn polls(&self) -> usize {
            self.0.polls.load(Ordering::SeqCst)
        }

        fn fire(&self, ready: bool) {
            self.0.ready.store(ready, Ordering::SeqCst);
            let waker = self.0.waker.lock().unwrap().take();
            waker.expect("the probe registered a waker").wake();
        }
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_future_is_polled_only_after_its_own_wake_up() {
        let probe = Probe::default();
        let mut gated = Gated::new(probe.clone());
        let task = Arc::new(Counter::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls(), 1, "polled only on the first poll");
        probe.fire(false);
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the wake-up reached the task"
        );
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(probe.polls(), 2, "one more poll for one wake-up");
        probe.fire(true);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(probe.polls(), 3);
    }

    #[test]
    fn a_wake_up_reaches_the_tasks_latest_waker() {
        let probe = Probe::default();
        let mut gated = Gated::new(probe.clone());
        let (first, second) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let waker = Waker::from(first.clone());
        assert!(
            Pin::new(&mut gated)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let waker = Waker::from(second.clone());
        assert!(
            Pin::new(&mut gated)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        probe.fire(true);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(
            Pin::new(&mut gated)
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        );
    }

    /// Beside a branch that keeps the task busy, a gated timer still ends the select on
    /// time.
    #[tokio::test(start_paused = true)]
    async fn a_gated_timer_beside_a_busy_branch_fires_on_time() {
        let start = Instant::now();
        let mut deadline = Gated::new(Box::pin(tokio::time::sleep(Duration::from_secs(5))));
        let mut ticks = 0u32;
        let busy = async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks += 1;
            }
        };
        tokio::select! {
            biased;
            _ = busy => unreachable!(),
            () = &mut deadline => {}
        }
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(ticks >= 499, "{ticks}");
    }
}
