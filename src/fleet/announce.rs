//! `ringlb announce`: keeps the service route announced by BIRD while this instance can serve, and withdraws it when not.
//!
//! Every `interval` it asks ringlb's control socket for `status` (with a
//! timeout). The instance is *up* when the socket answers, ringlb is not
//! stopping, and every pool named with `--pool` has a usable backend.
//! On a change it runs `birdc -s BIRD_SOCKET enable|disable PROTOCOL`: the
//! protocol is a BIRD `static` protocol holding the service prefix, which
//! the BGP session exports, so disabling it withdraws the route. The state
//! is asserted again every `reassert` (a restarted BIRD comes back with its
//! configured state). SIGTERM/SIGINT withdraw before exiting. The decision
//! is the pure [`Announcer`]; the loop around it only does I/O.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::protocol::{Reply, Request};

/// What the instance looks like from its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Serving: announce.
    Up,
    /// Not serving, with the reason (logged and shown): withdraw.
    Down(String),
}

/// Judges a `status` reply (or the error asking for it) against the pools
/// that must have a usable backend.
pub fn judge(reply: Result<&Reply<'_>, &str>, pools: &[String]) -> Health {
    let r = match reply {
        Err(e) => return Health::Down(format!("control socket not answering: {e}")),
        Ok(Reply::Status(r)) => r,
        Ok(Reply::Error(e)) => return Health::Down(format!("status error: {e}")),
        Ok(other) => return Health::Down(format!("status error: not a status reply: {other:?}")),
    };
    if r.stopping {
        return Health::Down("ringlb is stopping".into());
    }
    for name in pools {
        match r.pools.iter().find(|p| p.name == *name) {
            None => return Health::Down(format!("no pool named \"{name}\"")),
            Some(p) if p.usable_backends == 0 => return Health::Down(format!("pool \"{name}\" has no usable backend")),
            Some(_) => {}
        }
    }
    Health::Up
}

/// What to tell the route speaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Announce the route.
    Announce,
    /// Withdraw it.
    Withdraw,
}

/// The announcement state machine: pure, driven with `now` and each health verdict.
#[derive(Debug)]
pub struct Announcer {
    announced: Option<bool>,
    last_told: Option<Instant>,
    reassert: Duration,
}

impl Announcer {
    /// Nothing told yet; the first verdict always produces an action.
    pub fn new(reassert: Duration) -> Self {
        Announcer {
            announced: None,
            last_told: None,
            reassert,
        }
    }

    /// The action for `health` at `now`: on a change, on the first verdict,
    /// and again once `reassert` has passed since the last one.
    pub fn step(&mut self, now: Instant, health: &Health) -> Option<Action> {
        let up = *health == Health::Up;
        let due = self.last_told.is_none_or(|t| now.duration_since(t) >= self.reassert);
        if self.announced == Some(up) && !due {
            return None;
        }
        self.announced = Some(up);
        self.last_told = Some(now);
        Some(if up { Action::Announce } else { Action::Withdraw })
    }

    /// Whether the route is announced, as far as this instance told the speaker.
    pub fn announced(&self) -> bool {
        self.announced == Some(true)
    }
}

/// Settings of `ringlb announce`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// ringlb's control socket.
    pub socket: PathBuf,
    /// Pools that must have a usable backend.
    pub pools: Vec<String>,
    /// The birdc binary.
    pub birdc: PathBuf,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
    /// The BIRD protocol holding the service route.
    pub protocol: String,
    /// Poll period.
    pub interval: Duration,
    /// Time the control socket has to answer.
    pub timeout: Duration,
    /// Period at which the state is told to BIRD again.
    pub reassert: Duration,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Runs until SIGTERM/SIGINT, then withdraws; returns the exit code.
