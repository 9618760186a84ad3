// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where host media errors come from, turned into bad byte ranges of the backing file.
//!
//! Owns the sources: the `badblocks` attribute of the block device under the file's
//! filesystem (device sector → file offset through FIEMAP physical extents), SIGBUS
//! memory-failure notices on the daemon's own mapping, and a rate-limited scrub that
//! reads the file and narrows read errors down to 512-byte sectors. Never writes the
//! backing file and never clears anything: sources only report.

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicI32, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::{
    blockmap::Extent,
    media::ranges::{BadRange, SECTOR},
};

/// The block device under a file's filesystem, as the badblocks source needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDevice {
    /// `/sys/block/<disk>` (badblocks are kept per whole disk).
    pub disk: PathBuf,
    /// First sector of the partition holding the filesystem (0 for a whole disk).
    pub partition_start: u64,
}

impl HostDevice {
    /// Finds the device of `file`'s filesystem through `/sys/dev/block/MAJ:MIN`.
    /// Returns `None` when the filesystem is not on a block device (tmpfs, NFS,
    /// btrfs' anonymous device numbers).
    pub fn of(file: &File) -> io::Result<Option<Self>> {
        let dev = file.metadata()?.dev();
        // SAFETY: major/minor only decode the integer.
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let node = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let Ok(real) = fs::canonicalize(&node) else {
            return Ok(None);
        };
        if real.join("partition").exists() {
            let start = read_u64(&real.join("start"))?;
            let disk = real.parent().map(Path::to_path_buf).unwrap_or(real);
            Ok(Some(Self {
                disk,
                partition_start: start,
            }))
        } else {
            Ok(Some(Self {
                disk: real,
                partition_start: 0,
            }))
        }
    }

    /// The disk's badblocks attribute, if the driver keeps one (pmem, md, nvdimm-btt).
    pub fn badblocks_path(&self) -> Option<PathBuf> {
        let p = self.disk.join("badblocks");
        p.exists().then_some(p)
    }
}

