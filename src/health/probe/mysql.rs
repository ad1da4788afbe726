//! `kind = "mysql"`: read the server's greeting (protocol 10), answer it with a
//! handshake response for `user` (no password), and end with `COM_QUIT` after an OK.
//!
//! Why a handshake response and not a close after the greeting: MySQL and MariaDB count
//! a connection that ends during the handshake as a connect error of the client's host,
//! and after `max_connect_errors` of them in a row they refuse that host
//! ("1129 Host ... is blocked"), which for a balancer is every client at once. A
//! completed handshake, even one refused with "1045 Access denied", is not counted,
//! and a successful login resets the count (measured against MariaDB 10.11,
//! tests/protocol_checks.rs).

use super::spec::MysqlCheck;
use super::{printable, text, Step, Verdict};

/// The user named when none is configured: the login is refused (1045), which
/// still completes the handshake and names the check in the server's log.
pub const DEFAULT_USER: &str = "ringlb-health-check";

/// `COM_QUIT`, sequence 0.
pub const COM_QUIT: [u8; 5] = [1, 0, 0, 0, 1];

/// CLIENT_LONG_PASSWORD | CLIENT_LONG_FLAG | CLIENT_PROTOCOL_41 |
/// CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH.
const CAPABILITIES: u32 = 0x1 | 0x4 | 0x200 | 0x8000 | 0x8_0000;

/// Where the exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    /// Handshake response sent; the server's answer is next.
    Login,
}

/// A MySQL check in progress.
#[derive(Debug, Clone)]
pub struct MysqlExchange {
    user: String,
    phase: Phase,
    version: String,
}

impl MysqlExchange {
    /// The check.
    pub fn new(check: &MysqlCheck) -> MysqlExchange {
        MysqlExchange {
            user: check.user.clone().unwrap_or_else(|| DEFAULT_USER.into()),
            phase: Phase::Greeting,
            version: String::new(),
        }
    }

    /// See [`super::Exchange::step`].
    pub fn step(&mut self, reply: &[u8], _ended: bool) -> Step {
        let Some((seq, payload)) = packet(reply) else {
            return if reply.len() >= 4 && packet_len(reply) > super::MAX_REPLY {
                Step::done(Verdict::down(format!(
                    "not a MySQL reply: {}",
                    printable(&reply[..4], 4)
                )))
            } else {
                Step::Read
            };
        };
        match (self.phase, payload.first()) {
            (_, Some(0xff)) => Step::done(error(payload, self.phase == Phase::Login)),
            (Phase::Greeting, Some(10)) => match greeting(payload) {
                Some((version, caps)) if caps & 0x200 != 0 => {
                    self.version = version;
                    self.phase = Phase::Login;
                    Step::Send(self.handshake_response(seq.wrapping_add(1)))
                }
                Some((version, _)) => Step::done(Verdict::down(format!(
                    "mysql {version}: server without the 4.1 protocol"
                ))),
                None => Step::done(Verdict::down(format!(
                    "mysql greeting not understood: {}",
                    printable(payload, 40)
                ))),
            },
            (Phase::Greeting, Some(&v)) => Step::done(Verdict::down(format!(
                "not a MySQL greeting (protocol {v}, want 10): {}",
                printable(payload, 24)
            ))),
            (Phase::Login, Some(0x00)) => Step::bye(
                Verdict::up(format!("mysql {} accepted user {}", self.version, self.user)),
                &COM_QUIT,
            ),
            // An authentication method switch: answer with empty auth data (the check
            // has no password) and read on.
            (Phase::Login, Some(0xfe)) => Step::Send(vec![0, 0, 0, seq.wrapping_add(1)]),
            // More authentication data: fast-auth success (3) is followed by OK;
            // anything else wants a password the check does not have.
            (Phase::Login, Some(0x01)) if payload.get(1) == Some(&3) => match packet(&reply[4 + payload.len()..]) {
                Some(_) => self.step(&reply[4 + payload.len()..], _ended),
                None => Step::Read,
            },
            (Phase::Login, Some(0x01)) => Step::hang_up(Verdict::up(format!(
                "mysql {} asks user {} for a password (the server is accepting connections; counted as up)",
                self.version, self.user
            ))),
            (_, other) => Step::done(Verdict::down(format!(
                "mysql: unexpected packet {:?}",
                other.map(|b| format!("0x{b:02x}"))
            ))),
        }
    }

    /// HandshakeResponse41: capabilities, max packet, utf8 charset, the user, empty
    /// auth data, the auth plugin's name.
    fn handshake_response(&self, seq: u8) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.user.len());
        body.extend_from_slice(&CAPABILITIES.to_le_bytes());
        body.extend_from_slice(&(16u32 << 20).to_le_bytes());
        body.push(33); // utf8_general_ci
        body.extend_from_slice(&[0; 23]);
        body.extend_from_slice(self.user.as_bytes());
        body.push(0);
        body.push(0); // auth response length: no password
        body.extend_from_slice(b"mysql_native_password\0");
        let len = body.len() as u32;
        let mut p = len.to_le_bytes()[..3].to_vec();
        p.push(seq);
        p.extend_from_slice(&body);
        p
    }
}

fn packet_len(reply: &[u8]) -> usize {
    usize::from(reply[0]) | usize::from(reply[1]) << 8 | usize::from(reply[2]) << 16
}

