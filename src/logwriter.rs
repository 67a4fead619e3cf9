//! Where log lines go: appended to one buffer by whichever thread logs, and written to
//! stderr in batches by a writer thread, so a request never waits on a write syscall and
//! a busy router makes one write per batch rather than per line.
//!
//! The writer thread sleeps until a line arrives, then gathers lines for up to
//! [`BATCH_WAIT`] (less once [`HIGH_WATER`] bytes are waiting) and writes them at once.
//! While it is gathering, logging a line costs a lock and a copy: no wake-up, no syscall.
//! Nothing is dropped: past [`MAX_PENDING`] bytes, loggers wait for the writer. Dropping
//! the [`Flush`] guard writes what is left and stops the thread.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// How long the writer gathers lines before writing them.
pub const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Waiting bytes that make the writer write at once.
pub const HIGH_WATER: usize = 256 * 1024;
/// Waiting bytes past which loggers block until the writer catches up.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

/// A handle for logging; cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the writer thread should look at the buffer.
    wake: Condvar,
    /// Signalled when the writer has taken a batch (room for blocked loggers).
    room: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer thread waits for a first line (not gathering a batch).
    idle: bool,
    /// Loggers waiting for room (a wake-up is a syscall, so only when someone waits).
    blocked: usize,
    closed: bool,
}

/// Writes what is left and stops the writer thread when dropped.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// A writer thread that writes batches to `out`.
    pub fn spawn(out: impl Write + Send + 'static) -> (LogWriter, Flush) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn({
                let shared = shared.clone();
                move || write_batches(&shared, out)
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

    /// Appends `line`, which should be one or more whole lines.
    pub fn append(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        while state.pending.len() > MAX_PENDING && !state.closed {
            state.blocked += 1;
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            state.blocked -= 1;
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        if state.idle {
            state.idle = false;
            self.shared.wake.notify_one();
        } else if before < HIGH_WATER && state.pending.len() >= HIGH_WATER {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && !state.closed {
            state.idle = true;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.idle = false;
        if !state.closed && state.pending.len() < HIGH_WATER {
            state = shared
                .wake
                .wait_timeout(state, BATCH_WAIT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut state.pending, &mut batch);
        let closed = state.closed;
        if state.blocked > 0 {
            shared.room.notify_all();
        }
        drop(state);
        if !batch.is_empty() {
            // A log that cannot be written has nowhere to report that; carry on.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        }
        if closed && shared.lock().pending.is_empty() {
            return;
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        self.shared.room.notify_all();
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
        let (writer, flush) = LogWriter::spawn(out.clone());
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

    #[test]
    fn a_full_buffer_makes_loggers_wait_instead_of_dropping() {
        /// An output slower than the loggers.
        struct Slow(Recorder);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(20));
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = Recorder::default();
        let (writer, flush) = LogWriter::spawn(Slow(out.clone()));
        let line = vec![b'x'; 1023];
        let total = 3 * MAX_PENDING / 1024;
        for _ in 0..total {
            writer.append(&[&line[..], b"\n"].concat());
            assert!(writer.shared.lock().pending.len() <= MAX_PENDING + 1024);
        }
        drop(flush);
        let bytes: usize = out.0.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(bytes, total * 1024);
    }
}
