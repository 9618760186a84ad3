// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user device: feature and protocol negotiation, config space, the shared
//! memory region, and the request queue's events.
//!
//! Owns: one connection's device state, the moment the backing file is handed to
//! the VMM (SHMEM_MAP), and when the flush rate limit's timer is armed (a pass held
//! a flush back) or disarmed (the ring stopped or was reset). Never decides
//! durability (that is `durability`) and never parses requests itself (that is
//! `wire` and `queue`).

pub mod queue;
pub mod wire;

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::MetadataExt,
    },
    sync::Arc,
};

use log::{debug, error, info, warn};
use vhost::vhost_user::{
    message::{
        VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
        VhostUserVirtioFeatures,
    },
    Backend, VhostUserFrontendReqHandler,
};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, Le64,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::{
    device::queue::{process_queue, QueueState, QueueStats},
    device::wire::{PmemConfig, VIRTIO_PMEM_F_SHMEM_REGION, VIRTIO_PMEM_SHMEM_REGION_ID},
    events::{EventHub, EventKind},
    region::Region,
    report::DeviceStatus,
};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: usize = crate::device::queue::MAX_QUEUE_SIZE as usize;
const NUM_QUEUES: usize = 1;
const REQUEST_QUEUE_EVENT: u16 = 0;
/// The flush rate limit's timer in the vring worker's epoll set (vhost-user-backend
/// keeps 0..=NUM_QUEUES for the queues and its exit event).
pub const LIMIT_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// State of one vhost-user connection. A new one is made for every connection, so
/// nothing a previous VMM negotiated leaks into the next.
pub struct PmemBackend {
    region: Arc<Region>,
    status: Arc<DeviceStatus>,
    events: Arc<EventHub>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    queue_state: QueueState,
    frontend: Option<Backend>,
    /// Set once this connection asked the VMM to map the region.
    map_requested: bool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    /// Exit-event consumers handed to vhost-user-backend, which gives up their
    /// ownership (see [`Drop for PmemBackend`](#impl-Drop-for-PmemBackend)).
    handed_out: std::sync::Mutex<Vec<std::os::fd::RawFd>>,
    config_write_logged: bool,
}

impl PmemBackend {
    pub fn new(
        region: Arc<Region>,
        status: Arc<DeviceStatus>,
        events: Arc<EventHub>,
        queue_stats: Arc<QueueStats>,
    ) -> io::Result<Self> {
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        // A new connection is a new device: whatever broke the last one's queue is gone.
        Self::queue_usable(&status, &events, "a new VMM connection");
        Ok(Self {
            region,
            status,
            events,
            mem: None,
            event_idx: false,
            queue_state: QueueState::new(queue_stats),
            frontend: None,
            map_requested: false,
            exit_consumer,
            exit_notifier,
            handed_out: std::sync::Mutex::new(Vec::new()),
            config_write_logged: false,
        })
    }

    fn config(&self) -> PmemConfig {
        // `start` is a guest-physical address only the VMM knows (it places the
        // shared-memory BAR). Drivers that take VIRTIO_PMEM_F_SHMEM_REGION ignore it;
        // older drivers try to claim [0, size), which the guest's own RAM already
        // holds, so their probe fails cleanly instead of mapping the wrong memory.
        PmemConfig {
            start: Le64::from(0),
            size: Le64::from(self.region.size),
        }
    }

    /// Asks the VMM to map the backing file into shared memory region 0.
    ///
    /// Called while the VMM starts the device (QEMU binds the device to this
    /// connection before its first start message, and mapping earlier crashes QEMU
    /// 11.1). The request is written before we answer the start message that
    /// triggered it, so it is in the VMM's socket before the guest's DRIVER_OK write
    /// completes; the guest driver creates the region only after that write. The
    /// request goes without NEED_REPLY: the VMM's answer would only come from its main
    /// loop, which cannot run while its vCPU waits for us. The map is known to be live
    /// when the VMM's next memory table contains the file (see [`Self::note_memory`]).
    fn request_map(&mut self) {
        if self.map_requested {
            return;
        }
        let Some(frontend) = self.frontend.as_ref() else {
            error!("cannot map the region: the VMM gave no backend request channel (BACKEND_REQ not negotiated)");
            return;
        };
        let flags = if self.region.readonly {
            VhostUserMMapFlags::empty()
        } else {
            VhostUserMMapFlags::WRITABLE
        };
        let req = VhostUserMMap {
            shmid: VIRTIO_PMEM_SHMEM_REGION_ID,
            fd_offset: 0,
            shm_offset: 0,
            len: self.region.size,
            flags: flags.bits(),
            ..Default::default()
        };
        match frontend.shmem_map(&req, &self.region.file) {
            Ok(_) => {
                self.map_requested = true;
                info!(
                    "asked the VMM to map {} bytes of {} ({})",
                    self.region.size,
                    self.region.path.display(),
                    if self.region.readonly {
                        "read-only"
                    } else {
                        "writable"
                    }
                );
            }
            Err(e) => error!("cannot send the map request to the VMM: {e}"),
        }
    }

