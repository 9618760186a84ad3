// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a guest flush costs and promises: the durability modes and the flush executor.
//!
//! Owns: the only calls to fsync/fdatasync on the backing file, the choice of mode
//! from a block-map verdict, the one-way downgrade when immutability is lost, the
//! latched sync failure (after one failed sync every later flush is EIO: Linux
//! reports a writeback error once, so a second sync would succeed and lie), the
//! daemon's health vocabulary, and the flush counters. Never maps, resizes or writes
//! the file.

use std::{
    fmt,
    fs::File,
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    blockmap::{self, Filesystem, Verdict},
    util::{lock, Busy},
};

/// The mode asked for on the command line or in the config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The strongest mode the file qualifies for; refuses to start if only
    /// `volatile` would.
    #[default]
    Auto,
    /// DAX host file, MAP_SYNC-capable, immutable block map: flushes make no syscall.
    Direct,
    /// Any writable file: one fdatasync per batch of flushes. Correct for any file
    /// (fdatasync commits the allocation metadata a later read needs); with an
    /// immutable block map it needs no journal commit.
    Datasync,
    /// One fsync per batch of flushes (also commits timestamps; never needed for
    /// the guest's data, kept for operators who want it).
    Fsync,
    /// No persistence at all; for scratch guests only.
    Volatile,
}

/// The policy in force: what a batch of flush requests does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Policy {
    /// Data reaches media through the guest's own cache flushes; nothing to do.
    Direct = 0,
    /// fdatasync: data writeback, plus a journal commit only when the block map
    /// changed since the last one (never, for an immutable map).
    Datasync = 1,
    /// fsync: data and metadata.
    Fsync = 2,
    /// Nothing is made durable.
    Volatile = 3,
    /// The region is mapped read-only; nothing can be dirty.
    ReadOnly = 4,
}

impl Policy {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Direct,
            1 => Self::Datasync,
            2 => Self::Fsync,
            3 => Self::Volatile,
            _ => Self::ReadOnly,
        }
    }

    /// Whether this policy relies on the block map staying immutable (only `direct`:
    /// its flushes make no syscall, so nothing would commit a changed map).
    pub fn needs_immutable_map(self) -> bool {
        matches!(self, Self::Direct)
    }

    /// What the policy promises a guest on a filesystem that keeps its files across
    /// a power cut, in one line (for logs and `status`); [`Self::promise_on`] says
    /// what it gives on the backing file's filesystem.
    pub fn promise(self) -> &'static str {
        match self {
            Self::Direct => {
                "a guest cache flush is durable by itself; flush requests make no syscall"
            }
            Self::Datasync => "each flush request is durable after one shared fdatasync",
            Self::Fsync => "each flush request is durable after one shared fsync",
            Self::Volatile => {
                "NOTHING IS PERSISTENT: flushes are acknowledged without making data durable"
            }
            Self::ReadOnly => "the region is read-only; flushes have nothing to do",
        }
    }
}

impl Policy {
    /// What the policy gives the guest's writes to a file on `fs` (the backing
    /// file's filesystem, if known): [`Self::promise`], unless `fs` keeps files in
    /// memory only (tmpfs, ramfs), where no sync makes anything survive a power cut.
    pub fn promise_on(self, fs: Option<Filesystem>) -> String {
        match fs.filter(|f| f.memory_only()) {
            None => self.promise().to_string(),
            Some(fs) => match self {
                Self::ReadOnly => format!(
                    "{}; the file is on {fs} (memory only) and does not survive a reboot",
                    self.promise()
                ),
                Self::Volatile => format!(
                    "NOTHING IS PERSISTENT: flushes are acknowledged without making data durable, and the file is on {fs}, which keeps it in memory only: nothing survives a power cut or reboot"
                ),
                _ => format!(
                    "NOTHING SURVIVES A POWER CUT: the file is on {fs}, which keeps it in memory only; a flush request is answered after one shared {} (which {fs} ignores): the data outlives the VM and the daemon, not a reboot or power cut",
                    if self == Self::Fsync { "fsync" } else { "fdatasync" }
                ),
            },
        }
    }

