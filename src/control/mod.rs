//! The control plane: its own thread and runtime, never a data worker's.
//! It owns the model, runs health checks, serves the control socket and the
//! metrics endpoint and status page, handles signals, and publishes snapshots.

pub mod ctl;
pub mod health_check;
pub mod http;
pub mod metrics;
pub mod socket;
pub mod status;
pub mod takeover;
pub mod top;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::model::health::CheckResult;
use crate::protocol::{
    BackendRow, BackendsReply, Candidate, LastCheck, ListenerCounters, ListenerStatus, PoolCounters, PoolRow, Reply,
    Request, RouteReply, SourceCounters, StatsReply, StatusReply, WorkerStatus,
};
use crate::server::{graceful_shutdown, Server};
use crate::stats::RefuseReason;

/// How often drains, ejections and slow-start steps are looked at.
const TICK: Duration = Duration::from_millis(100);
/// How often due health checks are started.
const CHECK_SCAN: Duration = Duration::from_millis(20);

/// Things bound at start that the control plane serves.
pub struct ControlEndpoints {
    /// The control socket, when configured.
    pub socket: Option<std::os::unix::net::UnixListener>,
    /// The metrics listener, when configured.
    pub metrics: Option<std::net::TcpListener>,
}

/// Runs the control plane on the calling thread until ringlb shuts down.
pub fn run_control_plane(server: Arc<Server>, endpoints: ControlEndpoints) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control plane runtime: {e}"))?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
        let mut usr2 = signal(SignalKind::user_defined2()).map_err(|e| e.to_string())?;

        if let Some(sock) = endpoints.socket {
            let task = tokio::spawn(socket::serve(sock, server.clone()));
            server.endpoint_tasks.lock().push(task.abort_handle());
        }
        if let Some(m) = endpoints.metrics {
            let listener = tokio::net::TcpListener::from_std(m).map_err(|e| e.to_string())?;
            let task = tokio::spawn(http::serve(listener, server.clone()));
            server.endpoint_tasks.lock().push(task.abort_handle());
        }
        tokio::spawn(ticker(server.clone()));
        tokio::spawn(health_scheduler(server.clone()));

        loop {
            tokio::select! {
                _ = term.recv() => { log::info!("SIGTERM received"); break; }
                _ = int.recv() => { log::info!("SIGINT received"); break; }
                _ = usr1.recv() => {
                    log::info!("SIGUSR1 received: reopening the access log file");
                    crate::access_log::reopen();
                }
                _ = server.handover_done.notified() => { break; }
                _ = usr2.recv() => {
                    log::info!("SIGUSR2 received: starting the upgraded binary with --takeover");
                    takeover::spawn_successor(&server);
                }
                _ = hup.recv() => {
                    log::info!("SIGHUP received: reloading");
                    if let Err(e) = server.reload().await {
                        log::warn!("reload rejected; running config unchanged:\n{e}");
                    }
                }
            }
        }
        let timeout = server.model.lock().config.runtime.shutdown_timeout;
        // A second signal exits at once: the connections still open then
        // are closed by the exit, and that is the number reported.
        let second = |server: &Server| {
            let open = server.active_connections();
            log::warn!("second signal: exiting now; {open} connection(s) still open are closed");
            open
        };
        let (closed, when) = tokio::select! {
            closed = graceful_shutdown(&server, timeout) => (closed, "at the shutdown timeout"),
            _ = term.recv() => (second(&server), "by the second signal"),
            _ = int.recv() => (second(&server), "by the second signal"),
        };
        // The access log's last records are written before the exit.
        crate::access_log::flush();
        log::info!("ringlb stopped ({closed} connection(s) closed {when})");
        Ok(())
    })
}

/// One summary line per listener and period with refusals, at warn: never a
/// line per refused connection.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

