//! Configuration errors: each names the file, the place in it, and the problem.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in (`<control>` for control-socket requests).
    pub file: PathBuf,
    /// Where in the file: `pool "web", backend 2: addr`, or `line 7, column 1`.
    pub place: String,
    /// What is wrong, in words an operator can act on.
    pub problem: String,
}

impl ConfigError {
    /// Builds an error for `file` at `place`.
    pub fn new(file: &Path, place: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            place: place.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.place, self.problem)
    }
}

/// Every problem found in one configuration; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
