//! Where log lines go: appended to one buffer by whichever thread logs, and written to
//! stderr in batches by a writer thread, so a request never waits on a write syscall and
//! a busy router makes one write per batch rather than per line.
//!
//! The writer thread sleeps until a line arrives, then gathers lines for up to
//! [`BATCH_WAIT`] (less once [`HIGH_WATER`] bytes are waiting) and writes them at once.
//! While it is gathering, logging a line costs a lock and a copy: no wake-up, no syscall.
//!
//! A logger never waits for the output. If stderr's reader stalls (a pipe nobody reads, a
//! frozen log shipper), a router that waited would stop serving; so once the waiting bytes
//! would pass the bound (`max_pending`, default [`MAX_PENDING`], set by the environment
//! variable [`MAX_PENDING_ENV`]), new lines are dropped, the newest first, and counted:
//! per process in [`dropped`] (exported as `scorefront_log_dropped_lines_total` and
//! `..._bytes_total`), and per gap, for a marker line ("N log lines dropped") that the
//! writer puts exactly where the lines are missing once it takes the next batch. Dropping
//! goes on until then, so each gap is one run of lines with one marker. Memory stays
//! bounded: at most one batch being written and `max_pending` bytes (or one line) waiting.
//! Dropping the [`Flush`] guard writes what is left and stops the thread.

use std::{
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::Duration,
};

/// How long the writer gathers lines before writing them.
pub const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Waiting bytes that make the writer write at once (or half the bound, if smaller).
pub const HIGH_WATER: usize = 256 * 1024;
/// Waiting bytes past which new lines are dropped, unless [`MAX_PENDING_ENV`] says otherwise.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;
/// The environment variable that sets the bound, in bytes.
pub const MAX_PENDING_ENV: &str = "SCOREFRONT_LOG_MAX_PENDING";

/// Lines dropped and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

/// Dropped by every writer of this process so far (a process has one stderr).
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);
static DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// What every writer of this process dropped so far.
pub fn dropped() -> Dropped {
    Dropped {
        lines: DROPPED_LINES.load(Relaxed),
        bytes: DROPPED_BYTES.load(Relaxed),
    }
}

/// The bound set by [`MAX_PENDING_ENV`], or [`MAX_PENDING`] when it is not set.
pub fn max_pending_from_env() -> Result<usize, String> {
    match std::env::var(MAX_PENDING_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(MAX_PENDING),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{MAX_PENDING_ENV}={v:?}: expected a positive number of bytes"
            )),
        },
        Err(e) => Err(format!("{MAX_PENDING_ENV}: {e}")),
    }
}

/// Makes the marker line written where lines were dropped.
type GapLine = Box<dyn Fn(Dropped) -> Vec<u8> + Send>;

/// A handle for logging; cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the writer thread should look at the buffer.
    wake: Condvar,
    max_pending: usize,
    high_water: usize,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer thread waits for a first line (not gathering a batch).
    idle: bool,
    /// Dropped since the writer last took a batch: lines are dropped while this is not
    /// zero, and the writer marks the gap when it takes the batch.
    gap: Dropped,
    closed: bool,
}

