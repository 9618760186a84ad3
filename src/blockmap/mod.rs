// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block map of a backing file: read with FIEMAP, judged, fingerprinted.
//!
//! Owns: the verdict "every byte of this file is in an allocated, written, unshared,
//! plainly mapped extent", the list of problems with their byte ranges, the host facts
//! that decide a durability mode (filesystem, DAX, MAP_SYNC), and a cheap fingerprint
//! of the physical layout. Never modifies the file (FIEMAP_FLAG_SYNC only writes back
//! dirty data so that delayed allocations show up as what they will become).

pub mod check;
pub mod prepare;

use std::{
    fmt,
    fs::File,
    io,
    os::fd::{AsRawFd, RawFd},
};

use serde::Serialize;

// linux/fiemap.h: _IOWR('f', 11, struct fiemap), the header without its extents.
const FS_IOC_FIEMAP: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<FiemapHeader>(b'f', 11);
const FIEMAP_FLAG_SYNC: u32 = 0x0000_0001;
const FIEMAP_EXTENT_LAST: u32 = 0x0000_0001;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0000_0002;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x0000_0004;
const FIEMAP_EXTENT_ENCODED: u32 = 0x0000_0008;
const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x0000_0080;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x0000_0100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x0000_0200;
const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x0000_0400;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0000_0800;
const FIEMAP_EXTENT_SHARED: u32 = 0x0000_2000;
/// Extents fetched per ioctl call.
const EXTENTS_PER_CALL: usize = 512;

/// Flags that break the promise "a write through the mapping needs no metadata", each
/// with the name used in reports.
const BAD_FLAGS: &[(u32, &str)] = &[
    (FIEMAP_EXTENT_UNKNOWN, "unknown"),
    (FIEMAP_EXTENT_DELALLOC, "delalloc"),
    (FIEMAP_EXTENT_ENCODED, "encoded"),
    (FIEMAP_EXTENT_DATA_ENCRYPTED, "encrypted"),
    (FIEMAP_EXTENT_NOT_ALIGNED, "not-aligned"),
    (FIEMAP_EXTENT_DATA_INLINE, "inline"),
    (FIEMAP_EXTENT_DATA_TAIL, "tail-packed"),
    (FIEMAP_EXTENT_UNWRITTEN, "unwritten"),
    (FIEMAP_EXTENT_SHARED, "shared"),
];

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` (its size is part of the ioctl number).
#[repr(C)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap` followed by room for the extents the kernel fills in.
#[repr(C)]
struct FiemapRequest {
    header: FiemapHeader,
    fm_extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// One extent of the file: logical range, physical start, raw FIEMAP flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// Where byte `offset` of the file lies on the device, if this extent holds it.
    pub fn physical_of(&self, offset: u64) -> Option<u64> {
        (self.logical <= offset && offset - self.logical < self.length)
            .then(|| self.physical + (offset - self.logical))
    }
}

/// Where byte `offset` of the file lies on the device (FIEMAP's physical offsets),
/// if an extent holds it.
pub fn physical_offset(extents: &[Extent], offset: u64) -> Option<u64> {
    extents.iter().find_map(|e| e.physical_of(offset))
}

/// Why a byte range breaks immutability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// No extent at all: a write would allocate.
    Hole,
    /// An extent with these flags (names as in [`BAD_FLAGS`]).
    Flags(Vec<&'static str>),
}

/// A byte range of the file that does not qualify, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub offset: u64,
    pub length: u64,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.offset + self.length;
        match &self.kind {
            ProblemKind::Hole => write!(f, "[{:#x}, {:#x}) hole", self.offset, end),
            ProblemKind::Flags(names) => {
                write!(f, "[{:#x}, {:#x}) {}", self.offset, end, names.join("+"))
            }
        }
    }
}

/// The host filesystem, as far as the durability modes care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Xfs,
    Btrfs,
    Tmpfs,
    Ramfs,
    Other(i64),
}

