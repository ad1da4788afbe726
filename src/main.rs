//! The `ringlb` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringlb::config::Config;
use ringlb::protocol::Request;

/// ringlb: an L4 TCP load balancer for Linux on io_uring, choosing backends
/// with weighted Maglev tables so a fleet of instances agrees on every client.
#[derive(Parser)]
#[command(name = "ringlb", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer with a config file until SIGTERM/SIGINT (graceful stop;
    /// a second signal exits at once).
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Upgrade: take the listening sockets over from the ringlb running on
        /// this config's control socket (it stops accepting once this one
        /// serves, finishes its connections and exits 0).
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file: print every error and exit 1, or print a
    /// one-line summary and exit 0 (like `nginx -t`). Nothing is bound.
    Check {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to a running ringlb over its control socket. Exit 0 on an ok reply,
    /// 1 on an error reply, 2 when the socket can't be reached, 64 on a usage
    /// error, 74 when the output can't be written.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["socket", "config"])))]
    Ctl {
        /// Control socket path.
        #[arg(short, long, value_name = "SOCKET")]
        socket: Option<PathBuf>,
        /// Read the socket path from this config's [control] socket.
        #[arg(short, long, value_name = "CONFIG", conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Compare the routing of several running instances (control sockets, or
    /// metrics addresses `ip:port`) and name the first difference. Exit 0 when
    /// they agree, 1 when one differs, 2 when one can't be asked.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Keep a BIRD route announced while this ringlb serves: `birdc enable
    /// PROTOCOL` while the control socket answers, ringlb is not stopping and
    /// every --pool has a usable backend; `disable PROTOCOL` otherwise and on
    /// SIGTERM/SIGINT.
    Announce {
        /// ringlb's control socket.
        #[arg(short, long, value_name = "SOCKET")]
        socket: PathBuf,
        /// A pool that must have a usable backend (repeatable).
        #[arg(long = "pool", value_name = "POOL")]
        pools: Vec<String>,
        /// BIRD's control socket.
        #[arg(long, value_name = "PATH", default_value = "/run/bird/bird.ctl")]
        bird_socket: PathBuf,
        /// The BIRD protocol (a `static` one) holding the service route.
        #[arg(long, value_name = "NAME")]
        protocol: String,
        /// The birdc binary.
        #[arg(long, value_name = "PATH", default_value = "birdc")]
        birdc: PathBuf,
        /// Poll period.
        #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Time the control socket has to answer.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Tell BIRD the state again this often, changed or not.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        reassert: std::time::Duration,
    },
    /// What a config change would move: per pool, the fraction of the key
    /// space and from which backend to which (every backend taken as healthy).
    #[command(name = "what-if")]
    WhatIf {
        /// The old config, then the new one: `-c OLD.toml -c NEW.toml`.
        #[arg(short, long = "config", value_name = "FILE", num_args = 1, required = true)]
        configs: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a self-contained demo: three local backends, ringlb in front of them
    /// (config/demo.toml, embedded), some traffic, and how it spread; then a
    /// database failover (primary steps down, sessions closed, new primary), timed.
    Demo {
        /// Connections to send through the balancer.
        #[arg(long, default_value_t = 400)]
        connections: usize,
        /// Then keep the backends and a gentle load going, with one backend failing
        /// and recovering every --fail-every seconds, until Ctrl-C: something to
        /// watch on the status page (its address is printed) or with `ctl top`.
        #[arg(long)]
        keep_running: bool,
        /// With --keep-running: seconds of one fail-and-recover cycle (the backend
        /// is down for the second half).
        #[arg(long, default_value_t = 30.0, value_name = "SECS", requires = "keep_running")]
        fail_every: f64,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Compare instances; exit 0 when they agree, 1 naming the first difference.
    Check {
        /// Control socket paths or metrics addresses (`ip:port`).
        #[arg(required = true, value_name = "ENDPOINT")]
        endpoints: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A change `ctl what-if` previews.
#[derive(Subcommand, Clone)]
enum WhatIfChange {
    /// The backend leaves the pool.
    Remove { addr: String },
    /// A backend joins the pool.
    Add {
        addr: String,
        /// Weight (default 1).
        #[arg(long)]
        weight: Option<i64>,
    },
    /// The backend's weight changes.
    Weight {
        addr: String,
        #[arg(allow_negative_numbers = true)]
        weight: i64,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    ringlb::config::parse_duration(s)
}

#[derive(Subcommand, Clone)]
enum CtlCommand {
    /// Version, uptime, io engine per worker, config file and generation, listeners.
    Status,
    /// Per backend: weight, state, connections, bytes, failures.
    Backends {
        /// Only this pool.
        pool: Option<String>,
        /// At most this many backends per pool (a page; all by default).
        #[arg(long)]
        limit: Option<usize>,
        /// Skip this many backends of each pool first.
        #[arg(long)]
        offset: Option<usize>,
    },
    /// Take no new connections; open ones may finish within the pool's drain_timeout.
    Drain {
        pool: String,
        addr: String,
        /// Do it even if it leaves the pool with no usable backend (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Put a drained or disabled backend back in service.
    Enable { pool: String, addr: String },
    /// Out of service at once: no new connections, open ones closed after drain_timeout.
    Disable {
        pool: String,
        addr: String,
        /// Do it even if it leaves the pool with no usable backend (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Change a backend's weight.
    Weight {
        pool: String,
        addr: String,
        /// New weight (0..=1000000; checked by ringlb with the config's rules).
        #[arg(allow_negative_numbers = true)]
        weight: i64,
        /// Do it even if it leaves the pool with no usable backend (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Add a backend to a pool.
    Add {
        pool: String,
        addr: String,
        /// Weight (default 1).
        #[arg(long)]
        weight: Option<i64>,
        /// Do it even if it leaves the pool with no usable backend (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Drain a backend, then remove it.
    Remove {
        pool: String,
        addr: String,
        /// Do it even if it leaves the pool with no usable backend (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Re-read the config file (same as SIGHUP).
    Reload,
    /// Counters: accepted, active, refused by reason, bytes, table generations.
    Stats,
    /// Live view in the terminal: listeners (rates, refusals by reason), pools and
    /// backends (state, share of the Maglev table, connections, bytes/s, last check),
    /// refreshed in place; plain text, frame after frame, when stdout is not a terminal.
    Top {
        /// Print one frame (after one interval: rates need two samples) and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between samples (at least 0.2).
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
    },
    /// What a change would move (fraction of the key space, from which backend
    /// to which, per client region, UDP flows to re-pick); changes nothing.
    #[command(name = "what-if")]
    WhatIf {
        pool: String,
        #[command(subcommand)]
        change: WhatIfChange,
    },
    /// Explain where a client goes: its region, the table used, the chosen backend, the next candidates.
    Route {
        listener: String,
        /// `ip` or `ip:port`.
        client: String,
        /// `hash_key = "token"` listeners: the token, in hex (e.g. 32 hex digits for 16 bytes).
        #[arg(long)]
        token: Option<String>,
    },
}

impl CtlCommand {
    /// The typed request this command sends.
    fn request(&self) -> Request {
        let c = self.clone();
        match c {
            CtlCommand::Status => Request::Status {},
            CtlCommand::Backends { pool, limit, offset } => Request::Backends { pool, limit, offset },
            CtlCommand::Drain { pool, addr, force } => Request::Drain { pool, addr, force },
            CtlCommand::Enable { pool, addr } => Request::Enable { pool, addr },
            CtlCommand::Disable { pool, addr, force } => Request::Disable { pool, addr, force },
            CtlCommand::Weight {
                pool,
                addr,
                weight,
                force,
            } => Request::Weight {
                pool,
                addr,
                weight,
                force,
            },
            CtlCommand::Add {
                pool,
                addr,
                weight,
                force,
            } => Request::Add {
                pool,
                addr,
                weight,
                force,
            },
            CtlCommand::Remove { pool, addr, force } => Request::Remove { pool, addr, force },
            CtlCommand::Reload => Request::Reload {},
            CtlCommand::Stats => Request::Stats {},
            CtlCommand::Route {
                listener,
                client,
                token,
            } => Request::Route {
                listener,
                client,
                token,
            },
            // Not one request: `ctl top` asks for stats and backends itself
            // (and is handled before any request is built).
            CtlCommand::Top { .. } => Request::Stats {},
            CtlCommand::WhatIf { pool, change } => match change {
                WhatIfChange::Remove { addr } => Request::WhatIf {
                    pool,
                    change: "remove".into(),
                    addr,
                    weight: None,
                },
                WhatIfChange::Add { addr, weight } => Request::WhatIf {
                    pool,
                    change: "add".into(),
                    addr,
                    weight,
                },
                WhatIfChange::Weight { addr, weight } => Request::WhatIf {
                    pool,
                    change: "weight".into(),
                    addr,
                    weight: Some(weight),
                },
            },
        }
    }
}

/// Loads and validates `path`, then checks it against this host: `check`
/// and `run` refuse the same configs.
fn load_checked(path: &std::path::Path) -> Result<Config, ringlb::config::ConfigErrors> {
    let config = Config::load(path)?;
    ringlb::host_check::check_host(&config)?;
    Ok(config)
}

/// `ringlb what-if -c OLD -c NEW`.
fn what_if_offline(configs: &[PathBuf], json: bool) -> ExitCode {
    let [old, new] = configs else {
        eprintln!("ringlb what-if: give exactly two configs: -c OLD.toml -c NEW.toml");
        return ExitCode::from(ringlb::output::EXIT_USAGE as u8);
    };
    let load = |p: &PathBuf| {
        Config::load(p).map_err(|e| {
            eprintln!("{e}");
            eprintln!("ringlb what-if: {} error(s) in {}", e.0.len(), p.display());
        })
    };
    let (Ok(old_cfg), Ok(new_cfg)) = (load(old), load(new)) else {
        return ExitCode::FAILURE;
    };
    match ringlb::whatif::offline(&old_cfg, &new_cfg) {
        Err(e) => {
            eprintln!("ringlb what-if: {e}");
            ExitCode::FAILURE
        }
        Ok(pools) => {
            let text = if json {
                // The shape of a ctl reply: {"ok": true, "pools": [...]}.
                #[derive(serde::Serialize)]
                struct Offline<'a> {
                    ok: bool,
                    pools: &'a [ringlb::protocol::PoolMoves],
                }
                let line = serde_json::to_string(&Offline {
                    ok: true,
                    pools: &pools,
                })
                .expect("serializable");
                format!("{line}\n")
            } else {
                let mut out = format!("what-if {} -> {}\n", old.display(), new.display());
                for p in &pools {
                    out.push_str(&ringlb::control::ctl::human_what_if(p));
                }
                out
            };
            ExitCode::from(ringlb::output::print(&text, 0) as u8)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and exit 0; anything else is a usage error
            // with its own exit code (clap's 2 is ctl's "socket unreachable").
            let code = if e.use_stderr() { ringlb::output::EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    match cli.command {
        Command::Run { config, takeover } => match load_checked(&config) {
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "ringlb: {} error(s) in {}; not started",
                    errors.0.len(),
                    config.display()
                );
                ExitCode::FAILURE
            }
            Ok(cfg) => match ringlb::startup::run(cfg, takeover) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            },
        },
        Command::Check { config } => match load_checked(&config) {
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("ringlb: {} error(s) in {}", errors.0.len(), config.display());
                ExitCode::FAILURE
            }
            Ok(cfg) => {
                let line = format!("{}: ok: {}\n", config.display(), cfg.summary());
                ExitCode::from(ringlb::output::print(&line, 0) as u8)
            }
        },
        Command::Ctl {
            socket,
            config,
            json,
            command,
        } => {
            use ringlb::control::ctl;
            match ctl::socket_path(socket, config.as_deref()) {
                Err(e) => {
                    eprintln!("ringlb ctl: {e}");
                    ExitCode::from(ctl::EXIT_UNREACHABLE as u8)
                }
                Ok(path) => match command {
                    CtlCommand::Top { .. } if json => {
                        eprintln!("ringlb ctl top: --json does not apply; /status.json on the metrics address, or ctl stats --json, is the machine-readable view");
                        ExitCode::from(ringlb::output::EXIT_USAGE as u8)
                    }
                    CtlCommand::Top { once, interval } => {
                        if !(interval.is_finite() && interval > 0.0) {
                            eprintln!("ringlb ctl top: --interval must be a positive number of seconds");
                            return ExitCode::from(ringlb::output::EXIT_USAGE as u8);
                        }
                        let interval = std::time::Duration::from_secs_f64(interval.min(3600.0));
                        ExitCode::from(ringlb::control::top::run(&path, once, interval) as u8)
                    }
                    _ => ExitCode::from(ctl::run(&path, command.request(), json) as u8),
                },
            }
        }
        Command::Fleet {
            command: FleetCommand::Check { endpoints, json },
        } => ExitCode::from(ringlb::fleet::check::run(&endpoints, json) as u8),
        Command::Announce {
            socket,
            pools,
            bird_socket,
            protocol,
            birdc,
            interval,
            timeout,
            reassert,
        } => {
            let settings = ringlb::fleet::announce::Settings {
                socket,
                pools,
                birdc,
                bird_socket,
                protocol,
                interval,
                timeout,
                reassert,
            };
            ExitCode::from(ringlb::fleet::announce::run(&settings) as u8)
        }
        Command::WhatIf { configs, json } => what_if_offline(&configs, json),
        Command::Demo {
            connections,
            keep_running,
            fail_every,
        } => {
            if !(fail_every.is_finite() && (1.0..=86_400.0).contains(&fail_every)) {
                eprintln!("ringlb demo: --fail-every must be between 1 and 86400 seconds");
                return ExitCode::from(ringlb::output::EXIT_USAGE as u8);
            }
            let keep = keep_running.then(|| ringlb::demo::KeepRunning {
                fail_every: std::time::Duration::from_secs_f64(fail_every),
                rate: 20,
            });
            demo(connections, keep)
        }
    }
}

fn demo(connections: usize, keep: Option<ringlb::demo::KeepRunning>) -> ExitCode {
    match ringlb::demo::run(connections, keep) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
