//! Event-by-event tests of the connection machine: no socket, no clock.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;
use crate::snapshot::{Backend, PoolSnapshot};

const E_REFUSED: Errno = Errno(libc::ECONNREFUSED);
const E_RESET: Errno = Errno(libc::ECONNRESET);

/// A listener, its pool of `backends` (weights 1) and its counters.
struct World {
    config: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    limits: Arc<ListenerLimits>,
    pool: Arc<PoolSnapshot>,
    now: Instant,
}

impl World {
    fn new(listener_extra: &str, backends: usize) -> World {
        let mut text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7000\"\npool = \"p\"\n{listener_extra}\n[[pool]]\nname = \"p\"\n"
        );
        for i in 0..backends {
            text.push_str(&format!("[[pool.backend]]\naddr = \"127.0.0.1:{}\"\n", 9000 + i));
        }
        let config = Config::parse(&text, Path::new("test.toml")).expect("valid test config");
        let l = config.listeners[0].clone();
        let shared: Vec<Arc<Backend>> = config.pools[0]
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(b.addr, 1)))
            .collect();
        let weights = vec![1; shared.len()];
        let pool = Arc::new(PoolSnapshot::build("p", 1, 65537, shared, weights).expect("distinct backends"));
        World {
            limits: Arc::new(ListenerLimits::new(&l)),
            config: Arc::new(l),
            stats: Arc::new(ListenerStats::new(1)),
            pool,
            now: Instant::now(),
        }
    }

    fn accept(&self, out: &mut Vec<Op>) -> Conn {
        self.accept_from("192.0.2.1:4000".parse().unwrap(), out)
    }

    fn accept_from(&self, peer: SocketAddr, out: &mut Vec<Op>) -> Conn {
        Conn::accept(
            ConnParams {
                config: &self.config,
                stats: &self.stats,
                limits: &self.limits,
                pool: &self.pool,
                peer,
                local: Some("127.0.0.1:7000".parse().unwrap()),
                access_log: crate::config::AccessLog::Off,
                snapshot: None,
            },
            self.now,
            out,
        )
    }

    fn refused(&self, reason: RefuseReason) -> u64 {
        self.stats.refused[reason as usize].get()
    }

    fn refused_total(&self) -> u64 {
        self.stats.refused.iter().map(|c| c.get()).sum()
    }

    /// Every accepted connection ended with exactly one outcome.
    fn assert_outcomes_add_up(&self) {
        assert_eq!(
            self.stats.accepted.get(),
            self.stats.active.opened.get() + self.refused_total(),
            "accepted = relayed + refused"
        );
    }
}

fn take(out: &mut Vec<Op>) -> Vec<Op> {
    std::mem::take(out)
}

fn connect_addr(ops: &[Op]) -> SocketAddr {
    match ops {
        [Op::Connect { addr, .. }] => *addr,
        other => panic!("expected one connect, got {other:?}"),
    }
}

/// A connection that got to relaying, with both receives in flight.
fn relaying(w: &World, out: &mut Vec<Op>) -> Conn {
    let mut c = w.accept(out);
    connect_addr(&take(out));
    c.on_connected(Ok(()), w.now, out);
    assert_eq!(
        take(out),
        vec![
            Op::Recv {
                from: Side::Client,
                via: Via::Buffer
            },
            Op::Recv {
                from: Side::Backend,
                via: Via::Buffer
            }
        ]
    );
    c
}

fn closes(ops: &[Op]) -> usize {
    ops.iter().filter(|o| matches!(o, Op::Close { .. })).count()
}

#[test]
fn a_request_and_its_response_are_relayed_and_counted() {
    let w = World::new("", 2);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    c.on_received(Side::Client, Ok(100), 16384, w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Backend,
            data: Data::Buffer,
            offset: 0,
            len: 100
        }]
    );
    c.on_sent(Side::Backend, Ok(100), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Recv {
            from: Side::Client,
            via: Via::Buffer
        }]
    );
    c.on_received(Side::Backend, Ok(300), 16384, w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Client,
            data: Data::Buffer,
            offset: 0,
            len: 300
        }]
    );
    c.on_sent(Side::Client, Ok(300), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Recv {
            from: Side::Backend,
            via: Via::Buffer
        }]
    );
    assert_eq!(w.stats.bytes_in.get(), 100);
    assert_eq!(w.stats.bytes_out.get(), 300);
    assert_eq!(w.stats.active.current(), 1);
    assert_eq!(w.pool.backends.iter().map(|b| b.stats.conns.current()).sum::<u64>(), 1);
}