impl Filesystem {
    fn from_magic(magic: i64) -> Self {
        match magic {
            0xEF53 => Self::Ext4,
            0x5846_5342 => Self::Xfs,
            0x9123_683E => Self::Btrfs,
            0x0102_1994 => Self::Tmpfs,
            0x8584_58f6 => Self::Ramfs,
            m => Self::Other(m),
        }
    }

    /// Keeps files in memory only: nothing on it survives a reboot or power cut,
    /// whatever is synced.
    pub fn memory_only(self) -> bool {
        matches!(self, Self::Tmpfs | Self::Ramfs)
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ext4 => f.write_str("ext4"),
            Self::Xfs => f.write_str("xfs"),
            Self::Btrfs => f.write_str("btrfs"),
            Self::Tmpfs => f.write_str("tmpfs"),
            Self::Ramfs => f.write_str("ramfs"),
            Self::Other(m) => write!(f, "fs-magic-{m:#x}"),
        }
    }
}

/// Everything the daemon and `check` need to know about a file's block map.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub size: u64,
    pub filesystem: Filesystem,
    /// DAX is active on this file (statx STATX_ATTR_DAX).
    pub dax: bool,
    /// A MAP_SHARED_VALIDATE|MAP_SYNC mapping of the file succeeded.
    pub map_sync: bool,
    pub extents: usize,
    pub problems: Vec<Problem>,
    /// Hash of the physical layout; equal fingerprints mean an unchanged map.
    pub fingerprint: u64,
}

impl Verdict {
    /// Every byte is in a written, unshared, plainly mapped extent.
    pub fn immutable(&self) -> bool {
        self.problems.is_empty() && self.size > 0
    }

    /// Logs the verdict on `path` at start-up (info) and its first problems (warn).
    pub fn log(&self, path: &std::path::Path) {
        log::info!(
            "block map verdict: {}: {} bytes on {}, {} extent(s), dax={}, map_sync={}, immutable={}",
            path.display(),
            self.size,
            self.filesystem,
            self.extents,
            self.dax,
            self.map_sync,
            self.immutable()
        );
        for p in self.problems.iter().take(8) {
            log::warn!("block map problem: {p}");
        }
    }
}

/// Reads all extents of `file` covering `[0, size)`, in batches, after writing back
/// dirty data (so delayed allocations show up as what they become).
pub fn read_extents(file: &File, size: u64) -> io::Result<Vec<Extent>> {
    read_extents_with(file, size, true)
}

/// As [`read_extents`]; without `sync`, dirty data is not written back first (cheap,
/// and the same answer for an immutable map, whose extents writeback never changes).
pub fn read_extents_with(file: &File, size: u64, sync: bool) -> io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut start = 0u64;
    let mut flags = if sync { FIEMAP_FLAG_SYNC } else { 0 };
    while start < size {
        let batch = fiemap(fd, start, size - start, flags)?;
        flags = 0; // one sync is enough
        let Some(last) = batch.last().copied() else {
            break;
        };
        let done = last.flags & FIEMAP_EXTENT_LAST != 0;
        start = last.logical.saturating_add(last.length);
        extents.extend(batch);
        if done {
            break;
        }
    }
    Ok(extents)
}

