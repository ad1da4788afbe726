//! The connection core allocates nothing per request: a counting global
//! allocator watches a connection relay thousands of request/response
//! exchanges, event by event, after one warm-up exchange.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ringlb::admission::limits::ListenerLimits;
use ringlb::config::Config;
use ringlb::conn::{Conn, ConnParams, Op, Side};
use ringlb::snapshot::{Backend, PoolSnapshot};
use ringlb::stats::ListenerStats;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_relayed_request_and_response_allocate_nothing() {
    let text = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7000\"\npool = \"p\"\nproxy_protocol = \"v2\"\n\
                [[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:9000\"\n[[pool.backend]]\naddr = \"127.0.0.1:9001\"\n";
    let config = Config::parse(text, Path::new("t.toml")).unwrap();
    let listener = Arc::new(config.listeners[0].clone());
    let backends: Vec<Arc<Backend>> = config.pools[0]
        .backends
        .iter()
        .map(|b| Arc::new(Backend::new(b.addr, 1)))
        .collect();
    let pool = Arc::new(PoolSnapshot::build("p", 1, 65537, backends, vec![1, 1]).unwrap());
    let stats = Arc::new(ListenerStats::new(1));
    let limits = Arc::new(ListenerLimits::new(&listener));
    let mut out: Vec<Op> = Vec::with_capacity(8);
    let now = Instant::now();
    let mut conn = Conn::accept(
        ConnParams {
            config: &listener,
            stats: &stats,
            limits: &limits,
            pool: &pool,
            peer: "192.0.2.1:5000".parse().unwrap(),
            local: Some("127.0.0.1:7000".parse().unwrap()),
            access_log: ringlb::config::AccessLog::Off,
            snapshot: None,
        },
        now,
        &mut out,
    );
    out.clear();
    conn.on_connected(Ok(()), now, &mut out);
    let header = conn.proxy_header().len();
    out.clear();
    conn.on_sent(Side::Backend, Ok(header), now, &mut out);
    out.clear();
    let exchange = |conn: &mut Conn, out: &mut Vec<Op>| {
        conn.on_received(Side::Client, Ok(120), 16384, now, out);
        conn.on_sent(Side::Backend, Ok(60), now, out);
        conn.on_sent(Side::Backend, Ok(60), now, out);
        conn.on_received(Side::Backend, Ok(300), 16384, now, out);
        conn.on_sent(Side::Client, Ok(300), now, out);
        conn.on_timer(now, out);
        out.clear();
    };
    exchange(&mut conn, &mut out);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10_000 {
        exchange(&mut conn, &mut out);
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocated, 0, "allocations over 10,000 exchanges");
    assert_eq!(stats.bytes_in.get(), 120 * 10_001);
}
