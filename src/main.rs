//! The `ringlb` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringlb::config::Config;

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
    /// Run a self-contained demo: three local backends, ringlb in front of them
    /// (config/demo.toml, embedded), some traffic, and how it spread.
    Demo {
        /// Connections to send through the balancer.
        #[arg(long, default_value_t = 400)]
        connections: usize,
    },
}

#[derive(Subcommand)]
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
    /// Explain where a client goes: its region, the table used, the chosen backend, the next candidates.
    Route {
        listener: String,
        /// `ip` or `ip:port`.
        client: String,
    },
}

impl CtlCommand {
    fn request(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            CtlCommand::Status => json!({"cmd": "status"}),
            CtlCommand::Backends { pool, limit, offset } => {
                json!({"cmd": "backends", "pool": pool, "limit": limit, "offset": offset})
            }
            CtlCommand::Drain { pool, addr, force } => {
                json!({"cmd": "drain", "pool": pool, "addr": addr, "force": force})
            }
            CtlCommand::Enable { pool, addr } => json!({"cmd": "enable", "pool": pool, "addr": addr}),
            CtlCommand::Disable { pool, addr, force } => {
                json!({"cmd": "disable", "pool": pool, "addr": addr, "force": force})
            }
            CtlCommand::Weight {
                pool,
                addr,
                weight,
                force,
            } => json!({"cmd": "weight", "pool": pool, "addr": addr, "weight": weight, "force": force}),
            CtlCommand::Add {
                pool,
                addr,
                weight,
                force,
            } => json!({"cmd": "add", "pool": pool, "addr": addr, "weight": weight, "force": force}),
            CtlCommand::Remove { pool, addr, force } => {
                json!({"cmd": "remove", "pool": pool, "addr": addr, "force": force})
            }
            CtlCommand::Reload => json!({"cmd": "reload"}),
            CtlCommand::Stats => json!({"cmd": "stats"}),
            CtlCommand::Route { listener, client } => json!({"cmd": "route", "listener": listener, "client": client}),
        }
    }
}

/// Loads and validates `path`, then checks it against this host: `check`
/// and `run` refuse the same configs.
fn load_checked(path: &std::path::Path) -> Result<Config, ringlb::config::ConfigErrors> {
    let config = Config::load(path)?;
    config.check_host()?;
    Ok(config)
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
            Ok(cfg) => match ringlb::server::run(cfg, takeover) {
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
                Ok(path) => ExitCode::from(ctl::run(&path, command.request(), json) as u8),
            }
        }
        Command::Demo { connections } => match ringlb::demo::run(connections) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
