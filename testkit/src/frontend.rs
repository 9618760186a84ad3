// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small vhost-user frontend that plays QEMU for a virtio-pmem backend.
//!
//! It speaks to the daemon with `vhost::vhost_user::Frontend`, gives it a memfd-backed
//! guest RAM, serves the backend request channel (recording SHMEM_MAP requests),
//! sets up one split virtqueue and submits flush requests the way a guest driver
//! does. Message order follows QEMU: `connect` is vhost_user_backend_init +
//! vhost_dev_init, [`TestFrontend::start`] is vhost_dev_start.
//!
//!
//! Owns: the frontend side of the vhost-user protocol and the guest RAM it
//! gives. Never decides what a test asserts.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::{fs::MetadataExt, net::UnixStream},
    },
    path::Path,
    sync::{
        atomic::{fence, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMap, VhostUserShMemConfig},
        Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend,
        VhostUserFrontendReqHandler, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long any single wait on the daemon may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_PMEM_F_SHMEM_REGION: u64 = 1 << 0;
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;

/// Guest RAM: one memfd region at guest address 0.
const RAM_SIZE: usize = 1 << 20;
/// Where the frontend places the pmem region once it is mapped (like a 64-bit BAR).
pub const PMEM_GPA: u64 = 1 << 32;
/// The virtqueue: size and where its parts live in guest RAM.
pub const QUEUE_SIZE: u16 = 128;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Request/status buffers: slot i uses [BUFFERS + 16 i, +4) and [+8, +12).
const BUFFERS: u64 = 0x10000;
/// A status the device has not written.
const NO_STATUS: u32 = 0xffff_ffff;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// One SHMEM_MAP request as the frontend received it.
#[derive(Debug)]
pub struct ShmemMap {
    pub shmid: u8,
    pub fd_offset: u64,
    pub shm_offset: u64,
    pub len: u64,
    pub flags: u64,
    /// (st_dev, st_ino) of the received fd.
    pub dev_ino: (u64, u64),
    /// The received fd, kept open.
    pub file: File,
}

/// Serves the backend request channel: records SHMEM_MAP requests and answers OK.
#[derive(Default)]
pub struct MapRecorder {
    maps: Mutex<Vec<ShmemMap>>,
    arrived: Condvar,
}

impl MapRecorder {
    /// Waits until `n` map requests arrived (or the timeout passed); returns how many did.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let guard = self.maps.lock().unwrap();
        let (guard, _) = self
            .arrived
            .wait_timeout_while(guard, timeout, |m| m.len() < n)
            .unwrap();
        guard.len()
    }

    pub fn count(&self) -> usize {
        self.maps.lock().unwrap().len()
    }

    /// Runs `f` on map request `i`.
    pub fn with<T>(&self, i: usize, f: impl FnOnce(&ShmemMap) -> T) -> T {
        f(&self.maps.lock().unwrap()[i])
    }
}

impl VhostUserFrontendReqHandler for MapRecorder {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        // SAFETY: the fd is owned by the request handler for the duration of this call.
        let file =
            File::from(unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned()?);
        let meta = file.metadata()?;
        let req = *req; // packed: copy before taking fields
        self.maps.lock().unwrap().push(ShmemMap {
            shmid: req.shmid,
            fd_offset: req.fd_offset,
            shm_offset: req.shm_offset,
            len: req.len,
            flags: req.flags,
            dev_ino: (meta.dev(), meta.ino()),
            file,
        });
        self.arrived.notify_all();
        Ok(0)
    }
}

/// A status read back from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub len: u32,
    pub status: u32,
}

pub struct TestFrontend {
    pub vu: Frontend,
    /// Virtio features the daemon offered.
    pub device_features: u64,
    /// Protocol features the daemon offered.
    pub device_protocol: VhostUserProtocolFeatures,
    /// Negotiate EVENT_IDX in [`Self::start`] (a Linux guest does).
    pub event_idx: bool,
    pub maps: Arc<MapRecorder>,
    /// Whether the backend channel held a message just before SET_MEM_TABLE.
    pub backend_msg_before_mem_table: bool,
    ram: GuestMemoryMmap,
    pmem: Option<GuestRegionMmap>,
    req_handler: Option<FrontendReqHandler<MapRecorder>>,
    req_sock: UnixStream,
    req_thread: Option<JoinHandle<()>>,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl TestFrontend {
    /// Connects and runs the init sequence QEMU runs when the device is created:
    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD, SET_OWNER.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        let mut vu = Frontend::from_stream(sock, 1);

        let device_features = vu.get_features().map_err(err)?;
        if device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(err("the daemon does not offer PROTOCOL_FEATURES"));
        }
        let device_protocol = vu.get_protocol_features().map_err(err)?;
        let wanted = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::SHMEM;
        vu.set_protocol_features(device_protocol & wanted)
            .map_err(err)?;

