//! Health checks that speak a protocol, as sans-io exchanges: the bytes to send, and a
//! pure function from the bytes received to "read more", "send this" or a verdict.
//!
//! The shell (`control::health_check`) owns the socket, the timeout and the read cap;
//! nothing here does I/O or reads a clock, so every parser is unit-, property- and
//! fuzz-tested over plain bytes (`ringlb::fuzzing::check_probe`).

pub mod http;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod spec;

/// Most bytes a check reads from one server reply (each phase of an exchange starts an
/// empty buffer): enough for any status line and headers, a Patroni JSON body, a MySQL
/// greeting or a Redis `ROLE` with a few hundred replicas. A reply that does not decide
/// within it fails the check ("no verdict within 16384 bytes").
pub const MAX_REPLY: usize = 16 * 1024;

/// What a check found, and why, in words for `ctl backends` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The server counts as up.
    pub up: bool,
    /// What the server answered, e.g. `http 503 from /primary`.
    pub reason: String,
}

impl Verdict {
    /// Up, because `reason`.
    pub fn up(reason: impl Into<String>) -> Verdict {
        Verdict {
            up: true,
            reason: reason.into(),
        }
    }

    /// Down, because `reason`.
    pub fn down(reason: impl Into<String>) -> Verdict {
        Verdict {
            up: false,
            reason: reason.into(),
        }
    }
}

/// The next thing the shell does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The reply so far does not decide: read more.
    Read,
    /// Send these bytes, then read the next reply into an empty buffer.
    Send(Vec<u8>),
    /// Decided. Send `farewell` (the protocol's goodbye, possibly empty); then, if
    /// `await_close`, wait (briefly) for the server to close first, so it sees a clean
    /// end and the TIME_WAIT entry is on its side, not ringlb's.
    Done {
        /// The verdict.
        verdict: Verdict,
        /// Bytes that end the session politely (`Terminate`, `COM_QUIT`), or none.
        farewell: Vec<u8>,
        /// The server closes next (after an error, `QUIT`, `Connection: close`, or the
        /// farewell); false when it would wait for more from the check (a password),
        /// so the check closes at once.
        await_close: bool,
    },
}

impl Step {
    /// Decided, nothing to send, and the server closes next.
    fn done(verdict: Verdict) -> Step {
        Step::Done {
            verdict,
            farewell: Vec::new(),
            await_close: true,
        }
    }

    /// Decided, with a goodbye after which the server closes.
    fn bye(verdict: Verdict, farewell: &[u8]) -> Step {
        Step::Done {
            verdict,
            farewell: farewell.to_vec(),
            await_close: true,
        }
    }

    /// Decided while the server waits for the check: the check closes first.
    fn hang_up(verdict: Verdict) -> Step {
        Step::Done {
            verdict,
            farewell: Vec::new(),
            await_close: false,
        }
    }
}

/// One protocol check in progress.
#[derive(Debug, Clone)]
pub enum Exchange {
    /// `kind = "http"`.
    Http(http::HttpExchange),
    /// `kind = "postgres"`.
    Postgres(postgres::PostgresExchange),
    /// `kind = "mysql"`.
    Mysql(mysql::MysqlExchange),
    /// `kind = "redis"`.
    Redis(redis::RedisExchange),
}

impl Exchange {
    /// Bytes sent right after connecting (empty: the server speaks first).
    pub fn opening(&self) -> Vec<u8> {
        match self {
            Exchange::Http(x) => x.request(),
            Exchange::Postgres(x) => x.startup(),
            Exchange::Mysql(_) => Vec::new(),
            Exchange::Redis(x) => x.commands(),
        }
    }

    /// Given everything received since the last send (`reply`, at most [`MAX_REPLY`]
    /// bytes) and whether more can come (`ended`: the server closed, or the cap is
    /// reached), what to do next. Never returns [`Step::Read`] when `ended`.
    pub fn step(&mut self, reply: &[u8], ended: bool) -> Step {
        let step = match self {
            Exchange::Http(x) => x.step(reply, ended),
            Exchange::Postgres(x) => x.step(reply, ended),
            Exchange::Mysql(x) => x.step(reply, ended),
            Exchange::Redis(x) => x.step(reply, ended),
        };
        match step {
            Step::Read if ended => Step::done(Verdict::down(if reply.len() >= MAX_REPLY {
                format!("no verdict within {MAX_REPLY} bytes of reply")
            } else {
                format!(
                    "closed after {} byte(s) of reply: {}",
                    reply.len(),
                    printable(reply, 60)
                )
            })),
            step => step,
        }
    }
}

/// Up to `max` bytes of `bytes` as text for a reason, escaped, with `...` if cut.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b' '..=b'~' => s.push(b as char),
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > max {
        s.push_str("...");
    }
    format!("\"{s}\"")
}

/// Text from a server (a message, a version), cleaned of controls and bounded.
fn text(bytes: &[u8], max: usize) -> String {
    let s: String = String::from_utf8_lossy(&bytes[..bytes.len().min(max)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.trim().to_string()
}
