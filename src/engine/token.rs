//! What a completion or readiness event is about, packed in 64 bits (the
//! io_uring `user_data` and the epoll event data).

/// The kind of operation or source an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Nothing to do on completion (close, shutdown, cancel, linked timeout).
    Ignore = 0,
    /// The worker's waker (commands, stopped listeners).
    Waker,
    /// An accept on listener `index`.
    Accept,
    /// A backend connect.
    Connect,
    /// A receive from the client (buffer) or its readiness (epoll).
    RecvClient,
    /// A receive from the backend.
    RecvBackend,
    /// A send to the client.
    SendClient,
    /// A send to the backend.
    SendBackend,
    /// The client socket became readable (splice on the ring).
    PollInClient,
    /// The backend socket became readable (splice on the ring).
    PollInBackend,
    /// The client socket became writable (splice on the ring).
    PollOutClient,
    /// The backend socket became writable (splice on the ring).
    PollOutBackend,
    /// Setting `TCP_NODELAY` on a backend socket on the ring failed.
    SockOpt,
    /// A UDP listener socket has client datagrams.
    UdpIn,
    /// A UDP listener's flow sockets have replies (their epoll set is readable).
    UdpReplies,
}

impl Kind {
    const ALL: [Kind; 15] = [
        Kind::Ignore,
        Kind::Waker,
        Kind::Accept,
        Kind::Connect,
        Kind::RecvClient,
        Kind::RecvBackend,
        Kind::SendClient,
        Kind::SendBackend,
        Kind::PollInClient,
        Kind::PollInBackend,
        Kind::PollOutClient,
        Kind::PollOutBackend,
        Kind::SockOpt,
        Kind::UdpIn,
        Kind::UdpReplies,
    ];
}

/// kind (8 bits) | generation (24 bits) | index (32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub u64);

impl Token {
    /// A token for `kind` on slot `index` of generation `gen`.
    #[inline]
    pub fn new(kind: Kind, index: u32, gen: u32) -> Token {
        Token(((kind as u64) << 56) | (((gen & 0xff_ffff) as u64) << 32) | index as u64)
    }

    /// The kind (unknown values read as [`Kind::Ignore`]).
    #[inline]
    pub fn kind(self) -> Kind {
        Kind::ALL.get((self.0 >> 56) as usize).copied().unwrap_or(Kind::Ignore)
    }

    /// The slot index.
    #[inline]
    pub fn index(self) -> u32 {
        self.0 as u32
    }

    /// The slot generation (24 bits).
    #[inline]
    pub fn gen(self) -> u32 {
        ((self.0 >> 32) & 0xff_ffff) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for kind in Kind::ALL {
            let t = Token::new(kind, 0xdead_beef, 0x12_3456);
            assert_eq!((t.kind(), t.index(), t.gen()), (kind, 0xdead_beef, 0x12_3456));
        }
        assert_eq!(
            Token::new(Kind::Connect, 1, 0x1ff_ffff).gen(),
            0xff_ffff,
            "gen wraps at 24 bits"
        );
    }
}
