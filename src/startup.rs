//! Starting a ringlb process: engine, bound listeners, workers, the model
//! and its first snapshot, then the control plane on this thread until
//! shutdown. Everything is bound before anything starts, so a config whose
//! address is taken never half-starts.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::Config;
use crate::control::{run_control_plane, ControlEndpoints};
use crate::engine::resolve_engine;
use crate::model::Model;
use crate::server::{bind_listener, Server};
use crate::worker::{spawn_worker, Shared};

/// Starts ringlb with `config` and blocks until it has shut down.
pub fn run(config: Config) -> Result<(), String> {
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

    // Bind everything before starting anything: a config whose address is
    // taken never half-starts.
    let mut bound = HashMap::new();
    for l in &config.listeners {
        bound.insert(
            l.name.clone(),
            bind_listener(l, workers, false, config.runtime.pin_workers)?,
        );
    }
    let endpoints = ControlEndpoints {
        socket: config
            .control
            .socket
            .as_deref()
            .map(crate::control::socket::bind_control_socket)
            .transpose()?,
        metrics: match config.control.metrics {
            None => None,
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| format!("control.metrics: cannot bind {addr}: {e}"))?;
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
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
    let (model, fx) = Model::new(config.clone(), workers, Instant::now(), jitter_seed());
    let server = Arc::new(Server {
        shared,
        model: Mutex::new(model),
        workers: senders,
        reloading: tokio::sync::Mutex::new(()),
        rebuild_soon: tokio::sync::Notify::new(),
        stops: Mutex::new(HashMap::new()),
        reloads: crate::server::ReloadStats::default(),
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
    let result = run_control_plane(server, endpoints);
    if let Some(p) = &config.control.socket {
        let _ = std::fs::remove_file(p);
    }
    result
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
