//! Connection steering: a reuseport classic-BPF program that hands each new TCP connection to the worker pinned on the CPU that received it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `ld [SKF_AD_OFF + SKF_AD_CPU]`: A = the CPU running the program.
const LD_CPU: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
/// `ld [SKF_AD_OFF + SKF_AD_RANDOM]`: A = a pseudo-random u32.
const LD_RANDOM: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The classic BPF program that maps the receiving CPU to a reuseport
/// group index for `workers` workers pinned over `cpus` CPUs.
///
/// The kernel numbers the sockets of a `SO_REUSEPORT` group in the order
/// they joined it (`listen(2)` order for TCP, `bind(2)` order for UDP:
/// socket(7), `SO_ATTACH_REUSEPORT_CBPF`), and a program attached to any
/// one of them serves the whole group. [`crate::listen::bind_tcp_for_workers`]
/// binds and listens socket `i` before socket `i + 1` and socket `i` goes
/// to worker `i`, so group index = worker id. An index the program returns
/// past the group's end makes the kernel fall back to its 4-tuple hash.
///
/// Worker `w` is pinned to CPU `w % C` (`C` = [`crate::worker::context::pinning_cpus`]).
/// With `W` workers the program picks, for a SYN handled on CPU `cpu`:
/// - `W <= C`: worker `cpu % W`. With `W == C` that is the worker on that
///   CPU; with fewer workers than CPUs, a CPU without a worker of its own
///   always hands its connections to the same one, and the CPUs spread
///   evenly over the workers.
/// - `W > C`: one of the workers pinned on `cpu % C` (`c`, `c + C`, ...),
///   chosen at random per connection. Only the SYN is steered (later
///   packets find the connection's own socket), so a random choice cannot
///   split a connection.
///
/// UDP listeners keep the kernel's hash: each datagram is steered on its
/// own and a worker keeps per-flow state, so a flow must always reach the
/// same worker. The hash guarantees that; the receiving CPU does not (a
/// local client that migrates, an IRQ or RPS change).
pub fn program(workers: usize, cpus: usize) -> Vec<libc::sock_filter> {
    use libc::{BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_JA, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_LDX};
    use libc::{BPF_MEM, BPF_MOD, BPF_MUL, BPF_RET, BPF_ST, BPF_W, BPF_X};
    let (workers, cpus) = (workers.max(1) as u32, cpus.max(1) as u32);
    let ld_abs = BPF_LD | BPF_W | BPF_ABS;
    let ret_a = stmt(BPF_RET | BPF_A, 0);
    if workers <= cpus {
        return vec![stmt(ld_abs, LD_CPU), stmt(BPF_ALU | BPF_MOD | BPF_K, workers), ret_a];
    }
    // Workers on CPU c: c + cpus * j for j < per_cpu, plus one more
    // (j == per_cpu) on the first `extra` CPUs.
    let (per_cpu, extra) = (workers / cpus, workers % cpus);
    let mut p = vec![
        stmt(ld_abs, LD_CPU),
        stmt(BPF_ALU | BPF_MOD | BPF_K, cpus),
        stmt(BPF_ST, 0), // M[0] = c
    ];
    if extra > 0 {
        p.extend([
            // c < extra: j = random % (per_cpu + 1); else jump to j = random % per_cpu.
            libc::sock_filter {
                code: (BPF_JMP | BPF_JGE | BPF_K) as u16,
                jt: 3,
                jf: 0,
                k: extra,
            },
            stmt(ld_abs, LD_RANDOM),
            stmt(BPF_ALU | BPF_MOD | BPF_K, per_cpu + 1),
            stmt(BPF_JMP | BPF_JA, 2),
        ]);
    }
    p.extend([
        stmt(ld_abs, LD_RANDOM),
        stmt(BPF_ALU | BPF_MOD | BPF_K, per_cpu),
        stmt(BPF_ALU | BPF_MUL | BPF_K, cpus), // A = j * cpus
        stmt(BPF_LDX | BPF_W | BPF_MEM, 0),    // X = c
        stmt(BPF_ALU | BPF_ADD | BPF_X, 0),    // A = c + j * cpus
        ret_a,
    ]);
    p
}

