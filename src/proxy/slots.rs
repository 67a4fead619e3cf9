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
//!   finish and release normally (drain);
//! - an ejected replica (see below) gets no new slot either, but at least one replica of
//!   a version with replicas is never ejected.
//!
//! Passive outlier detection: the request path reports each attempt's transport outcome
//! ([`Replica::succeeded`], [`VersionSlots::failed`]). A replica that fails
//! `consecutiveFailures` times in a row is ejected for the base time times its ejections in
//! a row, up to the maximum; then it returns on probation, where a single failure ejects
//! it again (for longer) and a success clears its record. The state lives in the
//! [`Replica`], so it survives table swaps like the in-flight count.
//!
//! The fast path takes no lock: a power-of-two-choices pick over the routable replicas
//! with atomic counters; the ejection check is one more atomic load per candidate (the
//! clock is read only for a replica that is ejected). Only waiting takes the version's
//! queue mutex, and only ejecting takes the ejection mutex.

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
use crate::{config::OutlierDetection, error::CapacityError};

/// One model replica as seen by one version.
#[derive(Debug)]
pub struct Replica {
    pub addr: SocketAddr,
    in_flight: AtomicU32,
    /// Idle upstream connections to this replica.
    pub(crate) conns: ConnPool,
    /// Transport failures in a row (low 32 bits) and ejections in a row (high 32 bits):
    /// both end with a success, so a success reads one word and writes only when it
    /// clears something.
    record: AtomicU64,
    /// Milliseconds after `born` at which the current ejection ends; 0 when not ejected.
    ejected_until: AtomicU64,
    /// The origin of `ejected_until`.
    born: Instant,
}

/// An ejection just decided, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row that led to it.
    pub failures: u32,
    /// The replica's ejections in a row, this one included.
    pub nth: u32,
    pub duration: Duration,
}