pub fn run(settings: &Settings) -> i32 {
    // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only stores to an
    // atomic, which is async-signal-safe; installing it has no other effect.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut announcer = Announcer::new(settings.reassert);
    let mut last_health: Option<Health> = None;
    while !STOP.load(Ordering::SeqCst) {
        let started = Instant::now();
        let reply = ask_status(&settings.socket, settings.timeout);
        let health = judge(reply.as_ref().map_err(String::as_str), &settings.pools);
        if last_health.as_ref() != Some(&health) {
            match &health {
                Health::Up => log::info!("announce: ringlb is up: announcing {}", settings.protocol),
                Health::Down(why) => log::warn!("announce: {why}: withdrawing {}", settings.protocol),
            }
            last_health = Some(health.clone());
        }
        if let Some(action) = announcer.step(started, &health) {
            if let Err(e) = tell_bird(settings, action) {
                log::warn!("announce: {e}");
                // Try again on the next poll rather than waiting for `reassert`.
                announcer = Announcer::new(settings.reassert);
            }
        }
        let elapsed = started.elapsed();
        if elapsed < settings.interval {
            std::thread::sleep(settings.interval - elapsed);
        }
    }
    log::info!("announce: stopping: withdrawing {}", settings.protocol);
    match tell_bird(settings, Action::Withdraw) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("announce: {e}");
            1
        }
    }
}

/// `status` with a deadline on connect, write and read, and at most 4 MiB
/// of reply.
fn ask_status(socket: &Path, timeout: Duration) -> Result<Reply<'static>, String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let request = Request::Status {};
    s.write_all(format!("{}\n", request.to_line()).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(s, 4 << 20))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Reply::parse(&request, line.trim_end()).map_err(|e| format!("bad reply: {e}"))
}

fn tell_bird(settings: &Settings, action: Action) -> Result<(), String> {
    let verb = match action {
        Action::Announce => "enable",
        Action::Withdraw => "disable",
    };
    let out = Command::new(&settings.birdc)
        .arg("-s")
        .arg(&settings.bird_socket)
        .arg(verb)
        .arg(&settings.protocol)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", settings.birdc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // birdc exits 0 even when BIRD refuses; its reply says "enabled",
    // "disabled", or "already ..." on success.
    let ok = out.status.success() && (text.contains(&format!("{verb}d")) || text.contains("already"));
    if ok {
        log::debug!("announce: birdc {verb} {}: {}", settings.protocol, text.trim());
        Ok(())
    } else {
        Err(format!(
            "birdc {verb} {} failed: {} {}",
            settings.protocol,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status reply line as a server sends it, read as `announce` reads it.
    fn status(stopping: bool, usable: usize) -> Reply<'static> {
        let line = serde_json::json!({"ok": true, "version": "0", "protocol": 1, "uptime_seconds": 1,
            "workers": [], "config": null, "config_generation": 1, "snapshot_generation": 1,
            "listeners": [], "stopping": stopping,
            "pools": [{"name": "web", "fingerprint": "00", "table_digest": null, "table_size": 7,
                "table_generation": 1, "usable_backends": usable, "backends": 2}]});
        Reply::parse(&Request::Status {}, &line.to_string()).unwrap()
    }

    #[test]
    fn judges_stopping_empty_pools_and_silence() {
        let pools = vec!["web".to_string()];
        let up = status(false, 2);
        assert_eq!(judge(Ok(&up), &pools), Health::Up);
        let stopping = status(true, 2);
        assert_eq!(judge(Ok(&stopping), &pools), Health::Down("ringlb is stopping".into()));
        let empty = status(false, 0);
        assert!(matches!(judge(Ok(&empty), &pools), Health::Down(w) if w.contains("no usable backend")));
        let refused = Reply::Error("busy".into());
        assert_eq!(judge(Ok(&refused), &pools), Health::Down("status error: busy".into()));
        assert!(matches!(judge(Err("timed out"), &pools), Health::Down(w) if w.contains("not answering")));
        assert!(matches!(judge(Ok(&up), &["db".to_string()]), Health::Down(w) if w.contains("no pool")));
    }

    #[test]
    fn acts_on_changes_and_reasserts() {
        let t0 = Instant::now();
        let mut a = Announcer::new(Duration::from_secs(10));
        assert_eq!(a.step(t0, &Health::Up), Some(Action::Announce));
        assert_eq!(a.step(t0 + Duration::from_secs(1), &Health::Up), None);
        assert!(a.announced());
        let down = Health::Down("x".into());
        assert_eq!(a.step(t0 + Duration::from_secs(2), &down), Some(Action::Withdraw));
        assert_eq!(a.step(t0 + Duration::from_secs(3), &down), None);
        assert_eq!(a.step(t0 + Duration::from_secs(13), &down), Some(Action::Withdraw));
        assert_eq!(
            a.step(t0 + Duration::from_secs(14), &Health::Up),
            Some(Action::Announce)
        );
    }
}