fn read_u64(path: &Path) -> io::Result<u64> {
    fs::read_to_string(path)?.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Parses a `badblocks` attribute: one "SECTOR COUNT" pair per line.
pub fn parse_badblocks(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// Translates bad disk sectors into bad ranges of the file, through the file's
/// extents (`physical` is a byte offset on the filesystem's device, i.e. relative to
/// the partition). Sectors outside the file are dropped.
pub fn disk_sectors_to_file(
    bad: &[(u64, u64)],
    partition_start: u64,
    extents: &[Extent],
) -> Vec<BadRange> {
    let mut out = Vec::new();
    for &(sector, count) in bad {
        let Some(rel) = sector.checked_sub(partition_start) else {
            continue;
        };
        // The text can name any sector and count: saturate rather than wrap (a
        // device byte past 2^64 lies in no extent; found by the fuzzer).
        let bstart = rel.saturating_mul(SECTOR);
        let bend = rel.saturating_add(count).saturating_mul(SECTOR);
        for e in extents {
            let (pstart, pend) = (e.physical, e.physical.saturating_add(e.length));
            let (s, t) = (bstart.max(pstart), bend.min(pend));
            if s < t {
                out.push(BadRange {
                    offset: e.logical + (s - pstart),
                    length: t - s,
                });
            }
        }
    }
    out
}

/// Waits for a change of a sysfs attribute that the kernel announces with
/// sysfs_notify (POLLPRI), or for `timeout` (a periodic re-read is the fallback
/// for attributes that are not notified). Returns the attribute's current text.
pub struct SysfsWatch {
    file: File,
}

impl SysfsWatch {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// Reads the whole attribute (sysfs wants a read from offset 0 to re-arm poll).
    pub fn read(&self) -> io::Result<String> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Blocks until the attribute is notified or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLPRI | libc::POLLERR,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Reads `[offset, offset + len)` of the file and reports every 512-byte sector that
/// fails with EIO. Reads in large blocks through the daemon's own descriptor (a new
/// open would break the daemon's file lease) and narrows a failing block down with
/// O_DIRECT sector reads (buffered reads fail a whole page), opening the file with
/// O_DIRECT only then.
pub struct Scrubber {
    buffered: File,
    path: PathBuf,
    block: usize,
}

impl Scrubber {
    /// `file` is (a duplicate of) the daemon's descriptor of `path`.
    pub fn new(file: File, path: &Path) -> Self {
        Self {
            buffered: file,
            path: path.to_owned(),
            block: 1 << 20,
        }
    }

    /// Scrubs `[offset, offset + len)`, sleeping as needed to stay under
    /// `rate` bytes per second (0: no limit). Returns the bad sectors found.
    pub fn scrub(&self, offset: u64, len: u64, rate: u64) -> io::Result<Vec<BadRange>> {
        let mut bad = Vec::new();
        let mut buf = vec![0u8; self.block];
        let started = Instant::now();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(self.block as u64) as usize;
            match self.buffered.read_at(&mut buf[..n], pos) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    bad.extend(self.narrow(pos, n as u64)?);
                }
                Err(e) => return Err(e),
            }
            pos += n as u64;
            if rate > 0 {
                let due = Duration::from_secs_f64((pos - offset) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok(bad)
    }

    fn narrow(&self, start: u64, len: u64) -> io::Result<Vec<BadRange>> {
        let mut bad = Vec::new();
        let direct = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .ok();
        let Some(direct) = &direct else {
            // No O_DIRECT (e.g. tmpfs): report the whole failing block.
            bad.push(BadRange {
                offset: start,
                length: len,
            });
            return Ok(bad);
        };
        let mut sector = AlignedSector::new();
        let mut off = start;
        while off < start + len {
            match direct.read_at(sector.as_mut(), off) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => bad.push(BadRange {
                    offset: off,
                    length: SECTOR,
                }),
                Err(e) => return Err(e),
            }
            off += SECTOR;
        }
        Ok(bad)
    }
}

/// A 4 KiB-aligned 512-byte buffer for O_DIRECT reads.
struct AlignedSector(Box<Aligned>);

#[repr(C, align(4096))]
struct Aligned([u8; 512]);

impl AlignedSector {
    fn new() -> Self {
        Self(Box::new(Aligned([0; 512])))
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0 .0
    }
}

// ---- SIGBUS memory-failure notices -------------------------------------------------

const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;
/// Pending notices: (address, lsb) pairs written by the signal handler.
const SLOTS: usize = 64;
static NOTICE_ADDR: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static NOTICE_LSB: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static NOTICE_NEXT: AtomicUsize = AtomicUsize::new(0);
static NOTICE_PIPE: AtomicI32 = AtomicI32::new(-1);

/// A read-only mapping of the backing file whose only purpose is to be told about
/// memory failures in it: with early kill, the kernel sends SIGBUS BUS_MCEERR_AO to
/// every process mapping a poisoned page. The daemon never loads from it.
pub struct PoisonWatch {
    base: usize,
    len: usize,
    read_fd: RawFd,
}

impl PoisonWatch {
    /// Maps `file` and installs the SIGBUS handler. One per process. With
    /// `map_sync` (a DAX file served in `direct` mode) the mapping is asked for with
    /// MAP_SHARED_VALIDATE|MAP_SYNC, so the daemon's own address space shows the
    /// kernel granting MAP_SYNC (`sf` in /proc/PID/smaps); a plain shared mapping is
    /// made if that is refused.
    ///
    /// The kernel signals only processes whose page tables map the poisoned page
    /// (`page_mapped_in_vma`), so on DAX the mapping is populated: that costs page
    /// tables only (DAX maps the media, nothing is read or cached). On a page-cache
    /// host it is not (populating would read the whole file into memory); there the
    /// watch sees poison only in pages the daemon happens to map, i.e. none, and the
    /// scrub and the device list are the sources that matter.
    pub fn new(file: &File, len: u64, map_sync: bool) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("region too large"))?;
        let map = |flags| {
            // SAFETY: a fresh read-only shared mapping at a kernel-chosen address; it
            // is never dereferenced, only compared against fault addresses.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    flags,
                    file.as_raw_fd(),
                    0,
                )
            }
        };
        let mut base = libc::MAP_FAILED;
        if map_sync {
            base = map(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC | libc::MAP_POPULATE);
            if base == libc::MAP_FAILED {
                log::warn!(
                    "memory-failure watch: MAP_SYNC mapping refused ({}); using a plain one",
                    io::Error::last_os_error()
                );
            }
        }
        if base == libc::MAP_FAILED {
            base = map(libc::MAP_SHARED | if map_sync { libc::MAP_POPULATE } else { 0 });
        }
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut fds = [0; 2];
        // SAFETY: valid array for two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        NOTICE_PIPE.store(fds[1], Ordering::SeqCst);
        // Ask for early notice of poison in pages we map, not only on access.
        // SAFETY: prctl with integer arguments.
        unsafe {
            libc::prctl(
                libc::PR_MCE_KILL,
                libc::PR_MCE_KILL_SET,
                libc::PR_MCE_KILL_EARLY,
                0,
                0,
            )
        };
        // SAFETY: installing a handler that only touches atomics and write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            base: base as usize,
            len,
            read_fd: fds[0],
        })
    }

    /// The fd that becomes readable when notices are pending.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: `read_fd` is this watch's own pipe end, open until it is dropped,
        // which the borrow's lifetime cannot outlive.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.read_fd) }
    }

    /// Takes the pending notices that fall in our mapping, as file ranges.
    pub fn take(&self) -> Vec<BadRange> {
        let mut sink = [0u8; 64];
        // SAFETY: draining our own non-blocking pipe into a local buffer.
        while unsafe { libc::read(self.read_fd, sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
        let mut out = Vec::new();
        for i in 0..SLOTS {
            let addr = NOTICE_ADDR[i].swap(0, Ordering::SeqCst);
            let lsb = NOTICE_LSB[i].load(Ordering::SeqCst);
            if addr >= self.base && addr < self.base + self.len {
                let size = 1u64 << lsb.clamp(9, 30);
                let off = (addr - self.base) as u64 / size * size;
                out.push(BadRange {
                    offset: off,
                    length: size,
                });
            }
        }
        out
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers. For SIGBUS
    // the union holds si_addr followed by the short si_addr_lsb (x86_64 layout:
    // si_addr at byte 16, si_addr_lsb at byte 24).
    let (code, addr, lsb) = unsafe {
        let raw = info as *const u8;
        (
            (*info).si_code,
            (*info).si_addr() as usize,
            *(raw.add(24) as *const i16) as usize,
        )
    };
    if code == BUS_MCEERR_AO || code == BUS_MCEERR_AR {
        let slot = NOTICE_NEXT.fetch_add(1, Ordering::SeqCst) % SLOTS;
        NOTICE_LSB[slot].store(lsb, Ordering::SeqCst);
        NOTICE_ADDR[slot].store(addr, Ordering::SeqCst);
        let fd = NOTICE_PIPE.load(Ordering::SeqCst);
        if fd >= 0 {
            let b = 1u8;
            // SAFETY: write(2) is async-signal-safe; one byte from a local.
            unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        }
        if code == BUS_MCEERR_AO {
            return; // advisory: nothing of ours touched the page
        }
    }
    // A fault we did not cause deliberately (we never load from the watch mapping):
    // die as the default action would.
    // SAFETY: resetting to the default disposition and re-raising.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badblocks_text_parses_and_ignores_junk() {
        assert_eq!(
            parse_badblocks("8 1\n4096 16\n\nbogus\n7 0\n"),
            vec![(8, 1), (4096, 16)]
        );
    }

    #[test]
    fn disk_sectors_map_to_file_offsets_through_extents_and_partitions() {
        // Two extents: file [0, 1 MiB) at device byte 10 MiB, file [1 MiB, 2 MiB) at
        // device byte 50 MiB; the partition starts at sector 2048.
        let extents = [
            Extent {
                logical: 0,
                physical: 10 << 20,
                length: 1 << 20,
                flags: 0,
            },
            Extent {
                logical: 1 << 20,
                physical: 50 << 20,
                length: 1 << 20,
                flags: 1,
            },
        ];
        let part = 2048;
        let sector_of = |dev_byte: u64| part + dev_byte / 512;
        let bad = [
            (sector_of((10 << 20) + 4096), 1), // inside extent 1
            (sector_of((50 << 20) + 512), 2),  // inside extent 2
            (sector_of(5 << 20), 8),           // outside the file
            (sector_of((11 << 20) - 512), 2),  // straddles the end of extent 1
            (100, 1),                          // before the partition
        ];
        let got = disk_sectors_to_file(&bad, part, &extents);
        assert_eq!(
            got,
            vec![
                BadRange {
                    offset: 4096,
                    length: 512
                },
                BadRange {
                    offset: (1 << 20) + 512,
                    length: 1024
                },
                BadRange {
                    offset: (1 << 20) - 512,
                    length: 512
                },
            ]
        );
    }

    /// Found by the fuzzer: a count near 2^55 overflowed the byte arithmetic (a
    /// panic in debug builds, wrapped nonsense in release ones).
    #[test]
    fn sectors_near_two_to_the_64_bytes_do_not_overflow() {
        let extents = [Extent {
            logical: 0,
            physical: 0,
            length: 1 << 20,
            flags: 0,
        }];
        assert_eq!(
            disk_sectors_to_file(&[(0, 1 << 55), (u64::MAX, u64::MAX)], 0, &extents),
            vec![BadRange {
                offset: 0,
                length: 1 << 20
            }]
        );
    }

    #[test]
    fn the_device_of_a_file_on_a_block_device_is_found() {
        let f = tempfile::tempfile().unwrap();
        // Whatever /tmp is on, the answer must be consistent with sysfs.
        if let Some(dev) = HostDevice::of(&f).unwrap() {
            assert!(dev.disk.starts_with("/sys/devices"), "{dev:?}");
            assert!(dev.disk.join("size").exists(), "{dev:?}");
        }
    }

    #[test]
    fn scrub_of_a_healthy_file_finds_nothing() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(3 << 20).unwrap();
        let s = Scrubber::new(f.reopen().unwrap(), f.path());
        assert!(s.scrub(0, 3 << 20, 0).unwrap().is_empty());
    }
}