/// Writes what is left and stops the writer thread when dropped.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// A writer thread that writes batches to `out`, keeping at most `max_pending` bytes
    /// waiting, and writing `gap_line` where lines were dropped.
    pub fn spawn(
        out: impl Write + Send + 'static,
        max_pending: usize,
        gap_line: impl Fn(Dropped) -> Vec<u8> + Send + 'static,
    ) -> (LogWriter, Flush) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            max_pending,
            high_water: HIGH_WATER.min(max_pending / 2),
        });
        let gap_line: GapLine = Box::new(gap_line);
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn({
                let shared = shared.clone();
                move || write_batches(&shared, out, gap_line)
            })
            .expect("spawn the log writer thread");
        (
            LogWriter {
                shared: shared.clone(),
            },
            Flush {
                shared,
                thread: Some(thread),
            },
        )
    }

    /// Appends `line`, which should be one or more whole lines, or drops it if the bound
    /// is reached (a line alone in the buffer is always taken).
    pub fn append(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        let before = state.pending.len();
        if state.gap.lines > 0 || (before > 0 && before + line.len() > self.shared.max_pending) {
            let lines = line.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
            let bytes = line.len() as u64;
            state.gap.lines += lines;
            state.gap.bytes += bytes;
            drop(state);
            DROPPED_LINES.fetch_add(lines, Relaxed);
            DROPPED_BYTES.fetch_add(bytes, Relaxed);
            return;
        }
        state.pending.extend_from_slice(line);
        if state.idle {
            state.idle = false;
            self.shared.wake.notify_one();
        } else if before < self.shared.high_water && state.pending.len() >= self.shared.high_water {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_batches(shared: &Shared, mut out: impl Write, gap_line: GapLine) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && state.gap.lines == 0 && !state.closed {
            state.idle = true;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.idle = false;
        if !state.closed && state.pending.len() < shared.high_water {
            state = shared
                .wake
                .wait_timeout(state, BATCH_WAIT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut state.pending, &mut batch);
        // Every line waiting was taken before the first dropped one, and none after it.
        let gap = std::mem::take(&mut state.gap);
        let closed = state.closed;
        drop(state);
        if gap.lines > 0 {
            batch.extend_from_slice(&gap_line(gap));
        }
        if !batch.is_empty() {
            // A log that cannot be written has nowhere to report that; carry on.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        }
        let state = shared.lock();
        if closed && state.pending.is_empty() && state.gap.lines == 0 {
            return;
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records each write it gets.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_in_few_writes() {
        let out = Recorder::default();
        let (writer, flush) = LogWriter::spawn(out.clone(), MAX_PENDING, marker);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        w.append(format!("t{t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flush);
        let writes = out.0.lock().unwrap();
        let all: Vec<u8> = writes.concat();
        let text = String::from_utf8(all).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 40_000, "nothing lost");
        for t in 0..4 {
            let prefix = format!("t{t} ");
            let mine: Vec<usize> = lines
                .iter()
                .filter(|l| l.starts_with(&prefix))
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(mine, (0..10_000).collect::<Vec<_>>(), "thread {t} in order");
        }
        assert!(
            writes.len() < 4_000,
            "{} writes for 40000 lines: not batched",
            writes.len()
        );
    }

    /// A gap marker that says how much was dropped.
    fn marker(d: Dropped) -> Vec<u8> {
        format!("dropped {} {}\n", d.lines, d.bytes).into_bytes()
    }

    #[test]
    fn a_stalled_output_drops_new_lines_counts_them_and_marks_the_gap() {
        /// An output whose first write waits until the test opens it.
        struct Stalled {
            out: Recorder,
            open: std::sync::mpsc::Receiver<()>,
            writing: std::sync::mpsc::Sender<()>,
        }
        impl Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.out.0.lock().unwrap().is_empty() {
                    let _ = self.writing.send(());
                    let _ = self.open.recv();
                }
                self.out.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = Recorder::default();
        let (open, open_rx) = std::sync::mpsc::channel();
        let (writing_tx, writing) = std::sync::mpsc::channel();
        let max = 10 * 100;
        let (writer, flush) = LogWriter::spawn(
            Stalled {
                out: out.clone(),
                open: open_rx,
                writing: writing_tx,
            },
            max,
            marker,
        );
        let line = |i: usize| format!("{i:>99}\n");
        writer.append(line(0).as_bytes());
        // The writer took line 0 and is stuck writing it.
        writing.recv().unwrap();
        let before = dropped();
        // Ten lines fill the buffer; the next ones are dropped at once, never waited for.
        for i in 1..=30 {
            writer.append(line(i).as_bytes());
            assert!(writer.shared.lock().pending.len() <= max);
        }
        let after = dropped();
        assert!(after.lines - before.lines >= 20, "{before:?} {after:?}");
        assert!(after.bytes - before.bytes >= 2000, "{before:?} {after:?}");
        open.send(()).unwrap();
        // Once the writer has taken the batch with the gap, lines are kept again.
        until(|| writer.shared.lock().gap.lines == 0);
        writer.append(line(31).as_bytes());
        drop(flush);
        let text = String::from_utf8(out.0.lock().unwrap().concat()).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let kept: Vec<String> = (0..=10).chain([31]).map(|i| i.to_string()).collect();
        let mut want: Vec<&str> = kept.iter().map(String::as_str).collect();
        want.insert(11, "dropped 20 2000");
        assert_eq!(lines, want);
    }

    #[test]
    fn a_line_alone_is_kept_even_past_the_bound() {
        let out = Recorder::default();
        let (writer, flush) = LogWriter::spawn(out.clone(), 10, marker);
        writer.append(&[b'x'; 99]);
        drop(flush);
        assert_eq!(out.0.lock().unwrap().concat().len(), 99);
    }

    fn until(mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
