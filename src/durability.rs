// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a guest flush costs and promises: the durability modes and the flush executor.
//!
//! Owns: the only calls to fsync/fdatasync on the backing file, the choice of mode
//! from a block-map verdict, the one-way downgrade when immutability is lost, and the
//! flush counters. Never maps, resizes or writes the file.

use std::{
    fmt,
    fs::File,
    io,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::blockmap::Verdict;

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
    /// Page-cache host, immutable block map: one fdatasync per batch of flushes.
    Datasync,
    /// Any file: one fsync per batch of flushes (the compatibility floor).
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
    /// fdatasync: data writeback only, no journal commit needed.
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

    /// Whether this policy relies on the block map staying immutable.
    pub fn needs_immutable_map(self) -> bool {
        matches!(self, Self::Direct | Self::Datasync)
    }

    /// What the policy promises a guest, in one line (for logs and `status`).
    pub fn promise(self) -> &'static str {
        match self {
            Self::Direct => {
                "a guest cache flush is durable by itself; flush requests make no syscall"
            }
            Self::Datasync => {
                "each flush request is durable after one shared fdatasync (no journal commit)"
            }
            Self::Fsync => "each flush request is durable after one shared fsync",
            Self::Volatile => {
                "NOTHING IS PERSISTENT: flushes are acknowledged without making data durable"
            }
            Self::ReadOnly => "the region is read-only; flushes have nothing to do",
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
    #[error("mode auto found no durable mode for {0}; pass --mode volatile explicitly for a scratch guest")]
    NothingDurable(String),
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
            Ok((Policy::Direct, "requested; DAX with MAP_SYNC and an immutable block map".into()))
        }
        Mode::Datasync => {
            if !immutable {
                return Err(not_immutable(mode));
            }
            Ok((Policy::Datasync, "requested; the block map is immutable".into()))
        }
        Mode::Fsync => Ok((Policy::Fsync, "requested".into())),
        Mode::Volatile => Ok((Policy::Volatile, "requested explicitly with --mode volatile".into())),
        Mode::Auto => match verdict {
            Some(v) if v.immutable() && v.dax && v.map_sync => Ok((
                Policy::Direct,
                format!("auto: {} with DAX and MAP_SYNC, immutable block map ({} extents)", v.filesystem, v.extents),
            )),
            Some(v) if v.immutable() => Ok((
                Policy::Datasync,
                format!("auto: immutable block map ({} extents) on {} without DAX", v.extents, v.filesystem),
            )),
            Some(v) => Ok((
                Policy::Fsync,
                format!(
                    "auto: block map not immutable ({} problem range(s), first: {}); every flush needs fsync",
                    v.problems.len(),
                    v.problems.first().map_or("empty file".to_string(), ToString::to_string)
                ),
            )),
            None => Ok((
                Policy::Fsync,
                "auto: the block map could not be read (no FIEMAP on this filesystem); every flush needs fsync".into(),
            )),
        },
    }
}

/// Counters exposed by `stats`. Latency is the daemon's service time of a batch,
/// from the moment it was taken off the ring to its completion.
#[derive(Default)]
pub struct FlushStats {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    pub unsupported: AtomicU64,
    latency: Mutex<LatencyHistogram>,
}