fn log_refusals(model: &crate::model::Model, last: &mut HashMap<usize, [u64; RefuseReason::ALL.len()]>) {
    for l in &model.listeners {
        let now: [u64; RefuseReason::ALL.len()] = std::array::from_fn(|i| l.stats.refused[i].get());
        let before = last.insert(l.slot, now).unwrap_or([0; RefuseReason::ALL.len()]);
        let parts: Vec<String> = RefuseReason::ALL
            .iter()
            .filter(|r| now[**r as usize] > before[**r as usize])
            .map(|r| format!("{}={}", r.label(), now[*r as usize] - before[*r as usize]))
            .collect();
        if !parts.is_empty() {
            log::warn!(
                "listener \"{}\": refused in the last {REFUSAL_LOG_EVERY:?}: {}",
                l.config.name,
                parts.join(" ")
            );
        }
    }
}

/// Runs the periodic work every [`TICK`] and rebuilds dirty pools: when
/// woken by a health change, at once if the last rebuild is a tick ago,
/// otherwise at the next tick. So a single change reaches the table
/// without waiting, and a storm of them costs at most one rebuild per pool
/// per tick and one snapshot for all pools.
async fn ticker(server: Arc<Server>) {
    let mut refused_seen = HashMap::new();
    let mut next_refusal_log = Instant::now() + REFUSAL_LOG_EVERY;
    let mut next_tick = Instant::now() + TICK;
    let mut last_rebuild = Instant::now().checked_sub(TICK).unwrap_or_else(Instant::now);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_tick.into()) => {}
            _ = server.rebuild_soon.notified() => {}
        }
        let now = Instant::now();
        let mut model = server.model.lock();
        let mut fx = crate::model::Effects::default();
        if now >= next_tick {
            if now >= next_refusal_log {
                log_refusals(&model, &mut refused_seen);
                next_refusal_log = now + REFUSAL_LOG_EVERY;
            }
            fx = model.tick_state(now);
            next_tick = now + TICK;
        }
        // A wake-up within a tick of the last rebuild leaves the pools
        // dirty for the next tick, which is at most TICK away.
        if model.any_dirty() && now >= last_rebuild + TICK {
            fx.merge(model.rebuild_dirty(now));
            last_rebuild = now;
        }
        // The ticker is what rebuild_soon wakes: no need to wake itself.
        fx.rebuild_soon = false;
        let _none = server.apply(&mut model, fx, &mut HashMap::new());
    }
}

/// Starts due checks, each in its own task with its own timeout, at most
/// `max_concurrent` per pool at once: a hung backend only ever holds its own
/// check, never another backend's.
async fn health_scheduler(server: Arc<Server>) {
    let mut limits: HashMap<String, (usize, Arc<Semaphore>)> = HashMap::new();
    let mut interval = tokio::time::interval(CHECK_SCAN);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let jobs = {
            let mut model = server.model.lock();
            let fx = model.due_checks(Instant::now());
            server.apply(&mut model, fx, &mut HashMap::new())
        };
        for job in jobs {
            let entry = limits
                .entry(job.pool_name.clone())
                .or_insert_with(|| (job.max_concurrent, Arc::new(Semaphore::new(job.max_concurrent))));
            if entry.0 != job.max_concurrent {
                *entry = (job.max_concurrent, Arc::new(Semaphore::new(job.max_concurrent)));
            }
            let slots = entry.1.clone();
            let server = server.clone();
            tokio::spawn(async move {
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                let (verdict, latency, detail) = health_check::run_check(job.target, &job.kind, job.timeout).await;
                let result = CheckResult {
                    passed: verdict.passed(),
                    latency,
                    detail,
                };
                let mut model = server.model.lock();
                let fx = model.record_check(&job, result, Instant::now());
                let _none = server.apply(&mut model, fx, &mut HashMap::new());
            });
        }
    }
}

/// Answers one control request with its reply line (without the newline).
pub async fn handle_line(server: &Arc<Server>, req: Request) -> String {
    match req {
        Request::Backends { pool, limit, offset } => {
            let started = Instant::now();
            let text = backends_line(server, pool.as_deref(), offset.unwrap_or(0), limit);
            log::debug!("ctl backends: {} bytes built in {:?}", text.len(), started.elapsed());
            text
        }
        other => handle(server, other).await.to_line(),
    }
}

