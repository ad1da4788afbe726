//! Starting a ringlb process: engine, bound listeners, workers, the model
//! and its first snapshot, then the control plane on this thread until
//! shutdown. Everything is bound before anything starts, so a config whose
//! address is taken never half-starts; with `--takeover` the sockets come
//! from the running process instead (`crate::control::takeover`).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{Config, ListenerConfig, Protocol};
use crate::control::{run_control_plane, ControlEndpoints};
use crate::engine::resolve_engine;
use crate::engine::spawn::spawn_worker;
use crate::listen::{bind_tcp_for_workers, bind_udp_for_workers};
use crate::model::Model;
use crate::server::{bind_listener, BoundSockets, Server};
use crate::worker::Shared;

/// Starts ringlb with `config` and blocks until it has shut down. With
/// `takeover`, the listening sockets (and the metrics listener) come from
/// the ringlb answering on the config's control socket, which stops
/// accepting once this process serves (see [`crate::control::takeover`]).
pub fn run(config: Config, takeover: bool) -> Result<(), String> {
    let started = Instant::now();
    let (engine, fallback_reason) = resolve_engine(config.runtime.io_engine)?;
    if let Some(why) = fallback_reason {
        log::warn!("io_uring unavailable ({why}); workers run on the epoll engine");
    }
    raise_fd_limit();
    if config.control.access_log == crate::config::AccessLog::Json {
        crate::access_log::start(config.control.access_log_file.clone()).map_err(|e| {
            format!(
                "control.access_log_file: {}: {e}",
                config
                    .control
                    .access_log_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new("stderr"))
                    .display()
            )
        })?;
    }
    let workers = config.runtime.workers;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(Default::default()),
        force_close: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
        workers,
        engine,
        pin_workers: config.runtime.pin_workers,
        access_log: std::sync::atomic::AtomicU8::new(match config.control.access_log {
            crate::config::AccessLog::Off => 0,
            crate::config::AccessLog::Text => 1,
            crate::config::AccessLog::Json => 2,
        }),
        started: Instant::now(),
        worker_setup: Mutex::new(Vec::new()),
    });

    let mut inherited = match (takeover, &config.control.socket) {
        (false, _) => None,
        (true, None) => {
            return Err("--takeover needs [control] socket: the running ringlb is asked for its sockets there".into())
        }
        (true, Some(path)) => {
            let got = crate::control::takeover::request(path)?;
            log::info!(
                "takeover: process {} (ringlb {}, config generation {}) handed over {} listener(s), {} socket(s)",
                got.offer.pid,
                got.offer.version,
                got.offer.config_generation,
                got.offer.listeners.len(),
                got.offer.fds
            );
            Some(got)
        }
    };

    // Bind everything before starting anything: a config whose address is
    // taken never half-starts (and, in a takeover, never disturbs the
    // running process, which has changed nothing yet).
    let mut bound = HashMap::new();
    for l in &config.listeners {
        let sockets = match inherited.as_mut() {
            Some(inh) => match inh.take_listener(l.bind, l.protocol) {
                Some(fds) => inherited_sockets(l, fds, workers)?,
                None => {
                    let ours = inh.overlaps(l.bind, l.protocol);
                    bind_listener(l, workers, ours, config.runtime.pin_workers)?
                }
            },
            None => bind_listener(l, workers, false, config.runtime.pin_workers)?,
        };
        bound.insert(l.name.clone(), sockets);
    }
    if let Some(inh) = &inherited {
        let dropped = inh.untaken();
        if !dropped.is_empty() {
            log::info!(
                "takeover: listener(s) {} of the previous process are not in this config: closed",
                dropped.join(", ")
            );
        }
    }
    let mut metrics_fd = None;
    // In a takeover the running process answers on the path until this one
    // serves: bound beside it, moved there before the old one lets go.
    let mut control_temp = None;
    let endpoints = ControlEndpoints {
        socket: match config.control.socket.as_deref() {
            None => None,
            Some(p) if takeover => {
                let (listener, temp) = crate::control::socket::bind_control_socket_beside(p)?;
                control_temp = Some(RemoveOnDrop(Some(temp)));
                Some(listener)
            }
            Some(p) => Some(crate::control::socket::bind_control_socket(p)?),
        },
        metrics: match config.control.metrics {
            None => None,
            Some(addr) => {
                let l = match inherited.as_mut().and_then(|inh| inh.take_metrics(addr)) {
                    Some(fd) => std::net::TcpListener::from(fd),
                    None => std::net::TcpListener::bind(addr)
                        .map_err(|e| format!("control.metrics: cannot bind {addr}: {e}"))?,
                };
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                if let Ok(dup) = l.as_fd().try_clone_to_owned() {
                    metrics_fd = Some((addr, dup));
                }
                log::info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
                if !addr.ip().is_loopback() {
                    // Read-only, but it shows every backend and its traffic to
                    // whoever can reach it.
                    log::warn!(
                        "control.metrics {addr} is not a loopback address: the metrics and the status page are readable by anyone who can reach it"
                    );
                }
                Some(l)
            }
        },
    };
    if let Some(p) = &config.control.socket {
        log::info!("control socket {}", p.display());
    }

    let mut senders = Vec::new();
    for id in 0..workers {
        let handle = spawn_worker(id, shared.clone(), config.runtime.pin_workers)
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        senders.push(handle);
    }
    let (mut model, mut fx) = Model::new(config.clone(), workers, Instant::now(), jitter_seed());
    // Before anything is served: a drained backend never takes a connection.
    let (restored, restore_fx) = crate::state_file::restore(&mut model, Instant::now());
    fx.merge(restore_fx);
    let state_saved = restored.and_then(|doc| Some((config.control.state_file.clone()?, doc)));
    let server = Arc::new(Server {
        shared,
        model: Mutex::new(model),
        workers: senders,
        reloading: tokio::sync::Mutex::new(()),
        rebuild_soon: tokio::sync::Notify::new(),
        stops: Mutex::new(HashMap::new()),
        reloads: crate::server::ReloadStats::default(),
        state_saved: Mutex::new(state_saved),
        handover: Mutex::new(HashMap::new()),
        metrics_fd: Mutex::new(metrics_fd),
        takeover_busy: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
        handover_done: tokio::sync::Notify::new(),
        endpoint_tasks: Mutex::new(Vec::new()),
        predecessor: Arc::new(Mutex::new(None)),
    });
    {
        let mut model = server.model.lock();
        let _no_checks_yet = server.apply(&mut model, fx, &mut bound);
    }
    log::info!(
        "ringlb {} running: {} on {engine}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    match inherited {
        None => crate::systemd::ready(&format!("serving; {}", config.summary())),
        Some(inh) => {
            let old = inh.offer.pid;
            if let (Some(temp), Some(path)) = (control_temp.as_mut().and_then(|t| t.0.take()), &config.control.socket) {
                if let Err(e) = crate::control::socket::install_control_socket(&temp, path) {
                    log::error!("takeover: {e}; ctl reaches the old process there until it exits, then nothing");
                }
            }
            match inh.confirm() {
                Ok(reader) => {
                    log::info!(
                        "takeover: serving {:?} after --takeover; process {old} stops accepting and finishes its connections",
                        started.elapsed()
                    );
                    crate::control::takeover::watch_predecessor(reader, server.predecessor.clone());
                }
                Err(e) => log::warn!("takeover: {e}; serving anyway (both processes may accept until it stops)"),
            }
            crate::systemd::main_pid_ready(&format!("serving (took over from process {old}); {}", config.summary()));
        }
    }
    let result = run_control_plane(server.clone(), endpoints);
    // After a handover the socket path is the new process's.
    if let Some(p) = &config.control.socket {
        if !server.handed_over.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// A file removed when this goes out of scope unless taken out first: the
/// control socket bound beside the old process's, if the start fails.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A listener's handed-over sockets, checked to be what the config says;
/// topped up with new sockets in the same SO_REUSEPORT group when this
/// process has more workers than the old one had.
fn inherited_sockets(l: &ListenerConfig, fds: Vec<OwnedFd>, workers: usize) -> Result<BoundSockets, String> {
    let kind = match l.protocol {
        Protocol::Tcp => socket2::Type::STREAM,
        Protocol::Udp => socket2::Type::DGRAM,
    };
    for fd in &fds {
        crate::control::takeover::check_socket(fd, kind, l.bind)
            .map_err(|e| format!("--takeover: listener \"{}\": {e}", l.name))?;
    }
    let missing = workers.saturating_sub(fds.len());
    Ok(match l.protocol {
        Protocol::Tcp => {
            let mut sockets: Vec<std::net::TcpListener> = fds.into_iter().map(std::net::TcpListener::from).collect();
            if missing > 0 {
                sockets.extend(bind_tcp_for_workers(&l.name, l.bind, l.backlog, missing, true)?);
            }
            BoundSockets::Tcp(sockets)
        }
        Protocol::Udp => {
            let mut sockets: Vec<std::net::UdpSocket> = fds.into_iter().map(std::net::UdpSocket::from).collect();
            if missing > 0 {
                sockets.extend(bind_udp_for_workers(&l.name, l.bind, missing, true)?);
            }
            BoundSockets::Udp(sockets)
        }
    })
}

/// A seed for the model's check jitter: differs between processes (so two
/// instances do not check the same backends in step) and is read here, in
/// the shell, since the model reads no clock.
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// Raises the soft open-files limit to the hard limit: a proxy holds two fds
/// per connection, and the usual soft default (1024) caps it at ~500.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::info!("open files limit raised from {before} to {}", lim.rlim_cur);
            }
        }
    }
}