/// Log2 buckets of microseconds: bucket i holds latencies in [2^(i-1), 2^i) µs.
#[derive(Default, Clone)]
struct LatencyHistogram {
    buckets: [u64; 32],
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl LatencyHistogram {
    fn record(&mut self, d: Duration, n: u64) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let idx = (64 - us.leading_zeros()) as usize;
        self.buckets[idx.min(31)] += n;
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

/// A point-in-time copy of the counters, for the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub flush_requests: u64,
    pub batches: u64,
    pub syncs: u64,
    pub errors: u64,
    pub malformed_chains: u64,
    pub unsupported_requests: u64,
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
    pub fn snapshot(&self) -> StatsSnapshot {
        let h = self.latency.lock().unwrap().clone();
        StatsSnapshot {
            flush_requests: self.requests.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            malformed_chains: self.malformed.load(Ordering::Relaxed),
            unsupported_requests: self.unsupported.load(Ordering::Relaxed),
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
    policy: AtomicU8,
    /// Bumped on every downgrade, so a batch can tell it raced one.
    epoch: AtomicU64,
    downgrade_reason: Mutex<Option<String>>,
    pub stats: FlushStats,
}

impl Flusher {
    pub fn new(file: File, policy: Policy) -> Self {
        Self {
            file,
            policy: AtomicU8::new(policy as u8),
            epoch: AtomicU64::new(0),
            downgrade_reason: Mutex::new(None),
            stats: FlushStats::default(),
        }
    }

    pub fn policy(&self) -> Policy {
        Policy::from_u8(self.policy.load(Ordering::Acquire))
    }

    /// Why the policy was downgraded, if it was.
    pub fn downgrade_reason(&self) -> Option<String> {
        self.downgrade_reason.lock().unwrap().clone()
    }

    /// Makes every write to the region before this call durable, per policy, for a
    /// batch of `requests` flush requests taken off the ring at `taken`.
    pub fn flush_batch(&self, requests: u64, taken: Instant) -> io::Result<()> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let policy = self.policy();
        let mut result = self.sync(policy);
        // A downgrade that raced this batch means the map may have changed while we
        // relied on it: make the batch durable under the stronger policy too.
        if result.is_ok() && self.epoch.load(Ordering::Acquire) != epoch {
            let now = self.policy();
            if now != policy {
                result = self.sync(now);
            }
        }
        self.stats.requests.fetch_add(requests, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.stats.errors.fetch_add(requests, Ordering::Relaxed);
        }
        self.stats
            .latency
            .lock()
            .unwrap()
            .record(taken.elapsed(), requests);
        result
    }

    fn sync(&self, policy: Policy) -> io::Result<()> {
        match policy {
            Policy::Direct | Policy::Volatile | Policy::ReadOnly => Ok(()),
            Policy::Datasync => {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.file.sync_data()
            }
            Policy::Fsync => {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.file.sync_all()
            }
        }
    }

    /// The block-map promise is gone: from now on every flush is an fsync. One way:
    /// only a restart (and a fresh verdict) goes back. Returns false if the policy
    /// did not rely on the map (nothing to do).
    pub fn downgrade_to_fsync(&self, reason: &str) -> bool {
        let old = self.policy();
        if !old.needs_immutable_map() {
            return false;
        }
        *self.downgrade_reason.lock().unwrap() = Some(reason.to_string());
        self.policy.store(Policy::Fsync as u8, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        log::error!("durability downgraded from {old} to fsync: {reason}");
        true
    }

    /// Makes everything durable per the current policy; used at shutdown.
    pub fn final_sync(&self) -> io::Result<()> {
        match self.policy() {
            // Even in direct mode an fsync at exit is free insurance.
            Policy::Volatile | Policy::ReadOnly => Ok(()),
            _ => self.file.sync_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::{Filesystem, Problem, ProblemKind};

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
        assert_eq!(p(&verdict(vec![hole()], true)), Policy::Fsync);
        assert_eq!(
            choose_policy(Mode::Auto, false, None, f).unwrap().0,
            Policy::Fsync
        );
        assert_eq!(
            choose_policy(Mode::Auto, true, None, f).unwrap().0,
            Policy::ReadOnly
        );
    }

    #[test]
    fn explicit_modes_are_refused_when_the_file_does_not_qualify() {
        let f = "img";
        assert!(matches!(
            choose_policy(Mode::Direct, false, Some(&verdict(vec![], false)), f),
            Err(ModeError::NotDax { .. })
        ));
        let e = choose_policy(
            Mode::Datasync,
            false,
            Some(&verdict(vec![hole()], false)),
            f,
        )
        .unwrap_err();
        assert!(e.to_string().contains("prepare"), "{e}");
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
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Datasync);
        fl.flush_batch(3, Instant::now()).unwrap();
        assert!(fl.downgrade_to_fsync("map changed"));
        assert_eq!(fl.policy(), Policy::Fsync);
        assert!(!fl.downgrade_to_fsync("again"));
        fl.flush_batch(1, Instant::now()).unwrap();
        let s = fl.stats.snapshot();
        assert_eq!((s.flush_requests, s.batches, s.syncs), (4, 2, 2));
        assert_eq!(fl.downgrade_reason().as_deref(), Some("map changed"));
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