    /// What the exit leaves, after the final sync under this policy succeeded on a
    /// file on `fs` (for the daemon's last log line).
    pub fn exit_claim(self, fs: Option<Filesystem>) -> String {
        let memory_only = fs.filter(|f| f.memory_only());
        match (self, memory_only) {
            (Self::Volatile, None) => "policy volatile: nothing was made durable; what the guest wrote reaches the disk whenever the kernel writes the page cache back".into(),
            (Self::Volatile, Some(fs)) => format!("policy volatile, and the file is on {fs} (memory only): nothing was made durable and nothing survives a reboot or power cut"),
            (Self::ReadOnly, _) => "the region was read-only: there was nothing to make durable".into(),
            (_, None) => format!("data is durable per policy {self} (a final fsync succeeded)"),
            (_, Some(fs)) => format!("policy {self}: a final fsync succeeded, but the file is on {fs} (memory only): the data does not survive a reboot or power cut"),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Datasync => "datasync",
            Self::Fsync => "fsync",
            Self::Volatile => "volatile",
            Self::ReadOnly => "readonly",
        })
    }
}

/// Why a mode cannot be used for a file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("mode {mode:?} needs an immutable block map, but {file} has {count} problem range(s), first: {first}; run `vhost-device-pmem prepare` on it")]
    NotImmutable {
        mode: Mode,
        file: String,
        count: usize,
        first: String,
    },
    #[error(
        "mode direct needs DAX on the host file ({file}: dax={dax}, MAP_SYNC possible={map_sync})"
    )]
    NotDax {
        file: String,
        dax: bool,
        map_sync: bool,
    },
}

/// Picks the policy for `mode`, returning it with the reason (for logs and `status`).
pub fn choose_policy(
    mode: Mode,
    readonly: bool,
    verdict: Option<&Verdict>,
    file: &str,
) -> Result<(Policy, String), ModeError> {
    if readonly {
        return Ok((
            Policy::ReadOnly,
            "--readonly: the region is mapped read-only".into(),
        ));
    }
    let immutable = verdict.is_some_and(Verdict::immutable);
    let dax = verdict.is_some_and(|v| v.dax && v.map_sync);
    let not_immutable = |mode| {
        let (count, first) = verdict.map_or((0, "block map unreadable".to_string()), |v| {
            (
                v.problems.len(),
                v.problems
                    .first()
                    .map_or("empty file".to_string(), ToString::to_string),
            )
        });
        ModeError::NotImmutable {
            mode,
            file: file.to_string(),
            count,
            first,
        }
    };
    match mode {
        Mode::Direct => {
            if !dax {
                return Err(ModeError::NotDax {
                    file: file.to_string(),
                    dax: verdict.is_some_and(|v| v.dax),
                    map_sync: verdict.is_some_and(|v| v.map_sync),
                });
            }
            if !immutable {
                return Err(not_immutable(mode));
            }
            Ok((
                Policy::Direct,
                "requested; DAX with MAP_SYNC and an immutable block map".into(),
            ))
        }
        Mode::Datasync => Ok((
            Policy::Datasync,
            format!("requested; {}", datasync_cost(verdict)),
        )),
        Mode::Fsync => Ok((Policy::Fsync, "requested".into())),
        Mode::Volatile => Ok((
            Policy::Volatile,
            "requested explicitly with --mode volatile".into(),
        )),
        Mode::Auto => match verdict {
            Some(v) if v.immutable() && v.dax && v.map_sync => Ok((
                Policy::Direct,
                format!(
                    "auto: {} with DAX and MAP_SYNC, immutable block map ({} extents)",
                    v.filesystem, v.extents
                ),
            )),
            _ => Ok((
                Policy::Datasync,
                format!("auto: {}", datasync_cost(verdict)),
            )),
        },
    }
}

