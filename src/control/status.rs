// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the daemon reports about itself: the live device state shared between the
//! vhost-user connection, the control socket and the logs.
//!
//! Owns: the `status` document. Never changes behaviour; it only records it.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    blockmap::guard::GuardStatus,
    durability::{Health, Mode, Policy, SyncFailure},
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

/// Live, cheaply updated device state.
#[derive(Default)]
pub struct DeviceStatus {
    connected: AtomicBool,
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
    pub fn set_connected(&self, yes: bool) {
        self.connected.store(yes, Ordering::Release);
        if yes {
            self.connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.region_mapped.store(false, Ordering::Release);
            self.features.store(0, Ordering::Release);
        }
    }

    pub fn set_last_disconnect(&self, why: String) {
        *self.last_disconnect.lock().unwrap() = Some(why);
    }

    pub fn set_region_mapped(&self, yes: bool) {
        self.region_mapped.store(yes, Ordering::Release);
    }

    pub fn region_mapped(&self) -> bool {
        self.region_mapped.load(Ordering::Acquire)
    }

    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
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
        self.last_disconnect.lock().unwrap().clone()
    }

    /// Records a pass that found the queue unusable; true for the first pass of an
    /// episode (the caller logs and announces it then, and only then).
    pub fn queue_failed(&self, reason: &str) -> bool {
        let mut q = self.queue_broken.lock().unwrap_or_else(|p| p.into_inner());
        match q.as_mut() {
            Some(b) => {
                b.passes += 1;
                false
            }
            None => {
                *q = Some(QueueBroken {
                    reason: reason.to_string(),
                    since: crate::control::events::rfc3339_now(),
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
        let mut q = self.queue_broken.lock().unwrap_or_else(|p| p.into_inner());
        self.queue_is_broken.store(false, Ordering::Release);
        q.take()
    }

    pub fn queue_broken(&self) -> Option<QueueBroken> {
        self.queue_broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    pub agent: Option<crate::media::channel::AgentState>,
    /// Service threads that died (a panic, caught at the thread boundary).
    #[serde(default)]
    pub services_failed: Vec<crate::service::ServiceFailure>,
    /// The seccomp sandbox: enforce, log or off.
    #[serde(default)]
    pub seccomp: crate::sandbox::SeccompMode,
    /// The health record once a sync failed: whether it is written everywhere
    /// (`persisted`), where, and since when a write is pending.
    #[serde(default)]
    pub health_record: Option<crate::state::health::HealthRecordStatus>,
    /// The NVDIMM export's part (`vhost-device-pmem nvdimm`); absent for `serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvdimm: Option<crate::nvdimm::NvdimmStatus>,
}