/// Answers one control request (`backends`: see [`backends_line`]).
pub async fn handle(server: &Arc<Server>, req: Request) -> Reply<'static> {
    match req {
        Request::Status {} => Reply::Status(status(server)),
        Request::Backends { pool, limit, offset } => {
            let line = backends_line(server, pool.as_deref(), offset.unwrap_or(0), limit);
            Reply::parse(&Request::Backends { pool, limit, offset }, &line).unwrap_or_else(Reply::Error)
        }
        Request::Stats {} => Reply::Stats(stats(server)),
        Request::Route {
            listener,
            client,
            token,
        } => match route(server, &listener, &client, token.as_deref()) {
            Ok(r) => Reply::Route(r),
            Err(e) => Reply::Error(e),
        },
        Request::WhatIf {
            pool,
            change,
            addr,
            weight,
        } => match what_if(server, &pool, &change, &addr, weight, Instant::now()) {
            // The table builds run off the control thread.
            Ok(prepared) => match tokio::task::spawn_blocking(move || prepared.compute()).await {
                Ok(Ok(report)) => Reply::WhatIf(report),
                Ok(Err(e)) => Reply::Error(e),
                Err(e) => Reply::Error(format!("what_if failed: {e}")),
            },
            Err(e) => Reply::Error(e),
        },
        Request::Reload {} => match server.reload().await {
            Ok(r) => Reply::Reload(r),
            Err(e) => {
                log::warn!("reload rejected; running config unchanged:\n{e}");
                Reply::Error(e)
            }
        },
        Request::Takeover { .. } => Reply::Error("takeover is served on the control socket only".into()),
        change => {
            let now = Instant::now();
            let mut model = server.model.lock();
            let (reply, mut fx) = model.command(&change, now).expect("every other verb changes the model");
            if reply.is_ok() {
                // Health changes pending for any pool go into the same
                // (single) snapshot as the command's own rebuild.
                fx.merge(model.rebuild_dirty(now));
            }
            let _none = server.apply(&mut model, fx, &mut HashMap::new());
            drop(model);
            if reply.is_ok() {
                server.save_state();
            }
            reply
        }
    }
}

fn status(server: &Server) -> StatusReply {
    let setup = server.shared.worker_setup.lock().clone();
    // Set once a SIGTERM/SIGINT has stopped the listeners: `ringlb
    // announce` withdraws the route at once rather than at the exit.
    let stopping = server.stops.lock().values().any(|s| s.is_stopped());
    let model = server.model.lock();
    let cpus = crate::worker::pinning_cpus();
    StatusReply {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        // During an upgrade: the process this one took over from, still
        // finishing its connections (its last report; none once it exited).
        predecessor: server.predecessor.lock().clone(),
        protocol: crate::protocol::PROTOCOL_VERSION,
        uptime_seconds: server.shared.started.elapsed().as_secs(),
        workers: (0..server.shared.workers)
            .map(|id| WorkerStatus {
                id,
                engine: server.shared.engine.to_string(),
                setup: setup.get(id).cloned().unwrap_or_default(),
                // TCP connections and UDP flows this worker accepted, over the
                // listeners `stats` lists (the per-worker split of its "accepted").
                accepted: model.listeners.iter().map(|l| l.stats.accepted.worker(id)).sum::<u64>(),
                cpu: server.shared.pin_workers.then(|| id % cpus),
            })
            .collect(),
        config: model.config.source.as_ref().map(|p| p.display().to_string()),
        config_generation: model.config_generation,
        snapshot_generation: model.generation(),
        listeners: model
            .live_listeners()
            .map(|l| ListenerStatus {
                name: l.config.name.clone(),
                bind: l.config.bind.to_string(),
                protocol: format!("{:?}", l.config.protocol).to_lowercase(),
                pool: l.config.pool.clone(),
                active: l.stats.active.current(),
            })
            .collect(),
        // Set once a SIGTERM/SIGINT has stopped the listeners: `ringlb
        // announce` withdraws the route at once rather than at the exit.
        stopping,
        pools: model
            .pools
            .iter()
            .filter(|p| !p.retired)
            .map(|p| crate::protocol::PoolStatus {
                name: p.config.name.clone(),
                fingerprint: crate::fleet::fingerprint::hex(crate::fleet::fingerprint::pool_fingerprint(
                    &p.published,
                    p.config.table_size,
                )),
                table_digest: p.published.table.as_ref().map(|t| format!("{:016x}", t.digest())),
                table_size: p.config.table_size,
                table_generation: p.published.generation,
                usable_backends: p.published.weights.iter().filter(|w| **w > 0).count(),
                backends: p.backends.len(),
            })
            .collect(),
    }
}