    /// Records whether the VMM's memory table contains the backing file, which it
    /// does once the mapping is in the guest's address space.
    fn note_memory(&self, mem: &GuestMemoryMmap) {
        let Ok(ours) = self.region.file.metadata() else {
            return;
        };
        let live = mem.iter().any(|r| {
            r.file_offset()
                .and_then(|fo| fo.file().metadata().ok())
                .is_some_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino())
        });
        if live && !self.status.region_mapped() {
            info!("the region is live in the guest's address space");
        }
        self.status.set_region_mapped(live);
    }

    /// Serves the queue until it is empty. Never fails: a queue that cannot be
    /// processed (an impossible available index, a used ring that cannot be written)
    /// is reported as health `queue-broken` and tried again at the next kick, so the
    /// vring worker never ends (vhost-user-backend would only notice at join, and the
    /// device would be dead while `status` said connected).
    fn process(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.mem.as_ref().map(GuestMemoryAtomic::memory) else {
            warn!("queue kicked before the VMM sent its memory table; ignored");
            return;
        };
        loop {
            match self.pass(vring, &mem) {
                Ok(true) => continue,
                Ok(false) => {
                    Self::queue_usable(&self.status, &self.events, "the ring is sane again");
                    return;
                }
                Err(reason) => {
                    self.queue_fault(&reason);
                    // Leave notifications on, or the guest would never kick again and
                    // a ring that becomes sane would not be seen.
                    if self.event_idx {
                        let _ = vring.enable_notification();
                    }
                    return;
                }
            }
        }
    }

    /// The flush rate limit's timer expired: serve the flushes it held back, if the
    /// ring still runs (a stopped or disabled ring is served again when it starts;
    /// what is left on it stays the driver's).
    fn limit_timer(&mut self, vring: &VringRwLock) {
        let Some(limiter) = self.queue_state.stats.limiter.as_ref() else {
            return;
        };
        limiter.timer.consume();
        let runs = {
            let state = vring.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        if runs && self.mem.is_some() {
            self.process(vring);
        } else {
            limiter.release();
        }
    }

    /// One pass over the ring; true if the driver may have added more meanwhile.
    fn pass(&mut self, vring: &VringRwLock, mem: &GuestMemoryMmap) -> Result<bool, String> {
        if self.event_idx {
            vring
                .disable_notification()
                .map_err(|e| format!("cannot write the used ring's event index: {e}"))?;
        }
        let pass = {
            let mut state = vring.get_mut();
            process_queue(
                state.get_queue_mut(),
                mem,
                &self.region.flusher,
                &mut self.queue_state,
            )
            .map_err(|e| e.to_string())?
        };
        if pass.completed > 0
            && (!self.event_idx
                || vring
                    .needs_notification()
                    .map_err(|e| format!("cannot read the driver's event index: {e}"))?)
        {
            if let Err(e) = vring.signal_used_queue() {
                error!("cannot signal the guest: {e}");
            }
        }
        if let Some(wait) = self.queue_state.held_back() {
            // A flush waits for a token on the ring: come back when it is due (the
            // timer is in this worker's epoll set), never sooner, and serve kicks
            // and the VMM meanwhile. Notifications go back on as after any pass,
            // but what they say is not looked at: the chains behind the held one
            // are known to be there.
            if let Some(limiter) = self.queue_state.stats.limiter.as_ref() {
                if let Err(e) = limiter.timer.arm(wait) {
                    error!("cannot arm the flush rate limit's timer: {e}; held-back flushes wait for the next kick");
                }
            }
            if self.event_idx {
                vring
                    .enable_notification()
                    .map_err(|e| format!("cannot write the used ring's event index: {e}"))?;
            }
            return Ok(false);
        }
        if !self.event_idx {
            return Ok(false);
        }
        vring
            .enable_notification()
            .map_err(|e| format!("cannot write the used ring's event index: {e}"))
    }

    /// The ring stopped or was reset: nothing is held back by this connection now.
    fn release_limit(&self) {
        if let Some(limiter) = self.queue_state.stats.limiter.as_ref() {
            limiter.release();
        }
    }

    fn queue_fault(&self, reason: &str) {
        if self.status.queue_failed(reason) {
            error!("virtio-pmem: the request queue cannot be processed: {reason}; health queue-broken until the ring is sane again or the device is reset");
            self.events.publish(EventKind::QueueBroken {
                reason: reason.to_string(),
            });
        }
    }

    /// Ends a queue-broken episode, if one was on.
    fn queue_usable(status: &DeviceStatus, events: &EventHub, why: &str) {
        if let Some(ep) = status.queue_ok() {
            info!(
                "virtio-pmem: the request queue works again ({why}; broken since {}, {} pass(es)): {}",
                ep.since, ep.passes, ep.reason
            );
            events.publish(EventKind::QueueRecovered { after: ep.reason });
        }
    }
}

