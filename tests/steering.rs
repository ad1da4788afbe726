//! Connection steering by CPU (`pin_workers = true`) through the real
//! binary, on both io engines: a connection made from a client thread
//! pinned to CPU c lands on the worker pinned to CPU c (on loopback the
//! SYN is processed on the sending CPU), as `ctl status` counts them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::thread;

use common::*;

/// Connections each client CPU makes per phase.
const N: usize = 48;

/// The CPUs ringlb pins over (what it sees: the same affinity and cgroup
/// limits as this process), or `None` with the reason to skip.
fn cpus_or_skip() -> Option<usize> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!("skipped: steering by CPU needs 2 CPUs, this machine gives ringlb {cpus}");
        return None;
    }
    // SAFETY: a zeroed cpu_set_t is valid and sched_getaffinity writes
    // within the size given.
    let allowed = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_ISSET(0, &set)
            && libc::CPU_ISSET(1, &set)
    };
    if !allowed {
        println!("skipped: this process may not run on CPUs 0 and 1 (worker N is pinned to CPU N)");
        return None;
    }
    Some(cpus)
}

struct Lb {
    lb: Ringlb,
    sock: std::path::PathBuf,
    listen: SocketAddr,
    _echo: Backend,
    _dir: TempDir,
}

fn config(engine: &str, workers: usize, pin: bool, sock: &Path, listeners: &[SocketAddr], echo: SocketAddr) -> String {
    let mut c = format!(
        "[runtime]\nworkers = {workers}\nio_engine = \"{engine}\"\npin_workers = {pin}\nshutdown_timeout = \"2s\"\n\n[control]\nsocket = \"{}\"\n\n",
        sock.display()
    );
    for (i, addr) in listeners.iter().enumerate() {
        c.push_str(&format!(
            "[[listener]]\nname = \"l{i}\"\nbind = \"{addr}\"\npool = \"p\"\nconnect_timeout = \"1s\"\n\n"
        ));
    }
    c.push_str(&format!(
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"{echo}\"\n"
    ));
    c
}

fn start(engine: &str, workers: usize, pin: bool) -> Lb {
    let echo = Backend::start("echo", Behaviour::Echo);
    let dir = TempDir::new("steer");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let lb = Ringlb::start(&config(engine, workers, pin, &sock, &[listen], echo.addr), listen);
    Lb {
        lb,
        sock,
        listen,
        _echo: echo,
        _dir: dir,
    }
}

/// Accepted connections per worker, from `ctl status`.
fn accepted(sock: &Path) -> Vec<u64> {
    let (code, v) = ctl_json(sock, &["status"]);
    assert_eq!(code, 0, "{v}");
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["accepted"].as_u64().expect("accepted per worker"))
        .collect()
}

/// `n` connections to `to`, one after another, from a thread pinned to
/// `cpu`; each one echoes a line, so ringlb has accepted it on return.
fn connect_from_cpu(cpu: usize, to: SocketAddr, n: usize) {
    thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it;
        // pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(
                rc,
                0,
                "pinning the client to cpu {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
        for i in 0..n {
            let mut s = connect_from(to, None).unwrap_or_else(|e| panic!("cpu {cpu}, connection {i}: {e}"));
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            s.write_all(b"hi\n").unwrap();
            let mut got = [0u8; 3];
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("cpu {cpu}, connection {i}: {e}"));
            assert_eq!(&got, b"hi\n");
        }
    })
    .join()
    .unwrap();
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// N connections from CPU 0, then N from CPU 1, to `to`: the per-worker
/// counts each phase added.
fn two_phases(sock: &Path, to: SocketAddr) -> (Vec<u64>, Vec<u64>) {
    let before = accepted(sock);
    connect_from_cpu(0, to, N);
    let mid = accepted(sock);
    connect_from_cpu(1, to, N);
    let after = accepted(sock);
    (delta(&mid, &before), delta(&after, &mid))
}

