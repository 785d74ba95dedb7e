//! Where log lines go: a buffer in memory, written out by a thread of its own at least
//! every [`INTERVAL`] and whenever it holds [`WAKE_AT`] bytes, so a busy gateway makes one
//! `write` per batch instead of one per request. Until the server runs (command-line
//! tools, start-up errors) and after it is told to stop, lines are written as they come;
//! stopping writes out everything held first, so a SIGTERM loses no line. A buffer that
//! reaches [`MAX_HELD`] (a stalled disk) is written by the request that filled it: the
//! log slows requests down rather than growing without bound or dropping lines.

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Held bytes that wake the writer early.
const WAKE_AT: usize = 64 * 1024;
/// Held bytes that make the request that adds more write them itself.
const MAX_HELD: usize = 4 * 1024 * 1024;

struct Held {
    bytes: Vec<u8>,
    /// Whether the writer thread runs: lines wait for it. Otherwise they go out at once.
    buffered: bool,
}

struct Shared {
    held: Mutex<Held>,
    /// The buffer written last, emptied, for the next batch to fill: a buffer keeps the
    /// capacity a busy second grew it to instead of growing again from 64 KiB.
    spare: Mutex<Vec<u8>>,
    wake: Condvar,
    /// The file or stderr. Locked after `held`, never before.
    out: Mutex<Box<dyn Write + Send>>,
}

static SINK: OnceLock<Arc<Shared>> = OnceLock::new();

/// The `Write` env_logger is given. One exists per process.
pub struct LogSink(Arc<Shared>);

impl LogSink {
    /// The sink writing to `out`; `None` when the process already has one (a second
    /// logger set-up, which env_logger ignores too).
    pub fn new(out: Box<dyn Write + Send>) -> Option<LogSink> {
        let shared = Arc::new(Shared {
            held: Mutex::new(Held {
                bytes: Vec::with_capacity(WAKE_AT),
                buffered: false,
            }),
            spare: Mutex::new(Vec::with_capacity(WAKE_AT)),
            wake: Condvar::new(),
            out: Mutex::new(out),
        });
        SINK.set(Arc::clone(&shared)).ok()?;
        Some(LogSink(shared))
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(&[buf])?;
        Ok(buf.len())
    }

    /// env_logger flushes after every line: the writer thread does that instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    /// Adds `parts` (one line) to what is held, or writes them out when lines are not
    /// held.
    fn append(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut held = lock(&self.held);
        if !held.buffered {
            // Held bytes go first: lines stay in order.
            let earlier = std::mem::take(&mut held.bytes);
            let mut out = lock(&self.out);
            drop(held);
            out.write_all(&earlier)?;
            for part in parts {
                out.write_all(part)?;
            }
            return Ok(());
        }
        for part in parts {
            held.bytes.extend_from_slice(part);
        }
        let len = held.bytes.len();
        if len >= MAX_HELD {
            let full = std::mem::take(&mut held.bytes);
            let mut out = lock(&self.out);
            drop(held);
            out.write_all(&full)?;
        } else if len >= WAKE_AT {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Writes out whatever is held.
    fn write_held(&self, mut held: std::sync::MutexGuard<'_, Held>) {
        if held.bytes.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut *lock(&self.spare));
        let mut bytes = std::mem::replace(&mut held.bytes, spare);
        let mut out = lock(&self.out);
        drop(held);
        // Nowhere to report a failed log write; the next batch tries again.
        let _ = out.write_all(&bytes);
        let _ = out.flush();
        drop(out);
        bytes.clear();
        *lock(&self.spare) = bytes;
    }

    /// The writer thread: a batch every `interval`, or sooner when woken, until told to
    /// stop (`buffered` off).
    fn run(&self, interval: Duration) {
        let mut held = lock(&self.held);
        while held.buffered {
            held = match self.wake.wait_timeout(held, interval) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
            self.write_held(held);
            held = lock(&self.held);
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the sink is the process's logger's output (set once the logger is installed).
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the sink as the installed logger's output.
pub fn activate() {
    ACTIVE.store(true, std::sync::atomic::Ordering::Release);
}

/// Adds an access-log line (without its line break) straight to the sink, as the logger
/// would write it, without the logger's formatting machinery. False when the sink is not
/// the installed logger's output: the caller logs the line through `log` then.
pub fn access_line(line: &str) -> bool {
    if !ACTIVE.load(std::sync::atomic::Ordering::Acquire) {
        return false;
    }
    let Some(s) = SINK.get() else { return false };
    // Nowhere to report a failed log write, as for every other line.
    let _ = s.append(&[line.as_bytes(), b"\n"]);
    true
}

/// Writes out every held line now (at exit, and from the panic hook).
pub fn flush_logs() {
    if let Some(s) = SINK.get() {
        s.write_held(lock(&s.held));
    }
}

/// The server's log writer: batches lines while the server runs, writing them out every
/// `interval` at most, then writes out what it holds and goes back to writing lines as
/// they come.
pub struct LogWriter {
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for LogWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(shared) = SINK.get().cloned() else {
            return;
        };
        lock(&shared.held).buffered = true;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("log writer".into())
                .spawn({
                    let interval = self.interval;
                    move || shared.run(interval)
                })
        };
        if let Err(e) = thread {
            lock(&shared.held).buffered = false;
            log::warn!("log: cannot start the writer thread ({e}); lines are written one by one");
            return;
        }
        let _ = shutdown.changed().await;
        let mut held = lock(&shared.held);
        held.buffered = false;
        shared.wake.notify_one();
        shared.write_held(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose writes are counted and kept.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(usize, Vec<u8>)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut r = self.0.lock().unwrap();
            r.0 += 1;
            r.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink's state writing to a recorder.
    fn recorded(buffered: bool) -> (Recorder, Arc<Shared>) {
        let rec = Recorder::default();
        let shared = Arc::new(Shared {
            held: Mutex::new(Held {
                bytes: Vec::new(),
                buffered,
            }),
            spare: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            out: Mutex::new(Box::new(rec.clone())),
        });
        (rec, shared)
    }

    #[test]
    fn lines_are_batched_while_buffered_and_none_is_lost() {
        let (rec, shared) = recorded(false);
        let mut sink = LogSink(Arc::clone(&shared));
        // Not buffered: each line is a write of its own.
        sink.write_all(b"a\n").unwrap();
        assert_eq!(rec.0.lock().unwrap().0, 1);
        // Buffered: 1,000 lines held, then one write.
        lock(&shared.held).buffered = true;
        for i in 0..1000 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert_eq!(rec.0.lock().unwrap().0, 1);
        shared.write_held(lock(&shared.held));
        // Stopped: what is held goes out before the next line, in order.
        sink.write_all(b"held\n").unwrap();
        lock(&shared.held).buffered = false;
        sink.write_all(b"last\n").unwrap();
        let (writes, bytes) = rec.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1003);
        assert_eq!(lines[1], "line 0");
        assert_eq!(lines[1000], "line 999");
        assert_eq!(&lines[1001..], ["held", "last"]);
        assert!(writes <= 5, "{writes} writes");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_request_that_fills_it() {
        let (rec, shared) = recorded(true);
        let mut sink = LogSink(Arc::clone(&shared));
        let line = vec![b'x'; 1024];
        for _ in 0..(MAX_HELD / 1024) {
            sink.write_all(&line).unwrap();
        }
        assert_eq!(rec.0.lock().unwrap().1.len(), MAX_HELD);
        assert!(lock(&shared.held).bytes.is_empty());
    }
}
