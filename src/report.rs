// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the daemon reports about itself: the live device state shared between the
//! vhost-user connection, the control socket and the logs.
//!
//! Owns: the `status` document. Never changes behaviour; it only records it.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    durability::{Health, Mode, Policy, SyncFailure},
    util::{lock, rfc3339_now},
};

/// Why the request queue cannot be processed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueBroken {
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// Passes that found the queue unusable since.
    pub passes: u64,
}

/// Who is on the other end of the vhost-user socket (SO_PEERCRED at accept).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmIdentity {
    /// None when the peer's credentials could not be read.
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    /// The process's command name (`/proc/PID/comm`), if readable.
    pub comm: Option<String>,
    /// When it connected (RFC 3339).
    pub since: String,
}

impl fmt::Display for VmmIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.comm) {
            (Some(pid), Some(comm)) => write!(f, "pid {pid} ({comm})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => f.write_str("unknown peer"),
        }
    }
}

/// Live, cheaply updated device state.
#[derive(Default)]
pub struct DeviceStatus {
    connected: AtomicBool,
    /// Set at the first feature negotiation of a connection: a client that never
    /// negotiates is a probe, not a VMM.
    negotiated: AtomicBool,
    vmm: Mutex<Option<VmmIdentity>>,
    region_mapped: AtomicBool,
    features: AtomicU64,
    connections: AtomicU64,
    last_disconnect: Mutex<Option<String>>,
    queue_broken: Mutex<Option<QueueBroken>>,
    /// Mirrors `queue_broken.is_some()`, so a healthy pass checks it without a lock.
    queue_is_broken: AtomicBool,
    /// Times the queue was found broken (each episode once), over the daemon's life.
    queue_faults: AtomicU64,
}

impl DeviceStatus {
    /// A connection was accepted from `peer` (`None`: it ended).
    pub fn set_connected(&self, peer: Option<VmmIdentity>) {
        self.connected.store(peer.is_some(), Ordering::Release);
        self.negotiated.store(false, Ordering::Release);
        if peer.is_none() {
            self.region_mapped.store(false, Ordering::Release);
            self.features.store(0, Ordering::Release);
        }
        *lock(&self.vmm) = peer;
    }

    /// Whether the connection negotiated features (it is a VMM, not a probe).
    pub fn negotiated(&self) -> bool {
        self.negotiated.load(Ordering::Acquire)
    }

    /// The peer of the connection, while one is connected.
    pub fn vmm(&self) -> Option<VmmIdentity> {
        lock(&self.vmm).clone()
    }

    pub fn set_last_disconnect(&self, why: String) {
        *lock(&self.last_disconnect) = Some(why);
    }

    pub fn set_region_mapped(&self, yes: bool) {
        self.region_mapped.store(yes, Ordering::Release);
    }

    pub fn region_mapped(&self) -> bool {
        self.region_mapped.load(Ordering::Acquire)
    }

