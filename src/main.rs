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
    },
    /// Validate a config file: print every error and exit 1, or print a
    /// one-line summary and exit 0 (like `nginx -t`). Nothing is bound.
    Check {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a self-contained demo: three local backends, ringlb in front of them
    /// (config/demo.toml, embedded), some traffic, and how it spread.
    Demo {
        /// Connections to send through the balancer.
        #[arg(long, default_value_t = 400)]
        connections: usize,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp_millis().init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match Config::load(&config) {
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("ringlb: {} error(s) in {}; not started", errors.0.len(), config.display());
                ExitCode::FAILURE
            }
            Ok(cfg) => match ringlb::server::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            },
        },
        Command::Check { config } => match Config::load(&config) {
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("ringlb: {} error(s) in {}", errors.0.len(), config.display());
                ExitCode::FAILURE
            }
            Ok(cfg) => {
                println!("{}: ok: {}", config.display(), cfg.summary());
                ExitCode::SUCCESS
            }
        },
        Command::Demo { connections } => match ringlb::demo::run(connections) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
