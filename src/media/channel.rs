// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The channel to the guest agent: a unix socket the VMM connects a virtio-serial
//! port to, carrying newline-delimited JSON.
//!
//! Owns: the message format shared by the daemon and `vhost-device-pmem-agent` (its
//! lines go through `jsonl`, capped, versioned), and
//! the daemon's side of the channel (hello + the full bad-range list on every
//! connect, the full list again on every change). Never decides which ranges are bad.

use std::{
    io::Write,
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    device::queue::GuestLog,
    jsonl::{self, LineReader},
    media::ranges::{BadRange, SECTOR},
    service::{self, Services},
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

/// What the daemon knows about the agent, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    pub connected: bool,
    pub device: Option<String>,
    pub data_offset: Option<u64>,
    /// Ranges the agent last reported as applied.
    pub applied: Vec<(u64, u64)>,
    pub last_error: Option<String>,
    /// Times a connection's reader thread could not be started (EAGAIN: a
    /// process or thread limit, memory); each is retried, never fatal.
    #[serde(default)]
    pub thread_spawn_failures: u64,
}

/// The first wait before retrying a failed thread start, doubled up to
/// [`SPAWN_RETRY_MAX`].
const SPAWN_RETRY_FIRST: Duration = Duration::from_millis(50);
const SPAWN_RETRY_MAX: Duration = Duration::from_secs(5);

/// The daemon's side: serves one agent connection at a time and pushes the list.
pub struct GuestChannel {
    hello: ToAgent,
    /// Current list and a generation counter bumped on each change.
    list: Mutex<(u64, Vec<BadRange>)>,
    changed: Condvar,
    pub state: Mutex<AgentState>,
    /// The connection being served, so shutdown can end it.
    current: Arc<Mutex<Option<UnixStream>>>,
    /// Lines from the agent that were not a message (too long, not JSON, ...).
    pub bad_messages: AtomicU64,
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
            bad_messages: AtomicU64::new(0),
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
                while let Ok(true) = service::wait_readable(&svc, listener.as_fd()) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Ok(s) = stream.try_clone() {
                                *me.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                            }
                            if !svc.stopping() {
                                me.serve(stream, &svc);
                            }
                            me.current.lock().unwrap_or_else(|p| p.into_inner()).take();
                        }
                        Err(e) => warn!("guest channel accept failed: {e}"),
                    }
                }
            },
        )
    }

    fn serve(self: &Arc<Self>, stream: UnixStream, svc: &Services) {
        info!("guest channel connected");
        self.state.lock().unwrap().connected = true;
        let Some(read_thread) = self.start_reader(&stream, svc) else {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.state.lock().unwrap().connected = false;
            info!("guest channel disconnected");
            return;
        };
        if let Err(e) = self.push(&stream) {
            info!("guest channel: {e}");
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = read_thread.join();
        self.state.lock().unwrap().connected = false;
        info!("guest channel disconnected");
    }

    /// Starts the connection's reader thread. A start that fails (EAGAIN: the
    /// user's process limit or a cgroup's pids.max is reached, or memory is short)
    /// is counted, logged and retried with back-off for as long as the peer stays
    /// connected and no shutdown is asked for: a passing shortage delays the
    /// channel, it never ends it. None: the peer left or shutdown came first.
    fn start_reader(
        self: &Arc<Self>,
        stream: &UnixStream,
        svc: &Services,
    ) -> Option<JoinHandle<()>> {
        let mut delay = SPAWN_RETRY_FIRST;
        let mut failed = 0u64;
        loop {
            let error = match stream.try_clone() {
                Ok(reader) => {
                    let me = self.clone();
                    match thread::Builder::new()
                        .name("guest-channel-rx".into())
                        .spawn(move || me.read_messages(reader))
                    {
                        Ok(handle) => {
                            if failed > 0 {
                                info!(
                                    "guest channel: the connection's reader thread started after {failed} failed attempt(s)"
                                );
                            }
                            return Some(handle);
                        }
                        Err(e) => format!("cannot start the connection's reader thread: {e}"),
                    }
                }
                Err(e) => format!("cannot duplicate the connection: {e}"),
            };
            failed += 1;
            self.state.lock().unwrap().thread_spawn_failures += 1;
            // The first failure, then every doubling of the count: a long
            // shortage does not flood the log.
            if failed.is_power_of_two() {
                warn!(
                    "guest channel: {error} (attempt {failed}); retrying in up to {SPAWN_RETRY_MAX:?} while the guest stays connected"
                );
            }
            if !wait_retry(stream, svc, delay) {
                return None;
            }
            delay = (delay * 2).min(SPAWN_RETRY_MAX);
        }
    }

    /// The reader: the guest's messages until the peer goes away.
    fn read_messages(self: &Arc<Self>, reader: UnixStream) {
        // The guest writes here: lines are capped and complaints rate-limited.
        let mut reader = LineReader::new(reader, jsonl::MAX_LINE);
        let mut log = GuestLog::new("guest agent message");
        while let Ok(Some(msg)) = jsonl::read_message::<FromAgent, _>(&mut reader) {
            match msg {
                Ok(msg) => self.note(msg),
                Err(e) => {
                    self.bad_messages.fetch_add(1, Ordering::Relaxed);
                    if log.allow(Instant::now()) {
                        warn!("guest agent: {e}");
                    }
                }
            }
        }
        // The peer is gone: wake the pushing side so it stops.
        self.state.lock().unwrap().connected = false;
        let _guard = self.list.lock().unwrap();
        self.changed.notify_all();
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

    fn note(&self, msg: FromAgent) {
        let mut st = self.state.lock().unwrap();
        match msg {
            FromAgent::Attached {
                device,
                data_offset,
            } => {
                info!("guest agent attached to {device} (data offset {data_offset})");
                st.device = Some(device);
                st.data_offset = Some(data_offset);
            }
            FromAgent::Applied { sectors } => {
                info!("guest agent applied {} bad range(s)", sectors.len());
                st.applied = sectors;
            }
            FromAgent::Error { message } => {
                warn!("guest agent: {message}");
                st.last_error = Some(message);
            }
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

/// Waits `delay` before a retry; false if the peer hung up or shutdown was asked
/// for meanwhile.
fn wait_retry(stream: &UnixStream, svc: &Services, delay: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec::try_from(delay).ok();
    let stop = svc.stop_fd();
    let mut fds = [
        PollFd::new(stream, PollFlags::RDHUP),
        PollFd::new(&stop, PollFlags::IN),
    ];
    let _ = poll(&mut fds, timeout.as_ref());
    let gone = fds[0]
        .revents()
        .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR);
    !gone && fds[1].revents().is_empty() && !svc.stopping()
}

fn send<W: Write>(w: &mut W, msg: &ToAgent) -> std::io::Result<()> {
    jsonl::write_message(w, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

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
