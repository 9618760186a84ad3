// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who may use the control socket, and how many at once.
//!
//! Owns: the client cap and what happens at it (the client idle the longest is
//! closed to make room; with none idle, the newcomer is refused), the idle
//! deadline of a request, the cap on `events` streams, the peer's credentials
//! (SO_PEERCRED, SO_PEERGROUPS) and the rule "a command that changes state needs
//! root, the daemon's own uid or the operator group". Never answers a request
//! (that is `control`), never binds a socket.

use std::{
    collections::HashMap,
    io::{self, Read},
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use log::warn;
use serde::{Deserialize, Serialize};

use crate::{
    jsonl,
    util::{accept, GuestLog},
};

/// Default of `control-max-clients`.
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// Default of `control-idle-timeout`, seconds.
pub const DEFAULT_IDLE_TIMEOUT: u64 = 60;

/// The limits and the access rule of one control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientPolicy {
    /// Clients served at once (at least 1).
    pub max_clients: usize,
    /// How long a client may take to send a whole request (and to read an answer).
    pub idle_timeout: Duration,
    /// The daemon's effective uid, taken at start-up: its clients are operators.
    pub own_uid: u32,
    /// `--operator-group`: its members (primary or supplementary group) are
    /// operators too. Name as given, and gid.
    pub operator_group: Option<(String, u32)>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self {
            max_clients: DEFAULT_MAX_CLIENTS,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT),
            own_uid: rustix::process::geteuid().as_raw(),
            operator_group: None,
        }
    }
}

impl ClientPolicy {
    /// The policy of `max_clients`, `idle_timeout_secs` and an operator group (its
    /// name, for messages, and its gid, resolved by the caller at start-up).
    pub fn new(
        max_clients: usize,
        idle_timeout_secs: u64,
        operator_group: Option<(String, u32)>,
    ) -> Self {
        Self {
            max_clients: max_clients.max(1),
            idle_timeout: Duration::from_secs(idle_timeout_secs.max(1)),
            operator_group,
            ..Self::default()
        }
    }

    /// Most `events` streams at once: half the clients, so that requests always
    /// have the other half.
    pub fn max_streams(&self) -> usize {
        (self.max_clients / 2).max(1)
    }

    /// What `peer` may do.
    pub fn access(&self, peer: &Peer) -> Access {
        let in_group = |gid: u32| peer.gid == gid || peer.groups.contains(&gid);
        if peer.uid == 0
            || peer.uid == self.own_uid
            || self
                .operator_group
                .as_ref()
                .is_some_and(|(_, g)| in_group(*g))
        {
            Access::Operator
        } else {
            Access::ReadOnly
        }
    }

    /// Why `peer` may not run `command` (a command that changes state).
    pub fn refusal(&self, peer: &Peer, command: &str) -> String {
        format!(
            "permission denied: {command} changes the daemon's state, which needs root, \
             the daemon's uid {} or {}; this client is uid {} gid {} (pid {}), which may \
             run only the commands that read (status, stats, metrics, events, badblocks-list)",
            self.own_uid,
            match &self.operator_group {
                Some((name, gid)) => format!("a member of the operator group {name} (gid {gid})"),
                None => "a member of the operator group (none configured: --operator-group)".into(),
            },
            peer.uid,
            peer.gid,
            peer.pid
        )
    }
}

/// What a client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every command.
    Operator,
    /// The commands that only read.
    ReadOnly,
}

/// The credentials of a connected client, as the kernel recorded them at
/// connect(2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// `SO_PEERGROUPS` (Linux 4.13), which the `libc` crate does not name on Linux.
#[cfg(not(target_arch = "sparc64"))]
const SO_PEERGROUPS: libc::c_int = 59;
#[cfg(target_arch = "sparc64")]
const SO_PEERGROUPS: libc::c_int = 0x3d;