    /// Records the features the driver accepted; true for the first negotiation of
    /// the connection, which makes it count as a VMM connection.
    pub fn set_features(&self, features: u64) -> bool {
        self.features.store(features, Ordering::Release);
        let first = !self.negotiated.swap(true, Ordering::AcqRel);
        if first {
            self.connections.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
    }

    pub fn last_disconnect(&self) -> Option<String> {
        lock(&self.last_disconnect).clone()
    }

    /// Records a pass that found the queue unusable; true for the first pass of an
    /// episode (the caller logs and announces it then, and only then).
    pub fn queue_failed(&self, reason: &str) -> bool {
        let mut q = lock(&self.queue_broken);
        match q.as_mut() {
            Some(b) => {
                b.passes += 1;
                false
            }
            None => {
                *q = Some(QueueBroken {
                    reason: reason.to_string(),
                    since: rfc3339_now(),
                    passes: 1,
                });
                self.queue_is_broken.store(true, Ordering::Release);
                self.queue_faults.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// The queue is usable again; returns the episode that ended, if one did.
    pub fn queue_ok(&self) -> Option<QueueBroken> {
        if !self.queue_is_broken.load(Ordering::Acquire) {
            return None;
        }
        let mut q = lock(&self.queue_broken);
        self.queue_is_broken.store(false, Ordering::Release);
        q.take()
    }

    pub fn queue_broken(&self) -> Option<QueueBroken> {
        lock(&self.queue_broken).clone()
    }

    pub fn queue_faults(&self) -> u64 {
        self.queue_faults.load(Ordering::Relaxed)
    }
}

/// The `status` answer of the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// healthy, downgraded, queue-broken or failed (the worst that holds).
    pub health: Health,
    /// The latched sync failure, if a sync failed (now or in an earlier run).
    pub sync_failure: Option<SyncFailure>,
    /// Why the request queue cannot be processed, if it cannot.
    pub queue_broken: Option<QueueBroken>,
    pub version: String,
    pub pid: u32,
    pub file: String,
    pub size: u64,
    pub readonly: bool,
    pub mode_requested: Mode,
    pub policy: Policy,
    pub policy_reason: String,
    pub promise: String,
    /// Set when immutability was lost while serving and flushes became fsyncs.
    pub downgraded: Option<String>,
    pub socket: String,
    pub connected: bool,
    /// The VMM connected now (pid, command, since when), once it negotiated.
    #[serde(default)]
    pub vmm: Option<VmmIdentity>,
    pub connections: u64,
    pub last_disconnect: Option<String>,
    /// Virtio features the driver accepted, as a hex string.
    pub features_acked: String,
    pub shmem_region_feature: bool,
    pub region_mapped: bool,
    /// Lease, seal and block-map verification state.
    #[serde(default)]
    pub guard: Option<GuardStatus>,
    /// Known bad ranges of the backing file (file offsets, bytes).
    #[serde(default)]
    pub bad_ranges: Vec<crate::media::ranges::BadRange>,
    /// Why the bad ranges are not on disk (they are kept in memory and published;
    /// the write is retried).
    #[serde(default)]
    pub bad_ranges_persist_error: Option<String>,
    /// The guest agent, if a guest channel is configured.
    #[serde(default)]
    pub agent: Option<AgentState>,
    /// Service threads that died (a panic, caught at the thread boundary).
    #[serde(default)]
    pub services_failed: Vec<crate::service::ServiceFailure>,
    /// The seccomp sandbox: enforce, log or off.
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// System calls outside the allow-list answered ENOSYS (`enforce`) since the
    /// filter went on; each is also logged once per call and sent as an event.
    #[serde(default)]
    pub sandbox_denials: u64,
    /// The health record once a sync failed: whether it is written everywhere
    /// (`persisted`), where, and since when a write is pending.
    #[serde(default)]
    pub health_record: Option<HealthRecordStatus>,
    /// The flush rate limit (`--flush-rate-limit`) and what it did; absent
    /// without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_rate_limit: Option<FlushRateLimitStatus>,
    /// The NVDIMM export's part (`vhost-device-pmem nvdimm`); absent for `serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvdimm: Option<NvdimmStatus>,
}

/// The flush rate limit's part of `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlushRateLimitStatus {
    /// Flush requests per second, on average.
    pub ops_per_sec: u32,
    /// Flush requests served at once after a quiet spell (the bucket's size).
    pub burst: u32,
    /// Flush requests the limit held back before they were answered (each
    /// answered with success once its token was due), over the daemon's life.
    pub throttled: u64,
    /// Their waits added up, seconds (from the pass that first saw each one on
    /// the ring to the pass that took it).
    pub throttled_seconds: f64,
    /// A flush is held back on the ring now.
    pub holding: bool,
}

/// The guard's part of `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GuardStatus {
    /// "write lease held", "read lease held", "broken: ...", "unavailable: ...".
    pub lease: String,
    pub lease_breaks: u64,
    /// The immutable attribute is set by this daemon.
    pub sealed: bool,
    /// 0: only on lease breaks.
    pub verify_interval_secs: u64,
    pub verifications: u64,
    pub last_verified: Option<String>,
    /// Whether the map is watched at all (only an immutable map is).
    pub watching: bool,
    /// Set when the map was seen to change.
    pub map_changed: Option<String>,
    /// Change notices (inotify) that triggered a verification.
    #[serde(default)]
    pub change_notices: u64,
    /// Set when the served file was seen deleted, renamed over, moved away,
    /// truncated or resized: what happened (latched, like `map_changed`).
    #[serde(default)]
    pub file_problem: Option<String>,
    /// The kind of that change: `deleted`, `replaced` (renamed over), `moved`
    /// (its path names another file or none), `truncated`, `resized`.
    #[serde(default)]
    pub file_change: Option<String>,
    /// How many times such a change was seen (each new kind of change counts).
    #[serde(default)]
    pub file_problems: u64,
}

/// What the daemon knows about the agent, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    pub connected: bool,
    pub device: Option<String>,
    pub data_offset: Option<u64>,
    /// Ranges the agent last reported as applied.
    pub applied: Vec<(u64, u64)>,
    /// The agent's last error, escaped and capped (`media::channel::guest_text`).
    pub last_error: Option<String>,
    /// Messages received, over all connections.
    #[serde(default)]
    pub messages: u64,
    /// Lines that were not a message (too long, not JSON, ...).
    #[serde(default)]
    pub bad_messages: u64,
    /// Times a connection's reader thread could not be started (EAGAIN: a
    /// process or thread limit, memory); each is retried, never fatal.
    #[serde(default)]
    pub thread_spawn_failures: u64,
}

