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
    durability::{Mode, Policy},
    guard::GuardStatus,
};

/// Live, cheaply updated device state.
#[derive(Default)]
pub struct DeviceStatus {
    connected: AtomicBool,
    region_mapped: AtomicBool,
    features: AtomicU64,
    connections: AtomicU64,
    last_disconnect: Mutex<Option<String>>,
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
}

/// The `status` answer of the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
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
    pub bad_ranges: Vec<crate::badblocks::BadRange>,
    /// The guest agent, if a guest channel is configured.
    #[serde(default)]
    pub agent: Option<crate::guest_channel::AgentState>,
}