#[test]
fn a_short_send_sends_the_rest_before_reading_again() {
    let w = World::new("", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    c.on_received(Side::Client, Ok(1000), 16384, w.now, &mut out);
    take(&mut out);
    c.on_sent(Side::Backend, Ok(400), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Backend,
            data: Data::Buffer,
            offset: 400,
            len: 600
        }]
    );
    c.on_sent(Side::Backend, Ok(600), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Recv {
            from: Side::Client,
            via: Via::Buffer
        }]
    );
    assert_eq!(w.stats.bytes_in.get(), 1000);
}

#[test]
fn half_close_passes_on_and_the_other_direction_continues() {
    let w = World::new("", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    c.on_received(Side::Client, Ok(0), 16384, w.now, &mut out);
    assert_eq!(take(&mut out), vec![Op::ShutdownWrite(Side::Backend)]);
    // The response still flows after the client's FIN.
    c.on_received(Side::Backend, Ok(50), 16384, w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Client,
            data: Data::Buffer,
            offset: 0,
            len: 50
        }]
    );
    c.on_sent(Side::Client, Ok(50), w.now, &mut out);
    take(&mut out);
    c.on_received(Side::Backend, Ok(0), 16384, w.now, &mut out);
    // The last FIN goes with the close: no shutdown(2) just before it.
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: false,
            reset_backend: false
        }]
    );
    assert!(c.is_finished());
    assert_eq!(c.end(), End::Done);
    assert_eq!(w.stats.active.current(), 0);
    w.assert_outcomes_add_up();
}

#[test]
fn a_backend_reset_reaches_the_client_as_a_reset() {
    let w = World::new("", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    c.on_received(Side::Backend, Err(E_RESET), 16384, w.now, &mut out);
    // The client receive is still in flight: abort, then close when it ends.
    assert_eq!(take(&mut out), vec![Op::Abort]);
    c.on_received(Side::Client, Err(Errno::CANCELED), 16384, w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: true,
            reset_backend: false
        }]
    );
    w.assert_outcomes_add_up();
}

#[test]
fn a_failed_connect_tries_the_next_candidate_then_refuses() {
    let w = World::new("connect_attempts = 2", 3);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    let first = connect_addr(&take(&mut out));
    c.on_connected(Err(E_REFUSED), w.now, &mut out);
    let second = connect_addr(&take(&mut out));
    assert_ne!(first, second, "a distinct backend is tried");
    c.on_connected(Err(E_REFUSED), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: false,
            reset_backend: false
        }]
    );
    assert_eq!(w.refused(RefuseReason::ConnectFailed), 1);
    let failures: u64 = w.pool.backends.iter().map(|b| b.stats.connect_failures.get()).sum();
    assert_eq!(failures, 2);
    w.assert_outcomes_add_up();
}

#[test]
fn a_connect_past_its_deadline_is_cancelled_and_counts_as_a_failure() {
    let w = World::new("connect_timeout = \"1s\"\nconnect_attempts = 1", 1);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    let deadline = match take(&mut out)[..] {
        [Op::Connect { deadline, .. }] => deadline,
        ref other => panic!("{other:?}"),
    };
    assert_eq!(deadline, w.now + Duration::from_secs(1));
    assert_eq!(c.deadline(), Some(deadline));
    c.on_timer(w.now + Duration::from_millis(999), &mut out);
    assert!(take(&mut out).is_empty(), "not yet");
    c.on_timer(deadline, &mut out);
    assert_eq!(take(&mut out), vec![Op::CancelConnect]);
    assert_eq!(c.deadline(), None, "cancelled once");
    c.on_connected(Err(Errno::CANCELED), deadline, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.pool.backends[0].consecutive_failures.load(Ordering::Relaxed), 1);
    w.assert_outcomes_add_up();
}

