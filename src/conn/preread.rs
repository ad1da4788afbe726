//! The bounded pre-read of a connection's first bytes: a PROXY header to take off, a ClientHello to route by.
//!
//! Only listeners with `accept_proxy` or `[[listener.route]]` have one; the
//! others never build it. The bytes are read into a buffer of the
//! connection's own, parsed as they arrive (across any number of reads),
//! and what follows the PROXY header (the ClientHello included) is sent to
//! the backend unchanged once it is connected.

use std::net::SocketAddr;
use std::time::Instant;

use crate::config::preread::SniFallback;
use crate::config::ListenerConfig;
use crate::proxy::client_hello::{self, Hello, MAX_HELLO};
use crate::proxy::proxy_accept::{self, ProxyError, MAX_HEADER};
use crate::stats::RefuseReason;

/// What is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The PROXY header.
    Proxy,
    /// The ClientHello.
    Hello,
    /// Read: waiting to be sent to the backend.
    Done,
}

/// Where a finished pre-read sends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// The listener's own pool.
    Default,
    /// `[[listener.route]]` entry N.
    Entry(u16),
}

/// What the bytes so far decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Read more.
    More,
    /// Done: connect (through `route`).
    Connect(Route),
    /// Refuse the client.
    Refuse(RefuseReason),
}

/// The pre-read state of one connection.
pub(super) struct Preread {
    buf: Box<[u8]>,
    /// Bytes read.
    pub(super) len: usize,
    /// First byte for the backend (after the PROXY header).
    pub(super) start: usize,
    /// Bytes of `buf[start..len]` already sent to the backend.
    pub(super) sent: usize,
    pub(super) stage: Stage,
    /// When the current stage times out.
    pub(super) deadline: Instant,
    /// The client's FIN was read.
    pub(super) eof: bool,
    /// The deadline passed and the receive in flight was aborted.
    pub(super) timed_out: bool,
    /// The addresses the PROXY header carried (`None`: own addresses).
    pub(super) addrs: Option<(SocketAddr, SocketAddr)>,
}

impl Preread {
    /// A pre-read for a listener with `accept_proxy` and/or SNI routes.
    pub(super) fn new(config: &ListenerConfig, now: Instant) -> Preread {
        let cap = config.accept_proxy.as_ref().map_or(0, |_| MAX_HEADER) + config.sni.as_ref().map_or(0, |_| MAX_HELLO);
        let (stage, deadline) = match (&config.accept_proxy, &config.sni) {
            (Some(p), _) => (Stage::Proxy, now + p.timeout),
            (None, Some(s)) => (Stage::Hello, now + s.timeout),
            (None, None) => (Stage::Done, now),
        };
        Preread {
            buf: vec![0; cap].into_boxed_slice(),
            len: 0,
            start: 0,
            sent: 0,
            stage,
            deadline,
            eof: false,
            timed_out: false,
            addrs: None,
        }
    }

    /// Where the next read goes.
    pub(super) fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// The bytes for the backend not sent yet.
    pub(super) fn unsent(&self) -> &[u8] {
        &self.buf[self.start + self.sent..self.len]
    }

    /// The ClientHello's server name, if one was read.
    pub(super) fn sni(&self) -> Option<&[u8]> {
        match client_hello::server_name(&self.buf[self.start..self.len]) {
            Hello::Sni(n) => Some(n),
            _ => None,
        }
    }

    /// Takes what was read (or the deadline, or the end of stream) and
    /// says what follows. `now` starts the next stage's clock.
    pub(super) fn advance(&mut self, config: &ListenerConfig, now: Instant) -> Step {
        if self.stage == Stage::Proxy {
            let accept = config.accept_proxy.as_ref().expect("proxy stage has accept_proxy");
            match proxy_accept::parse(&self.buf[..self.len], accept.accept) {
                Ok(Some(p)) => {
                    self.start = p.len;
                    self.addrs = p.addrs;
                    match &config.sni {
                        Some(s) => {
                            self.stage = Stage::Hello;
                            self.deadline = now + s.timeout;
                        }
                        None => self.stage = Stage::Done,
                    }
                }
                Ok(None) if self.timed_out => return Step::Refuse(RefuseReason::ProxyTimeout),
                Ok(None) if self.eof => return Step::Refuse(RefuseReason::ClientClosed),
                Ok(None) => return Step::More,
                Err(ProxyError::Oversized) => return Step::Refuse(RefuseReason::ProxyOversized),
                Err(_) => return Step::Refuse(RefuseReason::ProxyMalformed),
            }
        }
        if self.stage == Stage::Hello {
            let Some(sni) = &config.sni else {
                self.stage = Stage::Done;
                return Step::Connect(Route::Default);
            };
            let hello = client_hello::server_name(&self.buf[self.start..self.len]);
            let incomplete = hello == Hello::Incomplete;
            if incomplete && !self.timed_out && !self.eof && self.len < self.buf.len() {
                return Step::More;
            }
            let name = match hello {
                Hello::Sni(n) => Some(n),
                _ => None,
            };
            self.stage = Stage::Done;
            return match (name.and_then(|n| sni.route(n)), sni.fallback) {
                (Some(i), _) => Step::Connect(Route::Entry(i as u16)),
                (None, SniFallback::Default) => Step::Connect(Route::Default),
                (None, SniFallback::Refuse) if self.timed_out && incomplete => Step::Refuse(RefuseReason::SniTimeout),
                (None, SniFallback::Refuse) => Step::Refuse(RefuseReason::SniUnmatched),
            };
        }
        Step::Connect(Route::Default)
    }
}