/// The first whole packet of `reply`: its sequence number and payload.
fn packet(reply: &[u8]) -> Option<(u8, &[u8])> {
    if reply.len() < 4 {
        return None;
    }
    let len = packet_len(reply);
    reply.get(4..4 + len).map(|p| (reply[3], p))
}

/// Protocol 10 greeting → server version and capability flags.
fn greeting(p: &[u8]) -> Option<(String, u32)> {
    let rest = &p[1..];
    let nul = rest.iter().position(|&b| b == 0)?;
    let version = text(&rest[..nul], 60);
    // thread id (4), auth data part 1 (8), filler (1), then capabilities (low 16 bits).
    let at = nul + 1 + 4 + 8 + 1;
    let low = u32::from(u16::from_le_bytes([*rest.get(at)?, *rest.get(at + 1)?]));
    // charset (1), status (2), then the high 16 bits.
    let high = match (rest.get(at + 5), rest.get(at + 6)) {
        (Some(&a), Some(&b)) => u32::from(u16::from_le_bytes([a, b])),
        _ => 0,
    };
    Some((version, low | high << 16))
}

/// An ERR packet: `mysql CODE message`. During the login, 1045 (access denied) and the
/// other SQLSTATE 28000 errors mean the server is up and talking — the check's user is
/// refused — so they count as up, as the postgres check counts class 28.
fn error(p: &[u8], login: bool) -> Verdict {
    let code = match p.get(1..3) {
        Some(c) => u16::from_le_bytes([c[0], c[1]]),
        None => return Verdict::down("mysql error packet without a code"),
    };
    let mut msg = &p[3..];
    let mut state = "";
    if msg.first() == Some(&b'#') && msg.len() >= 6 {
        state = std::str::from_utf8(&msg[1..6]).unwrap_or("");
        msg = &msg[6..];
    }
    let message = text(msg, 200);
    if login && (code == 1045 || state == "28000") {
        Verdict::up(format!(
            "mysql {code} {message} (the server is accepting connections; the check's user is refused, counted as up)"
        ))
    } else {
        Verdict::down(format!("mysql {code} {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(seq);
        p.extend_from_slice(payload);
        p
    }

    fn greeting_packet() -> Vec<u8> {
        let mut g = vec![10];
        g.extend_from_slice(b"10.11.19-MariaDB\0");
        g.extend_from_slice(&[1, 0, 0, 0]);
        g.extend_from_slice(b"abcdefgh\0");
        g.extend_from_slice(&0xf7feu16.to_le_bytes());
        g.push(33);
        g.extend_from_slice(&[2, 0]);
        g.extend_from_slice(&0x81bfu16.to_le_bytes());
        g.push(21);
        g.extend_from_slice(&[0; 10]);
        g.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        pkt(0, &g)
    }

    #[test]
    fn greeting_then_login_then_quit() {
        let mut x = MysqlExchange::new(&MysqlCheck {
            user: Some("app".into()),
        });
        let g = greeting_packet();
        assert_eq!(x.step(&g[..10], false), Step::Read);
        let Step::Send(resp) = x.step(&g, false) else {
            panic!("a handshake response")
        };
        assert_eq!(resp[3], 1, "sequence follows the greeting's");
        assert_eq!(packet_len(&resp), resp.len() - 4);
        assert!(resp.windows(5).any(|w| w == b"app\0\0"), "user, then empty auth data");
        assert_eq!(
            x.step(&pkt(2, &[0, 0, 0, 2, 0, 0, 0]), false),
            Step::bye(Verdict::up("mysql 10.11.19-MariaDB accepted user app"), &COM_QUIT)
        );
    }

    #[test]
    fn errors_carry_code_and_text_and_access_denied_is_up() {
        let mut x = MysqlExchange::new(&MysqlCheck { user: None });
        let mut e = vec![0xff];
        e.extend_from_slice(&1040u16.to_le_bytes());
        e.extend_from_slice(b"Too many connections");
        assert_eq!(
            x.step(&pkt(0, &e), false),
            Step::done(Verdict::down("mysql 1040 Too many connections"))
        );
        let mut x = MysqlExchange::new(&MysqlCheck { user: None });
        assert!(matches!(x.step(&greeting_packet(), false), Step::Send(_)));
        let mut denied = vec![0xff];
        denied.extend_from_slice(&1045u16.to_le_bytes());
        denied.extend_from_slice(b"#28000Access denied for user 'ringlb-health-check'@'10.0.0.1'");
        let Step::Done { verdict, .. } = x.step(&pkt(2, &denied), false) else {
            panic!()
        };
        assert!(
            verdict.up && verdict.reason.starts_with("mysql 1045 Access denied"),
            "{verdict:?}"
        );
        let mut x = MysqlExchange::new(&MysqlCheck { user: None });
        assert!(matches!(x.step(b"+PONG\r\n", false), Step::Done { verdict, .. } if !verdict.up));
    }

    proptest::proptest! {
        #[test]
        fn a_decision_never_depends_on_bytes_after_it(
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            split in 0usize..200,
        ) {
            let split = split.min(reply.len());
            let mut a = MysqlExchange::new(&MysqlCheck { user: None });
            let mut b = a.clone();
            let early = a.step(&reply[..split], false);
            if early != Step::Read {
                proptest::prop_assert_eq!(early, b.step(&reply, false));
            }
        }
    }
}