#[test]
fn no_local_port_is_not_the_backends_fault_and_the_next_one_is_tried() {
    let w = World::new("connect_attempts = 2", 2);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    let first = connect_addr(&take(&mut out));
    c.on_connected(Err(Errno(libc::EADDRNOTAVAIL)), w.now, &mut out);
    let second = connect_addr(&take(&mut out));
    assert_ne!(
        first, second,
        "ports are per destination: another backend may have some"
    );
    let failures = |w: &World| -> u64 { w.pool.backends.iter().map(|b| b.stats.connect_failures.get()).sum() };
    assert_eq!(failures(&w), 0, "not counted against the backend (no passive ejection)");
    let in_a_row: u32 = w
        .pool
        .backends
        .iter()
        .map(|b| b.consecutive_failures.load(Ordering::Relaxed))
        .sum();
    assert_eq!(in_a_row, 0);
    c.on_connected(Err(E_REFUSED), w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(failures(&w), 1);
    w.assert_outcomes_add_up();
}

#[test]
fn out_of_memory_or_buffers_is_overload_like_descriptors() {
    for errno in [libc::ENOBUFS, libc::ENOMEM, libc::ENFILE] {
        let w = World::new("", 2);
        let mut out = Vec::new();
        let mut c = w.accept(&mut out);
        take(&mut out);
        c.on_connected(Err(Errno(errno)), w.now, &mut out);
        assert_eq!(closes(&take(&mut out)), 1);
        assert_eq!(w.refused(RefuseReason::Overloaded), 1, "errno {errno}");
        w.assert_outcomes_add_up();
    }
}

#[test]
fn running_out_of_descriptors_is_overload_not_a_backend_failure() {
    let w = World::new("", 2);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    take(&mut out);
    c.on_connected(Err(Errno(libc::EMFILE)), w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.refused(RefuseReason::Overloaded), 1);
    assert_eq!(
        w.pool
            .backends
            .iter()
            .map(|b| b.stats.connect_failures.get())
            .sum::<u64>(),
        0
    );
}

#[test]
fn a_full_backend_is_skipped_without_using_an_attempt() {
    let w = World::new("connect_attempts = 1", 2);
    let mut out = Vec::new();
    // Find the first choice of this client, then fill it.
    let first = {
        let mut c = w.accept(&mut out);
        let a = connect_addr(&take(&mut out));
        c.on_connected(Err(Errno::CANCELED), w.now, &mut out);
        take(&mut out);
        a
    };
    let full = w.pool.backends.iter().find(|b| b.addr == first).unwrap();
    full.slots.set_max(1);
    assert!(full.slots.try_acquire(), "one connection holds its only slot");
    let _c = w.accept(&mut out);
    assert_ne!(connect_addr(&take(&mut out)), first, "spilled over");
    // With every backend full the client is refused as backend_full.
    for b in &w.pool.backends {
        b.slots.set_max(1);
        while b.slots.try_acquire() {}
    }
    let _c = w.accept(&mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.refused(RefuseReason::BackendFull), 1);
}

#[test]
fn the_backend_slot_is_given_back_when_the_connection_ends() {
    let w = World::new("", 1);
    w.pool.backends[0].slots.set_max(5);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    assert_eq!(w.pool.backends[0].slots.current() as u64, 1);
    c.check_close(true, &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
    c.on_received(Side::Client, Err(Errno::CANCELED), 0, w.now, &mut out);
    assert!(take(&mut out).is_empty(), "one op still in flight");
    c.on_received(Side::Backend, Err(Errno::CANCELED), 0, w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.pool.backends[0].slots.current() as u64, 0);
    assert_eq!(c.end(), End::Closed);
}

#[test]
fn an_empty_pool_refuses_with_no_backend() {
    let w = World::new("", 1);
    let empty =
        Arc::new(PoolSnapshot::build("p", 2, 65537, w.pool.backends.clone(), vec![0]).expect("no weight is no table"));
    let mut out = Vec::new();
    let c = Conn::accept(
        ConnParams {
            config: &w.config,
            stats: &w.stats,
            limits: &w.limits,
            pool: &empty,
            peer: "192.0.2.1:1".parse().unwrap(),
            local: None,
            access_log: crate::config::AccessLog::Off,
            snapshot: None,
        },
        w.now,
        &mut out,
    );
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: false,
            reset_backend: false
        }]
    );
    assert!(c.is_finished());
    assert_eq!(w.refused(RefuseReason::NoBackend), 1);
}