/// Attaches [`program`] to the reuseport group of `sockets`: all of a
/// listener's sockets, listening, socket `i` the `i`-th to join the group
/// (the one worker `i` accepts on).
pub fn attach(sockets: &[impl AsFd], cpus: usize) -> io::Result<()> {
    let Some(first) = sockets.first() else {
        return Ok(());
    };
    let mut filter = program(sockets.len(), cpus);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter.len()` initialized instructions that
    // outlive the call (the kernel copies the program), and the option
    // length is the size of the `sock_fprog` passed; the descriptor is a
    // live socket borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            first.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Steers listener `name`'s new connections by receiving CPU (see
/// [`attach`]); a failure (kernel before 4.6, a seccomp or LSM refusal)
/// leaves the kernel's hash in charge and is logged at WARN, not fatal.
pub fn steer_by_cpu(name: &str, sockets: &[impl AsFd]) {
    if sockets.len() < 2 {
        return;
    }
    let cpus = crate::worker::context::pinning_cpus();
    match attach(sockets, cpus) {
        Ok(()) => log::info!(
            "listener \"{name}\": new connections go to the worker on the receiving CPU ({} workers, {cpus} CPUs)",
            sockets.len()
        ),
        Err(e) => log::warn!(
            "listener \"{name}\": cannot steer connections by CPU (SO_ATTACH_REUSEPORT_CBPF: {e}); the kernel's hash spreads them over the workers"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the instructions `program` emits, as the kernel would.
    fn run(p: &[libc::sock_filter], cpu: u32, random: u32) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        loop {
            let i = p[pc];
            pc += 1;
            let code = i.code as u32;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    a = match i.k {
                        LD_CPU => cpu,
                        LD_RANDOM => random,
                        k => panic!("load of {k:#x}"),
                    }
                }
                c if c == libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K => a %= i.k,
                c if c == libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K => a = a.wrapping_mul(i.k),
                c if c == libc::BPF_ALU | libc::BPF_ADD | libc::BPF_X => a = a.wrapping_add(x),
                c if c == libc::BPF_ST => mem[i.k as usize] = a,
                c if c == libc::BPF_LDX | libc::BPF_W | libc::BPF_MEM => x = mem[i.k as usize],
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => {
                    pc += if a >= i.k { i.jt } else { i.jf } as usize
                }
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c == libc::BPF_RET | libc::BPF_A => return a,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn each_cpu_goes_to_a_worker_pinned_on_it() {
        for cpus in 1..=5u32 {
            for workers in 1..=12u32 {
                let p = program(workers as usize, cpus as usize);
                for cpu in 0..2 * cpus {
                    let mut seen = std::collections::BTreeSet::new();
                    for random in (0..64).chain([12345, u32::MAX - 1, u32::MAX]) {
                        seen.insert(run(&p, cpu, random));
                    }
                    let want: std::collections::BTreeSet<u32> = if workers <= cpus {
                        [cpu % workers].into()
                    } else {
                        (0..workers).filter(|w| w % cpus == cpu % cpus).collect()
                    };
                    assert_eq!(seen, want, "{workers} workers, {cpus} cpus, cpu {cpu}");
                }
            }
        }
    }

    #[test]
    fn the_kernel_takes_the_program() {
        let first = crate::listen::bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = first.local_addr().unwrap();
        let second = crate::listen::bind_tcp(addr, 16).unwrap();
        for (workers, cpus) in [(2, 2), (2, 4), (5, 2)] {
            let sockets: Vec<&std::net::TcpListener> = [&first, &second].into_iter().cycle().take(workers).collect();
            match attach(&sockets, cpus) {
                Ok(()) => {}
                // Kernels before 4.6 have no reuseport BPF for TCP.
                Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => return,
                Err(e) => panic!("{workers} workers, {cpus} cpus: {e}"),
            }
        }
    }
}