/// vhost-user-backend 0.24 registers the exit-event consumer in its worker's epoll
/// set with `into_raw_fd()` and never closes it: one descriptor per connection
/// would leak. Its worker handler holds an `Arc` of this backend, so when the backend
/// is dropped every handler is gone and those descriptors belong to nobody: close
/// them here. (`descriptors_stay_flat_over_hundreds_of_connections` in
/// tests/vhost_user.rs watches this; if a later vhost-user-backend closes the fd
/// itself, drop this impl.)
impl Drop for PmemBackend {
    fn drop(&mut self) {
        let fds = std::mem::take(
            self.handed_out
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.release_limit();
        for fd in fds {
            // SAFETY: `fd` was a dup made by `exit_event` whose ownership
            // vhost-user-backend released with into_raw_fd; the only user of it, the
            // worker's epoll handler, was dropped before this backend (it held an Arc
            // of it). Nothing else knows the number, so nothing else closes it.
            drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl VhostUserBackendMut for PmemBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VIRTIO_PMEM_F_SHMEM_REGION
    }

    fn acked_features(&mut self, features: u64) {
        if self.status.set_features(features) {
            let vmm = self.status.vmm();
            info!(
                "VMM connected: {}, features {features:#x}",
                vmm.as_ref()
                    .map_or_else(|| "unknown peer".to_string(), ToString::to_string)
            );
            self.events.publish(EventKind::VmmConnected {
                pid: vmm.as_ref().and_then(|v| v.pid),
                comm: vmm.and_then(|v| v.comm),
            });
        }
        if features & VIRTIO_PMEM_F_SHMEM_REGION == 0 {
            error!("the guest driver did not accept VIRTIO_PMEM_F_SHMEM_REGION: it will look for the region at config.start, which a vhost-user backend cannot provide; this guest cannot use the device");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::SHMEM
    }

    fn reset_device(&mut self) {
        info!("device reset by the VMM");
        Self::queue_usable(&self.status, &self.events, "the VMM reset the device");
        self.event_idx = false;
        self.map_requested = false;
        self.status.set_region_mapped(false);
        self.release_limit();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config();
        let bytes = cfg.as_slice();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if !self.config_write_logged {
            warn!(
                "the guest wrote {} byte(s) at offset {offset} of the read-only virtio-pmem config space; ignored (logged once)",
                buf.len()
            );
            self.config_write_logged = true;
        }
        // The write is dropped, but answered with success: vhost-user-backend ends the
        // whole connection when a handler fails, and a guest must not be able to take
        // its device away by writing a read-only config field.
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        debug!("memory table updated");
        self.note_memory(&mem.memory());
        self.mem = Some(mem);
        // The VMM sends its memory table while starting the device, after it bound
        // the device to this connection: the earliest moment a map request is safe.
        self.request_map();
        Ok(())
    }

    fn set_backend_req_fd(&mut self, frontend: Backend) {
        // See `request_map`: map requests must not wait for the VMM's answer.
        frontend.set_reply_ack_flag(false);
        self.frontend = Some(frontend);
    }

    fn stop_vring(&mut self, _queue_index: u32) -> io::Result<()> {
        // The VMM stops the device (guest reset, reboot, pause). A reset drops the
        // mapping on the VMM side, so the next start maps again.
        debug!("device stopped by the VMM");
        // Flushes held back by the rate limit are still on the ring, in front of
        // the base the VMM gets: the next start serves them.
        self.release_limit();
        self.map_requested = false;
        self.status.set_region_mapped(false);
        Ok(())
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.region.size]))
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self.exit_consumer.try_clone().ok()?;
        let notifier = self.exit_notifier.try_clone().ok()?;
        self.handed_out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error returned here would end the vring worker for good: log instead.
        if evset != EventSet::IN {
            warn!("virtio-pmem: unexpected event set {evset:?} on device event {device_event}; ignored");
            return Ok(());
        }
        match device_event {
            REQUEST_QUEUE_EVENT => self.process(&vrings[0]),
            LIMIT_TIMER_EVENT => self.limit_timer(&vrings[0]),
            other => warn!("virtio-pmem: unknown device event {other}; ignored"),
        }
        Ok(())
    }
}
