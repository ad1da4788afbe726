//! `kind = "postgres"`: a protocol 3.0 StartupMessage (no SSLRequest) for the configured
//! user; an authentication request or ReadyForQuery is up, an ErrorResponse is down with
//! its SQLSTATE and message (authentication failures excepted, see [`verdict_on_error`]).

use super::spec::PostgresCheck;
use super::{text, Step, Verdict};

/// Terminate: the polite end of a session that reached ReadyForQuery.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// A PostgreSQL check in progress.
#[derive(Debug, Clone)]
pub struct PostgresExchange {
    check: PostgresCheck,
}

impl PostgresExchange {
    /// The check.
    pub fn new(check: &PostgresCheck) -> PostgresExchange {
        PostgresExchange { check: check.clone() }
    }

    /// The StartupMessage: length, version 3.0, `user`, optional `database`, and an
    /// `application_name` so the check is recognisable in `pg_stat_activity` and logs.
    pub fn startup(&self) -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec(); // 3 << 16 | 0
        let mut param = |k: &str, v: &str| {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        };
        param("user", &self.check.user);
        if let Some(db) = &self.check.database {
            param("database", db);
        }
        param("application_name", "ringlb-health-check");
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        msg
    }

    /// See [`super::Exchange::step`].
    pub fn step(&mut self, reply: &[u8], _ended: bool) -> Step {
        step(&self.check.user, reply)
    }
}

/// Walks the server's messages in `reply`.
///
/// - `R` with code 0 (AuthenticationOk, a `trust` login): read on to ReadyForQuery,
///   then send Terminate, so the server ends the session as a normal disconnect.
/// - `R` with any other code (a password, SCRAM, ...): up; the check then closes
///   without sending anything, which the server treats as a client that went away
///   during authentication and does not log (it cannot tell it from `psql` asking for
///   a password). Sending Terminate here would be logged as a protocol violation.
/// - `E`: see [`verdict_on_error`].
pub fn step(user: &str, reply: &[u8]) -> Step {
    let mut at = 0;
    let mut authenticated = false;
    loop {
        let rest = &reply[at..];
        if rest.len() < 5 {
            return Step::Read;
        }
        let kind = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if !kind.is_ascii_alphabetic() || !(4..=super::MAX_REPLY).contains(&len) {
            return Step::done(Verdict::down(format!(
                "not a PostgreSQL reply: {}",
                super::printable(&rest[..5], 5)
            )));
        }
        let Some(body) = rest.get(5..1 + len) else {
            return Step::Read;
        };
        at += 1 + len;
        match kind {
            b'R' if body.len() >= 4 => {
                let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                if code != 0 {
                    return Step::hang_up(Verdict::up(format!(
                        "postgres asks user {user} for {} authentication",
                        auth_name(code)
                    )));
                }
                authenticated = true;
            }
            b'E' => return Step::done(verdict_on_error(body)),
            // ParameterStatus, BackendKeyData, NoticeResponse, NegotiateProtocolVersion.
            b'S' | b'K' | b'N' | b'v' => {}
            b'Z' if authenticated => {
                return Step::bye(Verdict::up(format!("postgres ready for query as {user}")), &TERMINATE)
            }
            other => {
                return Step::done(Verdict::down(format!(
                    "postgres: unexpected message {:?} during startup",
                    other as char
                )))
            }
        }
    }
}

/// An ErrorResponse during startup. Down with `postgres SQLSTATE: message` (57P03 starting
/// up / shutting down / not accepting connections, 53300 too many connections, ...),
/// except class 28 (28000 no pg_hba.conf entry or role not allowed, 28P01 password
/// failed): the server got past its start-up and connection-limit checks, which come
/// before authentication, so it is running and accepting connections — the problem is
/// the check's credentials, not the backend, and marking a working primary down over
/// them would be an outage. Such a check is up, and its reason says so.
pub fn verdict_on_error(body: &[u8]) -> Verdict {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = text(v, 5),
            Some((b'M', v)) => message = text(v, 200),
            _ => {}
        }
    }
    if code.is_empty() {
        code = "?????".into();
    }
    if code.starts_with("28") {
        Verdict::up(format!(
            "postgres {code}: {message} (the server is accepting connections; the check's user is refused, counted as up)"
        ))
    } else {
        Verdict::down(format!("postgres {code}: {message}"))
    }
}

fn auth_name(code: u32) -> &'static str {
    match code {
        2 => "Kerberos",
        3 => "cleartext password",
        5 => "MD5 password",
        7 => "GSSAPI",
        9 => "SSPI",
        10 => "SASL (SCRAM)",
        _ => "another kind of",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_startup_message_names_user_and_database() {
        let x = PostgresExchange::new(&PostgresCheck {
            user: "app".into(),
            database: Some("db".into()),
        });
        let s = x.startup();
        assert_eq!(u32::from_be_bytes(s[..4].try_into().unwrap()) as usize, s.len());
        assert_eq!(&s[4..8], &[0, 3, 0, 0]);
        assert_eq!(
            &s[8..],
            b"user\0app\0database\0db\0application_name\0ringlb-health-check\0\0"
        );
    }

    #[test]
    fn auth_requests_and_ready_for_query_are_up_and_errors_say_their_sqlstate() {
        let scram = msg(b'R', &[0, 0, 0, 10, b'S', b'C']);
        assert_eq!(
            step("app", &scram),
            Step::hang_up(Verdict::up("postgres asks user app for SASL (SCRAM) authentication"))
        );
        let mut trust = msg(b'R', &[0, 0, 0, 0]);
        trust.extend(msg(b'S', b"server_version\x0015\0"));
        assert_eq!(step("app", &trust), Step::Read);
        trust.extend(msg(b'K', &[0; 8]));
        trust.extend(msg(b'Z', b"I"));
        assert_eq!(
            step("app", &trust),
            Step::bye(Verdict::up("postgres ready for query as app"), &TERMINATE)
        );
        let starting = msg(
            b'E',
            b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0Fpostmaster.c\0\0",
        );
        assert_eq!(
            step("app", &starting),
            Step::done(Verdict::down("postgres 57P03: the database system is starting up"))
        );
        assert_eq!(step("app", &starting[..starting.len() - 3]), Step::Read);
        let auth = msg(b'E', b"SFATAL\0C28000\0Mno pg_hba.conf entry\0\0");
        assert!(
            matches!(step("app", &auth), Step::Done { verdict, .. } if verdict.up && verdict.reason.starts_with("postgres 28000: no pg_hba.conf entry"))
        );
        assert!(matches!(step("app", b"HTTP/1.1 400 Bad"), Step::Done { verdict, .. } if !verdict.up));
    }

    proptest::proptest! {
        #[test]
        fn a_decision_never_depends_on_bytes_after_it(
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            split in 0usize..200,
        ) {
            let split = split.min(reply.len());
            let early = step("u", &reply[..split]);
            if early != Step::Read {
                proptest::prop_assert_eq!(early, step("u", &reply));
            }
        }
    }
}
