// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A busy marker: how long the work in progress (a sync, a queue pass) has run, for
//! the service manager's watchdog.
//!
//! Owns: the marker and its clock. Never decides what "stuck" means (the notifier
//! does).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// Marks a stretch of work in progress (a sync, a queue pass) so that the service
/// manager's watchdog can tell "stuck" from "idle": one relaxed store when the work
/// starts and one when it ends, nothing else on the hot path.
#[derive(Default)]
pub struct Busy {
    /// Milliseconds since [`busy_epoch`] (plus one) when the work started; 0: idle.
    since: AtomicU64,
}

/// The monotonic origin of [`Busy`] timestamps (first use in the process).
fn busy_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn busy_now() -> u64 {
    u64::try_from(busy_epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

impl Busy {
    /// Marks the work started; it ends when the returned guard is dropped.
    pub fn enter(&self) -> BusyGuard<'_> {
        self.since.store(busy_now(), Ordering::Relaxed);
        BusyGuard(self)
    }

    /// How long the work in progress has been going on; `None` when idle.
    pub fn running_for(&self) -> Option<Duration> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(busy_now().saturating_sub(t))),
        }
    }
}

/// Ends a [`Busy`] stretch when dropped.
pub struct BusyGuard<'a>(&'a Busy);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::Relaxed);
    }
}
