//! `kind = "redis"`: `PING` (and `ROLE` when a role is required) then `QUIT`, sent
//! together; `+PONG` is up, and `ROLE`'s first element must name the wanted role.

use super::spec::{RedisCheck, RedisRole};
use super::{printable, text, Step, Verdict};

/// A Redis check in progress.
#[derive(Debug, Clone)]
pub struct RedisExchange {
    check: RedisCheck,
}

impl RedisExchange {
    /// The check.
    pub fn new(check: &RedisCheck) -> RedisExchange {
        RedisExchange { check: check.clone() }
    }

    /// The commands, pipelined in one write: the server answers them in order and
    /// closes after `QUIT`, so the check ends with the server's close.
    pub fn commands(&self) -> Vec<u8> {
        let mut c = b"PING\r\n".to_vec();
        if self.check.role.is_some() {
            c.extend_from_slice(b"ROLE\r\n");
        }
        c.extend_from_slice(b"QUIT\r\n");
        c
    }

    /// See [`super::Exchange::step`].
    pub fn step(&mut self, reply: &[u8], _ended: bool) -> Step {
        match verdict(&self.check, reply) {
            Some(v) => Step::done(v),
            None => Step::Read,
        }
    }
}

/// The verdict on the replies so far, or None while incomplete.
pub fn verdict(check: &RedisCheck, reply: &[u8]) -> Option<Verdict> {
    let (first, at) = match value(reply, 0, 0) {
        Parsed::Incomplete => return None,
        Parsed::Invalid => {
            return Some(Verdict::down(format!(
                "not a Redis reply: {}",
                printable(first_line(reply, 0), 40)
            )))
        }
        Parsed::Value(v, at) => (v, at),
    };
    match first {
        Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => {}
        Value::Error(e) if e.starts_with(b"NOAUTH") && check.noauth_is_up => {
            return Some(Verdict::up(format!(
                "redis requires AUTH ({}), counted as up (noauth_is_up)",
                text(&e, 80)
            )))
        }
        Value::Error(e) => return Some(Verdict::down(format!("redis -{}", text(&e, 160)))),
        _ => {
            return Some(Verdict::down(format!(
                "redis answered PING with {}",
                printable(&reply[..at], 40)
            )))
        }
    }
    let Some(want) = check.role else {
        return Some(Verdict::up("redis PONG"));
    };
    let role = match role(reply, at) {
        Parsed::Incomplete => return None,
        Parsed::Invalid => {
            return Some(Verdict::down(format!(
                "redis ROLE reply not understood: {}",
                printable(first_line(reply, at), 60)
            )))
        }
        Parsed::Value(Err(e), _) => return Some(Verdict::down(format!("redis ROLE: -{}", text(&e, 160)))),
        Parsed::Value(Ok(r), _) => r,
    };
    let (want_name, ok) = match want {
        RedisRole::Master => ("master", role.name == "master"),
        RedisRole::Replica => ("replica", role.name == "slave"),
    };
    let described = match &role.master {
        Some(of) => format!("redis role is {} of {of}", role.name),
        None => format!("redis role is {}", role.name),
    };
    Some(if ok {
        Verdict::up(described)
    } else {
        Verdict::down(format!("{described}, want {want_name}"))
    })
}

/// What `ROLE` said.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Role {
    /// `master`, `slave` or `sentinel`.
    name: String,
    /// For a replica: `ip:port (state)` of its master.
    master: Option<String>,
}

/// The `ROLE` reply at `at`: only its first element (and a replica's master address and
/// link state) is read, so a master with many replicas does not need the whole array.
fn role(reply: &[u8], at: usize) -> Parsed<Result<Role, Vec<u8>>> {
    let Some((line, mut at)) = line(reply, at) else {
        return Parsed::Incomplete;
    };
    match line.split_first() {
        Some((b'-', e)) => return Parsed::Value(Err(e.to_vec()), at),
        Some((b'*', n)) if parse_int(n).is_some_and(|n| n >= 1) => {}
        _ => return Parsed::Invalid,
    }
    let mut items = Vec::new();
    let want = |items: &Vec<Value>| match items.first() {
        Some(Value::Bulk(b)) if b == b"slave" => 4,
        _ => 1,
    };
    while items.len() < want(&items) {
        match value(reply, at, 1) {
            Parsed::Incomplete => return Parsed::Incomplete,
            Parsed::Invalid => return Parsed::Invalid,
            Parsed::Value(v, next) => {
                items.push(v);
                at = next;
            }
        }
    }
    let name = match &items[0] {
        Value::Bulk(b) => text(b, 20),
        _ => return Parsed::Invalid,
    };
    let master = match (items.get(1), items.get(2), items.get(3)) {
        (Some(Value::Bulk(ip)), Some(Value::Int(port)), Some(Value::Bulk(state))) => {
            Some(format!("{}:{port} ({})", text(ip, 64), text(state, 20)))
        }
        _ => None,
    };
    Parsed::Value(Ok(Role { name, master }), at)
}

/// A RESP value (nested arrays are skipped, not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    Other,
}

enum Parsed<T> {
    Incomplete,
    Invalid,
    Value(T, usize),
}

/// Deepest array nesting read (ROLE's replica list is depth 2).
const MAX_DEPTH: usize = 4;

