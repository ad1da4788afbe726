//! `kind = "http"`: one HTTP/1.1 request with `Connection: close`; the status and,
//! optionally, a substring of the body decide.

use std::net::SocketAddr;

use super::spec::HttpCheck;
use super::{printable, Step, Verdict};

/// An HTTP check in progress.
#[derive(Debug, Clone)]
pub struct HttpExchange {
    check: HttpCheck,
    host: String,
}

impl HttpExchange {
    /// The check of `target` (its address is the `Host` unless one is configured).
    pub fn new(check: &HttpCheck, target: SocketAddr) -> HttpExchange {
        HttpExchange {
            host: check.host.clone().unwrap_or_else(|| target.to_string()),
            check: check.clone(),
        }
    }

    /// The request.
    pub fn request(&self) -> Vec<u8> {
        format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringlb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.check.method, self.check.path, self.host
        )
        .into_bytes()
    }

    /// See [`super::Exchange::step`]. Nothing is sent after the request: the server
    /// closes (`Connection: close`).
    pub fn step(&mut self, reply: &[u8], ended: bool) -> Step {
        match verdict(&self.check, reply, ended) {
            Some(v) => Step::done(v),
            None => Step::Read,
        }
    }
}

/// The verdict on `reply` to `check`, or None while it needs more bytes (never None
/// when `ended`).
pub fn verdict(check: &HttpCheck, reply: &[u8], ended: bool) -> Option<Verdict> {
    let path = &check.path;
    let Some(line_end) = find(reply, b"\n") else {
        return ended.then(|| {
            Verdict::down(if reply.is_empty() {
                format!("http: closed without a reply to {path}")
            } else {
                format!("http: no status line in {}", printable(reply, 60))
            })
        });
    };
    let line = reply[..line_end].strip_suffix(b"\r").unwrap_or(&reply[..line_end]);
    let status = match parse_status_line(line) {
        Some(s) => s,
        None => return Some(Verdict::down(format!("not an HTTP reply: {}", printable(line, 60)))),
    };
    if !check.expect_status.matches(status) {
        let want = match &check.expect_status {
            super::spec::StatusMatch::Class(c) => format!("{c}xx"),
            super::spec::StatusMatch::Codes(codes) => codes.iter().map(u16::to_string).collect::<Vec<_>>().join(" or "),
        };
        return Some(Verdict::down(format!("http {status} from {path} (want {want})")));
    }
    let Some(needle) = &check.expect_body else {
        return Some(Verdict::up(format!("http {status} from {path}")));
    };
    // The first blank line, whichever line ending the server uses.
    let crlf = find(reply, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(reply, b"\n\n").map(|i| i + 2);
    let Some(head_end) = crlf.into_iter().chain(lf).min() else {
        return ended.then(|| Verdict::down(format!("http {status} from {path}: headers not complete")));
    };
    let head = &reply[..head_end];
    let raw = &reply[head_end..];
    let chunked = header(head, b"transfer-encoding").is_some_and(|v| contains_ignore_case(v, b"chunked"));
    let (body, complete) = if chunked {
        dechunk(raw)
    } else {
        match header(head, b"content-length").and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok()) {
            Some(n) => (raw[..raw.len().min(n)].to_vec(), raw.len() >= n),
            None => (raw.to_vec(), false),
        }
    };
    if find(&body, needle).is_some() {
        return Some(Verdict::up(format!(
            "http {status} from {path}, body has {}",
            printable(needle, 40)
        )));
    }
    (complete || ended).then(|| {
        Verdict::down(format!(
            "http {status} from {path}, body does not contain {} ({} byte(s) of body read)",
            printable(needle, 40),
            body.len()
        ))
    })
}

/// `HTTP/1.x NNN ...` → NNN.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let code = rest.get(sp + 1..sp + 4)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(sp + 4).is_some_and(|&b| b != b' ') {
        return None;
    }
    let n = code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    (100..=999).contains(&n).then_some(n)
}

/// The value of the first header `name` (lowercase) in `head`.
fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon].eq_ignore_ascii_case(name).then(|| {
            let v = &line[colon + 1..];
            v.strip_suffix(b"\r").unwrap_or(v)
        })
    })
}

