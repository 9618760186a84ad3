// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz targets: the line protocols. The bounded line reader (`jsonl`) against a
//! model, the control socket's request loop over a real socket pair, and the guest
//! agent's messages in both directions (and its sector translation). Owns only
//! properties; never changes the code under test.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use proptest::{collection::vec, prelude::*, prop_oneof};
use serde_json::Value;

use crate::{
    control::{self, Answer, Request},
    jsonl::{self, Line, LineReader, MessageError},
    media::{
        channel::{guest_sectors, is_pci_address, parse_sysfs_number, FromAgent, ToAgent},
        ranges::{BadRange, SECTOR},
    },
};

/// A reader that hands out at most the next chunk size per read, and sometimes an
/// `Interrupted` error first: the split reads a socket gives.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    n: usize,
    interrupted: bool,
}

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let size = self.sizes[self.n % self.sizes.len()];
        self.n += 1;
        if size == 0 {
            // Then the read goes through: a reader that is interrupted forever
            // is a hang of the test, not of the code.
            self.interrupted = !self.interrupted;
            if self.interrupted {
                return Err(io::ErrorKind::Interrupted.into());
            }
        }
        let size = size.max(1);
        let k = size.min(out.len()).min(self.data.len());
        out[..k].copy_from_slice(&self.data[..k]);
        self.data = &self.data[k..];
        Ok(k)
    }
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    vec(
        prop_oneof![1 => Just(0usize), 6 => 1usize..16, 2 => 1usize..5000],
        1..6,
    )
}

/// Bytes with lines in them: text, JSON-ish pieces, newlines, invalid UTF-8.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => "[ -~]{0,20}".prop_map(String::into_bytes),
        3 => Just(b"\n".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        1 => vec(any::<u8>(), 0..8),
        1 => Just(vec![0xff, 0xfe]),
        1 => Just("é€😀".as_bytes().to_vec()),
        1 => (1usize..300).prop_map(|n| vec![b'x'; n]),
    ];
    vec(piece, 0..16).prop_map(|p| p.concat())
}

/// What the reader must return for `data` with cap `cap`.
fn model(data: &[u8], cap: usize) -> Vec<Line> {
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // After a final newline (or in an empty stream) there is no line.
    if pieces.last().is_some_and(|p| p.is_empty()) {
        pieces.pop();
    }
    pieces
        .into_iter()
        .map(|p| {
            if p.len() > cap {
                Line::TooLong {
                    bytes: p.len() as u64,
                }
            } else {
                match std::str::from_utf8(p) {
                    Ok(s) => Line::Text(s.to_string()),
                    Err(_) => Line::NotUtf8,
                }
            }
        })
        .collect()
}

#[test]
fn jsonl_line_reader() {
    let case = (bytes(), prop_oneof![0usize..40, Just(1024usize)], chunks());
    super::run("jsonl-line-reader", case, |(data, cap, sizes)| {
        let mut r = LineReader::new(
            Chunked {
                data: &data,
                sizes,
                n: 0,
                interrupted: false,
            },
            cap,
        );
        let mut got = Vec::new();
        // Bounded: every line consumes at least one byte, plus the end.
        for _ in 0..=data.len() + 1 {
            match r
                .next_line()
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                Some(l) => got.push(l),
                None => break,
            }
        }
        prop_assert_eq!(got, model(&data, cap));
        Ok(())
    });
}

