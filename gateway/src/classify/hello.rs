//! Sans-IO ClientHello reader: fed the bytes a client has sent so far, it says "need more",
//! "here are SNI and ALPN", or "malformed". Nothing is consumed: the caller keeps the bytes and
//! replays them to rustls or to a passthrough backend.
//!
//! Handles a ClientHello split over several TLS records. Every length is checked; no input
//! can make it panic.

/// What the classifier needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ClientHello {
    /// The server name, lowercased, without a trailing dot.
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
}

/// Outcome of feeding the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parse {
    NeedMore,
    Done(ClientHello),
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;

/// Parses `buf` (all bytes received so far). `max` bounds the bytes examined.
pub(crate) fn parse(buf: &[u8], max: usize) -> Result<Parse, HelloError> {
    Reassembly::default().parse(buf, max)
}

/// The records of a ClientHello reassembled so far. A reader fed a growing buffer resumes
/// after the records it has already taken, so the work is linear in the bytes received: parsing
/// everything again after each read made a ClientHello dribbled in 1-byte records cost time
/// quadratic in its length (16 KiB of them took 0.4 s of CPU).
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    /// Where the next record starts in the buffer.
    pos: usize,
    /// The handshake bytes of the records before `pos`.
    handshake: Vec<u8>,
}

impl Reassembly {
    /// Parses `buf`, which must extend the buffer of every earlier call (bytes are only
    /// appended).
    pub(crate) fn parse(&mut self, buf: &[u8], max: usize) -> Result<Parse, HelloError> {
        loop {
            let pos = self.pos;
            let Some(header) = buf.get(pos..pos + 5) else {
                return need_more(buf, max);
            };
            if header[0] != HANDSHAKE {
                return Err(if pos == 0 {
                    HelloError::NotTls
                } else {
                    HelloError::Malformed("record type changed inside ClientHello")
                });
            }
            if header[1] != 3 {
                return Err(HelloError::NotTls);
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len == 0 || len > 16384 {
                return Err(HelloError::Malformed("bad record length"));
            }
            let Some(body) = buf.get(pos + 5..pos + 5 + len) else {
                // Refuse an announced oversized ClientHello before waiting for all of it.
                let partial = buf.get(pos + 5..).unwrap_or_default();
                let mut head = self.handshake.iter().chain(partial).take(4).copied();
                if let (Some(_), Some(a), Some(b), Some(c)) =
                    (head.next(), head.next(), head.next(), head.next())
                {
                    let msg_len = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
                    if msg_len + 4 > max {
                        return Err(HelloError::TooLarge(max));
                    }
                }
                return need_more(buf, max);
            };
            self.handshake.extend_from_slice(body);
            self.pos += 5 + len;
            let handshake = &self.handshake;
            if handshake.len() >= 4 {
                if handshake[0] != CLIENT_HELLO {
                    return Err(HelloError::Malformed(
                        "first handshake message is not ClientHello",
                    ));
                }
                let msg_len = (usize::from(handshake[1]) << 16)
                    | (usize::from(handshake[2]) << 8)
                    | usize::from(handshake[3]);
                if msg_len + 4 > max {
                    return Err(HelloError::TooLarge(max));
                }
                if handshake.len() >= 4 + msg_len {
                    return parse_body(&handshake[4..4 + msg_len]).map(Parse::Done);
                }
            }
        }
    }
}

fn need_more(buf: &[u8], max: usize) -> Result<Parse, HelloError> {
    if buf.len() >= max + 5 {
        Err(HelloError::TooLarge(max))
    } else {
        Ok(Parse::NeedMore)
    }
}

/// A bounds-checked cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("truncated field"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites"));
    }
    r.vec8()?; // compression methods
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Ok(hello); // no extensions at all (old clients)
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            0 => hello.sni = Some(parse_sni(data)?),
            16 => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<String, HelloError> {
    let mut list = Reader(Reader(data).vec16()?);
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            let name = std::str::from_utf8(name).map_err(|_| HelloError::Malformed("SNI"))?;
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed("SNI"));
            }
            return Ok(name);
        }
    }
    Err(HelloError::Malformed("SNI without a host name"))
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut list = Reader(Reader(data).vec16()?);
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let p = list.vec8()?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

/// A fatal TLS alert record (TLS 1.2 framing, understood by every client).
pub(crate) fn alert(description: u8) -> [u8; 7] {
    [21, 3, 3, 0, 2, 2, description]
}
pub(crate) const ALERT_UNRECOGNIZED_NAME: u8 = 112;
pub(crate) const ALERT_DECODE_ERROR: u8 = 50;
pub(crate) const ALERT_INTERNAL_ERROR: u8 = 80;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello from rustls for `name` with ALPN h2 + http/1.1.
    fn real_hello(name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn real_hello_gives_sni_and_alpn_and_needs_all_bytes() {
        let bytes = real_hello("App.Example.org");
        for cut in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..cut], 16384),
                Ok(Parse::NeedMore),
                "cut {cut}"
            );
        }
        let Parse::Done(h) = parse(&bytes, 16384).unwrap() else {
            panic!("not done")
        };
        assert_eq!(h.sni.as_deref(), Some("app.example.org"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn hello_split_over_two_records() {
        let bytes = real_hello("a.example");
        let body = &bytes[5..];
        let (first, second) = body.split_at(40);
        let mut split = vec![22, 3, 1];
        split.extend_from_slice(&(first.len() as u16).to_be_bytes());
        split.extend_from_slice(first);
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&(second.len() as u16).to_be_bytes());
        split.extend_from_slice(second);
        let Parse::Done(h) = parse(&split, 16384).unwrap() else {
            panic!("not done")
        };
        assert_eq!(h.sni.as_deref(), Some("a.example"));
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 16384), Err(HelloError::NotTls));
        let bytes = real_hello("a.example");
        // Corrupt every byte in turn: must return, never panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = parse(&b, 16384);
        }
        // A record claiming a huge handshake is refused once over the bound.
        let huge = [22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff];
        assert!(matches!(parse(&huge, 16384), Err(HelloError::TooLarge(_))));
    }
}
