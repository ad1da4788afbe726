//! The client side of the control protocol: one request, one reply, over
//! the control socket (`ringlb ctl`, `ctl top`, `fleet check`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Reply, Request};

/// Longest reply line read (`ctl backends` of 100,000 backends is about
/// 30 MB); a longer one is refused, not buffered without end.
pub const MAX_REPLY: u64 = 256 << 20;

/// Sends `request` and returns its typed reply and the line as received,
/// or a message for exit code 2.
pub fn call(path: &Path, request: &Request) -> Result<(Reply<'static>, String), String> {
    call_capped(path, request, MAX_REPLY)
}

fn call_capped(path: &Path, request: &Request, max_reply: u64) -> Result<(Reply<'static>, String), String> {
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
    let read = BufReader::new(stream.take(max_reply)).read_line(&mut line);
    if line.len() as u64 >= max_reply && !line.ends_with('\n') {
        return Err(format!("reply from {} longer than {max_reply} bytes", path.display()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A server on a real socket that answers one request with `reply`.
    fn answering(reply: String) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!("ringlb-client-{}-{}.sock", std::process::id(), reply.len()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&s).read_line(&mut request).unwrap();
            let _ = s.write_all(reply.as_bytes());
        });
        (path, server)
    }

    #[test]
    fn a_reply_longer_than_the_cap_is_refused_and_a_shorter_one_read() {
        let ok = "{\"ok\":true}\n";
        let (path, server) = answering(format!("{}{ok}", " ".repeat(100)));
        let enable = Request::Enable {
            pool: "p".into(),
            addr: "127.0.0.1:1".into(),
        };
        let (reply, _) = call_capped(&path, &enable, 200).unwrap();
        assert!(reply.is_ok(), "{reply:?}");
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        let (path, server) = answering(format!("{}{ok}", " ".repeat(300)));
        let err = call_capped(&path, &Request::Stats {}, 200).unwrap_err();
        assert!(err.contains("longer than 200 bytes"), "{err}");
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