/// `--seccomp`: what an unlisted system call does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A call on the kill list (exec, fork, ptrace, a network socket, an executable
    /// mapping, ...) kills the whole process (SIGSYS, core-dumpable); any other
    /// unlisted call fails with ENOSYS, is logged once per call and counted
    /// (`status.sandbox_denials`).
    #[default]
    Enforce,
    /// Allow an unlisted call and have the kernel log it (audit type 1326 / SECCOMP
    /// lines in the kernel log): to find what a new path needs.
    Log,
    /// No filter.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The export's part of `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NvdimmStatus {
    /// direct or volatile.
    pub mode: Mode,
    /// The nvdimm device's id; its backend is `memdev`.
    pub id: String,
    pub memdev: String,
    pub qmp_socket: String,
    /// pending, hot-plugged or re-attached.
    pub attached: String,
    pub qemu_pid: Option<u32>,
    pub qemu_version: Option<String>,
    /// QEMU maps the judged file (its device:inode is in /proc/PID/smaps).
    pub mapping_verified: bool,
    /// The mapping's line of /proc/PID/maps.
    pub maps_line: Option<String>,
    pub vm_flags: Option<String>,
    /// MAP_SYNC is in effect for QEMU's mapping (VmFlags `sf`).
    pub sf: bool,
    /// The NVDIMM's guest-physical address (query-memory-devices).
    pub guest_address: Option<u64>,
    pub align: u64,
    pub sync_interval_secs: u64,
    /// Syncs made because the block map changed (the guest cannot ask for one).
    pub interval_syncs: u64,
    /// Set once QEMU's process is gone.
    pub qemu_exited: bool,
}

/// What `status` says about the health record (present once a sync failed, now or
/// in an earlier run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthRecordStatus {
    /// Written to every location: a daemon started next serves the file as failed.
    /// While false, the daemon retries, and exits 73 if it ends before it lands.
    pub persisted: bool,
    pub locations: Vec<RecordLocation>,
    /// RFC 3339: since when a write is pending.
    pub pending_since: Option<String>,
    /// Writes tried (each covers every location still missing).
    pub attempts: u64,
}

/// One directory of the health record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordLocation {
    /// The record's name after the file's path.
    pub path: String,
    pub written: bool,
    /// Why the last write there failed.
    pub error: Option<String>,
}
