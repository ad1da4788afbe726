//! What both worker loops do with a connection's machine: carry out its ops
//! until none is left, arm its deadline, fire its timers, ask it to close.

use std::collections::VecDeque;
use std::time::Instant;

use crate::conn::{Conn, Errno, Op, Side, TimerWheel};

use super::slab::Slab;
use super::token::{Kind, Token};

/// A result the shell knows at once, not from a completion or readiness
/// event (a splice or send that finished, a socket that could not be made).
pub enum Immediate {
    /// The connect ended.
    Connected(Result<(), Errno>),
    /// A receive ended; the last field is the buffer's capacity (0 for pipes).
    Received(Side, Result<usize, Errno>, usize),
    /// A send ended.
    Sent(Side, Result<usize, Errno>),
}

/// A shell's slot: the connection's machine and the deadline armed for it.
pub(crate) trait ConnSlot {
    /// The machine.
    fn conn(&mut self) -> &mut Conn;
    /// The deadline armed in the wheel, if any.
    fn armed(&mut self) -> &mut Option<Instant>;
}

/// The per-worker state every shell drives its connections with.
pub struct Driver {
    /// Ops returned by the machine, carried out in order.
    pub out: Vec<Op>,
    /// Results the shell knew at once, fed back before the next op.
    pub immediate: VecDeque<Immediate>,
    /// Connection deadlines.
    pub wheel: TimerWheel,
    fired: Vec<u64>,
}

impl Driver {
    /// An empty driver whose wheel starts at `now`.
    pub fn new(now: Instant) -> Driver {
        Driver {
            out: Vec::with_capacity(8),
            immediate: VecDeque::new(),
            wheel: TimerWheel::new(now),
            fired: Vec::new(),
        }
    }
}

/// An event loop that carries out connection ops.
pub(crate) trait Shell {
    /// Its per-connection slot.
    type Slot: ConnSlot;
    /// Its connections and its driver, borrowed apart.
    fn parts(&mut self) -> (&mut Slab<Self::Slot>, &mut Driver);
    /// Carries out one op of connection (`index`, `gen`); results known at
    /// once go to [`Driver::immediate`].
    fn execute(&mut self, index: u32, gen: u32, op: Op);
}

/// Carries out the machine's ops, feeding back the results the shell knows
/// at once, until nothing is left; then arms the connection's deadline
/// (once per earlier deadline: a later one is re-armed when the earlier
/// fires).
pub(crate) fn drive<S: Shell>(shell: &mut S, index: u32, gen: u32) {
    loop {
        let mut ops = std::mem::take(&mut shell.parts().1.out);
        for op in ops.drain(..) {
            shell.execute(index, gen, op);
        }
        let (conns, d) = shell.parts();
        if d.out.is_empty() {
            d.out = ops;
        }
        let Some(ev) = d.immediate.pop_front() else {
            if d.out.is_empty() {
                break;
            }
            continue;
        };
        let Some(slot) = conns.get_mut(index, gen) else {
            d.immediate.clear();
            break;
        };
        let now = Instant::now();
        let conn = slot.conn();
        match ev {
            Immediate::Connected(r) => conn.on_connected(r, now, &mut d.out),
            Immediate::Received(side, r, cap) => conn.on_received(side, r, cap, now, &mut d.out),
            Immediate::Sent(side, r) => conn.on_sent(side, r, now, &mut d.out),
        }
    }
    let (conns, d) = shell.parts();
    let Some(slot) = conns.get_mut(index, gen) else { return };
    if let Some(deadline) = slot.conn().deadline() {
        if slot.armed().is_none_or(|a| deadline < a) {
            *slot.armed() = Some(deadline);
            d.wheel.insert(Token::new(Kind::Ignore, index, gen).0, deadline);
        }
    }
}

/// Runs the machines whose deadlines have come.
pub(crate) fn fire_timers<S: Shell>(shell: &mut S, now: Instant) {
    let d = shell.parts().1;
    let mut fired = std::mem::take(&mut d.fired);
    d.wheel.advance(now, &mut fired);
    for key in fired.drain(..) {
        let t = Token(key);
        let (conns, d) = shell.parts();
        if let Some(slot) = conns.get_mut(t.index(), t.gen()) {
            *slot.armed() = None;
            slot.conn().on_timer(now, &mut d.out);
            drive(shell, t.index(), t.gen());
        }
    }
    shell.parts().1.fired = fired;
}

/// Asks every connection whether it must close now (drain deadline,
/// removed listener, or `force`: the shutdown timeout).
pub(crate) fn check_close<S: Shell>(shell: &mut S, force: bool) {
    for (index, gen) in shell.parts().0.keys() {
        let (conns, d) = shell.parts();
        if let Some(slot) = conns.get_mut(index, gen) {
            slot.conn().check_close(force, &mut d.out);
            drive(shell, index, gen);
        }
    }
}
