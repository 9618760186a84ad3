// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Newline-delimited JSON: the one reader and writer of every line protocol here (the
//! control socket, the guest channel, the guest agent), with the protocol version.
//!
//! Owns: the line cap (a longer line is discarded as it streams past, never held in
//! memory), the `v` field every message carries, and the typed decode with errors
//! that say which of the three went wrong. Never interprets a message.

use std::io::{self, BufRead, BufReader, Read, Write};

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// Longest line accepted from a peer that is not trusted (a control client, a guest
/// agent). Messages are small; nothing legitimate comes near it.
pub const MAX_LINE: usize = 64 * 1024;

/// Longest line a client accepts from the daemon (a `status` with many bad ranges).
pub const MAX_ANSWER_LINE: usize = 16 << 20;

/// Version of the line protocols. A message without `v` is version 1 (0.1 sent
/// none); a message with another version is refused with [`MessageError::Version`].
pub const PROTOCOL_VERSION: u64 = 1;

/// One line as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    /// A line longer than the cap; its bytes were dropped as they came.
    TooLong {
        bytes: u64,
    },
    NotUtf8,
}

/// Reads lines of at most `cap` bytes from `R`.
pub struct LineReader<R> {
    inner: BufReader<R>,
    cap: usize,
    buf: Vec<u8>,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, cap: usize) -> Self {
        Self {
            inner: BufReader::with_capacity(8192.min(cap.max(1)), inner),
            cap,
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at the end of the stream (a last
    /// line without a newline is returned first). Memory stays under the cap
    /// whatever the peer sends.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        self.buf.clear();
        let mut dropped: u64 = 0;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(match (dropped, self.buf.is_empty()) {
                    (0, true) => None,
                    (0, false) => Some(self.take()),
                    (n, _) => Some(Line::TooLong { bytes: n }),
                });
            }
            let (part, newline) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            let used = part.len() + usize::from(newline);
            if dropped == 0 && self.buf.len() + part.len() <= self.cap {
                self.buf.extend_from_slice(part);
            } else {
                dropped += (self.buf.len() + part.len()) as u64;
                self.buf.clear();
                self.buf.shrink_to(self.cap.min(8192));
            }
            self.inner.consume(used);
            if newline {
                return Ok(Some(if dropped > 0 {
                    Line::TooLong { bytes: dropped }
                } else {
                    self.take()
                }));
            }
        }
    }

    fn take(&mut self) -> Line {
        match std::str::from_utf8(&self.buf) {
            Ok(s) => Line::Text(s.to_string()),
            Err(_) => Line::NotUtf8,
        }
    }

    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }
}

/// Why a line is not a message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("line longer than {cap} bytes ({bytes} bytes discarded)")]
    TooLong { bytes: u64, cap: usize },
    #[error("line is not UTF-8")]
    NotUtf8,
    #[error("not JSON: {0}")]
    Json(serde_json::Error),
    #[error("protocol version {got} is not supported (this side speaks version {PROTOCOL_VERSION}); upgrade the older side")]
    Version { got: Value },
    #[error("not a valid message: {0}")]
    Invalid(serde_json::Error),
}

/// Decodes one line into a message of type `T`, checking the version first.
pub fn decode<T: DeserializeOwned>(line: &str) -> Result<T, MessageError> {
    let mut v: Value = serde_json::from_str(line).map_err(MessageError::Json)?;
    if let Some(obj) = v.as_object_mut() {
        if let Some(ver) = obj.remove("v") {
            if ver.as_u64() != Some(PROTOCOL_VERSION) {
                return Err(MessageError::Version { got: ver });
            }
        }
    }
    serde_json::from_value(v).map_err(MessageError::Invalid)
}

/// Reads the next message; `None` at the end of the stream. A bad line is an
/// `Err` of the inner result: the stream is still usable.
pub fn read_message<T: DeserializeOwned, R: Read>(
    r: &mut LineReader<R>,
) -> io::Result<Option<Result<T, MessageError>>> {
    loop {
        return Ok(match r.next_line()? {
            None => None,
            Some(Line::Text(t)) if t.trim().is_empty() => continue,
            Some(Line::Text(t)) => Some(decode(&t)),
            Some(Line::TooLong { bytes }) => Some(Err(MessageError::TooLong { bytes, cap: r.cap })),
            Some(Line::NotUtf8) => Some(Err(MessageError::NotUtf8)),
        });
    }
}