/// The data of a chunked body as far as it is complete, and whether the last chunk
/// was seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(nl) = find(raw, b"\n") else {
            return (out, false);
        };
        let size_text = raw[..nl].split(|&b| b == b';').next().unwrap_or(&[]);
        let size = std::str::from_utf8(size_text)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size else {
            // Broken framing: the body ends here.
            return (out, true);
        };
        if size == 0 {
            return (out, true);
        }
        let data = &raw[nl + 1..];
        if data.len() < size {
            out.extend_from_slice(data);
            return (out, false);
        }
        out.extend_from_slice(&data[..size]);
        raw = &data[size..];
        raw = raw
            .strip_prefix(b"\r\n")
            .or_else(|| raw.strip_prefix(b"\n"))
            .unwrap_or(raw);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::probe::spec::StatusMatch;

    fn check(expect_status: StatusMatch, expect_body: Option<&str>) -> HttpCheck {
        HttpCheck {
            method: "GET".into(),
            path: "/primary".into(),
            host: None,
            expect_status,
            expect_body: expect_body.map(|b| b.as_bytes().to_vec()),
        }
    }

    #[test]
    fn the_request_is_http_1_1_with_connection_close_and_the_address_as_host() {
        let x = HttpExchange::new(&check(StatusMatch::Class(2), None), "127.0.0.1:8008".parse().unwrap());
        assert_eq!(
            String::from_utf8(x.request()).unwrap(),
            "GET /primary HTTP/1.1\r\nHost: 127.0.0.1:8008\r\nUser-Agent: ringlb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let v6 = HttpExchange::new(&check(StatusMatch::Class(2), None), "[::1]:80".parse().unwrap());
        assert!(String::from_utf8(v6.request()).unwrap().contains("Host: [::1]:80\r\n"));
    }

    #[test]
    fn the_status_decides_and_the_reason_says_which() {
        let c = check(StatusMatch::Class(2), None);
        assert_eq!(
            verdict(&c, b"HTTP/1.1 200 OK\r\n", false),
            Some(Verdict::up("http 200 from /primary"))
        );
        assert_eq!(
            verdict(
                &c,
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Some(Verdict::down("http 503 from /primary (want 2xx)"))
        );
        assert_eq!(verdict(&c, b"HTTP/1.1 20", false), None);
        assert!(!verdict(&c, b"HTTP/1.1 20", true).unwrap().up);
        assert!(!verdict(&c, b"SSH-2.0-OpenSSH\r\n", false).unwrap().up);
        assert!(!verdict(&c, b"", true).unwrap().up);
        let list = check(StatusMatch::Codes(vec![200, 204]), None);
        assert!(verdict(&list, b"HTTP/1.0 204 No Content\r\n", false).unwrap().up);
        assert_eq!(
            verdict(&list, b"HTTP/1.1 202 Accepted\r\n", false),
            Some(Verdict::down("http 202 from /primary (want 200 or 204)"))
        );
    }

    #[test]
    fn the_body_must_contain_the_substring_within_its_length() {
        let c = check(StatusMatch::Class(2), Some("\"role\": \"master\""));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n";
        let mut r = head.to_vec();
        r.extend_from_slice(b"{\"role\": \"mas");
        assert_eq!(verdict(&c, &r, false), None);
        r.extend_from_slice(b"ter\"}\r\n\r\n");
        assert!(verdict(&c, &r, false).unwrap().up);
        let replica = b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{\"role\": \"replica\"}\r\n";
        let v = verdict(&c, replica, false).unwrap();
        assert!(!v.up && v.reason.contains("body does not contain"), "{v:?}");
        // Chunked: a match split by the chunk framing is still found.
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"rol\r\n11\r\ne\": \"master\"}\r\n\r\n0\r\n\r\n";
        assert!(verdict(&c, chunked, false).unwrap().up);
        // No length: until the server closes.
        let open = b"HTTP/1.1 200 OK\r\n\r\n{\"role\": \"replica\"}";
        assert_eq!(verdict(&c, open, false), None);
        assert!(!verdict(&c, open, true).unwrap().up);
    }

    proptest::proptest! {
        #[test]
        fn any_reply_decides_at_the_end_and_more_bytes_never_change_a_verdict(
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            split in 0usize..300,
        ) {
            let c = check(StatusMatch::Class(2), Some("ok"));
            let split = split.min(reply.len());
            proptest::prop_assert!(verdict(&c, &reply, true).is_some());
            if let Some(early) = verdict(&c, &reply[..split], false) {
                proptest::prop_assert_eq!(Some(early), verdict(&c, &reply, false).or(verdict(&c, &reply, true)));
            }
        }
    }
}