/// `ctl backends`: every pool (or `only`), each with its backends from
/// `offset`, at most `limit` of them, and `total_backends`, so a client can
/// page through a pool of thousands. The reply line is serialized straight
/// from the model (borrowed strings, no `serde_json::Value` per backend):
/// building a `Value` tree for 10,000 backends took 130-750 ms of the
/// control thread, serializing the rows takes ~30 ms.
pub fn backends_line(server: &Server, only: Option<&str>, offset: usize, limit: Option<usize>) -> String {
    use std::borrow::Cow;
    let model = server.model.lock();
    if let Some(name) = only {
        if model.pool_index(name).is_none() {
            return Reply::Error(format!("no pool named \"{name}\"")).to_line();
        }
    }
    let now = Instant::now();
    let pools = model
        .pools
        .iter()
        .filter(|p| !p.retired && only.is_none_or(|n| n == p.config.name))
        .map(|p| (p, status::table_shares(&p.published)))
        .map(|(p, shares)| PoolRow {
            pool: Cow::Borrowed(&p.config.name),
            table_generation: p.published.generation,
            panic: p.panic,
            balance: Cow::Borrowed(p.config.balance.name()),
            backup_tier: p.published.backup_tier,
            total_backends: p.backends.len(),
            offset,
            backends: p
                .backends
                .iter()
                .enumerate()
                .skip(offset)
                .take(limit.unwrap_or(usize::MAX))
                .map(|(i, b)| BackendRow {
                    addr: b.config.addr,
                    weight: b.config.weight,
                    effective_weight: p.published.weights.get(i).copied().unwrap_or(0),
                    table_share: shares.get(&b.config.addr).copied().unwrap_or(0.0),
                    state: Cow::Borrowed(b.state_label(now)),
                    reason: Cow::Borrowed(&b.reason),
                    active: b.shared.stats.conns.current(),
                    total: b.shared.stats.conns.opened.get(),
                    bytes_in: b.shared.stats.bytes_in.get(),
                    bytes_out: b.shared.stats.bytes_out.get(),
                    failures: b.shared.stats.connect_failures.get(),
                    ejections: b.outlier.ejections_total(),
                    last_check: b.last_check.as_ref().map(|(ok, lat, detail)| LastCheck {
                        ok: *ok,
                        ms: lat.as_secs_f64() * 1e3,
                        detail: Cow::Borrowed(detail),
                    }),
                    removing: b.remove_when_drained,
                    tier: Cow::Borrowed(if b.config.backup { "backup" } else { "primary" }),
                })
                .collect(),
            table_size: p.published.table.as_ref().map(|t| t.size()).unwrap_or(0),
            configured_table_size: p.config.table_size,
            fingerprint: crate::fleet::fingerprint::hex(crate::fleet::fingerprint::pool_fingerprint(
                &p.published,
                p.config.table_size,
            )),
            table_digest: p.published.table.as_ref().map(|t| format!("{:016x}", t.digest())),
        })
        .collect();
    Reply::Backends(BackendsReply { pools }).to_line()
}

