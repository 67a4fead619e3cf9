//! What client connections hold in the router's heap, while they are idle on keep-alive
//! and once they have closed. This binary's global allocator counts the live heap bytes
//! exactly, so it holds this one test: nothing else may allocate beside it.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
    time::Duration,
};

use support::*;
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};

/// The system allocator, counting the bytes it has handed out and not yet taken back.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Relaxed)
}

const CONNECTIONS: usize = 1000;
/// What one idle HTTP/1.1 keep-alive connection that has served a request may hold:
/// hyper's 8 KiB read buffer and 8 KiB write buffer, which it allocates for every
/// connection, and at most 8 KiB more for the connection's task, its state and its socket
/// registration. A read buffer that grew to 16 KiB, as it did when the bytes read to tell
/// HTTP/1.1 from h2c came back in a short read of their own, breaks it.
const PER_IDLE_CONNECTION: isize = 24 << 10;
/// What may stay behind once every connection has closed: room the runtime and the
/// router keep for reuse (the socket registration slab, the connection set), not per
/// connection state.
const LEFT_BEHIND: isize = 128 << 10;

/// A scoring request on a new keep-alive connection; the connection stays open.
async fn scored_connection(router: &Router) -> TcpStream {
    let mut stream = TcpStream::connect(router.http).await.unwrap();
    let request = raw_request("mem", "", "{}");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    stream
}

/// Waits until the router counts no client connection, then until its heap is back to
/// `baseline` plus `slack`, for at most 5 s; returns what the heap holds above `baseline`.
async fn settled(router: &Router, baseline: isize, slack: isize) -> isize {
    metric_eventually(
        router,
        Patience::SHORT,
        "scorefront_client_connections",
        &[],
        0.0,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while live() - baseline > slack && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    live() - baseline
}

/// Lets this process hold both ends of every connection: its soft limit on open files
/// (often 1024) goes up to the hard one.
fn open_files_up_to_the_hard_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 2 * CONNECTIONS as u64 + 256,
        "{CONNECTIONS} connections need more open files than the hard limit of {}",
        limit.rlim_cur
    );
}

#[tokio::test]
async fn connections_hold_little_while_idle_and_nothing_once_closed() {
    open_files_up_to_the_hard_limit();
    let model = Model::start("blue").await;
    let router = Router::start(&one_version("mem", &[model.addr], "")).await;
    // One request first, so the replica connection, the metric series and the access log
    // exist before the baseline.
    drop(scored_connection(&router).await);
    metric_eventually(
        &router,
        Patience::SHORT,
        "scorefront_client_connections",
        &[],
        0.0,
    )
    .await;
    let baseline = live();

    let mut open = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        open.push(scored_connection(&router).await);
    }
    let per_connection = (live() - baseline) / CONNECTIONS as isize;
    println!("{per_connection} bytes per idle connection");
    assert!(
        per_connection <= PER_IDLE_CONNECTION,
        "an idle connection holds {per_connection} bytes, more than {PER_IDLE_CONNECTION}"
    );

    drop(open);
    let left = settled(&router, baseline, LEFT_BEHIND).await;
    println!("{left} bytes left after {CONNECTIONS} connections closed");
    assert!(
        left <= LEFT_BEHIND,
        "{left} bytes are still held after {CONNECTIONS} connections closed"
    );
    router.shutdown().await;
}
