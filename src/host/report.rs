// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one `status` report, for both exports: what the region, the flusher, the
//! guard, the media errors, the services and the sandbox say, and the export's
//! own part (the vhost-user connection, or the NVDIMM's plug and mapping).
//!
//! Owns: filling [`StatusReport`]. Never changes what it reads.

use super::{ExportState, Shared};
use crate::{
    device::wire::VIRTIO_PMEM_F_SHMEM_REGION,
    durability::{Health, Policy},
    report::{FlushRateLimitStatus, StatusReport},
    util::lock,
};

impl Shared {
    /// The worst of what the flusher, the guard (the served file itself) and, for
    /// `serve`, the queue say.
    pub fn health(&self) -> Health {
        let queue = match &self.export {
            ExportState::VirtioPmem { device, .. } if device.queue_broken().is_some() => {
                Health::QueueBroken
            }
            _ => Health::Healthy,
        };
        let file = match self.guard.get().map(|g| g.snapshot().file_problem) {
            Some(Some(_)) => Health::FileChanged,
            _ => Health::Healthy,
        };
        self.region.flusher.health().max(queue).max(file)
    }

    /// The `status` document now.
    pub fn report(&self) -> StatusReport {
        let region = &self.region;
        let flusher = &region.flusher;
        let policy = flusher.policy();
        let mut r = StatusReport {
            health: self.health(),
            sync_failure: flusher.failure(),
            queue_broken: None,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            file: region.path.display().to_string(),
            size: region.size,
            readonly: region.readonly,
            mode_requested: region.mode_requested,
            policy,
            policy_reason: region.policy_reason.clone(),
            promise: flusher.promise(),
            downgraded: flusher.downgrade_reason(),
            socket: self
                .socket
                .get()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            connected: false,
            vmm: None,
            connections: 0,
            last_disconnect: None,
            features_acked: "0x0".into(),
            shmem_region_feature: false,
            region_mapped: false,
            guard: self.guard.get().map(|g| g.snapshot()),
            bad_ranges: self.media.list(),
            bad_ranges_persist_error: self.media.persist_error(),
            agent: self.agent.get().map(|a| lock(&a.state).clone()),
            services_failed: self.services.failures(),
            seccomp: self.seccomp,
            sandbox_denials: crate::sandbox::denials(),
            health_record: self.health_record.report(),
            flush_rate_limit: None,
            nvdimm: None,
        };
        match &self.export {
            ExportState::VirtioPmem { device, queue } => {
                r.flush_rate_limit = queue.limiter.as_ref().map(|l| {
                    let counted = queue.snapshot();
                    FlushRateLimitStatus {
                        ops_per_sec: l.limit.ops_per_sec,
                        burst: l.limit.burst,
                        throttled: counted.flush_throttled,
                        throttled_seconds: counted.flush_throttled_us as f64 / 1e6,
                        holding: l.holding(),
                    }
                });
                let features = device.features();
                r.queue_broken = device.queue_broken();
                r.connected = device.connected();
                r.vmm = device.vmm().filter(|_| device.negotiated());
                r.connections = device.connections();
                r.last_disconnect = device.last_disconnect();
                r.features_acked = format!("{features:#x}");
                r.shmem_region_feature = features & VIRTIO_PMEM_F_SHMEM_REGION != 0;
                r.region_mapped = device.region_mapped();
            }
            ExportState::Nvdimm(nv) => {
                let nv = lock(nv).clone();
                let live = nv.mapping_verified && !nv.qemu_exited;
                r.promise = nvdimm_promise(policy).into();
                r.socket.clone_from(&nv.qmp_socket);
                r.connected = live;
                r.connections = u64::from(nv.mapping_verified);
                r.last_disconnect = nv.qemu_exited.then(|| "QEMU exited".into());
                r.region_mapped = live;
                r.nvdimm = Some(nv);
            }
        }
        r
    }
}

/// What an NVDIMM's writes are promised: the guest has no flush request, so the
/// promise is about its cache flushes, or the interval syncs after a lost map.
fn nvdimm_promise(policy: Policy) -> &'static str {
    match policy {
        Policy::Volatile => {
            "NOTHING IS PERSISTENT: pmem=off, the guest's writes stay in the host page cache \
             until it writes them back"
        }
        Policy::Direct => {
            "a guest cache flush makes its writes durable (MAP_SYNC on a DAX file with an \
             immutable block map)"
        }
        _ => "the block map changed: the guest's writes are durable only at the next interval sync",
    }
}
