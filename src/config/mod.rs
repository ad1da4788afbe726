//! Configuration: TOML file → raw structs → one validated, typed [`Config`].
//!
//! The same validation serves the file at start, reloads and control commands,
//! so a setting that could never start ringlb can never be applied at runtime.
//! Types are in [`types`], validation in [`validate`], the file as written in
//! [`file`]; this module reads files. Checks against the host (addresses,
//! io_uring, the control socket's path) are start-up's: `crate::host_check`.

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

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

#[cfg(test)]
mod tests;
