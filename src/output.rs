//! A command's output to stdout, and exit codes shared by the subcommands.
//!
//! `println!` panics when stdout cannot be written: a reader that went away
//! (`ringlb check ... | head -0`: EPIPE, since Rust ignores SIGPIPE) or a full device
//! (`> /dev/full`), and the process then exits 101 with a panic message.

use std::io::Write;

/// Exit code of a usage error: unknown subcommand or option, missing argument
/// (EX_USAGE of sysexits.h; clap's own 2 would read as "control socket unreachable").
pub const EXIT_USAGE: i32 = 64;

/// Exit code when stdout cannot be written (EX_IOERR of sysexits.h).
pub const EXIT_OUTPUT: i32 = 74;

/// Writes `text` to stdout and flushes it, then returns `code`. A closed pipe returns
/// `code` as well, silently: the reader chose to stop reading, and the command itself did
/// what it was asked. Any other write error is said on stderr and returns
/// [`EXIT_OUTPUT`].
pub fn print(text: &str, code: i32) -> i32 {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            eprintln!("ringlb: writing to stdout: {e}");
            EXIT_OUTPUT
        }
    }
}