        let maps = Arc::new(MapRecorder::default());
        let mut req_handler = FrontendReqHandler::new(maps.clone()).map_err(err)?;
        // REPLY_ACK is negotiated: answer the requests that ask for it (the daemon
        // sends SHMEM_MAP without NEED_REPLY, so it gets no answer).
        req_handler.set_reply_ack_flag(true);
        // SAFETY: the handler's socket stays open as long as the handler.
        let req_sock = UnixStream::from(
            unsafe { BorrowedFd::borrow_raw(req_handler.as_raw_fd()) }.try_clone_to_owned()?,
        );
        // SAFETY: as above, for the end the daemon gets.
        let tx = unsafe { BorrowedFd::borrow_raw(req_handler.get_tx_raw_fd()) };

        let ram_file = memfd("guest-ram", RAM_SIZE)?;
        let region = MmapRegion::from_file(FileOffset::new(ram_file, 0), RAM_SIZE).map_err(err)?;
        let ram =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| err("ram region"))?
            ])
            .map_err(err)?;

        let mut fe = Self {
            vu,
            device_features,
            device_protocol,
            event_idx: true,
            maps,
            backend_msg_before_mem_table: false,
            ram,
            pmem: None,
            req_handler: None,
            req_sock,
            req_thread: None,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            avail_idx: 0,
            used_seen: 0,
        };
        fe.acked(|vu| vu.set_backend_request_fd(&tx))?;
        fe.req_handler = Some(req_handler);
        fe.acked(|vu| vu.set_owner())?;
        Ok(fe)
    }

    /// Sends one message with NEED_REPLY and waits for the daemon's answer.
    pub fn acked<T>(&mut self, f: impl FnOnce(&mut Frontend) -> vhost::Result<T>) -> io::Result<T> {
        self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let r = f(&mut self.vu);
        self.vu.set_hdr_flags(VhostUserHeaderFlag::empty());
        r.map_err(err)
    }

    /// Reads the whole 16-byte config space: (start, size).
    pub fn config(&mut self) -> io::Result<(u64, u64)> {
        let (_, buf) = self
            .vu
            .get_config(0, 16, VhostUserConfigFlags::empty(), &[0; 16])
            .map_err(err)?;
        let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
        Ok((word(0), word(8)))
    }

    /// Writes the config space (a guest write); returns the daemon's verdict.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> io::Result<()> {
        self.acked(|vu| vu.set_config(offset, VhostUserConfigFlags::WRITABLE, data))
    }

    /// The shared memory regions: sizes of the regions the daemon declares.
    pub fn shmem_config(&mut self) -> io::Result<Vec<u64>> {
        let c: VhostUserShMemConfig = self.vu.get_shmem_config().map_err(err)?;
        let n = c.nregions as usize;
        let sizes = c.memory_sizes; // packed: copy first
        Ok(sizes[..n.min(sizes.len())].to_vec())
    }

    /// The features [`Self::start`] acknowledges.
    pub fn driver_features(&self) -> u64 {
        let mut want = VIRTIO_F_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VIRTIO_PMEM_F_SHMEM_REGION;
        if self.event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        want & self.device_features
    }

    /// Starts the device like QEMU's vhost_dev_start: SET_FEATURES, SET_MEM_TABLE,
    /// then the vring (NUM, BASE, ADDR, KICK, CALL) and SET_VRING_ENABLE(1).
    /// [`Self::connect`], [`Self::start`], then waits for the daemon's SHMEM_MAP:
    /// a frontend the way QEMU leaves it once the device runs. The error says which
    /// step failed.
    pub fn connect_started(path: &Path) -> io::Result<Self> {
        let mut fe = Self::connect(path)?;
        fe.start()?;
        if fe.maps.wait_for(1, TIMEOUT) != 1 {
            return Err(err(format!("no SHMEM_MAP within {TIMEOUT:?}")));
        }
        Ok(fe)
    }

    pub fn start(&mut self) -> io::Result<()> {
        let features = self.driver_features();
        self.acked(|vu| vu.set_features(features))?;

        // Nothing may have come on the backend channel yet: look before serving it.
        self.backend_msg_before_mem_table = readable(&self.req_sock, Duration::ZERO)?;
        let mut handler = self.req_handler.take().expect("started twice");
        self.req_thread = Some(
            thread::Builder::new()
                .name("backend-req".into())
                .spawn(move || while handler.handle_request().is_ok() {})?,
        );
        self.send_mem_table()?;

        let ram_base = self.ram_host_addr();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: ram_base + DESC_TABLE,
            used_ring_addr: ram_base + USED_RING,
            avail_ring_addr: ram_base + AVAIL_RING,
            log_addr: None,
        };
        self.acked(|vu| vu.set_vring_num(0, QUEUE_SIZE))?;
        self.acked(|vu| vu.set_vring_base(0, 0))?;
        self.acked(|vu| vu.set_vring_addr(0, &config))?;
        let (kick, call) = (self.kick.try_clone()?, self.call.try_clone()?);
        self.acked(|vu| vu.set_vring_kick(0, &kick))?;
        self.acked(|vu| vu.set_vring_call(0, &call))?;
        self.acked(|vu| vu.set_vring_enable(0, true))
    }

    /// Stops the vring like QEMU's vhost_dev_stop (GET_VRING_BASE); returns the base.
    pub fn stop(&mut self) -> io::Result<u32> {
        self.vu.get_vring_base(0).map_err(err)
    }

    fn ram_host_addr(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.ram.find_region(GuestAddress(0)).unwrap().as_ptr() as u64
    }

    /// SET_MEM_TABLE with guest RAM and, once mapped, the pmem region.
    fn send_mem_table(&mut self) -> io::Result<()> {
        use vm_memory::GuestMemoryBackend;
        let mut regions = vec![VhostUserMemoryRegionInfo::from_guest_region(
            self.ram.find_region(GuestAddress(0)).unwrap(),
        )
        .map_err(err)?];
        if let Some(pmem) = &self.pmem {
            regions.push(VhostUserMemoryRegionInfo::from_guest_region(pmem).map_err(err)?);
        }
        self.acked(|vu| vu.set_mem_table(&regions).map(|_| ()))
    }

    /// Does what QEMU does on SHMEM_MAP: maps the received fd (shared, writable) and
    /// sends a new memory table that contains it.
    pub fn map_region(&mut self, index: usize) -> io::Result<()> {
        let (file, len) = self.maps.with(index, |m| (m.file.try_clone(), m.len));
        let region = MmapRegion::from_file(FileOffset::new(file?, 0), len as usize).map_err(err)?;
        self.pmem =
            Some(GuestRegionMmap::new(region, GuestAddress(PMEM_GPA)).ok_or_else(|| err("pmem"))?);
        self.send_mem_table()
    }

    /// Writes `data` at `offset` of the mapped pmem region (a guest store).
    pub fn write_pmem(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let pmem = self.pmem.as_ref().ok_or_else(|| err("region not mapped"))?;
        pmem.write_slice(data, vm_memory::MemoryRegionAddress(offset))
            .map_err(err)
    }

    /// Puts one request per entry of `types` on the ring, all at once, and kicks.
    pub fn submit(&mut self, types: &[u32]) -> io::Result<()> {
        self.submit_with_head(types, None)
    }

    /// Like [`Self::submit`], but a broken driver's way: the available-ring entry at
    /// position `at` among them names descriptor `head` instead of its chain.
    pub fn submit_with_head(
        &mut self,
        types: &[u32],
        bogus: Option<(usize, u16)>,
    ) -> io::Result<()> {
        assert!(types.len() * 2 <= QUEUE_SIZE as usize, "too many requests");
        for (i, &ty) in types.iter().enumerate() {
            let slot = i as u64;
            let (req, status) = (BUFFERS + 16 * slot, BUFFERS + 16 * slot + 8);
            self.ram
                .write_obj(ty.to_le(), GuestAddress(req))
                .map_err(err)?;
            self.ram
                .write_obj(NO_STATUS, GuestAddress(status))
                .map_err(err)?;
            let head = 2 * i as u16;
            self.write_desc(head, req, 4, VRING_DESC_F_NEXT, head + 1)?;
            self.write_desc(head + 1, status, 4, VRING_DESC_F_WRITE, 0)?;
            let head = match bogus {
                Some((at, bogus)) if at == i => bogus,
                _ => head,
            };
            let pos = (self.avail_idx.wrapping_add(i as u16) % QUEUE_SIZE) as u64;
            self.ram
                .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * pos))
                .map_err(err)?;
        }
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(types.len() as u16);
        self.ram
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .map_err(err)?;
        fence(Ordering::SeqCst);
        self.kick.write(1)
    }

    /// A hostile or broken driver: publishes `idx` as the available index (without
    /// adding any chain) and kicks. The frontend's own index is unchanged, so the
    /// next [`Self::submit`] writes the sane index again.
    pub fn publish_avail_idx(&mut self, idx: u16) -> io::Result<()> {
        fence(Ordering::SeqCst);
        self.ram
            .write_obj(idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .map_err(err)?;
        fence(Ordering::SeqCst);
        self.kick.write(1)
    }

    /// The available index the frontend last published honestly.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> io::Result<()> {
        let at = DESC_TABLE + 16 * u64::from(i);
        self.ram
            .write_obj(addr.to_le(), GuestAddress(at))
            .map_err(err)?;
        self.ram
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .map_err(err)?;
        self.ram
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .map_err(err)?;
        self.ram
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .map_err(err)
    }

    fn used_idx(&self) -> io::Result<u16> {
        fence(Ordering::SeqCst);
        let v: u16 = self
            .ram
            .read_obj(GuestAddress(USED_RING + 2))
            .map_err(err)?;
        Ok(u16::from_le(v))
    }

    /// Waits (on the call eventfd) until `n` more requests completed; returns them in
    /// used-ring order with the status each one's buffer holds.
    pub fn wait(&mut self, n: usize) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + TIMEOUT;
        let target = self.used_seen.wrapping_add(n as u16);
        loop {
            let used = self.used_idx()?;
            if used.wrapping_sub(self.used_seen) as usize >= n {
                break;
            }
            if self.event_idx {
                // used_event: interrupt me once the device goes past what I have seen.
                let seen = used.to_le();
                let at = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
                self.ram.write_obj(seen, GuestAddress(at)).map_err(err)?;
                if self.used_idx()? != used {
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} of {n} requests completed",
                        used.wrapping_sub(self.used_seen)
                    ),
                ));
            }
            if readable(&self.call, left)? {
                let _ = self.call.read();
            }
        }
        let mut out = Vec::with_capacity(n);
        while self.used_seen != target {
            let pos = u64::from(self.used_seen % QUEUE_SIZE);
            let at = USED_RING + 4 + 8 * pos;
            let id = u32::from_le(self.ram.read_obj(GuestAddress(at)).map_err(err)?);
            let len = u32::from_le(self.ram.read_obj(GuestAddress(at + 4)).map_err(err)?);
            let status_at = BUFFERS + 8 * u64::from(id) + 8; // head 2i → slot i
            let status = u32::from_le(self.ram.read_obj(GuestAddress(status_at)).map_err(err)?);
            out.push(Completion {
                head: id as u16,
                len,
                status,
            });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }

    /// Submits `types` and returns each request's status, in submission order.
    pub fn requests(&mut self, types: &[u32]) -> io::Result<Vec<u32>> {
        self.submit(types)?;
        let mut done = self.wait(types.len())?;
        done.sort_by_key(|c| c.head);
        for c in &done {
            if c.len != 4 {
                return Err(err(format!(
                    "request {} completed with len {}",
                    c.head / 2,
                    c.len
                )));
            }
        }
        Ok(done.into_iter().map(|c| c.status).collect())
    }

    /// `n` flush requests in flight at once; their statuses.
    pub fn flush(&mut self, n: usize) -> io::Result<Vec<u32>> {
        self.requests(&vec![VIRTIO_PMEM_REQ_TYPE_FLUSH; n])
    }
}

impl Drop for TestFrontend {
    fn drop(&mut self) {
        // The handler holds the daemon's end of the channel too, so EOF never comes on
        // its own: shut the socket down to end the thread.
        let _ = self.req_sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.req_thread.take() {
            let _ = t.join();
        }
    }
}

/// An anonymous shared-memory file of `size` bytes, for guest RAM.
fn memfd(name: &str, size: usize) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name; the returned fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    Ok(file)
}

/// Whether `fd` becomes readable within `timeout`.
fn readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