fn fiemap(fd: RawFd, start: u64, length: u64, flags: u32) -> io::Result<Vec<Extent>> {
    let mut req = Box::new(FiemapRequest {
        header: FiemapHeader {
            fm_start: start,
            fm_length: length,
            fm_flags: flags,
            fm_mapped_extents: 0,
            fm_extent_count: EXTENTS_PER_CALL as u32,
            fm_reserved: 0,
        },
        fm_extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
    });
    // SAFETY: `req` is a properly laid out `struct fiemap` followed by room for
    // `fm_extent_count` extents, valid and exclusively borrowed for the call.
    let rc = unsafe {
        libc::ioctl(
            fd,
            FS_IOC_FIEMAP as libc::c_ulong,
            &mut *req as *mut FiemapRequest,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (req.header.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
    Ok(req.fm_extents[..n]
        .iter()
        .map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags,
        })
        .collect())
}

/// Judges extents covering `[0, size)`: holes between and after extents, and extents
/// with flags that break immutability. Adjacent problems of the same kind are merged.
pub fn find_problems(extents: &[Extent], size: u64) -> Vec<Problem> {
    let mut problems: Vec<Problem> = Vec::new();
    let mut push = |p: Problem| {
        if let Some(prev) = problems.last_mut() {
            if prev.kind == p.kind && prev.offset + prev.length == p.offset {
                prev.length += p.length;
                return;
            }
        }
        problems.push(p);
    };
    let mut cursor = 0u64;
    for e in extents {
        if e.logical >= size {
            break;
        }
        if e.logical > cursor {
            push(Problem {
                offset: cursor,
                length: e.logical - cursor,
                kind: ProblemKind::Hole,
            });
        }
        let bad: Vec<&'static str> = BAD_FLAGS
            .iter()
            .filter(|(bit, _)| e.flags & bit != 0)
            .map(|(_, name)| *name)
            .collect();
        let end = e.logical.saturating_add(e.length).min(size);
        if !bad.is_empty() {
            push(Problem {
                offset: e.logical,
                length: end - e.logical,
                kind: ProblemKind::Flags(bad),
            });
        }
        cursor = cursor.max(end);
    }
    if cursor < size {
        push(Problem {
            offset: cursor,
            length: size - cursor,
            kind: ProblemKind::Hole,
        });
    }
    problems
}

/// FNV-1a over (logical, physical, length, flags) of every extent: cheap to compute
/// and compare, changes whenever an extent moves, splits, is shared or unwritten.
pub fn fingerprint(extents: &[Extent]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in extents {
        for word in [e.logical, e.physical, e.length, u64::from(e.flags)] {
            for b in word.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    h
}

/// The filesystem type of the file (fstatfs magic).
pub fn filesystem_of(file: &File) -> io::Result<Filesystem> {
    let st = rustix::fs::fstatfs(file)?;
    #[allow(clippy::unnecessary_cast)]
    Ok(Filesystem::from_magic(st.f_type as i64))
}

/// Whether DAX is in effect for this file (statx STATX_ATTR_DAX, Linux >= 5.8).
pub fn dax_active(file: &File) -> io::Result<bool> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags};
    let stx = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)?;
    let dax = StatxAttributes::DAX;
    Ok(stx.stx_attributes_mask.contains(dax) && stx.stx_attributes.contains(dax))
}

