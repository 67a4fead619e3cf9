//! Hot-path costs without sockets: version pick, and slot acquire/release alone and
//! under contention (threads racing on the lock-free path; tasks queueing for few slots).
//!
//! Run: `cargo bench --bench core`.

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use scorefront::{
    metrics::Metrics,
    proxy::{
        slots::{Replica, VersionSlots},
        table::RoutingTable,
    },
    spec,
};

fn version(name: &str, pct: u32, default: bool) -> spec::Version {
    spec::Version {
        name: name.into(),
        traffic_percentile: pct,
        is_default: default,
        role: spec::Role::Treatment,
        slots_per_replica: 4,
        max_wait: Duration::from_millis(500),
        max_pending: None,
        scoring_timeout: Duration::from_secs(60),
        replicas: spec::ReplicaSource::Fixed(Vec::new()),
        autoscale: None,
    }
}

fn slots(replicas: u16, per_replica: u32) -> Arc<VersionSlots> {
    let v = VersionSlots::new("blue", per_replica, Some(1024));
    v.set_replicas(
        (0..replicas)
            .map(|i| Arc::new(Replica::new(SocketAddr::from(([127, 0, 0, 1], 5000 + i)))))
            .collect(),
    );
    v
}

fn pick(c: &mut Criterion) {
    let ep = spec::Endpoint {
        name: "fraud".into(),
        auth: spec::Auth::None,
        versions: vec![
            version("blue", 80, true),
            version("green", 15, false),
            version("red", 5, false),
        ],
    };
    let table = RoutingTable::build(&[ep], &Metrics::new(), |_, v| {
        VersionSlots::new(&v.name, v.slots_per_replica, None)
    });
    let mut roll = 0;
    c.bench_function("route/lookup_and_pick", |b| {
        b.iter(|| {
            roll = (roll + 37) % 100;
            let ep = table.endpoint(black_box("fraud")).unwrap();
            black_box(ep.pick(None, roll).unwrap());
        })
    });
    c.bench_function("route/lookup_and_pin", |b| {
        b.iter(|| {
            let ep = table.endpoint(black_box("fraud")).unwrap();
            black_box(ep.pick(Some(black_box(b"red")), 0).unwrap());
        })
    });
}

fn slot_paths(c: &mut Criterion) {
    let v = slots(8, 4);
    c.bench_function("slots/try_acquire_release", |b| {
        b.iter(|| black_box(v.try_acquire(None).unwrap()))
    });

    c.bench_function("slots/contended_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters / 2 {
                            black_box(v.try_acquire(None));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });

    // 16 tasks share 2 slots: most acquisitions wait in the queue and are handed a slot
    // by a release.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let few = slots(1, 2);
    c.bench_function("slots/queued_handoff_16_tasks_2_slots", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(async {
                let tasks: Vec<_> = (0..16)
                    .map(|_| {
                        let few = few.clone();
                        tokio::spawn(async move {
                            for _ in 0..iters.div_ceil(16) {
                                let slot = few.acquire(Duration::from_secs(10)).await.unwrap();
                                tokio::task::yield_now().await;
                                drop(slot);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
            start.elapsed()
        })
    });
}

criterion_group!(benches, pick, slot_paths);
criterion_main!(benches);
