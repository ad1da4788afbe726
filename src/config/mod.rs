//! Configuration: TOML file → raw structs → one validated, typed [`Config`].
//!
//! The same validation serves the file at start, reloads and control commands,
//! so a setting that could never start ringlb can never be applied at runtime.
//! Types are in [`types`], validation in [`validate`], the file as written in
//! [`file`]; this module reads files and checks the host.

mod duration;
mod error;
pub mod file;
pub mod game;
pub mod preread;
pub mod types;
pub mod validate;

pub use duration::{format_duration, parse_duration};
pub use error::{ConfigError, ConfigErrors};
pub use game::{SourceMode, TokenConfig};
pub use types::*;
pub use validate::{addresses_overlap, pool_rule_problems, validate, validate_backend_request, PoolMember};

use std::net::SocketAddr;
use std::path::Path;

use file::ConfigFile;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let bytes =
            file::read_bounded_bytes(path).map_err(|e| ConfigErrors(vec![ConfigError::new(path, "file", e)]))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Placed like a TOML error: the line and column of the first bad byte.
            let valid = e.utf8_error().valid_up_to();
            let prefix = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
            let problem = format!("not valid UTF-8 (byte 0x{:02x})", e.as_bytes()[valid]);
            ConfigErrors(vec![ConfigError::new(path, line_col(prefix, valid), problem)])
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let place = match e.span() {
                Some(span) => line_col(text, span.start),
                None => "file".to_string(),
            };
            let mut problem = e.message().trim().to_string();
            if problem.is_empty() {
                // toml gives no message for some syntax errors, e.g. a control character
                // in a comment; name what is at the spot rather than print nothing.
                let at = e
                    .span()
                    .and_then(|s| text.get(s.start..))
                    .and_then(|t| t.chars().next());
                problem = match at {
                    Some(c) if c.is_control() => {
                        format!("invalid character {c:?} (control characters are not allowed)")
                    }
                    Some(c) => format!("invalid TOML at {c:?}"),
                    None => "invalid TOML".to_string(),
                };
            }
            ConfigErrors(vec![ConfigError::new(path, place, problem)])
        })?;
        // The one file validation depends on is read here, so that
        // validation itself stays pure.
        let prefixes = validate::PrefixesFile::read(&file, path);
        validate(file, path, prefixes)
    }

    /// What can be known about this host without starting anything, for
    /// `check` and `run` (after [`Config::load`]): every listener and the
    /// metrics endpoint on an address this host has, the control socket
    /// path usable (short enough, not some other file, its directory there
    /// or creatable), and io_uring available when `io_engine = "uring"`.
    /// Nothing is bound, created or kept. Ports are not probed: the running
    /// ringlb a config is checked for usually holds them.
    pub fn check_host(&self) -> Result<(), ConfigErrors> {
        let file = self.source.as_deref().unwrap_or(Path::new("<embedded>"));
        let mut errors = Vec::new();
        let mut err = |place: String, problem: String| errors.push(ConfigError::new(file, place, problem));
        for l in &self.listeners {
            let ty = match l.protocol {
                Protocol::Tcp => socket2::Type::STREAM,
                Protocol::Udp => socket2::Type::DGRAM,
            };
            if let Err(e) = address_is_local(l.bind, ty) {
                err(
                    format!("listener \"{}\": bind", l.name),
                    format!("{}: cannot bind here: {e}", l.bind),
                );
            }
            if l.source == SourceMode::Client {
                if let Err(problem) = crate::transparent::probe() {
                    err(format!("listener \"{}\": source", l.name), problem);
                }
            }
            if l.source == SourceMode::Client {
                if let Err(problem) = crate::transparent::probe() {
                    err(format!("listener \"{}\": source", l.name), problem);
                }
            }
        }
        if let Some(m) = self.control.metrics {
            if let Err(e) = address_is_local(m, socket2::Type::STREAM) {
                err("control.metrics".into(), format!("{m}: cannot bind here: {e}"));
            }
        }
        if let Some(path) = &self.control.socket {
            if let Err(problem) = control_socket_usable(path) {
                err("control.socket".into(), problem);
            }
        }
        if let Some(path) = &self.control.state_file {
            if let Err(problem) = crate::state_file::usable(path) {
                err("control.state_file".into(), problem);
            }
        }
        if let Err(e) = crate::engine::resolve_engine(self.runtime.io_engine) {
            err("runtime.io_engine".into(), e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// A one-line summary, as printed by `ringlb check`.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        format!(
            "{} listener(s), {} pool(s), {} backend(s), {} worker(s)",
            self.listeners.len(),
            self.pools.len(),
            backends,
            self.runtime.workers
        )
    }
}

/// Binds a throwaway socket to `addr`'s IP on an ephemeral port: fails
/// (EADDRNOTAVAIL) when this host does not have the address, whoever holds
/// the port itself.
fn address_is_local(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.bind(&SocketAddr::new(addr.ip(), 0).into())
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

/// Whether ringlb could create its control socket at `path` at start.
fn control_socket_usable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() > MAX_UNIX_PATH {
        return Err(format!(
            "longer than the {MAX_UNIX_PATH} bytes a Unix socket path may have: {}",
            path.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // A stale socket is replaced at start; anything else would be deleted.
        return if meta.file_type().is_socket() {
            Ok(())
        } else {
            Err(format!(
                "{}: exists and is not a socket (ringlb only replaces a stale socket)",
                path.display()
            ))
        };
    }
    // The directory is created at start when missing: the nearest existing
    // ancestor must be a directory ringlb can create entries in.
    let mut dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    loop {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{}: not a directory", dir.display())),
            Err(_) => match dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(up) => dir = up,
                None => return Ok(()),
            },
        }
    }
    let c_dir =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: access() with a valid NUL-terminated path.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!(
            "{}: cannot create the socket there: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

#[cfg(test)]
mod tests;