/// Whether the kernel grants a MAP_SHARED_VALIDATE|MAP_SYNC mapping of the file (only
/// DAX files do). Maps and unmaps one page; needs a file at least one page long. A
/// read-only descriptor is probed with a read-only mapping (MAP_SYNC is judged the
/// same way for both).
pub fn map_sync_possible(file: &File) -> bool {
    let len = 4096;
    let read_only = rustix::fs::fcntl_getfl(file)
        .is_ok_and(|fl| fl & rustix::fs::OFlags::ACCMODE == rustix::fs::OFlags::RDONLY);
    let prot = if read_only {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    // SAFETY: a fresh mapping at a kernel-chosen address; nothing else refers to it
    // and it is unmapped right below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    true
}

/// Problem name for a btrfs file without No_COW (`chattr +C`): its map may look
/// clean after a sync, but every write puts the data in new extents.
pub const COPY_ON_WRITE: &str = "copy-on-write";

/// Reads and judges the whole block map of `file`.
pub fn inspect(file: &File) -> io::Result<Verdict> {
    let size = file.metadata()?.len();
    let extents = read_extents(file, size)?;
    let mut problems = find_problems(&extents, size);
    let filesystem = filesystem_of(file)?;
    if filesystem == Filesystem::Btrfs
        && size > 0
        && crate::sys::get_flags(file).map_or(true, |f| f & crate::sys::FS_NOCOW_FL == 0)
    {
        problems.insert(
            0,
            Problem {
                offset: 0,
                length: size,
                kind: ProblemKind::Flags(vec![COPY_ON_WRITE]),
            },
        );
    }
    Ok(Verdict {
        size,
        filesystem,
        dax: dax_active(file).unwrap_or(false),
        map_sync: size >= 4096 && map_sync_possible(file),
        extents: extents.len(),
        fingerprint: fingerprint(&extents),
        problems,
    })
}

/// The fingerprint without writing back dirty data first: for periodic watching of a
/// served file, where forcing writeback of the guest's data every interval would
/// cost I/O for nothing. Equals the verdict's fingerprint while the map is immutable;
/// any hole, delayed or unwritten extent that appears changes it.
pub fn watch_fingerprint(file: &File) -> io::Result<u64> {
    let size = file.metadata()?.len();
    Ok(fingerprint(&read_extents_with(file, size, false)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_offset_maps_through_its_extent_and_nowhere_else() {
        let e = |logical, physical, length| Extent {
            logical,
            physical,
            length,
            flags: 0,
        };
        let map = [e(0, 1 << 20, 8192), e(8192, 5 << 20, 4096)];
        assert_eq!(physical_offset(&map, 100), Some((1 << 20) + 100));
        assert_eq!(physical_offset(&map, 8192), Some(5 << 20));
        assert_eq!(physical_offset(&map, 12_287), Some((5 << 20) + 4095));
        assert_eq!(physical_offset(&map, 12_288), None);
    }

    #[test]
    fn the_fiemap_ioctl_number_is_the_kernels() {
        // linux/fs.h on x86_64: _IOWR('f', 11, struct fiemap) with a 32-byte header.
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(FS_IOC_FIEMAP as u64, 0xC020_660B);
    }

    fn ext(logical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical: logical + 1_000_000,
            length,
            flags,
        }
    }

    #[test]
    fn clean_map_has_no_problems() {
        let e = [ext(0, 4096, 0), ext(4096, 8192, FIEMAP_EXTENT_LAST)];
        assert!(find_problems(&e, 12288).is_empty());
    }

    #[test]
    fn holes_are_found_in_the_middle_and_at_the_end() {
        let e = [ext(0, 4096, 0), ext(8192, 4096, 0)];
        let p = find_problems(&e, 16384);
        assert_eq!(
            p,
            vec![
                Problem {
                    offset: 4096,
                    length: 4096,
                    kind: ProblemKind::Hole
                },
                Problem {
                    offset: 12288,
                    length: 4096,
                    kind: ProblemKind::Hole
                },
            ]
        );
        assert_eq!(find_problems(&[], 4096)[0].kind, ProblemKind::Hole);
    }

    #[test]
    fn bad_flags_are_named_and_adjacent_ranges_merge() {
        let e = [
            ext(0, 4096, FIEMAP_EXTENT_UNWRITTEN),
            ext(4096, 4096, FIEMAP_EXTENT_UNWRITTEN),
            ext(8192, 4096, FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST),
        ];
        let p = find_problems(&e, 12288);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].length, 8192);
        assert_eq!(p[0].kind, ProblemKind::Flags(vec!["unwritten"]));
        assert_eq!(p[1].kind, ProblemKind::Flags(vec!["shared"]));
        assert_eq!(p[1].to_string(), "[0x2000, 0x3000) shared");
    }

    #[test]
    fn merged_and_last_flags_are_harmless() {
        // FIEMAP_EXTENT_MERGED (0x1000): a block-mapped file, not a problem.
        let e = [ext(0, 4096, 0x1000 | FIEMAP_EXTENT_LAST)];
        assert!(find_problems(&e, 4096).is_empty());
    }

    #[test]
    fn fingerprint_changes_when_an_extent_moves() {
        let a = [ext(0, 4096, 0)];
        let mut b = a;
        b[0].physical += 4096;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }

    #[test]
    fn a_sparse_file_on_the_test_filesystem_is_not_immutable() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let v = inspect(&f).unwrap();
        assert!(!v.immutable(), "{v:?}");
    }
}
