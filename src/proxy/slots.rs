//! Replica capacity: the only handle on it is a [`Slot`].
//!
//! [`VersionSlots`] owns all slot accounting of one model version: which replicas are
//! routable, how many requests each has in flight, and the FIFO queue of requests waiting
//! for room. It outlives routing-table swaps (the index keeps it by identity), so in-flight
//! counts survive a reload. Invariants:
//! - a replica never has more than `slots_per_replica` requests in flight from this
//!   version (every increment is a compare-and-swap against the limit);
//! - a [`Slot`] is released exactly once, on drop, whatever path the request took;
//! - a freed slot goes to the oldest live waiter before any newcomer (newcomers only take
//!   the lock-free fast path while nobody waits);
//! - a replica removed from the routable set gets no new slot; its running requests
//!   finish and release normally (drain).
//!
//! The fast path takes no lock: a power-of-two-choices pick over the routable replicas
//! with atomic counters. Only waiting takes the version's queue mutex.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{
            AtomicU32, AtomicU64, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{sync::oneshot, time::Instant};

use super::forward::ConnPool;
use crate::error::CapacityError;

/// One model replica as seen by one version.
#[derive(Debug)]
pub struct Replica {
    pub addr: SocketAddr,
    in_flight: AtomicU32,
    /// Idle upstream connections to this replica.
    pub(crate) conns: ConnPool,
}