/// Arbitrary JSON values, shallow.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z-]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("status"),
            Just("stats"),
            Just("metrics"),
            Just("badblocks-list"),
            Just("badblocks-inject"),
            Just("badblocks-clear"),
            Just("events"),
            Just("hello"),
            Just("badblocks"),
            Just("attached"),
            Just("applied"),
            Just("error"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let key = prop_oneof![
            Just("command".to_string()),
            Just("type".to_string()),
            Just("v".to_string()),
            Just("offset".to_string()),
            Just("length".to_string()),
            Just("ranges".to_string()),
            Just("sectors".to_string()),
            Just("size".to_string()),
            Just("version".to_string()),
            "[a-z_-]{1,8}",
        ];
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((key, inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One line a client may send: a real request, a JSON value, or noise.
fn request_line() -> impl Strategy<Value = Vec<u8>> {
    let real = prop_oneof![
        Just(Request::Status),
        Just(Request::Stats),
        Just(Request::Metrics),
        Just(Request::BadblocksList),
        (0u64..4 << 20, 0u64..8192)
            .prop_map(|(offset, length)| Request::BadblocksClear { offset, length }),
        (
            prop_oneof![Just(u64::MAX), Just(u64::MAX - 511)],
            1u64..1024
        )
            .prop_map(|(offset, length)| Request::BadblocksInject { offset, length }),
    ]
    .prop_map(|r| jsonl::encode(&r).unwrap().into_bytes());
    prop_oneof![
        3 => real,
        3 => json().prop_map(|v| v.to_string().into_bytes()),
        2 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40),
        1 => Just(vec![b'{'; jsonl::MAX_LINE + 1]),
    ]
}

#[test]
fn control_requests() {
    let daemon = control::tests::daemon();
    let size = daemon.media.size();
    let case = (vec(request_line(), 0..5), vec(1usize..64, 1..4));
    super::run("control-requests", case, |(lines, sizes)| {
        // `events` turns the connection into a stream: not this target's business.
        let lines: Vec<Vec<u8>> = lines
            .into_iter()
            .filter(|l| {
                !std::str::from_utf8(l).is_ok_and(|t| {
                    matches!(jsonl::decode::<Request>(t), Ok(Request::Events { .. }))
                })
            })
            .collect();
        let (client, server) = UnixStream::pair().unwrap();
        let d = daemon.clone();
        let worker = std::thread::spawn(move || control::serve_client(server, &d));
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut wire = Vec::new();
        for l in &lines {
            wire.extend_from_slice(l);
            wire.push(b'\n');
        }
        wire.extend_from_slice(b"{\"command\":\"stats\"}\n");
        // Split writes, read answers as they come (an over-long line is big).
        let writer = {
            let mut c = client.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut at = 0;
                let mut i = 0;
                while at < wire.len() {
                    let k = (sizes[i % sizes.len()] * 97).min(wire.len() - at);
                    c.write_all(&wire[at..at + k]).unwrap();
                    at += k;
                    i += 1;
                }
            })
        };
        let mut answers = LineReader::new(&client, jsonl::MAX_ANSWER_LINE);
        // Every line that is not blank gets exactly one answer, in order.
        let expected: Vec<&Vec<u8>> = lines
            .iter()
            .filter(|l| !std::str::from_utf8(l).is_ok_and(|t| t.trim().is_empty()))
            .collect();
        for line in expected {
            let a: Answer = match jsonl::read_message(&mut answers) {
                Ok(Some(Ok(a))) => a,
                other => return Err(TestCaseError::fail(format!("no answer: {other:?}"))),
            };
            let decoded = std::str::from_utf8(line)
                .ok()
                .filter(|_| line.len() <= jsonl::MAX_LINE)
                .map(jsonl::decode::<Request>);
            match decoded {
                Some(Ok(req)) => {
                    // Refused: empty, past 2^64, or not inside the file.
                    let refused = matches!(req,
                        Request::BadblocksInject { offset, length } | Request::BadblocksClear { offset, length }
                        if length == 0 || offset.checked_add(length).is_none_or(|end| end > size));
                    prop_assert_eq!(a.ok, !refused, "{:?} -> {:?}", req, a);
                }
                _ => {
                    prop_assert!(
                        !a.ok,
                        "malformed line accepted: {:?}",
                        String::from_utf8_lossy(line)
                    );
                    prop_assert!(a.error.as_deref().is_some_and(|e| !e.is_empty()));
                }
            }
        }
        let last: Answer = match jsonl::read_message(&mut answers) {
            Ok(Some(Ok(a))) => a,
            other => return Err(TestCaseError::fail(format!("no final answer: {other:?}"))),
        };
        prop_assert!(last.ok && last.stats.is_some(), "{last:?}");
        writer.join().unwrap();
        drop(answers);
        drop(client);
        worker.join().unwrap();
        Ok(())
    });
}

fn bad_range() -> impl Strategy<Value = BadRange> {
    prop_oneof![(0u64..1 << 30, 1u64..1 << 20), (any::<u64>(), any::<u64>()),]
        .prop_map(|(offset, length)| BadRange { offset, length })
}

fn to_agent() -> impl Strategy<Value = ToAgent> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u64>(),
            proptest::option::of("\\PC{0,16}"),
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(version, size, pci_address, guest_address)| ToAgent::Hello {
                    version,
                    size,
                    pci_address,
                    guest_address
                }
            ),
        vec(bad_range(), 0..8).prop_map(|ranges| ToAgent::Badblocks { ranges }),
    ]
}

fn from_agent() -> impl Strategy<Value = FromAgent> {
    prop_oneof![
        ("\\PC{0,16}", any::<u64>()).prop_map(|(device, data_offset)| FromAgent::Attached {
            device,
            data_offset
        }),
        vec((any::<u64>(), any::<u64>()), 0..8).prop_map(|sectors| FromAgent::Applied { sectors }),
        "\\PC{0,32}".prop_map(|message| FromAgent::Error { message }),
    ]
}