impl Replica {
    pub fn new(addr: SocketAddr) -> Self {
        Replica {
            addr,
            in_flight: AtomicU32::new(0),
            conns: ConnPool::default(),
            record: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    /// Notes an attempt that got a response head: the replica's failure record is cleared.
    pub fn succeeded(&self) {
        if self.record.load(Relaxed) != 0 {
            self.record.store(0, Relaxed);
        }
    }

    /// Whether the replica takes new requests: not ejected, or its ejection is over (the
    /// first to see that logs the return).
    fn available(&self) -> bool {
        match self.ejected_until.load(Relaxed) {
            0 => true,
            until => self.ejection_over(until),
        }
    }

    #[cold]
    fn ejection_over(&self, until: u64) -> bool {
        if self.clock_ms() < until {
            return false;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Relaxed, Relaxed)
            .is_ok()
        {
            tracing::info!(replica = %self.addr, "replica ejection over; it takes requests again");
        }
        true
    }

    /// Milliseconds until the current ejection ends (0 when not ejected).
    fn ejection_left_ms(&self) -> u64 {
        (self.ejected_until.load(Relaxed)).saturating_sub(self.clock_ms())
    }

    /// Milliseconds since `born`.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
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
    /// Held to decide an ejection (or to end one because none is left available), so that
    /// two replicas failing at once cannot both be ejected as each other's spare.
    ejecting: Mutex<()>,
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
            ejecting: Mutex::new(()),
        })
    }

    /// Changes the limits (a reload); waiters get any room this creates.
    pub fn set_limits(self: &Arc<Self>, slots_per_replica: u32, max_pending: Option<usize>) {
        self.slots_per_replica.store(slots_per_replica, SeqCst);
        self.max_pending.store(max_pending.unwrap_or(AUTO), SeqCst);
        self.dispatch();
    }

    /// Makes exactly these replicas routable. Where one has the address of a replica
    /// that is already routable, the existing one stays (with its in-flight count, idle
    /// connections and failure record). Should every one of them be ejected (the one left
    /// out was removed), the ejection ending first ends now.
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
        self.keep_one_available();
        self.dispatch();
    }

    /// Ends the ejection that would end first when no replica is available.
    fn keep_one_available(&self) {
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let replicas = self.replicas.load();
        if replicas.iter().any(|r| r.available()) {
            return;
        }
        if let Some(r) = replicas.iter().min_by_key(|r| r.ejection_left_ms()) {
            r.ejected_until.store(0, Relaxed);
            tracing::info!(
                version = %self.name,
                replica = %r.addr,
                "replica ejection ended early: no other replica is left"
            );
        }
    }

    /// Notes an attempt at `replica` that failed in transport; returns the ejection it
    /// leads to, if any. A replica already ejected (this was an attempt sent before) or
    /// the version's last available one is not ejected.
    pub fn failed(&self, replica: &Replica, settings: &OutlierDetection) -> Option<Ejection> {
        let threshold = settings.consecutive_failures;
        if threshold == 0 {
            return None;
        }
        let record = replica
            .record
            .fetch_update(Relaxed, Relaxed, |r| {
                Some((r & !0xffff_ffff) | u64::from((r as u32).saturating_add(1)))
            })
            .expect("the update always applies");
        let nth = ((record >> 32) as u32).saturating_add(1);
        let failures = (record as u32).saturating_add(1);
        // Back from an ejection without a success since: on probation.
        let on_probation = nth > 1;
        if failures < threshold && !on_probation {
            return None;
        }
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        if !replica.available() || !self.others_available(replica) {
            return None;
        }
        let duration = settings.ejection_time(nth);
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        replica.record.store(u64::from(nth) << 32, Relaxed);
        // At least 1 ms, so never 0 ("not ejected").
        let until = replica.clock_ms().saturating_add(ms.max(1));
        replica.ejected_until.store(until, Relaxed);
        Some(Ejection {
            failures,
            nth,
            duration,
        })
    }

    /// Whether a routable replica other than `replica` takes new requests.
    fn others_available(&self, replica: &Replica) -> bool {
        (self.replicas.load().iter()).any(|r| !std::ptr::eq(&**r, replica) && r.available())
    }

    /// Routable replicas that are ejected now.
    pub fn ejected(&self) -> usize {
        self.replicas
            .load()
            .iter()
            .filter(|r| !r.available())
            .count()
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
    /// another available replica (a retry must not go back to the replica that refused
    /// it).
    pub async fn acquire_avoiding(
        self: &Arc<Self>,
        max_wait: Duration,
        avoid: Option<&Arc<Replica>>,
    ) -> Result<Slot, CapacityError> {
        let avoid = avoid.filter(|a| self.others_available(a));
        if self.queued.load(SeqCst) == 0
            && let Some(slot) = self.try_acquire(avoid)
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
            if let Some(slot) = self.try_acquire(avoid) {
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

    /// Takes a free slot now, without waiting, on an available (not ejected) replica;
    /// prefers a replica other than `avoid`.
    ///
    /// Power of two choices: of two random replicas, the less loaded; if both are full,
    /// the least loaded of all.
    /// `avoid` itself only when it is the version's only available replica.
    pub fn try_acquire(self: &Arc<Self>, avoid: Option<&Arc<Replica>>) -> Option<Slot> {
        let replicas = self.replicas.load();
        let limit = self.slots_per_replica();
        let eligible = |r: &Arc<Replica>| avoid.is_none_or(|a| !Arc::ptr_eq(a, r)) && r.available();
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
        // Nothing but `avoid` has room: better it than waiting, when it is the only one
        // available (else the wait is for another).
        avoid
            .filter(|a| {
                replicas.iter().any(|r| Arc::ptr_eq(a, r))
                    && a.available()
                    && !self.others_available(a)
            })
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
                        // Not to a retry that avoids this replica while it has another.
                        Some((_, Some(a)))
                            if Arc::ptr_eq(a, slot.replica()) && self.others_available(a) =>
                        {
                            i += 1
                        }
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
            && replica.available()
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

    fn outliers(consecutive_failures: u32, base_s: u64, max_s: u64) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures,
            base_ejection_time_ms: base_s * 1000,
            max_ejection_time_ms: max_s * 1000,
        }
    }

    /// The addresses `n` slots went to.
    fn picks(v: &Arc<VersionSlots>, n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|_| v.try_acquire(None).expect("a free slot").replica().addr)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_in_a_row_and_a_success_clears_the_record() {
        let settings = outliers(3, 10, 25);
        let v = VersionSlots::new("blue", 1, None);
        v.set_replicas(replicas(&addrs(2)));
        let (a, b) = (v.replicas()[0].clone(), v.replicas()[1].clone());
        let eject = |nth: u32, failures: u32, secs: u64| Ejection {
            failures,
            nth,
            duration: Duration::from_secs(secs),
        };
        assert_eq!(v.failed(&a, &settings), None);
        assert_eq!(v.failed(&a, &settings), None);
        assert_eq!(v.failed(&a, &settings), Some(eject(1, 3, 10)));
        assert_eq!(v.ejected(), 1);
        assert!(picks(&v, 20).iter().all(|addr| *addr == b.addr));
        assert_eq!(v.failed(&a, &settings), None, "already ejected");

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(v.ejected(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(v.ejected(), 0, "back after 10 s");
        assert!(picks(&v, 40).contains(&a.addr));

        // Back without a success since: one failure ejects it again, for longer (the
        // failure while ejected still counts in the run).
        assert_eq!(v.failed(&a, &settings), Some(eject(2, 2, 20)));
        tokio::time::advance(Duration::from_millis(19_999)).await;
        assert_eq!(v.ejected(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(v.ejected(), 0);
        assert_eq!(v.failed(&a, &settings), Some(eject(3, 1, 25)), "capped");
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(v.ejected(), 0);

        // A success clears both counts: three failures again, and the base time.
        a.succeeded();
        assert_eq!(v.failed(&a, &settings), None);
        assert_eq!(v.failed(&a, &settings), None);
        a.succeeded();
        assert_eq!(v.failed(&a, &settings), None);
        assert_eq!(v.failed(&a, &settings), None);
        assert_eq!(v.failed(&a, &settings), Some(eject(1, 3, 10)));

        // Off: never ejected.
        assert_eq!(v.failed(&b, &outliers(0, 10, 25)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_available_replica_is_never_ejected() {
        let settings = outliers(1, 30, 300);
        let one = VersionSlots::new("one", 1, None);
        one.set_replicas(replicas(&addrs(1)));
        let only = one.replicas()[0].clone();
        for _ in 0..10 {
            assert_eq!(one.failed(&only, &settings), None);
        }
        assert_eq!(one.ejected(), 0);
        assert!(one.try_acquire(None).is_some());

        let v = VersionSlots::new("three", 1, None);
        v.set_replicas(replicas(&addrs(3)));
        let r = v.replicas();
        assert!(v.failed(&r[0], &settings).is_some());
        assert!(v.failed(&r[1], &settings).is_some());
        for _ in 0..10 {
            assert_eq!(v.failed(&r[2], &settings), None, "the last one stays");
        }
        assert_eq!(v.ejected(), 2);
        assert_eq!(picks(&v, 1), [r[2].addr]);
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_survive_a_new_table_but_one_replica_stays_available() {
        let settings = outliers(1, 30, 300);
        let [a, b, c] = addrs(3)[..] else {
            unreachable!()
        };
        let v = VersionSlots::new("blue", 1, None);
        v.set_replicas(replicas(&[a, b, c]));
        let r = v.replicas();
        assert!(v.failed(&r[0], &settings).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(v.failed(&r[1], &settings).is_some());
        // The same addresses, as new objects: the ejections stay.
        v.set_replicas(replicas(&[a, b, c]));
        assert_eq!(v.ejected(), 2);
        // The available one goes: the ejection ending first (a's) ends now.
        v.set_replicas(replicas(&[a, b]));
        assert_eq!(v.ejected(), 1);
        assert_eq!(picks(&v, 1), [a]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_no_slot_on_an_ejected_replica() {
        let settings = outliers(1, 30, 300);
        let v = VersionSlots::new("blue", 1, None);
        v.set_replicas(replicas(&addrs(2)));
        let held = [v.try_acquire(None).unwrap(), v.try_acquire(None).unwrap()];
        let waiter = {
            let v = v.clone();
            tokio::spawn(async move { v.acquire(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(v.queued(), 1);
        let [on_bad, on_good] = held;
        assert!(v.failed(on_bad.replica(), &settings).is_some());
        let good = on_good.replica().clone();
        drop(on_bad);
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "not handed the ejected replica's slot"
        );
        drop(on_good);
        assert_eq!(waiter.await.unwrap().unwrap().replica().addr, good.addr);

        // A retry avoiding the good replica takes it rather than wait for the ejected one.
        let retry = v
            .acquire_avoiding(Duration::from_secs(5), Some(&good))
            .await
            .unwrap();
        assert_eq!(retry.replica().addr, good.addr);
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