impl Replica {
    pub fn new(addr: SocketAddr) -> Self {
        Replica {
            addr,
            in_flight: AtomicU32::new(0),
            conns: ConnPool::default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    /// Takes one of `limit` slots if one is free.
    fn try_take(&self, limit: u32) -> bool {
        self.in_flight
            .fetch_update(SeqCst, SeqCst, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }
}

/// Slot accounting of one version; see the module docs.
#[derive(Debug)]
pub struct VersionSlots {
    /// Version name, for error messages.
    name: String,
    /// Routable replicas. Swapped whole by [`VersionSlots::set_replicas`].
    replicas: ArcSwap<Vec<Arc<Replica>>>,
    slots_per_replica: AtomicU32,
    /// Explicit `maxPendingRequests`, or `usize::MAX` for 2 x slots x replicas.
    max_pending: AtomicUsize,
    /// Requests of this version at a replica now.
    in_flight: AtomicUsize,
    /// Live waiters: incremented under the queue lock, decremented when a waiter leaves.
    queued: AtomicUsize,
    /// How long a slot is held, on average lately (an exponentially weighted moving
    /// average, in microseconds; 0 until the first release).
    hold_us: AtomicU64,
    /// Waiters in arrival order, each with the replica it must not get (a retry's).
    /// Entries whose receiver is gone are skipped and purged.
    queue: Mutex<VecDeque<Waiter>>,
}

/// A queued request: where to send its slot, and the replica it must not get.
type Waiter = (oneshot::Sender<Slot>, Option<Arc<Replica>>);

const AUTO: usize = usize::MAX;

impl VersionSlots {
    pub fn new(name: &str, slots_per_replica: u32, max_pending: Option<usize>) -> Arc<Self> {
        Arc::new(VersionSlots {
            name: name.to_owned(),
            replicas: ArcSwap::from_pointee(Vec::new()),
            slots_per_replica: AtomicU32::new(slots_per_replica),
            max_pending: AtomicUsize::new(max_pending.unwrap_or(AUTO)),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            hold_us: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        })
    }

    /// Changes the limits (a reload); waiters get any room this creates.
    pub fn set_limits(self: &Arc<Self>, slots_per_replica: u32, max_pending: Option<usize>) {
        self.slots_per_replica.store(slots_per_replica, SeqCst);
        self.max_pending.store(max_pending.unwrap_or(AUTO), SeqCst);
        self.dispatch();
    }

    /// Makes exactly these replicas routable. Where one has the address of a replica
    /// that is already routable, the existing one stays (with its in-flight count and idle
    /// connections).
    pub fn set_replicas(self: &Arc<Self>, replicas: Vec<Arc<Replica>>) {
        let old = self.replicas.load();
        let next: Vec<Arc<Replica>> = replicas
            .into_iter()
            .map(|new| {
                old.iter()
                    .find(|r| r.addr == new.addr)
                    .cloned()
                    .unwrap_or(new)
            })
            .collect();
        drop(old);
        self.replicas.store(Arc::new(next));
        self.dispatch();
    }

    /// The routable replicas now.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas.load_full()
    }

    pub fn slots_per_replica(&self) -> u32 {
        self.slots_per_replica.load(SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(SeqCst)
    }

    /// The queue bound in force now.
    pub fn max_pending(&self) -> usize {
        match self.max_pending.load(SeqCst) {
            AUTO => {
                let replicas = self.replicas.load().len().max(1);
                2 * self.slots_per_replica() as usize * replicas
            }
            n => n,
        }
    }

    /// Seconds until a slot is likely to free for a newcomer: everyone queued ahead of it
    /// served by every slot at the recent pace (a second per request until one ended),
    /// within 1..=60.
    pub fn retry_after(&self) -> u32 {
        let slots = self.replicas.load().len() as u64 * u64::from(self.slots_per_replica());
        let hold_us = match self.hold_us.load(Relaxed) {
            0 => 1_000_000,
            us => us,
        };
        let ahead = self.queued.load(SeqCst) as u64 + 1;
        let us = ahead.saturating_mul(hold_us) / slots.max(1);
        us.div_ceil(1_000_000).clamp(1, 60) as u32
    }

    /// Folds a slot's holding time into the average (weight 1/8; concurrent updates may
    /// lose one another, which an estimate can afford).
    fn observe_hold(&self, held: Duration) {
        let us = u64::try_from(held.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.hold_us.load(Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.hold_us.store(new.max(1), Relaxed);
    }

    /// Takes a slot, waiting up to `max_wait` in FIFO order when every replica is full.
    pub async fn acquire(self: &Arc<Self>, max_wait: Duration) -> Result<Slot, CapacityError> {
        self.acquire_avoiding(max_wait, None).await
    }

    /// Like [`acquire`](Self::acquire), but never on `avoid` while the version has
    /// another replica (a retry must not go back to the replica that refused it).
    pub async fn acquire_avoiding(
        self: &Arc<Self>,
        max_wait: Duration,
        avoid: Option<&Arc<Replica>>,
    ) -> Result<Slot, CapacityError> {
        let avoid = avoid.filter(|_| self.replicas.load().len() > 1);
        if self.queued.load(SeqCst) == 0
            && let Some(slot) = self.try_acquire_inner(avoid, avoid.is_none())
        {
            return Ok(slot);
        }
        let rx = {
            let mut queue = self.queue.lock().expect("slot queue poisoned");
            let limit = self.max_pending();
            if self.queued.load(SeqCst) >= limit {
                return Err(CapacityError::TooManyPending {
                    version: self.name.clone(),
                    limit,
                    retry_after: self.retry_after(),
                });
            }
            self.queued.fetch_add(1, SeqCst);
            // A release may have happened since the fast path looked; having counted
            // ourselves first, either we see its room now or it sees us and dispatches.
            if let Some(slot) = self.try_acquire_inner(avoid, avoid.is_none()) {
                self.queued.fetch_sub(1, SeqCst);
                return Ok(slot);
            }
            if queue.len() >= 2 * limit.max(8) {
                queue.retain(|(tx, _)| !tx.is_closed());
            }
            let (tx, rx) = oneshot::channel();
            queue.push_back((tx, avoid.cloned()));
            rx
        };
        let waiting = Waiting(&self.queued);
        let waited = tokio::time::timeout(max_wait, rx).await;
        drop(waiting); // out of the queue before estimating the wait for the next one
        match waited {
            Ok(Ok(slot)) => Ok(slot),
            // The sender is only dropped unsent when the queue is purged of dead
            // entries, which ours is not while we wait; treat it like a timeout.
            Ok(Err(_)) | Err(_) => Err(if self.replicas.load().is_empty() {
                CapacityError::NoReadyReplicas {
                    version: self.name.clone(),
                    retry_after: self.retry_after(),
                }
            } else {
                CapacityError::QueueTimeout {
                    version: self.name.clone(),
                    waited_ms: max_wait.as_millis() as u64,
                    retry_after: self.retry_after(),
                }
            }),
        }
    }

    /// Takes a free slot now, without waiting; prefers a replica other than `avoid`.
    ///
    /// Power of two choices: of two random replicas, the less loaded; if both are full,
    /// the least loaded of all.
    /// `avoid` itself only when it is the version's only replica.
    pub fn try_acquire(self: &Arc<Self>, avoid: Option<&Arc<Replica>>) -> Option<Slot> {
        self.try_acquire_inner(avoid, self.replicas.load().len() < 2)
    }

    /// [`try_acquire`](Self::try_acquire); `avoid` itself only when `fallback`.
    fn try_acquire_inner(
        self: &Arc<Self>,
        avoid: Option<&Arc<Replica>>,
        fallback: bool,
    ) -> Option<Slot> {
        let replicas = self.replicas.load();
        let limit = self.slots_per_replica();
        let eligible = |r: &Arc<Replica>| avoid.is_none_or(|a| !Arc::ptr_eq(a, r));
        let take = |r: &Arc<Replica>| r.try_take(limit).then(|| self.slot(r.clone()));
        let n = replicas.len();
        if n >= 2 {
            let i = rand::random_range(0..n);
            let j = (i + rand::random_range(1..n)) % n;
            let (a, b) = (&replicas[i], &replicas[j]);
            let (first, second) = if a.in_flight() <= b.in_flight() {
                (a, b)
            } else {
                (b, a)
            };
            for r in [first, second] {
                if eligible(r)
                    && let Some(slot) = take(r)
                {
                    return Some(slot);
                }
            }
        }
        // The least loaded replica with room; a lost race for its slot means its count
        // moved, so look again (at most once per replica).
        for _ in 0..n {
            let least = replicas
                .iter()
                .filter(|r| eligible(r) && r.in_flight() < limit)
                .min_by_key(|r| r.in_flight());
            match least {
                Some(r) => {
                    if let Some(slot) = take(r) {
                        return Some(slot);
                    }
                }
                None => break,
            }
        }
        // Nothing but `avoid` has room: better it than waiting.
        avoid
            .filter(|a| fallback && replicas.iter().any(|r| Arc::ptr_eq(a, r)))
            .and_then(take)
    }

    fn slot(self: &Arc<Self>, replica: Arc<Replica>) -> Slot {
        self.in_flight.fetch_add(1, SeqCst);
        Slot {
            version: self.clone(),
            replica: Some(replica),
            taken: Instant::now(),
        }
    }

    fn is_routable(&self, replica: &Arc<Replica>) -> bool {
        self.replicas.load().iter().any(|r| Arc::ptr_eq(r, replica))
    }

    /// Gives `slot` to the oldest live waiter that may take its replica, or returns it
    /// when there is none.
    fn hand_off(&self, mut slot: Slot) -> Option<Slot> {
        let several = self.replicas.load().len() > 1;
        loop {
            let tx = {
                let mut queue = self.queue.lock().expect("slot queue poisoned");
                let mut i = 0;
                loop {
                    match queue.get(i) {
                        None => return Some(slot),
                        Some((tx, _)) if tx.is_closed() => {
                            queue.remove(i);
                        }
                        Some((_, Some(a))) if several && Arc::ptr_eq(a, slot.replica()) => i += 1,
                        Some(_) => break queue.remove(i).expect("index checked").0,
                    }
                }
            };
            match tx.send(slot) {
                Ok(()) => return None,
                // The waiter left between the check and the send: try the next one.
                Err(back) => slot = back,
            }
        }
    }

    /// Moves free room to waiters until one of the two runs out.
    fn dispatch(self: &Arc<Self>) {
        while self.queued.load(SeqCst) > 0 {
            let Some(slot) = self.try_acquire(None) else {
                return;
            };
            if let Some(unwanted) = self.hand_off(slot) {
                unwanted.forget_and_free();
                return;
            }
        }
    }

    fn free(&self, replica: &Replica) {
        replica.in_flight.fetch_sub(1, SeqCst);
        self.in_flight.fetch_sub(1, SeqCst);
    }
}

/// Decrements the live-waiter count however the wait ends (slot, timeout, or the
/// request future dropped because the client went away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// The right to send one request to one replica. Released on drop.
#[derive(Debug)]
pub struct Slot {
    version: Arc<VersionSlots>,
    /// Always `Some` until drop.
    replica: Option<Arc<Replica>>,
    /// When the request got it, for the holding-time average.
    taken: Instant,
}

impl Slot {
    pub fn replica(&self) -> &Arc<Replica> {
        self.replica.as_ref().expect("slot already released")
    }

    /// When the request got it: the end of its wait for a slot.
    pub fn taken_at(&self) -> Instant {
        self.taken
    }

    /// Releases the counts without offering the slot to anyone.
    fn forget_and_free(mut self) {
        if let Some(r) = self.replica.take() {
            self.version.free(&r);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(replica) = self.replica.take() else {
            return;
        };
        let version = self.version.clone();
        version.observe_hold(self.taken.elapsed());
        // Hand the slot straight to a waiter when its replica still takes traffic and
        // is within the (possibly reloaded) limit; otherwise free it.
        if version.queued.load(SeqCst) > 0
            && replica.in_flight() <= version.slots_per_replica()
            && version.is_routable(&replica)
        {
            let slot = Slot {
                version: version.clone(),
                replica: Some(replica),
                taken: Instant::now(),
            };
            match version.hand_off(slot) {
                None => return,
                Some(back) => back.forget_and_free(),
            }
        } else {
            version.free(&replica);
        }
        if version.queued.load(SeqCst) > 0 {
            version.dispatch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 5000 + i)))
            .collect()
    }

    fn replicas(addrs: &[SocketAddr]) -> Vec<Arc<Replica>> {
        addrs.iter().map(|a| Arc::new(Replica::new(*a))).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_slots_and_releases_on_drop() {
        let v = VersionSlots::new("blue", 2, None);
        v.set_replicas(replicas(&addrs(2)));
        let held: Vec<Slot> = (0..4).map(|_| v.try_acquire(None).unwrap()).collect();
        assert!(v.try_acquire(None).is_none(), "4 slots on 2 replicas x 2");
        for r in v.replicas().iter() {
            assert_eq!(r.in_flight(), 2);
        }
        drop(held);
        assert_eq!(v.in_flight(), 0);
        assert!(v.replicas().iter().all(|r| r.in_flight() == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_time_out() {
        let v = VersionSlots::new("blue", 1, Some(2));
        v.set_replicas(replicas(&addrs(1)));
        let first = v.acquire(Duration::from_millis(10)).await.unwrap();
        let (a, b) = (v.clone(), v.clone());
        let wa = tokio::spawn(async move { a.acquire(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        let wb = tokio::spawn(async move { b.acquire(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        assert_eq!(v.queued(), 2);
        let err = v.acquire(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, CapacityError::TooManyPending { limit: 2, .. }),
            "{err:?}"
        );
        drop(first);
        let got_a = wa.await.unwrap().unwrap();
        assert!(!wb.is_finished(), "b waits behind a");
        drop(got_a);
        let got_b = wb.await.unwrap().unwrap();
        drop(got_b);
        let err = {
            let _hold = v.try_acquire(None).unwrap();
            v.acquire(Duration::from_millis(500)).await.unwrap_err()
        };
        assert!(matches!(
            err,
            CapacityError::QueueTimeout { waited_ms: 500, .. }
        ));
        assert_eq!((v.queued(), v.in_flight()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn removed_replica_drains_and_new_one_serves_waiters() {
        let v = VersionSlots::new("blue", 1, None);
        let [a, b] = addrs(2)[..] else { unreachable!() };
        v.set_replicas(replicas(&[a]));
        let held = v.try_acquire(None).unwrap();
        let w = {
            let v = v.clone();
            tokio::spawn(async move { v.acquire(Duration::from_secs(1)).await })
        };
        tokio::task::yield_now().await;
        v.set_replicas(replicas(&[b]));
        let got = w.await.unwrap().unwrap();
        assert_eq!(got.replica().addr, b);
        assert_eq!(
            held.replica().addr,
            a,
            "the drained replica keeps its request"
        );
        drop(held);
        assert_eq!(v.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_follows_the_queue_and_the_pace_of_requests() {
        let v = VersionSlots::new("blue", 1, Some(100));
        v.set_replicas(replicas(&addrs(2)));
        assert_eq!(v.retry_after(), 1, "a second per request until one ended");
        // Requests that hold their slot 4 s: a newcomer behind three waiters, served by
        // two slots, waits about (3 + 1) x 4 s / 2.
        let held: Vec<Slot> = (0..2).map(|_| v.try_acquire(None).unwrap()).collect();
        tokio::time::advance(Duration::from_secs(4)).await;
        drop(held);
        let held: Vec<Slot> = (0..2).map(|_| v.try_acquire(None).unwrap()).collect();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let v = v.clone();
                tokio::spawn(async move { v.acquire(Duration::from_secs(60)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(v.queued(), 3);
        assert_eq!(v.retry_after(), 8);
        let err = v.acquire(Duration::from_millis(1)).await.unwrap_err();
        assert!(
            matches!(err, CapacityError::QueueTimeout { retry_after: 8, .. }),
            "the estimate is for the next newcomer: {err:?}"
        );
        drop(held);
        for w in waiters {
            drop(w.await.unwrap().unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_replicas_is_reported_as_such() {
        let v = VersionSlots::new("blue", 1, None);
        let err = v.acquire(Duration::from_millis(100)).await.unwrap_err();
        assert!(
            matches!(err, CapacityError::NoReadyReplicas { .. }),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_prefers_another_replica() {
        let v = VersionSlots::new("blue", 4, None);
        v.set_replicas(replicas(&addrs(3)));
        for _ in 0..20 {
            let s = v.try_acquire(None).unwrap();
            let other = v.try_acquire(Some(s.replica())).unwrap();
            assert_ne!(s.replica().addr, other.replica().addr);
        }
    }
}
