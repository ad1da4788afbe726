//! Reading the server name (SNI) from a TLS ClientHello without consuming it.
//!
//! Pure and bounded: [`server_name`] looks at the bytes a client has sent so
//! far and says whether the ClientHello is incomplete, not TLS, without a
//! server name, or names a host (a slice of the input, never a copy). It
//! reads one TLS record, at most [`MAX_HELLO`] bytes. ringlb's own rather
//! than `tls-parser`: the SNI walk is ~100 lines over a borrowed slice, it
//! must say "incomplete" for a ClientHello split over TCP segments, and it
//! avoids nom and a full handshake decoder on the accept path.

/// A TLS record header plus the largest record body (2^14 bytes).
pub const MAX_HELLO: usize = 5 + 16384;
/// Longest DNS name.
const MAX_NAME: usize = 255;

/// What the first bytes of a connection say about its server name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello<'a> {
    /// More bytes are needed: the first record is not complete yet.
    Incomplete,
    /// Not a TLS handshake (or a ClientHello ringlb cannot read: fragmented
    /// over records, broken lengths).
    NotTls,
    /// A ClientHello without a (host name) server name.
    NoSni,
    /// The server name, as sent (compare it case-insensitively).
    Sni(&'a [u8]),
}

/// Reads the server name of the ClientHello at the start of `buf`.
pub fn server_name(buf: &[u8]) -> Hello<'_> {
    // Record: type 22 (handshake), version 3.x, 16-bit length.
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 || (buf.len() > 1 && buf[1] != 3) {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    let rec_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if rec_len == 0 || rec_len > MAX_HELLO - 5 {
        return Hello::NotTls;
    }
    if buf.len() < 5 + rec_len {
        // Look at what there is: a first byte that is no ClientHello
        // needs no more waiting.
        if buf.len() > 5 && buf[5] != 1 {
            return Hello::NotTls;
        }
        return Hello::Incomplete;
    }
    let rec = &buf[5..5 + rec_len];
    match client_hello(rec) {
        Some(Some(name)) => Hello::Sni(name),
        Some(None) => Hello::NoSni,
        None => Hello::NotTls,
    }
}

/// A small cursor over a borrowed slice; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// `None`: not a ClientHello ringlb can read; `Some(None)`: no SNI.
fn client_hello(rec: &[u8]) -> Option<Option<&[u8]>> {
    let mut r = Reader(rec);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.take(3)?;
    let len = (len[0] as usize) << 16 | (len[1] as usize) << 8 | len[2] as usize;
    // The whole message must be in this record (one record is 16 KiB; a
    // ClientHello fragmented over records is not read).
    let mut r = Reader(r.take(len)?);
    let version = r.take(2)?;
    if version[0] != 3 {
        return None;
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return None; // session id
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // compression methods
    }
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let body = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); the host_name entry counts.
        let mut b = Reader(body);
        let mut list = Reader(b.vec16()?);
        while !list.0.is_empty() {
            let ty = list.u8()?;
            let name = list.vec16()?;
            if ty == 0 {
                return valid_host(name).then_some(Some(name));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// A host name as RFC 6066 wants it: ASCII letters, digits, `-`, `_`, `.`,
/// 1..=255 bytes, no empty label.
fn valid_host(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.split(|&b| b == b'.').any(|l| l.is_empty())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello record with `sni` (if any) and `pad` bytes of padding extension.
    pub(crate) fn hello(sni: Option<&[u8]>, pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        // supported_versions first, so SNI is not the first extension.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(&list);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
            exts.extend_from_slice(&body);
        }
        if pad > 0 {
            exts.extend_from_slice(&[0x00, 0x15]);
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.resize(exts.len() + pad, 0);
        }
        let mut ch = vec![3, 3];
        ch.extend_from_slice(&[7; 32]);
        ch.push(0);
        ch.extend_from_slice(&[0, 2, 0x13, 0x01]);
        ch.extend_from_slice(&[1, 0]);
        ch.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        ch.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(ch.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&ch);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_the_name_and_waits_for_every_split() {
        let h = hello(Some(b"db1.example.com"), 300);
        for cut in 0..h.len() {
            assert_eq!(server_name(&h[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(server_name(&h), Hello::Sni(b"db1.example.com"));
        // Application data after the record does not matter.
        let mut more = h.clone();
        more.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
        assert_eq!(server_name(&more), Hello::Sni(b"db1.example.com"));
    }

    #[test]
    fn no_sni_and_not_tls() {
        assert_eq!(server_name(&hello(None, 0)), Hello::NoSni);
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(server_name(b"PROXY TCP4"), Hello::NotTls);
        assert_eq!(server_name(&[0x16, 2]), Hello::NotTls);
        // A handshake record that is not a ClientHello.
        assert_eq!(server_name(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]), Hello::NotTls);
        assert_eq!(
            server_name(&[0x16, 3, 3, 0x40, 0x01]),
            Hello::NotTls,
            "record over 16 KiB"
        );
    }

    #[test]
    fn broken_lengths_and_names_are_not_read() {
        let h = hello(Some(b"a.example"), 0);
        // Every single-byte change past the record header must not panic,
        // and a bad name is never returned.
        for i in 5..h.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut m = h.clone();
                m[i] = v;
                if let Hello::Sni(n) = server_name(&m) {
                    assert!(valid_host(n));
                }
            }
        }
        assert_eq!(server_name(&hello(Some(b"bad..name"), 0)), Hello::NotTls);
        assert_eq!(server_name(&hello(Some(b"sp ace"), 0)), Hello::NotTls);
        assert_eq!(server_name(&hello(Some(&[b'a'; 256]), 0)), Hello::NotTls);
        // A ClientHello longer than its record (fragmented over records).
        let mut frag = hello(Some(b"a.example"), 0);
        let n = frag.len() - 5 - 10;
        frag[3..5].copy_from_slice(&(n as u16).to_be_bytes());
        frag.truncate(5 + n);
        assert_eq!(server_name(&frag), Hello::NotTls);
    }
}