#[test]
fn a_rate_limited_client_is_reset() {
    let w = World::new("[listener.rate_limit]\nper_source_rate = 1\nper_source_burst = 1", 1);
    let mut out = Vec::new();
    let _first = w.accept(&mut out);
    connect_addr(&take(&mut out));
    let second = w.accept(&mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: true,
            reset_backend: false
        }]
    );
    assert!(second.is_finished());
    assert_eq!(w.refused(RefuseReason::RateLimited), 1);
}

#[test]
fn the_per_source_count_is_released_at_the_end() {
    let w = World::new("max_connections_per_source = 1", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    let _refused = w.accept(&mut out);
    assert_eq!(w.refused(RefuseReason::SourceLimit), 1);
    take(&mut out);
    c.on_received(Side::Client, Ok(0), 0, w.now, &mut out);
    c.on_received(Side::Backend, Ok(0), 0, w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    let _again = w.accept(&mut out);
    assert!(matches!(take(&mut out)[..], [Op::Connect { .. }]), "admitted again");
}

#[test]
fn the_proxy_header_goes_first_and_client_bytes_wait_for_it() {
    let w = World::new("proxy_protocol = \"v1\"", 1);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    take(&mut out);
    c.on_connected(Ok(()), w.now, &mut out);
    let header = c.proxy_header().to_vec();
    assert!(header.starts_with(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 7000\r\n"));
    assert_eq!(
        take(&mut out),
        vec![
            Op::Send {
                to: Side::Backend,
                data: Data::Header,
                offset: 0,
                len: header.len()
            },
            Op::Recv {
                from: Side::Backend,
                via: Via::Buffer
            }
        ]
    );
    c.on_sent(Side::Backend, Ok(10), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Backend,
            data: Data::Header,
            offset: 10,
            len: header.len() - 10
        }]
    );
    c.on_sent(Side::Backend, Ok(header.len() - 10), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Recv {
            from: Side::Client,
            via: Via::Buffer
        }]
    );
    assert_eq!(w.stats.bytes_in.get(), 0, "the header is not client traffic");
}

#[test]
fn an_idle_connection_times_out_and_activity_moves_the_deadline() {
    let w = World::new("idle_timeout = \"10s\"", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    assert_eq!(c.deadline(), Some(w.now + Duration::from_secs(10)));
    let later = w.now + Duration::from_secs(6);
    c.on_received(Side::Client, Ok(5), 16384, later, &mut out);
    c.on_sent(Side::Backend, Ok(5), later, &mut out);
    take(&mut out);
    c.on_timer(w.now + Duration::from_secs(10), &mut out);
    assert!(take(&mut out).is_empty(), "activity at 6s moved the deadline");
    assert_eq!(c.deadline(), Some(later + Duration::from_secs(10)));
    c.on_timer(later + Duration::from_secs(10), &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
    c.on_received(Side::Client, Err(Errno::CANCELED), 0, w.now, &mut out);
    c.on_received(Side::Backend, Err(Errno::CANCELED), 0, w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(c.end(), End::IdleTimeout);
}

#[test]
fn a_draining_backend_closes_its_connections_when_asked() {
    let w = World::new("", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    c.check_close(false, &mut out);
    assert!(take(&mut out).is_empty(), "not closing");
    w.pool.backends[0].closing.store(true, Ordering::Relaxed);
    c.check_close(false, &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
}

#[test]
fn auto_switches_a_bulk_direction_to_the_pipe() {
    let w = World::new("relay = \"auto\"", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    for _ in 0..AUTO_BULK_READS {
        c.on_received(Side::Backend, Ok(16384), 16384, w.now, &mut out);
        c.on_sent(Side::Client, Ok(16384), w.now, &mut out);
    }
    let ops = take(&mut out);
    assert_eq!(
        ops.last(),
        Some(&Op::Recv {
            from: Side::Backend,
            via: Via::Pipe
        })
    );
    c.on_received(Side::Backend, Ok(65536), 0, w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Client,
            data: Data::Pipe,
            offset: 0,
            len: 65536
        }]
    );
    // A short splice sends the rest from the pipe (offset is meaningless there).
    c.on_sent(Side::Client, Ok(1000), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Client,
            data: Data::Pipe,
            offset: 0,
            len: 64536
        }]
    );
}

#[test]
fn copy_never_switches_and_splice_always_pipes() {
    let w = World::new("relay = \"copy\"", 1);
    let mut out = Vec::new();
    let mut c = relaying(&w, &mut out);
    for _ in 0..10 {
        c.on_received(Side::Backend, Ok(16384), 16384, w.now, &mut out);
        c.on_sent(Side::Client, Ok(16384), w.now, &mut out);
    }
    assert_eq!(
        take(&mut out).last(),
        Some(&Op::Recv {
            from: Side::Backend,
            via: Via::Buffer
        })
    );

    let w = World::new("relay = \"splice\"", 1);
    let mut c = w.accept(&mut out);
    take(&mut out);
    c.on_connected(Ok(()), w.now, &mut out);
    assert!(take(&mut out)
        .iter()
        .all(|o| matches!(o, Op::Recv { via: Via::Pipe, .. })));
}

#[test]
fn abort_while_connecting_waits_for_the_connect_then_closes() {
    let w = World::new("", 1);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    take(&mut out);
    c.check_close(true, &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
    assert!(!c.is_finished());
    c.on_connected(Ok(()), w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.stats.active.current(), 0, "never counted as relaying");
    w.assert_outcomes_add_up();
}

#[test]
fn a_dropped_connection_gives_its_counts_back() {
    let w = World::new("max_connections = 1", 1);
    let mut out = Vec::new();
    let c = relaying(&w, &mut out);
    assert_eq!(w.stats.active.current(), 1);
    drop(c);
    assert_eq!(w.stats.active.current(), 0);
    let _next = w.accept(&mut out);
    assert!(
        matches!(take(&mut out)[..], [Op::Connect { .. }]),
        "the listener slot was released"
    );
}

/// A random driver: whatever the shell reports, in whatever order, every
/// connection ends with exactly one Close, only when nothing is in flight,
/// and the counters add up.
mod property {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        /// Complete the op at this index of the in-flight list with a result.
        Complete(usize, i32),
        Timer(u64),
        Close(bool),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0usize..4, prop_oneof![Just(0), Just(1), Just(500), Just(16384), Just(-libc::ECONNRESET), Just(-libc::ECANCELED), Just(-libc::ECONNREFUSED)])
                .prop_map(|(i, r)| Event::Complete(i, r)),
            1 => (0u64..400).prop_map(Event::Timer),
            1 => any::<bool>().prop_map(Event::Close),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn every_connection_closes_exactly_once_with_nothing_in_flight(
            events in proptest::collection::vec(event(), 0..60),
            extra in prop_oneof![Just(""), Just("relay = \"auto\""), Just("proxy_protocol = \"v2\""), Just("relay = \"splice\"")],
        ) {
            let w = World::new(&format!("idle_timeout = \"100s\"\nconnect_timeout = \"50s\"\n{extra}"), 3);
            let mut out = Vec::new();
            let mut c = w.accept(&mut out);
            let mut in_flight: Vec<Op> = Vec::new();
            let mut closed = 0;
            let mut now = w.now;
            let absorb = |ops: &mut Vec<Op>, in_flight: &mut Vec<Op>, closed: &mut usize| {
                for op in ops.drain(..) {
                    match op {
                        Op::Connect { .. } | Op::Recv { .. } | Op::Send { .. } => {
                            assert_eq!(*closed, 0, "no op after Close");
                            in_flight.push(op);
                        }
                        Op::Close { .. } => {
                            assert!(in_flight.is_empty(), "Close with ops in flight: {in_flight:?}");
                            *closed += 1;
                        }
                        _ => {}
                    }
                }
            };
            absorb(&mut out, &mut in_flight, &mut closed);
            for e in events {
                match e {
                    Event::Complete(i, r) if !in_flight.is_empty() => {
                        let op = in_flight.remove(i % in_flight.len());
                        let res = if r < 0 { Err(Errno(-r)) } else { Ok(r as usize) };
                        match op {
                            Op::Connect { .. } => c.on_connected(res.map(|_| ()), now, &mut out),
                            Op::Recv { from, .. } => c.on_received(from, res, 16384, now, &mut out),
                            Op::Send { to, len, .. } => {
                                let res = res.map(|n| n.clamp(1, len));
                                c.on_sent(to, res, now, &mut out)
                            }
                            _ => unreachable!(),
                        }
                    }
                    Event::Complete(..) => {}
                    Event::Timer(s) => {
                        now += Duration::from_secs(s);
                        c.on_timer(now, &mut out);
                    }
                    Event::Close(force) => c.check_close(force, &mut out),
                }
                absorb(&mut out, &mut in_flight, &mut closed);
            }
            // Drain: abort, and complete everything still in flight.
            c.check_close(true, &mut out);
            absorb(&mut out, &mut in_flight, &mut closed);
            while let Some(op) = in_flight.pop() {
                match op {
                    Op::Connect { .. } => c.on_connected(Err(Errno::CANCELED), now, &mut out),
                    Op::Recv { from, .. } => c.on_received(from, Err(Errno::CANCELED), 0, now, &mut out),
                    Op::Send { to, .. } => c.on_sent(to, Err(Errno::CANCELED), now, &mut out),
                    _ => unreachable!(),
                }
                absorb(&mut out, &mut in_flight, &mut closed);
            }
            prop_assert_eq!(closed, 1);
            prop_assert!(c.is_finished());
            prop_assert_eq!(w.stats.active.current(), 0);
            prop_assert_eq!(
                w.stats.accepted.get(),
                w.stats.active.opened.get() + w.refused_total()
            );
            for b in &w.pool.backends {
                prop_assert_eq!(b.stats.conns.current(), 0);
            }
        }
    }
}

// === the pre-read: accepting PROXY headers, routing by SNI ===

const PRE: Op = Op::Recv {
    from: Side::Client,
    via: Via::Preread,
};

/// Feeds `bytes` as one pre-read receive.
fn feed(c: &mut Conn, bytes: &[u8], now: Instant, out: &mut Vec<Op>) {
    c.preread_space()[..bytes.len()].copy_from_slice(bytes);
    c.on_received(Side::Client, Ok(bytes.len()), 0, now, out);
}

#[test]
fn a_proxy_header_split_over_reads_names_the_client_and_the_rest_is_relayed() {
    let w = World::new(
        "accept_proxy = \"v1\"\ntrusted_sources = [\"192.0.2.0/24\"]\nproxy_protocol = \"v2\"\n",
        1,
    );
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    assert_eq!(take(&mut out), vec![PRE], "no connect before the header");
    assert_eq!(c.deadline(), Some(w.now + Duration::from_secs(3)));
    feed(&mut c, b"PROXY TCP4 203.0.113.9 ", w.now, &mut out);
    assert_eq!(take(&mut out), vec![PRE]);
    feed(&mut c, b"198.51.100.1 4000 443\r\nhello", w.now, &mut out);
    connect_addr(&take(&mut out));
    assert_eq!(c.peer(), "203.0.113.9:4000".parse().unwrap());
    c.on_connected(Ok(()), w.now, &mut out);
    let ops = take(&mut out);
    // The outgoing v2 header carries the header's client and destination.
    let h = crate::proxy::proxy_accept::parse(c.proxy_header(), crate::proxy::proxy_accept::Accept::V2)
        .unwrap()
        .unwrap();
    assert_eq!(
        h.addrs,
        Some(("203.0.113.9:4000".parse().unwrap(), "198.51.100.1:443".parse().unwrap()))
    );
    assert!(
        matches!(
            ops[0],
            Op::Send {
                to: Side::Backend,
                data: Data::Header,
                ..
            }
        ),
        "{ops:?}"
    );
    c.on_sent(Side::Backend, Ok(c.proxy_header().len()), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Send {
            to: Side::Backend,
            data: Data::Preread,
            offset: 0,
            len: 5
        }]
    );
    assert_eq!(c.preread_unsent(), b"hello");
    c.on_sent(Side::Backend, Ok(5), w.now, &mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Recv {
            from: Side::Client,
            via: Via::Buffer
        }]
    );
    assert_eq!(w.stats.bytes_in.get(), 5, "the PROXY header is not client data");
    w.assert_outcomes_add_up();
}

