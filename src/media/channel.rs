// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The channel to the guest agent: a unix socket the VMM connects a virtio-serial
//! port to, carrying newline-delimited JSON.
//!
//! Owns: the message format shared by the daemon and `vhost-device-pmem-agent` (its
//! lines go through `jsonl`, capped, versioned), and
//! the daemon's side of the channel (hello + the full bad-range list on every
//! connect, the full list again on every change), and the rule that what the guest
//! says is data: every message kind is logged rate-limited, and its strings are
//! escaped and capped before they reach the host log or `status`. Never decides
//! which ranges are bad.

use std::{
    io::Write,
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    sync::{Arc, Condvar, Mutex},
    time::Instant,
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    jsonl::{self, LineReader},
    media::ranges::{BadRange, SECTOR},
    report::AgentState,
    service::{self, Services},
    util::accept::Backoff,
    util::GuestLog,
};

/// Name of the virtio-serial port the agent looks for by default.
pub const DEFAULT_PORT_NAME: &str = "org.vhost-device-pmem.0";

/// Daemon → agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToAgent {
    /// Which device this channel is about.
    Hello {
        version: u32,
        /// Size of the region in bytes.
        size: u64,
        /// PCI address of the virtio-pmem device in the guest, if the operator gave
        /// one (`--guest-pci-address`); makes the match unambiguous.
        pci_address: Option<String>,
        /// Guest-physical address of the region, for an NVDIMM (which has no PCI
        /// address): the agent matches it against `/sys/bus/nd/devices/regionN/resource`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest_address: Option<u64>,
    },
    /// The complete current list of bad ranges of the backing file (file offsets).
    Badblocks { ranges: Vec<BadRange> },
}

/// Agent → daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum FromAgent {
    /// The agent found the guest block device of this region.
    Attached {
        device: String,
        /// Byte offset of the block device's first byte in the region (fsdax/pfn
        /// metadata in front of the data).
        data_offset: u64,
    },
    /// Ranges now recorded in the guest's badblocks, as guest sectors.
    Applied { sectors: Vec<(u64, u64)> },
    /// Something the agent could not do.
    Error { message: String },
}

/// Longest guest string the host logs or keeps, in characters after escaping.
pub const GUEST_TEXT_MAX: usize = 256;

/// A string the guest sent, made safe to log: control characters, newlines,
/// quotes, backslashes and other non-printing characters escaped as Rust does
/// (`\n`, `\u{1b}`, `\u{202e}`), so it stays on one line and cannot pass for
/// a host log line; cut to [`GUEST_TEXT_MAX`] characters, saying how long it was.
pub fn guest_text(s: &str) -> String {
    let mut out = String::new();
    for (n, c) in s.escape_debug().enumerate() {
        if n == GUEST_TEXT_MAX {
            out.push_str(&format!("... ({} bytes in all)", s.len()));
            break;
        }
        out.push(c);
    }
    out
}

/// One limiter per message kind, over the channel's life (a reconnect does not
/// start a fresh allowance).
struct AgentLogs {
    attached: GuestLog,
    applied: GuestLog,
    error: GuestLog,
    malformed: GuestLog,
}

impl Default for AgentLogs {
    fn default() -> Self {
        const HINT: &str = " (see `status`, `agent`)";
        Self {
            attached: GuestLog::with_hint("guest agent `attached` message", HINT),
            applied: GuestLog::with_hint("guest agent `applied` message", HINT),
            error: GuestLog::with_hint("guest agent `error` message", HINT),
            malformed: GuestLog::with_hint("malformed guest agent line", HINT),
        }
    }
}

/// The daemon's side: serves one agent connection at a time and pushes the list.
pub struct GuestChannel {
    hello: ToAgent,
    /// Current list and a generation counter bumped on each change.
    list: Mutex<(u64, Vec<BadRange>)>,
    changed: Condvar,
    pub state: Mutex<AgentState>,
    /// The connection being served, so shutdown can end it.
    current: Arc<Mutex<Option<UnixStream>>>,
    /// The guest decides how often these are logged: rate-limited.
    logs: Mutex<AgentLogs>,
}

impl GuestChannel {
    pub fn new(size: u64, pci_address: Option<String>, ranges: Vec<BadRange>) -> Arc<Self> {
        Self::with_hello(
            ToAgent::Hello {
                version: 1,
                size,
                pci_address,
                guest_address: None,
            },
            ranges,
        )
    }

    /// The channel of an NVDIMM at `guest_address` (matched by address, not PCI).
    pub fn for_nvdimm(size: u64, guest_address: u64, ranges: Vec<BadRange>) -> Arc<Self> {
        Self::with_hello(
            ToAgent::Hello {
                version: 1,
                size,
                pci_address: None,
                guest_address: Some(guest_address),
            },
            ranges,
        )
    }

    fn with_hello(hello: ToAgent, ranges: Vec<BadRange>) -> Arc<Self> {
        Arc::new(Self {
            hello,
            list: Mutex::new((0, ranges)),
            changed: Condvar::new(),
            state: Mutex::default(),
            current: Arc::default(),
            logs: Mutex::default(),
        })
    }