/// What a `datasync` flush costs for this verdict: whether it will commit the journal.
fn datasync_cost(verdict: Option<&Verdict>) -> String {
    match verdict {
        Some(v) if v.immutable() => format!(
            "immutable block map ({} extents) on {}: a flush is data writeback only, no journal commit",
            v.extents, v.filesystem
        ),
        Some(v) => format!(
            "block map not immutable ({} problem range(s), first: {}): a flush that follows an allocation \
             or conversion also commits the journal (`vhost-device-pmem prepare` avoids that)",
            v.problems.len(),
            v.problems.first().map_or("empty file".to_string(), ToString::to_string)
        ),
        None => "the block map could not be read (no FIEMAP here): a flush may commit the journal".into(),
    }
}

/// The daemon's health, the one vocabulary of `status`, events, metrics and the
/// service manager's status line. Ordered by severity; the worst that holds is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Serving under the policy it was started with.
    Healthy,
    /// Serving, under a weaker policy than it started with (the block map changed).
    Downgraded,
    /// The request queue cannot be processed (the guest broke the ring); flushes wait
    /// until the ring is sane again or the device is reset.
    QueueBroken,
    /// The served file was deleted, renamed over, moved away, truncated or resized
    /// while serving: what the guest writes from then on may vanish with the last
    /// descriptor (`status.guard.file_problem` says what happened).
    FileChanged,
    /// A sync failed: what the guest wrote may not be on stable storage; every flush
    /// is answered EIO until an operator clears the record.
    Failed,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Healthy => "healthy",
            Self::Downgraded => "downgraded",
            Self::QueueBroken => "queue-broken",
            Self::FileChanged => "file-changed",
            Self::Failed => "failed",
        })
    }
}

/// Where a failed sync happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncContext {
    /// Answering a batch of guest flushes.
    Flush,
    /// Making the past durable when the policy was downgraded.
    Downgrade,
    /// Making the data durable after the VMM went away.
    Disconnect,
    /// The final sync at exit.
    Shutdown,
    /// The short-interval sync of an NVDIMM export whose block map changed (the
    /// guest has no flush request to send).
    Interval,
}

impl fmt::Display for SyncContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flush => "flush",
            Self::Downgrade => "downgrade",
            Self::Disconnect => "disconnect",
            Self::Shutdown => "shutdown",
            Self::Interval => "interval",
        })
    }
}

/// A latched sync failure: the first one, and how many flush requests were answered
/// EIO since (that one's batch included). Recorded in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    pub errno: i32,
    pub error: String,
    /// Seconds since the epoch.
    pub at: u64,
    pub context: SyncContext,
    pub requests: u64,
}

impl SyncFailure {
    fn new(context: SyncContext, e: &io::Error) -> Self {
        Self {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            error: e.to_string(),
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            context,
            requests: 0,
        }
    }
}

/// Called once, when a failure is latched (records it, publishes an event).
pub type FailureHook = Box<dyn Fn(&SyncFailure) + Send + Sync>;

/// Counters exposed by `stats`. Latency is the daemon's service time of a batch,
/// from the moment it was taken off the ring to its completion.
#[derive(Default)]
pub struct FlushStats {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    latency: Mutex<LatencyHistogram>,
}

/// Log2 buckets of microseconds: bucket i holds latencies in [2^(i-1), 2^i) µs.
#[derive(Default, Clone)]
struct LatencyHistogram {
    buckets: [u64; LATENCY_BUCKETS],
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl LatencyHistogram {
    fn record(&mut self, d: Duration, n: u64) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let idx = (64 - us.leading_zeros()) as usize;
        self.buckets[idx.min(LATENCY_BUCKETS - 1)] += n;
        self.count += n;
        self.sum_us = self.sum_us.saturating_add(us.saturating_mul(n));
        self.max_us = self.max_us.max(us);
    }

    /// Upper bound (µs) of the bucket holding quantile `q`.
    fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return if i == 0 {
                    1
                } else {
                    (1u64 << i).min(self.max_us.max(1))
                };
            }
        }
        self.max_us
    }
}