/// Explains the routing decision for `client` on `listener`, from the same
/// snapshot and the same code path workers use.
fn route(server: &Server, listener: &str, client: &str, token: Option<&str>) -> Result<RouteReply, String> {
    let addr: std::net::SocketAddr = match client.parse::<std::net::SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip: std::net::IpAddr = client
                .parse()
                .map_err(|_| format!("\"{client}\" is not an ip or ip:port"))?;
            std::net::SocketAddr::new(ip, 0)
        }
    };
    let snapshot = server.shared.snapshot.load_full();
    let view = snapshot
        .listeners
        .iter()
        .flatten()
        .find(|l| l.config.name == listener)
        .ok_or_else(|| format!("no listener named \"{listener}\""))?;
    let pool = &snapshot.pools[view.pool];
    let token_hash = match (&view.config.token, token) {
        (Some(t), Some(hex)) => {
            let bytes = parse_hex(hex).ok_or_else(|| format!("token \"{hex}\" is not hex (two digits per byte)"))?;
            if bytes.len() != t.length as usize {
                return Err(format!(
                    "listener \"{listener}\" routes by {}-byte tokens; token \"{hex}\" has {} bytes",
                    t.length,
                    bytes.len()
                ));
            }
            Some(crate::flow_key::token_hash(&bytes))
        }
        (Some(t), None) => {
            return Err(format!(
                "listener \"{listener}\" routes by token: give the {}-byte token in hex (--token HEX)",
                t.length
            ))
        }
        (None, Some(_)) => return Err(format!("listener \"{listener}\" does not route by token")),
        (None, None) => None,
    };
    // The very function a worker calls for a new connection or flow.
    let hash = token_hash.unwrap_or_else(|| crate::flow_key::flow_hash(addr, view.config.hash_key));
    let mut passed_over = Vec::new();
    let selection = crate::conn::select::select_explained(pool, addr.ip(), hash, 5, Some(&mut passed_over));
    let rule = selection.map_or(String::new(), |s| {
        if s.backup_tier {
            format!("{} (backup tier)", s.rule.name())
        } else {
            s.rule.name().to_string()
        }
    });
    let skipped = passed_over
        .iter()
        .map(|s| crate::protocol::SkippedCandidate {
            addr: pool.backends[s.index as usize].addr.to_string(),
            open: s.load,
            why: s.to_string(),
        })
        .collect();
    let tcp = view.config.protocol == crate::config::Protocol::Tcp;
    let region = pool.table_for(addr.ip()).1;
    let (region_name, table_name) = match (&pool.geo, region) {
        (Some(g), Some(r)) => {
            let name = g.names.name(r).unwrap_or("?").to_string();
            (
                Some(name.clone()),
                format!("pool \"{}\", client region \"{name}\"", pool.name),
            )
        }
        _ => (None, format!("pool \"{}\"", pool.name)),
    };
    let weights: Vec<u32> = match (&pool.geo, region) {
        (Some(g), Some(r)) => g.weights[g.by_region[r.0 as usize] as usize].clone(),
        _ => pool.weights.clone(),
    };
    // The table's weights are in its own units (configured weight x WEIGHT_SCALE, slow
    // start and geo spill-over applied), which mean nothing next to the configured
    // weight: show the configured weight and the share of the table instead, keeping the
    // raw figure as `effective_weight`.
    let configured = configured_weights(server, &pool.name);
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let candidates: Vec<Candidate> = selection
        .map(|sel| {
            sel.candidates()
                .iter()
                .map(|&i| {
                    let b = &pool.backends[i as usize];
                    // A TCP connect skips a backend at its max_connections
                    // (spill-over); UDP flows do not count against it.
                    let full = tcp && b.is_full();
                    let effective = weights[i as usize];
                    // Rounded to 1e-4 so that the JSON shows 0.5, not 0.49999999999999994.
                    let share = (effective as f64 / total.max(1) as f64 * 1e4).round() / 1e4;
                    Candidate {
                        addr: b.addr.to_string(),
                        weight: configured.get(&b.addr).copied(),
                        effective_weight: effective,
                        table_share: share,
                        full,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(RouteReply {
        listener: listener.to_string(),
        client: addr.to_string(),
        hash_key: format!("{:?}", view.config.hash_key),
        port_used: token_hash.is_some() || addr.port() != 0 || view.config.hash_key == crate::config::HashKey::SrcIp,
        token: token.map(str::to_string),
        region: region_name,
        table: table_name,
        table_generation: pool.generation,
        // What a new connection would get: the first candidate not full.
        chosen: candidates.iter().find(|c| !c.full).map(|c| c.addr.clone()),
        rule,
        skipped,
        candidates,
    })
}

/// `what_if`: the change checked like the command it previews (the same
/// backend validation as `add` and `weight`), then gathered from the model
/// for [`crate::whatif::Prepared::compute`]; nothing is changed.
fn what_if(
    server: &Server,
    pool: &str,
    change: &str,
    addr: &str,
    weight: Option<i64>,
    now: Instant,
) -> Result<crate::whatif::Prepared, String> {
    use crate::whatif::Change;
    let checked = |w: Option<i64>| crate::config::validate_backend_request(addr, w).map_err(|e| e.to_string());
    let change = match change {
        "remove" => Change::Remove(checked(None)?.addr),
        "add" => Change::Add(checked(weight)?),
        "weight" => {
            let w = weight.ok_or("what_if weight: give the new weight")?;
            let b = checked(Some(w))?;
            Change::Weight(b.addr, b.weight)
        }
        other => {
            return Err(format!(
                "what_if: change must be remove, add or weight, not \"{other}\""
            ))
        }
    };
    let model = server.model.lock();
    crate::whatif::prepare(&model, pool, &change, now)
}

/// `"00ff.."` as bytes; `None` unless it is pairs of hex digits.
fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * 64 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Configured weight of each backend of pool `name` (the file's, or `ctl weight`'s).
fn configured_weights(server: &Server, name: &str) -> HashMap<std::net::SocketAddr, u32> {
    let model = server.model.lock();
    model
        .pools
        .iter()
        .filter(|p| !p.retired && p.config.name == name)
        .flat_map(|p| p.backends.iter().map(|b| (b.config.addr, b.config.weight)))
        .collect()
}

fn stats(server: &Server) -> StatsReply {
    let model = server.model.lock();
    StatsReply {
        listeners: model
            .listeners
            .iter()
            .map(|l| ListenerCounters {
                name: l.config.name.clone(),
                accepted: l.stats.accepted.get(),
                relayed: l.stats.active.opened.get(),
                active: l.stats.active.current(),
                refused: RefuseReason::ALL
                    .iter()
                    .map(|r| (r.label().to_string(), l.stats.refused[*r as usize].get()))
                    .collect(),
                bytes_in: l.stats.bytes_in.get(),
                bytes_out: l.stats.bytes_out.get(),
                accept_errors: l.stats.accept_errors.get(),
                datagrams_in: l.stats.datagrams_in.get(),
                datagrams_out: l.stats.datagrams_out.get(),
                datagrams_dropped: l.stats.datagrams_dropped.get(),
                datagrams_short: l.stats.datagrams_short.get(),
                sources: l.limits.source_stats().map(|st| SourceCounters {
                    tracked: st.len,
                    evictions: st.evictions,
                    table_full: st.table_full,
                    sketch_admitted: st.sketch_admitted,
                    capacity: l.limits.connections.as_ref().map_or(0, |t| t.capacity()),
                    memory_bytes: l.limits.connections.as_ref().map_or(0, |t| t.approx_memory_bytes()),
                }),
            })
            .collect(),
        pools: model
            .pools
            .iter()
            .map(|p| PoolCounters {
                name: p.config.name.clone(),
                table_generation: p.published.generation,
                table_build_us: p.published.build_time.as_micros() as u64,
                panic: p.panic,
            })
            .collect(),
        snapshot_generation: model.generation(),
        config_generation: model.config_generation,
        // The JSON access log's queue: records written, and dropped when full.
        access_log: crate::protocol::AccessLogCounters {
            written: crate::access_log::written(),
            dropped: crate::access_log::dropped(),
        },
    }
}