    /// Publishes a new complete list; the agent gets it at once if connected.
    pub fn publish(&self, ranges: Vec<BadRange>) {
        let mut l = self.list.lock().unwrap();
        l.0 += 1;
        l.1 = ranges;
        self.changed.notify_all();
    }

    /// Accepts agent connections on `listener` forever (background thread); the
    /// caller keeps the bound socket and removes its path at exit.
    pub fn spawn(
        self: &Arc<Self>,
        listener: UnixListener,
        services: &Arc<Services>,
    ) -> std::io::Result<()> {
        let me = self.clone();
        // A connection in progress ends at shutdown: its stream is shut down, the
        // reader sees the end and wakes the pushing side.
        let current = self.current.clone();
        services.on_shutdown(Box::new(move || {
            if let Some(s) = current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }));
        let svc = services.clone();
        services.spawn(
            "guest-channel",
            |_| {},
            move || {
                // A failed accept (out of descriptors, say) leaves the connection
                // in the backlog and is tried again after a back-off: never spins.
                let mut retry = Backoff::new("guest channel accept");
                while let Ok(true) = service::wait_readable(&svc, listener.as_fd()) {
                    let failure = match listener.accept() {
                        Ok((stream, _)) => {
                            if let Ok(s) = stream.try_clone() {
                                *me.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                            }
                            let served = if svc.stopping() {
                                Ok(())
                            } else {
                                me.serve(stream, &svc)
                            };
                            me.current.lock().unwrap_or_else(|p| p.into_inner()).take();
                            served.err()
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                        Err(e) => Some(e),
                    };
                    match failure {
                        None => retry.succeeded(),
                        Some(e) => {
                            if svc.sleep(retry.failed(&e)) {
                                break;
                            }
                        }
                    }
                }
            },
        )
    }

    /// Serves one connection to its end; an error is one that kept it from being
    /// served (its reader thread could not start).
    fn serve(
        self: &Arc<Self>,
        stream: UnixStream,
        services: &Arc<Services>,
    ) -> std::io::Result<()> {
        // Connected before the reader starts: it is the one that says otherwise.
        self.state.lock().unwrap().connected = true;
        // A reader that cannot start (a thread or process limit, memory) is retried
        // with a back-off while the guest stays connected: never the end of the
        // channel.
        let mut retry = Backoff::new("guest channel reader thread");
        let mut failed = 0u64;
        let read_thread = loop {
            let reader = stream.try_clone()?;
            let me = self.clone();
            match services.spawn_owned(
                "guest-channel-read",
                |_| {},
                move || {
                    // The guest writes here: lines are capped, every kind of message is
                    // logged rate-limited and its text escaped.
                    let mut reader = LineReader::new(reader, jsonl::MAX_LINE);
                    while let Ok(Some(msg)) = jsonl::read_message::<FromAgent, _>(&mut reader) {
                        match msg {
                            Ok(msg) => me.note(msg),
                            Err(e) => me.note_malformed(&e),
                        }
                    }
                    // The peer is gone: wake the pushing side so it stops.
                    me.state.lock().unwrap().connected = false;
                    let _guard = me.list.lock().unwrap();
                    me.changed.notify_all();
                },
            ) {
                Ok(t) => {
                    if failed > 0 {
                        info!(
                            "guest channel reader thread started after {failed} failed attempt(s)"
                        );
                    }
                    break t;
                }
                Err(e) => {
                    failed += 1;
                    self.state.lock().unwrap().thread_spawn_failures += 1;
                    if services.sleep(retry.failed(&e)) {
                        self.state.lock().unwrap().connected = false;
                        return Ok(());
                    }
                }
            }
        };
        info!("guest channel connected");
        if let Err(e) = self.push(&stream) {
            info!("guest channel: {e}");
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = read_thread.join();
        self.state.lock().unwrap().connected = false;
        info!("guest channel disconnected");
        Ok(())
    }

    /// Sends hello and the list, then the list again on every change, until the
    /// peer goes away.
    fn push(&self, mut stream: &UnixStream) -> std::io::Result<()> {
        send(&mut stream, &self.hello)?;
        let mut sent_gen = None;
        loop {
            let (generation, ranges) = {
                let guard = self.list.lock().unwrap();
                let guard = self
                    .changed
                    .wait_while(guard, |l| {
                        Some(l.0) == sent_gen && self.state.lock().unwrap().connected
                    })
                    .unwrap();
                (guard.0, guard.1.clone())
            };
            if !self.state.lock().unwrap().connected {
                return Ok(());
            }
            send(&mut stream, &ToAgent::Badblocks { ranges })?;
            sent_gen = Some(generation);
        }
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, AgentLogs> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the agent said; logs it if its kind's allowance is not spent.
    fn note(&self, msg: FromAgent) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        st.messages += 1;
        match msg {
            FromAgent::Attached {
                device,
                data_offset,
            } => {
                let device = guest_text(&device);
                if self.logs().attached.allow(now) {
                    info!("guest agent attached to \"{device}\" (data offset {data_offset})");
                }
                st.device = Some(device);
                st.data_offset = Some(data_offset);
            }
            FromAgent::Applied { sectors } => {
                if self.logs().applied.allow(now) {
                    info!("guest agent applied {} bad range(s)", sectors.len());
                }
                st.applied = sectors;
            }
            FromAgent::Error { message } => {
                let message = guest_text(&message);
                if self.logs().error.allow(now) {
                    warn!("guest agent error: \"{message}\"");
                }
                st.last_error = Some(message);
            }
        }
    }

    /// A line that was not a message (its error can quote the guest's text).
    fn note_malformed(&self, e: &jsonl::MessageError) {
        self.state.lock().unwrap().bad_messages += 1;
        if self.logs().malformed.allow(Instant::now()) {
            warn!(
                "guest agent sent a line that is not a message: {}",
                guest_text(&e.to_string())
            );
        }
    }
}

/// A number as sysfs prints it (the agent reads region sizes and resources):
/// decimal, or hexadecimal after `0x`; surrounding whitespace is trimmed.
pub fn parse_sysfs_number(text: &str) -> Option<u64> {
    let s = text.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Whether `s` is a PCI address as sysfs names devices: `DDDD:BB:SS.F`, hex.
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The agent's translation of a [`ToAgent::Badblocks`] list: file ranges → sectors
/// of the guest block device whose data starts `data_offset` bytes into the region
/// and is `size` bytes long, widened outward to whole sectors. What cannot be
/// expressed (ranges wholly outside the data area, parts in front of it) is
/// returned second, for the agent to report. Pure, and in the library so tests
/// and fuzzers reach it.
pub fn guest_sectors(
    data_offset: u64,
    size: u64,
    ranges: &[BadRange],
) -> (Vec<(u64, u64)>, Vec<BadRange>) {
    let (mut ok, mut lost) = (Vec::new(), Vec::new());
    let data_end = data_offset.saturating_add(size);
    for r in ranges {
        let start = r.offset.max(data_offset);
        let end = r.end().min(data_end);
        if start >= end {
            lost.push(*r);
            continue;
        }
        if start > r.offset {
            lost.push(BadRange {
                offset: r.offset,
                length: start - r.offset,
            });
        }
        let s = (start - data_offset) / SECTOR;
        let e = (end - data_offset).div_ceil(SECTOR);
        ok.push((s, e - s));
    }
    (ok, lost)
}

fn send<W: Write>(w: &mut W, msg: &ToAgent) -> std::io::Result<()> {
    jsonl::write_message(w, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_one_line_without_control_characters_and_capped() {
        let forged =
            "x\n[2030-01-01T00:00:00Z ERROR vhost_device_pmem] forged\r\u{1b}[2K\u{202e}\u{7f}\0";
        let t = guest_text(forged);
        assert!(!t.chars().any(char::is_control), "{t:?}");
        assert_eq!(
            t,
            "x\\n[2030-01-01T00:00:00Z ERROR vhost_device_pmem] forged\\r\\u{1b}[2K\\u{202e}\\u{7f}\\0"
        );
        // Quotes and backslashes are escaped too: the text cannot close the quotes
        // it is logged in.
        assert_eq!(guest_text(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(guest_text("/dev/pmem0"), "/dev/pmem0");
        let long = "\n".repeat(10_000);
        let t = guest_text(&long);
        assert!(t.ends_with("... (10000 bytes in all)"), "{t}");
        assert!(t.chars().count() <= GUEST_TEXT_MAX + 30);
    }

    #[test]
    fn every_message_kind_is_counted_and_its_text_kept_escaped() {
        let ch = GuestChannel::new(2 << 20, None, vec![]);
        for i in 0..1000 {
            ch.note(FromAgent::Error {
                message: format!("bad\n{i}"),
            });
            ch.note(FromAgent::Attached {
                device: "/dev/pmem0\u{1b}".into(),
                data_offset: 0,
            });
            ch.note(FromAgent::Applied { sectors: vec![] });
        }
        let st = ch.state.lock().unwrap().clone();
        assert_eq!(st.messages, 3000);
        assert_eq!(st.last_error.as_deref(), Some("bad\\n999"));
        assert_eq!(st.device.as_deref(), Some("/dev/pmem0\\u{1b}"));
        // Each kind has its own allowance, spent.
        let mut guard = ch.logs();
        let logs = &mut *guard;
        let now = Instant::now();
        for log in [&mut logs.attached, &mut logs.applied, &mut logs.error] {
            assert!(!log.allow(now));
        }
        assert!(logs.malformed.allow(now), "not spent by the others");
    }

    #[test]
    fn messages_have_a_stable_wire_form() {
        let m = ToAgent::Badblocks {
            ranges: vec![BadRange {
                offset: 4096,
                length: 512,
            }],
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"badblocks","ranges":[{"offset":4096,"length":512}]}"#
        );
        let a: FromAgent = serde_json::from_str(r#"{"type":"applied","sectors":[[8,1]]}"#).unwrap();
        assert_eq!(
            a,
            FromAgent::Applied {
                sectors: vec![(8, 1)]
            }
        );
    }
}