/// The wire form of `msg`: its JSON object with `"v"` first (its own fields keep
/// their order), no newline.
pub fn encode<T: Serialize>(msg: &T) -> io::Result<String> {
    let body = serde_json::to_string(msg)?;
    Ok(match body.strip_prefix('{') {
        Some("}") => format!("{{\"v\":{PROTOCOL_VERSION}}}"),
        Some(rest) => format!("{{\"v\":{PROTOCOL_VERSION},{rest}"),
        // Not an object: nothing to put a version in (no message here is one).
        None => body,
    })
}

/// Writes `msg` as one line and flushes.
pub fn write_message<T: Serialize, W: Write>(w: &mut W, msg: &T) -> io::Result<()> {
    let mut line = encode(msg)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Endless bytes without a newline, then one good line: memory-free hostility.
    struct Flood {
        left: u64,
        tail: &'static [u8],
    }

    impl Read for Flood {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.left > 0 {
                let n = (out.len() as u64).min(self.left) as usize;
                out[..n].fill(b'x');
                self.left -= n as u64;
                return Ok(n);
            }
            let n = out.len().min(self.tail.len());
            out[..n].copy_from_slice(&self.tail[..n]);
            self.tail = &self.tail[n..];
            Ok(n)
        }
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(tag = "type", rename_all = "kebab-case")]
    enum Msg {
        Ping { n: u32 },
    }

    #[test]
    fn a_quarter_gigabyte_without_a_newline_is_discarded_in_bounded_memory() {
        let flood = Flood {
            left: 256 << 20,
            tail: b"\n{\"type\":\"ping\",\"n\":7}\n",
        };
        let mut r = LineReader::new(flood, MAX_LINE);
        assert_eq!(
            r.next_line().unwrap(),
            Some(Line::TooLong { bytes: 256 << 20 })
        );
        assert!(r.buf.capacity() <= MAX_LINE, "{}", r.buf.capacity());
        let m: Msg = read_message(&mut r).unwrap().unwrap().unwrap();
        assert_eq!(m, Msg::Ping { n: 7 });
        assert!(read_message::<Msg, _>(&mut r).unwrap().is_none());
    }

    #[test]
    fn lines_at_the_cap_pass_and_one_byte_more_does_not() {
        let ok = format!("{}\n", "a".repeat(16));
        let long = format!("{}\n", "b".repeat(17));
        let text = format!("{ok}{long}last");
        let mut r = LineReader::new(text.as_bytes(), 16);
        assert_eq!(r.next_line().unwrap(), Some(Line::Text("a".repeat(16))));
        assert_eq!(r.next_line().unwrap(), Some(Line::TooLong { bytes: 17 }));
        assert_eq!(r.next_line().unwrap(), Some(Line::Text("last".into())));
        assert_eq!(r.next_line().unwrap(), None);
        let mut r = LineReader::new(&b"\xff\xfe\n"[..], 16);
        assert_eq!(r.next_line().unwrap(), Some(Line::NotUtf8));
    }

    #[test]
    fn every_message_carries_the_version_and_others_are_refused_clearly() {
        let line = encode(&Msg::Ping { n: 1 }).unwrap();
        assert_eq!(line, r#"{"v":1,"type":"ping","n":1}"#);
        assert_eq!(decode::<Msg>(&line).unwrap(), Msg::Ping { n: 1 });
        // 0.1 peers sent no version: that is version 1.
        assert_eq!(
            decode::<Msg>(r#"{"type":"ping","n":2}"#).unwrap(),
            Msg::Ping { n: 2 }
        );
        let e = decode::<Msg>(r#"{"v":2,"type":"ping","n":1}"#).unwrap_err();
        assert!(matches!(e, MessageError::Version { .. }), "{e}");
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(matches!(
            decode::<Msg>("{nope").unwrap_err(),
            MessageError::Json(_)
        ));
        assert!(matches!(
            decode::<Msg>(r#"{"type":"pong"}"#).unwrap_err(),
            MessageError::Invalid(_)
        ));
    }
}