/// One direction of the agent channel: valid messages survive the wire whole;
/// a truncated one, another version or noise is an error, never a message.
fn agent_direction<T>(name: &'static str, msg: impl Strategy<Value = T>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Clone,
{
    let case = (
        vec(msg, 1..4),
        chunks(),
        any::<prop::sample::Index>(),
        bytes(),
    );
    super::run(name, case, |(msgs, sizes, cut, noise)| {
        let mut wire = Vec::new();
        for m in &msgs {
            jsonl::write_message(&mut wire, m).unwrap();
        }
        let first = jsonl::encode(&msgs[0]).unwrap();
        // Broken forms of the first message, each on its own line: cut short
        // (at any byte, so maybe inside a character), and of another version.
        let truncated = &first.as_bytes()[..1 + cut.index(first.len() - 1)];
        let versioned = first.replacen("{\"v\":1", "{\"v\":2", 1);
        for broken in [truncated, versioned.as_bytes()] {
            wire.extend_from_slice(broken);
            wire.push(b'\n');
        }
        wire.extend_from_slice(&noise);
        let mut r = LineReader::new(
            Chunked {
                data: &wire,
                sizes,
                n: 0,
                interrupted: false,
            },
            jsonl::MAX_LINE,
        );
        let mut next =
            || jsonl::read_message::<T, _>(&mut r).map_err(|e| TestCaseError::fail(e.to_string()));
        for m in &msgs {
            match next()? {
                Some(Ok(got)) => prop_assert_eq!(&got, m),
                other => return Err(TestCaseError::fail(format!("{m:?} came back as {other:?}"))),
            }
        }
        let t = next()?;
        prop_assert!(
            matches!(t, Some(Err(MessageError::Json(_) | MessageError::NotUtf8))),
            "truncated {:?} gave {t:?}",
            String::from_utf8_lossy(truncated)
        );
        let v = next()?;
        prop_assert!(
            matches!(v, Some(Err(MessageError::Version { .. }))),
            "{v:?}"
        );
        // Noise: anything but a panic or a hang; what decodes must re-encode to itself.
        for _ in 0..=noise.len() {
            match next()? {
                None => break,
                Some(Ok(m)) => {
                    let again = jsonl::decode::<T>(&jsonl::encode(&m).unwrap());
                    prop_assert_eq!(again.ok(), Some(m));
                }
                Some(Err(_)) => {}
            }
        }
        Ok(())
    });
}

#[test]
fn agent_messages_to_agent() {
    agent_direction("agent-to-agent", to_agent());
}

#[test]
fn agent_messages_from_agent() {
    agent_direction("agent-from-agent", from_agent());
}

#[test]
fn agent_sector_translation() {
    let device = prop_oneof![(0u64..1 << 24, 1u64..1 << 30), (any::<u64>(), any::<u64>()),];
    let case = (device, vec(bad_range(), 0..8));
    super::run("agent-sectors", case, |((data_offset, size), ranges)| {
        let (ok, lost) = guest_sectors(data_offset, size, &ranges);
        let (off, end) = (
            u128::from(data_offset),
            u128::from(data_offset) + u128::from(size),
        );
        // Every sector range is inside the device (rounded up to a whole sector)
        // and touches a bad byte of some range.
        for &(s, n) in &ok {
            prop_assert!(n > 0);
            let (bs, be) = (u128::from(s) * 512, (u128::from(s) + u128::from(n)) * 512);
            prop_assert!(
                be <= u128::from(size).div_ceil(512) * 512,
                "({s}, {n}) past {size}"
            );
            let hits = ranges.iter().any(|r| {
                let (rs, re) = (
                    u128::from(r.offset),
                    u128::from(r.offset) + u128::from(r.length),
                );
                rs.max(off) < re.min(end) && off + bs < re && off + be > rs
            });
            prop_assert!(hits, "({s}, {n}) covers no bad byte");
        }
        // Nothing vanishes: each range is translated, reported lost, or both.
        prop_assert!(ok.len() + lost.len() >= ranges.len());
        for r in &lost {
            prop_assert!(
                u128::from(r.offset) < off || u128::from(r.offset) >= end || r.length == 0
            );
        }
        let _ = SECTOR;
        Ok(())
    });
}

#[test]
fn agent_sysfs_values() {
    let case = prop_oneof![
        any::<u64>().prop_map(|n| (format!("{n}\n"), Some(n), None)),
        any::<u64>().prop_map(|n| (format!("0x{n:x}"), Some(n), None)),
        (any::<u16>(), any::<u8>(), 0u8..32, 0u8..8).prop_map(|(d, b, s, f)| {
            (format!("{d:04x}:{b:02x}:{s:02x}.{f:x}"), None, Some(true))
        }),
        "\\PC{0,14}".prop_map(|s| (s, None, None)),
        "[0-9a-fA-F:.x ]{0,14}".prop_map(|s| (s, None, None)),
    ];
    super::run("agent-sysfs", case, |(text, number, pci)| {
        let n = parse_sysfs_number(&text);
        if let Some(want) = number {
            prop_assert_eq!(n, Some(want));
        }
        let p = is_pci_address(&text);
        if let Some(want) = pci {
            prop_assert_eq!(p, want);
        }
        // Independently: twelve ASCII bytes, separators in place, hex elsewhere.
        let b = text.as_bytes();
        let shape = b.len() == 12
            && (0..12).all(|i| match i {
                4 | 7 => b[i] == b':',
                10 => b[i] == b'.',
                _ => b[i].is_ascii_hexdigit(),
            });
        prop_assert_eq!(p, shape, "{:?}", text);
        Ok(())
    });
}