/// A point-in-time copy of the latency histogram, for `metrics`: `buckets[i]` counts
/// the flush requests whose batch took less than 2^i µs and (for i > 0) at least
/// 2^(i-1) µs (latencies are truncated to whole microseconds); the last bucket also
/// holds everything longer. Not cumulative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyBuckets {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub count: u64,
    /// Sum of the truncated latencies, µs.
    pub sum_us: u64,
}

/// How many log2 buckets the latency histogram keeps.
pub const LATENCY_BUCKETS: usize = 32;

/// A point-in-time copy of the counters, for the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub flush_requests: u64,
    pub batches: u64,
    pub syncs: u64,
    pub errors: u64,
    pub latency_us: LatencySummary,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl FlushStats {
    /// The latency histogram as it is now.
    pub fn latency_buckets(&self) -> LatencyBuckets {
        let h = lock(&self.latency);
        LatencyBuckets {
            buckets: h.buckets,
            count: h.count,
            sum_us: h.sum_us,
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let h = lock(&self.latency).clone();
        StatsSnapshot {
            flush_requests: self.requests.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_us: LatencySummary {
                count: h.count,
                mean: h.sum_us.checked_div(h.count).unwrap_or(0),
                p50: h.quantile_us(0.50),
                p99: h.quantile_us(0.99),
                max: h.max_us,
            },
        }
    }
}

/// Executes flushes for one backing file under the policy in force.
///
/// Group commit comes from batching: the queue handler takes every flush request
/// that is on the ring, calls [`Flusher::flush_batch`] once, and completes them all;
/// requests that arrive during the sync wait for the next one. A sync that *started*
/// after a request was queued is what the request needs, so this is exact.
pub struct Flusher {
    file: File,
    /// The file's filesystem (statfs at creation), for what the policy gives.
    filesystem: Option<Filesystem>,
    policy: AtomicU8,
    /// Bumped on every downgrade, so a batch can tell it raced one.
    epoch: AtomicU64,
    downgrade_reason: Mutex<Option<String>>,
    /// Set with the first failed sync, never cleared while the daemon runs.
    failed: AtomicBool,
    failure: Mutex<Option<SyncFailure>>,
    on_failure: OnceLock<FailureHook>,
    /// Shared with the control socket, which reads them and nothing else.
    pub stats: Arc<FlushStats>,
    /// Set while a sync syscall is in progress (the watchdog reads it).
    pub busy: Busy,
    /// Runs just before every sync syscall (tests hold a sync there).
    #[cfg(test)]
    sync_hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Flusher {
    pub fn new(file: File, policy: Policy) -> Self {
        Self {
            filesystem: blockmap::filesystem_of(&file).ok(),
            file,
            policy: AtomicU8::new(policy as u8),
            epoch: AtomicU64::new(0),
            downgrade_reason: Mutex::new(None),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            on_failure: OnceLock::new(),
            stats: Arc::default(),
            busy: Busy::default(),
            #[cfg(test)]
            sync_hook: OnceLock::new(),
        }
    }

    /// Starts latched with a failure recorded by an earlier run: its error may have
    /// been reported to that run's descriptor only (errseq), so this one's syncs
    /// could succeed without the data being there.
    pub fn restore_failure(&self, failure: SyncFailure) {
        *lock(&self.failure) = Some(failure);
        self.failed.store(true, Ordering::Release);
    }

    /// Runs `hook` just before every sync syscall (tests hold a sync there to see
    /// what queues up behind it).
    #[cfg(test)]
    pub(crate) fn set_sync_hook(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.sync_hook.set(hook);
    }

    /// What to do when a failure is latched (once per daemon).
    pub fn set_failure_hook(&self, hook: FailureHook) {
        let _ = self.on_failure.set(hook);
    }

    /// The latched failure, if any.
    pub fn failure(&self) -> Option<SyncFailure> {
        lock(&self.failure).clone()
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Health as far as durability goes (the queue adds `queue-broken`).
    pub fn health(&self) -> Health {
        if self.failed() {
            Health::Failed
        } else if lock(&self.downgrade_reason).is_some() {
            Health::Downgraded
        } else {
            Health::Healthy
        }
    }

    /// Latches `e`: the first failure is kept (and handed to the hook), later ones
    /// are logged; `requests` flush requests were answered EIO because of it.
    fn latch(&self, context: SyncContext, e: &io::Error, requests: u64) {
        let mut slot = lock(&self.failure);
        let first = slot.is_none();
        let failure = slot.get_or_insert_with(|| SyncFailure::new(context, e));
        failure.requests += requests;
        let snapshot = failure.clone();
        self.failed.store(true, Ordering::Release);
        drop(slot);
        if first {
            log::error!(
                "sync of the backing file failed during {context}: {e}; from now on every flush is answered EIO \
                 (the data may not be on stable storage; Linux reports such an error only once)"
            );
            if let Some(hook) = self.on_failure.get() {
                hook(&snapshot);
            }
        } else {
            log::error!("another sync failure during {context}: {e}");
        }
    }

    pub fn policy(&self) -> Policy {
        Policy::from_u8(self.policy.load(Ordering::Acquire))
    }

    /// What the policy in force gives the guest on this file's filesystem (the
    /// `promise` of `status` and the start-up log).
    pub fn promise(&self) -> String {
        self.policy().promise_on(self.filesystem)
    }

    /// The backing file's filesystem, if statfs could tell.
    pub fn filesystem(&self) -> Option<Filesystem> {
        self.filesystem
    }

    /// What the exit leaves, after a successful [`Self::final_sync`].
    pub fn exit_claim(&self) -> String {
        self.policy().exit_claim(self.filesystem)
    }

    /// Why the policy was downgraded, if it was.
    pub fn downgrade_reason(&self) -> Option<String> {
        lock(&self.downgrade_reason).clone()
    }

    /// Makes every write to the region before this call durable, per policy, for a
    /// batch of `requests` flush requests taken off the ring at `taken`. Once a sync
    /// failed, answers EIO without trying again.
    pub fn flush_batch(&self, requests: u64, taken: Instant) -> io::Result<()> {
        let result = if self.failed() {
            if let Some(f) = lock(&self.failure).as_mut() {
                f.requests += requests;
            }
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            let epoch = self.epoch.load(Ordering::Acquire);
            let policy = self.policy();
            let mut result = self.sync(policy);
            // A downgrade that raced this batch means the map may have changed while
            // we relied on it: make the batch durable under the stronger policy too.
            if result.is_ok() && self.epoch.load(Ordering::Acquire) != epoch {
                let now = self.policy();
                if now != policy {
                    result = self.sync(now);
                }
            }
            if let Err(e) = &result {
                self.latch(SyncContext::Flush, e, requests);
            }
            result
        };
        self.stats.requests.fetch_add(requests, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.stats.errors.fetch_add(requests, Ordering::Relaxed);
        }
        lock(&self.stats.latency).record(taken.elapsed(), requests);
        result
    }

    fn sync(&self, policy: Policy) -> io::Result<()> {
        let data_only = match policy {
            Policy::Direct | Policy::Volatile | Policy::ReadOnly => return Ok(()),
            Policy::Datasync => true,
            Policy::Fsync => false,
        };
        let _busy = self.busy.enter();
        #[cfg(test)]
        if let Some(hook) = self.sync_hook.get() {
            hook();
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        if data_only {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        }
    }

    /// The block-map promise `direct` relies on is gone: from now on every flush is
    /// an fdatasync (correct for any file). One way: only a restart (and a fresh
    /// verdict) goes back. Before it returns, the whole file is made durable, which
    /// covers the flushes acknowledged while the map was already changing and the
    /// change not yet seen (they made no syscall). Returns false if the policy did
    /// not rely on the map (nothing to do: a `datasync` flush commits whatever
    /// changed).
    pub fn downgrade(&self, reason: &str) -> bool {
        let old = self.policy();
        if !old.needs_immutable_map() {
            return false;
        }
        *lock(&self.downgrade_reason) = Some(reason.to_string());
        self.policy.store(Policy::Datasync as u8, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        log::error!("durability downgraded from {old} to datasync: {reason}");
        if !self.failed() {
            if let Err(e) = self.sync(Policy::Fsync) {
                self.latch(SyncContext::Downgrade, &e, 0);
            }
        }
        true
    }

    /// Makes the whole file durable now under the current policy (nothing for
    /// `direct`, `volatile`, `readonly`), for a device that sends no flush requests
    /// (an NVDIMM); a failure is latched like a flush's, an earlier one returned.
    pub fn sync_now(&self, context: SyncContext) -> io::Result<()> {
        if let Some(f) = self.failure() {
            return Err(io::Error::other(format!(
                "a sync failed earlier ({} at {}): {}",
                f.context, f.at, f.error
            )));
        }
        self.sync(self.policy())
            .inspect_err(|e| self.latch(context, e, 0))
    }

    /// Makes everything durable per the current policy, after the VMM went away or
    /// at exit. A failure is latched; an earlier one is returned again (nothing
    /// acknowledged after it may be trusted).
    pub fn final_sync(&self, context: SyncContext) -> io::Result<()> {
        if let Some(f) = self.failure() {
            return Err(io::Error::other(format!(
                "a sync failed earlier ({} at {}): {}",
                f.context, f.at, f.error
            )));
        }
        match self.policy() {
            Policy::Volatile | Policy::ReadOnly => Ok(()),
            // Even in direct mode an fsync at the end is free insurance.
            _ => self
                .sync(Policy::Fsync)
                .inspect_err(|e| self.latch(context, e, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::{Filesystem, Problem, ProblemKind};

    #[test]
    fn promises_and_exit_claims_say_what_the_filesystem_keeps() {
        use Policy::*;
        for p in [Direct, Datasync, Fsync, Volatile, ReadOnly] {
            // A disk filesystem (or an unknown one): the plain promise.
            assert_eq!(p.promise_on(Some(Filesystem::Ext4)), p.promise());
            assert_eq!(p.promise_on(None), p.promise());
        }
        for fs in [Filesystem::Tmpfs, Filesystem::Ramfs] {
            for p in [Datasync, Fsync] {
                let promise = p.promise_on(Some(fs));
                assert!(
                    promise.starts_with("NOTHING SURVIVES A POWER CUT: the file is on"),
                    "{promise}"
                );
                assert!(promise.contains(&fs.to_string()), "{promise}");
                assert!(!promise.contains("is durable"), "{promise}");
                let exit = p.exit_claim(Some(fs));
                assert!(!exit.contains("durable per"), "{exit}");
                assert!(
                    exit.contains("does not survive a reboot or power cut"),
                    "{exit}"
                );
            }
            assert!(Volatile
                .promise_on(Some(fs))
                .contains("nothing survives a power cut"));
        }
        assert_eq!(
            Datasync.exit_claim(Some(Filesystem::Xfs)),
            "data is durable per policy datasync (a final fsync succeeded)"
        );
        let v = Volatile.exit_claim(Some(Filesystem::Ext4));
        assert!(
            v.starts_with("policy volatile: nothing was made durable"),
            "{v}"
        );
        assert!(!v.contains("is durable"), "{v}");
        assert!(ReadOnly
            .exit_claim(None)
            .contains("nothing to make durable"));
    }

    #[test]
    fn the_flusher_reads_the_filesystem_of_its_file() {
        let shm = std::path::Path::new("/dev/shm");
        let Ok(f) = tempfile::tempfile_in(shm) else {
            return; // no /dev/shm here; tests/cli.rs mounts a tmpfs as root
        };
        if blockmap::filesystem_of(&f).ok() != Some(Filesystem::Tmpfs) {
            return;
        }
        let fl = Flusher::new(f, Policy::Datasync);
        assert_eq!(fl.filesystem(), Some(Filesystem::Tmpfs));
        assert!(fl.promise().starts_with("NOTHING SURVIVES A POWER CUT"));
    }

    fn verdict(problems: Vec<Problem>, dax: bool) -> Verdict {
        Verdict {
            size: 2 << 20,
            filesystem: Filesystem::Ext4,
            dax,
            map_sync: dax,
            extents: 1,
            problems,
            fingerprint: 1,
        }
    }

    fn hole() -> Problem {
        Problem {
            offset: 0,
            length: 4096,
            kind: ProblemKind::Hole,
        }
    }

    #[test]
    fn auto_picks_the_strongest_mode_that_holds() {
        let f = "f";
        let p = |v: &Verdict| choose_policy(Mode::Auto, false, Some(v), f).unwrap().0;
        assert_eq!(p(&verdict(vec![], true)), Policy::Direct);
        assert_eq!(p(&verdict(vec![], false)), Policy::Datasync);
        // fdatasync is correct for any file; a map that is not immutable only costs
        // journal commits.
        assert_eq!(p(&verdict(vec![hole()], true)), Policy::Datasync);
        assert_eq!(p(&verdict(vec![hole()], false)), Policy::Datasync);
        assert_eq!(
            choose_policy(Mode::Auto, false, None, f).unwrap().0,
            Policy::Datasync
        );
        assert_eq!(
            choose_policy(Mode::Auto, true, None, f).unwrap().0,
            Policy::ReadOnly
        );
        let (_, why) =
            choose_policy(Mode::Auto, false, Some(&verdict(vec![hole()], false)), f).unwrap();
        assert!(
            why.contains("commits the journal") && why.contains("prepare"),
            "{why}"
        );
        let (_, why) = choose_policy(Mode::Auto, false, Some(&verdict(vec![], false)), f).unwrap();
        assert!(why.contains("no journal commit"), "{why}");
    }

    #[test]
    fn explicit_modes_are_refused_when_the_file_does_not_qualify() {
        let f = "img";
        assert!(matches!(
            choose_policy(Mode::Direct, false, Some(&verdict(vec![], false)), f),
            Err(ModeError::NotDax { .. })
        ));
        let e =
            choose_policy(Mode::Direct, false, Some(&verdict(vec![hole()], true)), f).unwrap_err();
        assert!(e.to_string().contains("prepare"), "{e}");
        // Only direct needs an immutable map.
        assert_eq!(
            choose_policy(
                Mode::Datasync,
                false,
                Some(&verdict(vec![hole()], false)),
                f
            )
            .unwrap()
            .0,
            Policy::Datasync
        );
        assert_eq!(
            choose_policy(Mode::Fsync, false, None, f).unwrap().0,
            Policy::Fsync
        );
        assert_eq!(
            choose_policy(Mode::Volatile, false, None, f).unwrap().0,
            Policy::Volatile
        );
    }

    #[test]
    fn downgrade_is_one_way_and_counts_syncs() {
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Direct);
        fl.flush_batch(3, Instant::now()).unwrap();
        assert!(fl.downgrade("map changed"));
        assert_eq!(fl.policy(), Policy::Datasync);
        assert!(!fl.downgrade("again"));
        fl.flush_batch(1, Instant::now()).unwrap();
        let s = fl.stats.snapshot();
        // No sync for the direct batch; one for the downgrade, one for the next batch.
        assert_eq!((s.flush_requests, s.batches, s.syncs), (4, 2, 2));
        // datasync and fsync do not rely on the map: nothing to downgrade.
        for p in [Policy::Datasync, Policy::Fsync] {
            assert!(!Flusher::new(tempfile::tempfile().unwrap(), p).downgrade("map changed"));
        }
        assert_eq!(fl.downgrade_reason().as_deref(), Some("map changed"));
    }

    /// fsync(2) on a socket fails with EINVAL: a real failing sync, no mocking.
    fn failing_file() -> File {
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        File::from(std::os::fd::OwnedFd::from(sock))
    }

    #[test]
    fn a_failed_sync_is_latched_and_never_retried() {
        let fl = Flusher::new(failing_file(), Policy::Datasync);
        let hooked = std::sync::Arc::new(AtomicU64::new(0));
        let h = hooked.clone();
        fl.set_failure_hook(Box::new(move |f| {
            assert_eq!(f.context, SyncContext::Flush);
            h.fetch_add(1, Ordering::Relaxed);
        }));
        assert!(fl.flush_batch(2, Instant::now()).is_err());
        assert_eq!(fl.health(), Health::Failed);
        // No second sync: Linux would report the error only once, and a second
        // fdatasync that returns 0 would acknowledge data that is not on disk.
        let e = fl.flush_batch(3, Instant::now()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let s = fl.stats.snapshot();
        assert_eq!((s.syncs, s.errors, s.flush_requests), (1, 5, 5));
        let f = fl.failure().unwrap();
        assert_eq!((f.errno, f.requests), (libc::EINVAL, 5));
        assert_eq!(hooked.load(Ordering::Relaxed), 1);
        // The end of the connection and the exit report it again.
        assert!(fl.final_sync(SyncContext::Disconnect).is_err());
        assert!(fl.final_sync(SyncContext::Shutdown).is_err());
        assert_eq!(fl.stats.snapshot().syncs, 1);
    }

    #[test]
    fn a_failed_final_sync_latches_too() {
        let fl = Flusher::new(failing_file(), Policy::Fsync);
        assert!(fl.final_sync(SyncContext::Disconnect).is_err());
        assert_eq!(fl.failure().unwrap().context, SyncContext::Disconnect);
        assert!(fl.flush_batch(1, Instant::now()).is_err());
        assert_eq!(fl.stats.snapshot().syncs, 1);
    }

    #[test]
    fn a_restored_failure_answers_eio_without_syncing() {
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Datasync);
        fl.restore_failure(SyncFailure {
            errno: libc::EIO,
            error: "Input/output error".into(),
            at: 1,
            context: SyncContext::Flush,
            requests: 4,
        });
        assert_eq!(fl.health(), Health::Failed);
        assert!(fl.flush_batch(1, Instant::now()).is_err());
        assert_eq!(fl.stats.snapshot().syncs, 0);
        assert_eq!(fl.failure().unwrap().requests, 5);
    }

    #[test]
    fn a_downgrade_makes_the_whole_file_durable_before_it_returns() {
        // In direct mode acknowledged flushes made no syscall: the downgrade's own
        // sync is what covers them.
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Direct);
        fl.flush_batch(4, Instant::now()).unwrap();
        assert_eq!(fl.stats.snapshot().syncs, 0);
        assert!(fl.downgrade("map changed"));
        assert_eq!(fl.stats.snapshot().syncs, 1);
        assert_eq!(fl.health(), Health::Downgraded);
        // And a downgrade whose sync fails latches the failure.
        let fl = Flusher::new(failing_file(), Policy::Direct);
        assert!(fl.downgrade("map changed"));
        assert_eq!(fl.failure().unwrap().context, SyncContext::Downgrade);
        assert_eq!(fl.health(), Health::Failed);
    }

    #[test]
    fn volatile_and_direct_make_no_sync() {
        for p in [Policy::Volatile, Policy::Direct, Policy::ReadOnly] {
            let fl = Flusher::new(tempfile::tempfile().unwrap(), p);
            fl.flush_batch(5, Instant::now()).unwrap();
            assert_eq!(fl.stats.snapshot().syncs, 0, "{p}");
        }
    }

    #[test]
    fn latency_quantiles_come_from_the_recorded_values() {
        let mut h = LatencyHistogram::default();
        for _ in 0..99 {
            h.record(Duration::from_micros(10), 1);
        }
        h.record(Duration::from_millis(5), 1);
        assert_eq!(h.quantile_us(0.5), 16);
        assert!(h.quantile_us(0.999) >= 4096);
        assert_eq!(h.max_us, 5000);
    }
}
