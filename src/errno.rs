//! Whose fault a socket error is: the one classification of errno values
//! that the data path, the accept loops, the health checks and the UDP
//! forwarders share, so they never disagree about what counts against a
//! backend.
//!
//! The rule: an error counts against a backend only when it is the
//! backend's (or the network's) answer. A shortage in this process or host
//! (descriptors, memory, socket buffers, local ports) says nothing about
//! the backend: a health check that meets it is "not run" and leaves the
//! backend's state as it was, and a proxied connect that meets it is not a
//! passive failure (no ejection).

/// What a failed outgoing connect (TCP connect, UDP socket to a backend,
/// health check) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectBlame {
    /// Out of descriptors, memory or socket buffers here: no other backend
    /// would do better, so a proxied connection is refused as `overloaded`.
    OutOfResources,
    /// EADDRNOTAVAIL: no free local port toward that backend (or the local
    /// address went away). Ours, not the backend's; ports are counted per
    /// destination, so another backend may still work and is tried.
    NoLocalAddress,
    /// The backend's or the network's answer (refused, reset, unreachable,
    /// timed out, ...): a passive failure of the backend.
    Backend,
}

/// Classifies a connect-side errno (positive).
pub fn connect_blame(errno: i32) -> ConnectBlame {
    match errno {
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => ConnectBlame::OutOfResources,
        libc::EADDRNOTAVAIL => ConnectBlame::NoLocalAddress,
        _ => ConnectBlame::Backend,
    }
}

/// Whether a failed accept (positive errno) is a shortage here, after which
/// the accept loop sheds pending clients and pauses (the same shortages
/// as [`ConnectBlame::OutOfResources`]; EADDRNOTAVAIL does not occur).
pub fn accept_is_shortage(errno: i32) -> bool {
    connect_blame(errno) == ConnectBlame::OutOfResources
}

/// Whether a failed UDP send toward a backend on its connected socket
/// (positive errno) counts against it: only ECONNREFUSED, the ICMP port
/// unreachable an earlier datagram drew. Anything else (a full socket
/// buffer, memory) is ours: the datagram is dropped and counted as such.
pub fn udp_send_blames_backend(errno: i32) -> bool {
    errno == libc::ECONNREFUSED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_here_are_never_the_backends_fault() {
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(connect_blame(e), ConnectBlame::OutOfResources);
            assert!(accept_is_shortage(e));
            assert!(!udp_send_blames_backend(e));
        }
        assert_eq!(connect_blame(libc::EADDRNOTAVAIL), ConnectBlame::NoLocalAddress);
        assert!(!accept_is_shortage(libc::EADDRNOTAVAIL));
        for e in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
        ] {
            assert_eq!(connect_blame(e), ConnectBlame::Backend);
        }
        assert!(udp_send_blames_backend(libc::ECONNREFUSED));
        assert!(!udp_send_blames_backend(libc::EAGAIN));
    }
}