impl Peer {
    /// The peer of `stream`. Without credentials (never on Linux unix sockets) it
    /// is uid and gid `u32::MAX`: nobody's, read-only.
    pub fn of(stream: &UnixStream) -> Peer {
        let Ok(cred) = rustix::net::sockopt::socket_peercred(stream) else {
            return Peer {
                pid: 0,
                uid: u32::MAX,
                gid: u32::MAX,
                groups: vec![],
            };
        };
        Peer {
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            groups: peer_groups(stream).unwrap_or_default(),
        }
    }
}

/// The peer's supplementary groups (getsockopt SO_PEERGROUPS, asked again with a
/// larger buffer if the first is too small).
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * 4).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` holds `len` writable bytes; the kernel writes at most
        // that many and sets `len` to what it wrote or needs.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / 4;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(e);
        }
        groups.resize(needed, 0);
    }
}

/// What a client is doing, for the choice of whom to close at the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request since then (a client sending one byte at a time is
    /// still waiting).
    Idle(Instant),
    /// A request is being answered.
    Busy,
    /// Streaming events: never closed to make room, and capped on their own.
    Streaming,
}

struct Slot {
    stream: Arc<UnixStream>,
    phase: Phase,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    slots: HashMap<u64, Slot>,
}

/// The control clients being served, and what happened to the others.
pub struct Clients {
    pub policy: ClientPolicy,
    table: Mutex<Table>,
    pub counters: ClientStats,
    /// Closing clients and refusing requests, logged rate-limited.
    log: Mutex<GuestLog>,
}

/// Counters of the control socket's clients, in `stats`.
#[derive(Default)]
pub struct ClientStats {
    pub accepted: AtomicU64,
    /// Refused at the cap with no client idle to close.
    pub refused_busy: AtomicU64,
    /// Closed while idle to make room for a new client.
    pub evicted: AtomicU64,
    /// Closed after the idle timeout.
    pub timed_out: AtomicU64,
    /// Taken and closed because the daemon was out of descriptors (or threads).
    pub shed: AtomicU64,
    /// Requests refused to a client that may only read.
    pub denied: AtomicU64,
}

/// A point-in-time copy of [`ClientStats`] and the number of live clients.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientCounters {
    pub control_clients: u64,
    pub control_clients_accepted: u64,
    pub control_clients_refused_busy: u64,
    pub control_clients_evicted: u64,
    pub control_clients_timed_out: u64,
    pub control_clients_shed: u64,
    pub control_requests_denied: u64,
}

/// One line sent to a client before it is closed.
pub fn closing_line(why: &str) -> Vec<u8> {
    let answer = crate::control::Answer {
        error: Some(why.to_string()),
        ..Default::default()
    };
    jsonl::encode(&answer)
        .map(String::into_bytes)
        .unwrap_or_default()
}

impl Clients {
    pub fn new(policy: ClientPolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            table: Mutex::default(),
            counters: ClientStats::default(),
            log: Mutex::new(GuestLog::with_hint(
                "control client notice",
                " (see `stats`)",
            )),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs `msg`, rate-limited (clients decide how often this happens).
    pub fn notice(&self, msg: std::fmt::Arguments<'_>) {
        if self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now())
        {
            warn!("control socket: {msg}");
        }
    }

    /// Takes a slot for `stream`. At the cap, the client idle the longest is sent
    /// a line saying why and closed; if none is idle, `stream` is refused (None).
    pub fn admit(self: &Arc<Self>, stream: Arc<UnixStream>) -> Option<Ticket> {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table();
        if t.slots.len() >= self.policy.max_clients {
            let victim = t
                .slots
                .iter()
                .filter_map(|(id, s)| match s.phase {
                    Phase::Idle(since) => Some((since, *id)),
                    _ => None,
                })
                .min()
                .map(|(_, id)| id);
            let Some(victim) = victim.and_then(|id| t.slots.remove(&id)) else {
                drop(t);
                self.counters.refused_busy.fetch_add(1, Ordering::Relaxed);
                accept::refuse(
                    &stream,
                    &closing_line(&format!(
                        "the control socket is busy: {} clients, none idle; try again later",
                        self.policy.max_clients
                    )),
                );
                self.notice(format_args!(
                    "refused a client: {} clients, none idle (--control-max-clients)",
                    self.policy.max_clients
                ));
                return None;
            };
            accept::refuse(
                &victim.stream,
                &closing_line(&format!(
                    "closed: idle while {} other clients were waiting (--control-max-clients)",
                    self.policy.max_clients
                )),
            );
            let _ = victim.stream.shutdown(std::net::Shutdown::Read);
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            self.notice(format_args!(
                "closed the client idle the longest to make room ({} clients, --control-max-clients)",
                self.policy.max_clients
            ));
        }
        let id = t.next_id;
        t.next_id += 1;
        t.slots.insert(
            id,
            Slot {
                stream,
                phase: Phase::Idle(Instant::now()),
            },
        );
        Some(Ticket {
            clients: self.clone(),
            id,
        })
    }

    /// Live clients.
    pub fn len(&self) -> usize {
        self.table().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every client's connection (shutdown): their threads see the end.
    pub fn close_all(&self) {
        for s in self.table().slots.values() {
            let _ = s.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn snapshot(&self) -> ClientCounters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientCounters {
            control_clients: self.len() as u64,
            control_clients_accepted: get(&c.accepted),
            control_clients_refused_busy: get(&c.refused_busy),
            control_clients_evicted: get(&c.evicted),
            control_clients_timed_out: get(&c.timed_out),
            control_clients_shed: get(&c.shed),
            control_requests_denied: get(&c.denied),
        }
    }
}

/// A client's slot; dropping it frees the slot.
pub struct Ticket {
    clients: Arc<Clients>,
    id: u64,
}

impl Ticket {
    fn set(&self, phase: Phase) -> bool {
        match self.clients.table().slots.get_mut(&self.id) {
            Some(s) => {
                s.phase = phase;
                true
            }
            None => false,
        }
    }

    /// Waiting for the next request from now on.
    pub fn idle(&self) {
        self.set(Phase::Idle(Instant::now()));
    }

    /// Answering a request: not closed to make room. False if the client was
    /// already closed for that.
    pub fn busy(&self) -> bool {
        self.set(Phase::Busy)
    }

    /// Becomes an `events` stream, if fewer than [`ClientPolicy::max_streams`]
    /// are; false otherwise (the request is refused).
    pub fn stream(&self) -> bool {
        let mut t = self.clients.table();
        let streams = t
            .slots
            .values()
            .filter(|s| s.phase == Phase::Streaming)
            .count();
        if streams >= self.clients.policy.max_streams() {
            return false;
        }
        match t.slots.get_mut(&self.id) {
            Some(s) => {
                s.phase = Phase::Streaming;
                true
            }
            None => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.clients.table().slots.remove(&self.id);
    }
}

/// Reads a client's stream under a deadline for the whole request: each read
/// waits at most until then (SO_RCVTIMEO set to what is left), so a client that
/// sends one byte at a time is closed at the same time as one that sends none.
/// An expired deadline is [`io::ErrorKind::TimedOut`].
pub struct DeadlineReader {
    pub stream: Arc<UnixStream>,
    deadline: Mutex<Instant>,
}

impl DeadlineReader {
    pub fn new(stream: Arc<UnixStream>, timeout: Duration) -> Self {
        Self {
            stream,
            deadline: Mutex::new(Instant::now() + timeout),
        }
    }

    /// The next request must be complete within `timeout` from now.
    pub fn restart(&self, timeout: Duration) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + timeout;
    }
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // A zero timeout would mean "none": at least a millisecond.
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match (&*self.stream).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_the_daemon_uid_and_the_operator_group_may_change_state_others_only_read() {
        let p = ClientPolicy {
            own_uid: 1000,
            operator_group: Some(("ops".into(), 77)),
            ..ClientPolicy::default()
        };
        assert_eq!(p.access(&peer(0, 5, &[])), Access::Operator);
        assert_eq!(p.access(&peer(1000, 5, &[])), Access::Operator);
        assert_eq!(p.access(&peer(1001, 77, &[])), Access::Operator);
        assert_eq!(p.access(&peer(1001, 5, &[3, 77])), Access::Operator);
        assert_eq!(p.access(&peer(1001, 5, &[3, 78])), Access::ReadOnly);
        let why = p.refusal(&peer(1001, 5, &[3]), "badblocks-inject");
        assert!(
            why.starts_with("permission denied: badblocks-inject")
                && why.contains("uid 1001 gid 5")
                && why.contains("operator group ops (gid 77)"),
            "{why}"
        );
        let none = ClientPolicy {
            own_uid: 1000,
            ..ClientPolicy::default()
        };
        assert_eq!(none.access(&peer(1001, 77, &[77])), Access::ReadOnly);
        assert!(none
            .refusal(&peer(1001, 5, &[]), "x")
            .contains("--operator-group"));
    }

    #[test]
    fn the_credentials_of_a_socket_pair_are_our_own() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Peer::of(&a);
        assert_eq!(p.uid, rustix::process::geteuid().as_raw());
        assert_eq!(p.pid as u32, std::process::id());
        let mut ours = rustix::process::getgroups().unwrap();
        let mut got = p.groups.clone();
        ours.sort_unstable_by_key(|g| g.as_raw());
        got.sort_unstable();
        assert_eq!(got, ours.iter().map(|g| g.as_raw()).collect::<Vec<_>>());
    }

    fn clients(max: usize) -> Arc<Clients> {
        Clients::new(ClientPolicy {
            max_clients: max,
            ..ClientPolicy::default()
        })
    }

    #[test]
    fn at_the_cap_the_client_idle_the_longest_is_closed_to_make_room() {
        let c = clients(2);
        let (a, a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let (n, _n_peer) = UnixStream::pair().unwrap();
        let ta = c.admit(Arc::new(a)).unwrap();
        let tb = c.admit(Arc::new(b)).unwrap();
        tb.idle();
        let tn = c.admit(Arc::new(n)).expect("room made");
        assert_eq!(c.len(), 2);
        assert!(!ta.busy(), "a, idle the longest, was closed");
        let mut line = String::new();
        BufReader::new(&a_peer).read_line(&mut line).unwrap();
        assert!(line.contains("closed: idle"), "{line}");
        drop(ta);
        assert_eq!(c.len(), 2, "a's slot was already given away");
        // Nobody idle: the newcomer is refused and told so.
        assert!(tb.busy() && tn.busy());
        let (m, m_peer) = UnixStream::pair().unwrap();
        assert!(c.admit(Arc::new(m)).is_none());
        line.clear();
        BufReader::new(&m_peer).read_line(&mut line).unwrap();
        assert!(line.contains("busy"), "{line}");
        let s = c.snapshot();
        assert_eq!(
            (s.control_clients_evicted, s.control_clients_refused_busy),
            (1, 1)
        );
        drop(tn);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn events_streams_get_half_the_slots_and_are_never_closed_to_make_room() {
        let c = clients(4);
        let tickets: Vec<_> = (0..4)
            .map(|_| c.admit(Arc::new(UnixStream::pair().unwrap().0)).unwrap())
            .collect();
        assert!(tickets[0].stream() && tickets[1].stream());
        assert!(!tickets[2].stream(), "a third stream of 4 slots");
        tickets[2].busy();
        tickets[3].busy();
        assert!(c.admit(Arc::new(UnixStream::pair().unwrap().0)).is_none());
        assert!(tickets[0].busy(), "streams were left alone");
    }

    #[test]
    fn a_deadline_covers_the_whole_request_not_each_read() {
        use std::io::Write;
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut r = DeadlineReader::new(Arc::new(server), Duration::from_millis(300));
        let dripper = std::thread::spawn(move || {
            // One byte every 50 ms: each read sees data well within the timeout.
            for _ in 0..100 {
                if client.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut buf = [0u8; 1];
        let err = loop {
            if let Err(e) = r.read(&mut buf) {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(r);
        dripper.join().unwrap();
    }
}
