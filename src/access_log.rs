//! The JSON access log: workers hand records to a bounded queue, a thread of its own writes them.
//!
//! A worker never blocks on logging and never makes a syscall for it: it
//! pushes a fixed-size [`Record`] into a lock-free array queue and goes on;
//! when the queue is full the record is dropped and counted
//! ([`dropped`]). The writer thread wakes every [`POLL`], formats what is
//! queued as one JSON object per line and writes it with one `write` per
//! batch, to stderr or to a file that it reopens when asked ([`reopen`],
//! on SIGUSR1, for logrotate).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crossbeam::queue::ArrayQueue;
use parking_lot::Mutex;

use crate::config::ListenerConfig;

/// Records the queue holds at most.
pub const QUEUE_CAPACITY: usize = 65536;
/// How often the writer looks at the queue when it found it empty.
pub const POLL: Duration = Duration::from_millis(20);

/// The transport a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP connection.
    Tcp,
    /// A UDP flow.
    Udp,
}

/// One closed connection or expired flow.
#[derive(Debug)]
pub struct Record {
    /// When it ended.
    pub time: SystemTime,
    /// TCP or UDP.
    pub proto: Proto,
    /// Its listener (name; pool names of routes).
    pub listener: Arc<ListenerConfig>,
    /// `[[listener.route]]` entry used, `None` for the listener's own pool.
    pub route: Option<u16>,
    /// The client: the address in the PROXY header when one was accepted.
    pub client: SocketAddr,
    /// The backend, once one was chosen.
    pub backend: Option<SocketAddr>,
    /// The TLS server name, when the listener routes by it.
    pub sni: Option<Box<str>>,
    /// Bytes (UDP: payload bytes) from the client to the backend.
    pub bytes_up: u64,
    /// Bytes from the backend to the client.
    pub bytes_down: u64,
    /// UDP: datagrams each way.
    pub datagrams: Option<(u64, u64)>,
    /// From accept (flow creation) to the end.
    pub duration: Duration,
    /// Time of the successful connect, if any.
    pub connect: Option<Duration>,
    /// Backends tried.
    pub attempts: u32,
    /// `done`, `idle_timeout`, `closed` (drain, removal, shutdown) or `refused`.
    pub end: &'static str,
    /// The refusal reason (a `refused` label of `ctl stats`).
    pub reason: Option<&'static str>,
}

struct Log {
    queue: ArrayQueue<Record>,
    dropped: AtomicU64,
    written: AtomicU64,
    reopen: AtomicBool,
    path: Option<PathBuf>,
    out: Mutex<Option<Box<dyn Write + Send>>>,
}

static LOG: OnceLock<Log> = OnceLock::new();

/// Whether the JSON access log is on (started).
#[inline]
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Queues a record; drops and counts it when the queue is full.
pub fn push(record: Record) {
    if let Some(log) = LOG.get() {
        if log.queue.push(record).is_err() {
            log.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Records dropped because the queue was full.
pub fn dropped() -> u64 {
    LOG.get().map_or(0, |l| l.dropped.load(Ordering::Relaxed))
}

/// Records written.
pub fn written() -> u64 {
    LOG.get().map_or(0, |l| l.written.load(Ordering::Relaxed))
}

/// Asks the writer to reopen its file before the next batch (SIGUSR1).
pub fn reopen() {
    if let Some(l) = LOG.get() {
        l.reopen.store(true, Ordering::Relaxed);
    }
}

fn open(path: &Option<PathBuf>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stderr()),
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
    })
}

/// Starts the log (once per process) writing to `path`, or stderr. The
/// file is opened here, so a path that cannot be written fails the start.
pub fn start(path: Option<PathBuf>) -> std::io::Result<()> {
    if LOG.get().is_some() {
        return Ok(());
    }
    let out = open(&path)?;
    let _ = LOG.set(Log {
        queue: ArrayQueue::new(QUEUE_CAPACITY),
        dropped: AtomicU64::new(0),
        written: AtomicU64::new(0),
        reopen: AtomicBool::new(false),
        path,
        out: Mutex::new(Some(out)),
    });
    std::thread::Builder::new()
        .name("ringlb-access-log".into())
        .spawn(|| loop {
            if flush() == 0 {
                std::thread::sleep(POLL);
            }
        })?;
    Ok(())
}

/// Writes what is queued now (the writer thread's loop; also called at
/// exit so the last records are not lost). Returns the records written.
pub fn flush() -> usize {
    let Some(log) = LOG.get() else { return 0 };
    let mut out = log.out.lock();
    if log.reopen.swap(false, Ordering::Relaxed) {
        match open(&log.path) {
            Ok(f) => *out = Some(f),
            Err(e) => log::warn!("access log: reopening failed, keeping the old file: {e}"),
        }
    }
    let mut text = String::new();
    let mut n = 0;
    // At most a queue's worth per batch, so a flood cannot hold the lock forever.
    while n < QUEUE_CAPACITY {
        let Some(r) = log.queue.pop() else { break };
        format_record(&r, &mut text);
        n += 1;
    }
    if n > 0 {
        if let Some(w) = out.as_mut() {
            if w.write_all(text.as_bytes()).and_then(|_| w.flush()).is_ok() {
                log.written.fetch_add(n as u64, Ordering::Relaxed);
            } else {
                log.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    n
}

/// One JSON object and a newline.
pub fn format_record(r: &Record, out: &mut String) {
    let pool = match r.route {
        Some(i) => r
            .listener
            .sni
            .as_ref()
            .and_then(|s| s.routes.get(i as usize))
            .map_or(r.listener.pool.as_str(), |route| route.pool.as_str()),
        None => r.listener.pool.as_str(),
    };
    let time = r
        .time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut v = serde_json::json!({
        "time": (time * 1000.0).round() / 1000.0,
        "proto": match r.proto { Proto::Tcp => "tcp", Proto::Udp => "udp" },
        "listener": r.listener.name,
        "client": r.client.to_string(),
        "backend": r.backend.map(|b| b.to_string()),
        "pool": pool,
        "sni": r.sni.as_deref(),
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
        "duration_ms": r.duration.as_secs_f64() * 1000.0,
        "connect_ms": r.connect.map(|c| c.as_secs_f64() * 1000.0),
        "attempts": r.attempts,
        "end": r.end,
        "reason": r.reason,
    });
    if let Some((up, down)) = r.datagrams {
        v["datagrams_up"] = up.into();
        v["datagrams_down"] = down.into();
    }
    out.push_str(&v.to_string());
    out.push('\n');
}
