//! The client side of the control protocol: one request, one reply, over
//! the control socket (`ringlb ctl`, `ctl top`, `fleet check`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Reply, Request};

/// Sends `request` and returns its typed reply and the line as received,
/// or a message for exit code 2.
pub fn call(path: &Path, request: &Request) -> Result<(Reply<'static>, String), String> {
    let mut stream =
        UnixStream::connect(path).map_err(|e| format!("cannot reach ringlb at {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    // A server that refuses the client (too many control clients) writes its error line
    // and closes without reading, so sending can fail with EPIPE while the reason waits
    // in our receive buffer: read it before reporting the send error.
    let sent = stream.write_all(format!("{}\n", request.to_line()).as_bytes());
    if let Err(e) = &sent {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(format!("sending to {}: {e}", path.display()));
        }
    }
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    let line = line.trim_end().to_string();
    match Reply::parse(request, &line) {
        Ok(reply) => Ok((reply, line)),
        Err(e) => {
            sent.map_err(|e| format!("sending to {}: {e}", path.display()))?;
            read.map_err(|e| format!("reading reply from {}: {e}", path.display()))?;
            Err(format!("bad reply from {}: {e}: {line:?}", path.display()))
        }
    }
}