#[test]
fn a_late_header_is_refused_after_its_receive_is_aborted() {
    let w = World::new(
        "accept_proxy = \"any\"\ntrusted_sources = [\"192.0.2.1\"]\nproxy_header_timeout = \"1s\"\n",
        1,
    );
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    take(&mut out);
    feed(&mut c, b"PROXY ", w.now, &mut out);
    take(&mut out);
    c.on_timer(w.now + Duration::from_millis(999), &mut out);
    assert!(out.is_empty());
    c.on_timer(w.now + Duration::from_secs(1), &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
    assert_eq!(c.deadline(), None);
    c.on_received(Side::Client, Err(Errno::CANCELED), 0, w.now, &mut out);
    assert_eq!(closes(&take(&mut out)), 1);
    assert_eq!(w.refused(RefuseReason::ProxyTimeout), 1);
    w.assert_outcomes_add_up();
}

#[test]
fn an_untrusted_source_is_reset_without_a_read() {
    let w = World::new("accept_proxy = \"v2\"\ntrusted_sources = [\"10.0.0.0/8\"]\n", 1);
    let mut out = Vec::new();
    let _c = w.accept(&mut out);
    assert_eq!(
        take(&mut out),
        vec![Op::Close {
            reset_client: true,
            reset_backend: false
        }]
    );
    assert_eq!(w.refused(RefuseReason::ProxyUntrusted), 1);
}

#[test]
fn no_client_hello_by_the_deadline_takes_the_fallback_pool() {
    let w = World::new(
        "sni_timeout = \"1s\"\n[[listener.route]]\nsni = \"a.example\"\npool = \"p\"\n",
        1,
    );
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    assert_eq!(take(&mut out), vec![PRE]);
    c.on_timer(w.now + Duration::from_secs(1), &mut out);
    assert_eq!(take(&mut out), vec![Op::Abort]);
    c.on_received(
        Side::Client,
        Err(Errno::CANCELED),
        0,
        w.now + Duration::from_secs(1),
        &mut out,
    );
    connect_addr(&take(&mut out));
    c.on_connected(Ok(()), w.now, &mut out);
    // Nothing was read: the client is read as usual.
    assert_eq!(
        take(&mut out),
        vec![
            Op::Recv {
                from: Side::Client,
                via: Via::Buffer
            },
            Op::Recv {
                from: Side::Backend,
                via: Via::Buffer
            }
        ]
    );
}

#[test]
fn a_fin_during_the_pre_read_is_passed_on_after_the_bytes() {
    let w = World::new("[[listener.route]]\nsni = \"a.example\"\npool = \"p\"\n", 1);
    let mut out = Vec::new();
    let mut c = w.accept(&mut out);
    take(&mut out);
    feed(&mut c, b"\x16\x03\x01\x00\x10\x01", w.now, &mut out);
    assert_eq!(take(&mut out), vec![PRE]);
    c.on_received(Side::Client, Ok(0), 0, w.now, &mut out);
    connect_addr(&take(&mut out));
    c.on_connected(Ok(()), w.now, &mut out);
    let ops = take(&mut out);
    assert_eq!(
        ops[0],
        Op::Send {
            to: Side::Backend,
            data: Data::Preread,
            offset: 0,
            len: 6
        }
    );
    c.on_sent(Side::Backend, Ok(6), w.now, &mut out);
    assert_eq!(take(&mut out), vec![Op::ShutdownWrite(Side::Backend)]);
}