fn each_worker_accepts_the_connections_of_its_cpu(engine: &str) {
    let Some(_) = cpus_or_skip() else { return };
    let s = start(engine, 2, true);
    let (cpu0, cpu1) = two_phases(&s.sock, s.listen);
    println!("pin_workers = true: from cpu 0 per worker {cpu0:?}, from cpu 1 {cpu1:?}");
    assert_eq!(cpu0, [N as u64, 0], "connections from cpu 0 by worker");
    assert_eq!(cpu1, [0, N as u64], "connections from cpu 1 by worker");
    let (_, text, _) = ctl_text(&s.sock, &["status"]);
    assert!(text.contains("worker 1: ") && text.contains("on cpu 1"), "{text}");
    drop(s.lb);
}

/// Without pinning nothing is steered: the kernel's 4-tuple hash spreads
/// connections over the workers whatever CPU sent them. Nothing exact can
/// be asserted about that spread, only that both workers serve.
fn without_pinning_the_hash_spreads_them(engine: &str) {
    let s = start(engine, 2, false);
    let (cpu0, cpu1) = two_phases(&s.sock, s.listen);
    println!("pin_workers = false: from cpu 0 per worker {cpu0:?}, from cpu 1 {cpu1:?} (the kernel's hash)");
    let total: Vec<u64> = cpu0.iter().zip(&cpu1).map(|(a, b)| a + b).collect();
    assert_eq!(total.iter().sum::<u64>(), 2 * N as u64);
    assert!(total.iter().all(|&n| n > 0), "both workers serve: {total:?}");
    let (_, v) = ctl_json(&s.sock, &["status"]);
    assert!(v["workers"][0]["cpu"].is_null(), "{v}");
}

/// More workers than CPUs: each CPU's connections spread over the workers
/// pinned on it (w, w + cpus, ...) and reach no other.
fn workers_sharing_a_cpu_split_its_connections(engine: &str) {
    let Some(cpus) = cpus_or_skip() else { return };
    let workers = 2 * cpus;
    let s = start(engine, workers, true);
    let (cpu0, cpu1) = two_phases(&s.sock, s.listen);
    println!("{workers} workers on {cpus} cpus: from cpu 0 per worker {cpu0:?}, from cpu 1 {cpu1:?}");
    for (cpu, got) in [(0, &cpu0), (1, &cpu1)] {
        for (w, &n) in got.iter().enumerate() {
            if w % cpus == cpu {
                assert!(
                    n > 0,
                    "worker {w} (on cpu {cpu}) got none of cpu {cpu}'s connections: {got:?}"
                );
            } else {
                assert_eq!(n, 0, "worker {w} got connections from cpu {cpu}: {got:?}");
            }
        }
        assert_eq!(got.iter().sum::<u64>(), N as u64);
    }
}

/// A listener added by a reload is bound fresh in worker order and steered
/// like the ones bound at start.
fn a_listener_added_by_reload_is_steered(engine: &str) {
    let Some(_) = cpus_or_skip() else { return };
    let mut s = start(engine, 2, true);
    let added = lb_addr();
    let echo = s._echo.addr;
    std::fs::write(&s.lb.config, config(engine, 2, true, &s.sock, &[s.listen, added], echo)).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    s.lb.wait_listening(added);
    let (cpu0, cpu1) = two_phases(&s.sock, added);
    println!("listener added by reload: from cpu 0 per worker {cpu0:?}, from cpu 1 {cpu1:?}");
    assert_eq!(cpu0, [N as u64, 0], "connections from cpu 0 by worker");
    assert_eq!(cpu1, [0, N as u64], "connections from cpu 1 by worker");
}

macro_rules! on_engines {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name("uring"); } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name("epoll"); } )*
        }
    };
}

on_engines!(
    each_worker_accepts_the_connections_of_its_cpu,
    without_pinning_the_hash_spreads_them,
    workers_sharing_a_cpu_split_its_connections,
    a_listener_added_by_reload_is_steered,
);
