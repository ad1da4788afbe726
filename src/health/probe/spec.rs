//! What each protocol check is configured to do (`[pool.health_check]` keys, validated by
//! `config::validate`).

/// `kind = "http"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Request method (`GET`).
    pub method: String,
    /// Request target, starting with `/`.
    pub path: String,
    /// `Host` header; None = the checked address.
    pub host: Option<String>,
    /// Statuses that pass.
    pub expect_status: StatusMatch,
    /// A substring the body must contain (within the read cap).
    pub expect_body: Option<Vec<u8>>,
}

/// Which HTTP statuses pass a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusMatch {
    /// Exactly these.
    Codes(Vec<u16>),
    /// A class: 2 for `"2xx"`.
    Class(u8),
}

impl StatusMatch {
    /// Whether `status` passes.
    pub fn matches(&self, status: u16) -> bool {
        match self {
            StatusMatch::Codes(codes) => codes.contains(&status),
            StatusMatch::Class(c) => status / 100 == u16::from(*c),
        }
    }
}

/// `kind = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresCheck {
    /// Role named in the startup message.
    pub user: String,
    /// Database (None = the server's default, the user's name).
    pub database: Option<String>,
}

/// `kind = "mysql"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlCheck {
    /// Log in as this user (no password) and quit; None = read the greeting
    /// and end the handshake with a protocol-level refusal.
    pub user: Option<String>,
}

/// `kind = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisCheck {
    /// Required replication role (`ROLE`), if any.
    pub role: Option<RedisRole>,
    /// Count `-NOAUTH` (a server that requires a password) as up.
    pub noauth_is_up: bool,
}

/// A Redis server's replication role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisRole {
    /// Writable: `ROLE` says `master`.
    Master,
    /// `ROLE` says `slave`.
    Replica,
}