/// The RESP value starting at `at`, and where the next begins.
fn value(reply: &[u8], at: usize, depth: usize) -> Parsed<Value> {
    let Some((line, next)) = line(reply, at) else {
        return Parsed::Incomplete;
    };
    let Some((&kind, rest)) = line.split_first() else {
        return Parsed::Invalid;
    };
    match kind {
        b'+' => Parsed::Value(Value::Simple(rest.to_vec()), next),
        b'-' => Parsed::Value(Value::Error(rest.to_vec()), next),
        b':' => match parse_int(rest) {
            Some(n) => Parsed::Value(Value::Int(n), next),
            None => Parsed::Invalid,
        },
        b'$' => match parse_int(rest) {
            Some(-1) => Parsed::Value(Value::Other, next),
            Some(n) if (0..=super::MAX_REPLY as i64).contains(&n) => {
                let end = next + n as usize;
                match reply.get(end..end + 2) {
                    None => Parsed::Incomplete,
                    Some(b"\r\n") => Parsed::Value(Value::Bulk(reply[next..end].to_vec()), end + 2),
                    Some(_) => Parsed::Invalid,
                }
            }
            _ => Parsed::Invalid,
        },
        b'*' if depth < MAX_DEPTH => match parse_int(rest) {
            Some(-1) => Parsed::Value(Value::Other, next),
            Some(n) if (0..=super::MAX_REPLY as i64).contains(&n) => {
                let mut at = next;
                for _ in 0..n {
                    match value(reply, at, depth + 1) {
                        Parsed::Value(_, after) => at = after,
                        other => return other,
                    }
                }
                Parsed::Value(Value::Other, at)
            }
            _ => Parsed::Invalid,
        },
        _ => Parsed::Invalid,
    }
}

/// The line at `at` (up to its CRLF, or all that is there): what a reason quotes, so
/// that it does not depend on bytes after the ones that decided.
fn first_line(reply: &[u8], at: usize) -> &[u8] {
    let rest = &reply[at.min(reply.len())..];
    let end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(rest.len());
    &rest[..end]
}

/// The line at `at` without its CRLF, and where the next begins.
fn line(reply: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = reply.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn parse_int(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(role: Option<RedisRole>, noauth_is_up: bool) -> RedisCheck {
        RedisCheck { role, noauth_is_up }
    }

    const MASTER: &[u8] = b"+PONG\r\n*3\r\n$6\r\nmaster\r\n:3129659\r\n*2\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n$7\r\n3129242\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9002\r\n$7\r\n3129543\r\n";
    const REPLICA: &[u8] = b"+PONG\r\n*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:9000\r\n$9\r\nconnected\r\n:3167038\r\n";

    #[test]
    fn ping_and_role_decide() {
        assert_eq!(
            RedisExchange::new(&check(Some(RedisRole::Master), false)).commands(),
            b"PING\r\nROLE\r\nQUIT\r\n"
        );
        assert_eq!(
            verdict(&check(None, false), b"+PONG\r\n"),
            Some(Verdict::up("redis PONG"))
        );
        assert_eq!(verdict(&check(None, false), b"+PON"), None);
        let m = check(Some(RedisRole::Master), false);
        assert_eq!(verdict(&m, MASTER), Some(Verdict::up("redis role is master")));
        assert_eq!(
            verdict(&m, REPLICA),
            Some(Verdict::down(
                "redis role is slave of 127.0.0.1:9000 (connected), want master"
            ))
        );
        let r = check(Some(RedisRole::Replica), false);
        assert!(verdict(&r, REPLICA).unwrap().up);
        assert!(!verdict(&r, MASTER).unwrap().up);
        // The master's replica list need not be complete to decide.
        assert_eq!(verdict(&m, &MASTER[..30]), Some(Verdict::up("redis role is master")));
        assert_eq!(verdict(&m, &MASTER[..20]), None);
    }

    #[test]
    fn errors_say_what_redis_said_and_noauth_is_up_only_when_configured() {
        let noauth = b"-NOAUTH Authentication required.\r\n";
        assert_eq!(
            verdict(&check(None, false), noauth),
            Some(Verdict::down("redis -NOAUTH Authentication required."))
        );
        assert!(verdict(&check(None, true), noauth).unwrap().up);
        let loading = b"-LOADING Redis is loading the dataset in memory\r\n";
        assert!(!verdict(&check(None, true), loading).unwrap().up);
        assert!(!verdict(&check(None, false), b"HTTP/1.1 400\r\n").unwrap().up);
    }

    proptest::proptest! {
        #[test]
        fn a_decision_never_depends_on_bytes_after_it(
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            split in 0usize..200,
        ) {
            let c = check(Some(RedisRole::Master), false);
            let split = split.min(reply.len());
            if let Some(early) = verdict(&c, &reply[..split]) {
                proptest::prop_assert_eq!(Some(early), verdict(&c, &reply));
            }
        }

        #[test]
        fn role_replies_split_anywhere_give_the_same_verdict(split in 0usize..REPLICA.len()) {
            let c = check(Some(RedisRole::Master), false);
            let early = verdict(&c, &REPLICA[..split]);
            proptest::prop_assert!(early.is_none() || early == verdict(&c, REPLICA));
        }
    }
}
