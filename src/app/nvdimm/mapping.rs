// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which mappings of a file another process holds, read from `/proc/PID/smaps`: the
//! device:inode of each mapping's header line (the same line `/proc/PID/maps`
//! shows) and its `VmFlags` (`sf`: MAP_SYNC in effect, `sh`: shared).
//!
//! Owns: parsing that text. Never decides whether a mapping is acceptable.

use std::{fs, io};

use serde::{Deserialize, Serialize};

/// A file's identity as /proc shows it: device major:minor and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &fs::File) -> io::Result<Self> {
        let st = rustix::fs::fstat(file)?;
        Ok(Self {
            major: rustix::fs::major(st.st_dev),
            minor: rustix::fs::minor(st.st_dev),
            inode: st.st_ino,
        })
    }
}

/// One mapping of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// The header line, as in /proc/PID/maps.
    pub line: String,
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The `VmFlags` words.
    pub vm_flags: Vec<String>,
}

impl Mapping {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Reads `/proc/PID/smaps` and returns the mappings of `id`.
pub fn mappings_of(pid: u32, id: FileId) -> io::Result<Vec<Mapping>> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps(&text, id))
}

/// The header fields of a maps line: start, end, offset, major, minor, inode.
fn parse_header(line: &str) -> Option<(u64, u64, u64, u32, u32, u64)> {
    let mut it = line.split_ascii_whitespace();
    let (start, end) = it.next()?.split_once('-')?;
    let perms = it.next()?;
    if perms.len() != 4 {
        return None;
    }
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (major, minor) = it.next()?.split_once(':')?;
    let inode = it.next()?.parse().ok()?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
        offset,
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
        inode,
    ))
}

/// The mappings of `id` in smaps text, with their flags.
pub fn parse_smaps(text: &str, id: FileId) -> Vec<Mapping> {
    let mut out = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in text.lines() {
        if let Some((start, end, offset, major, minor, inode)) = parse_header(line) {
            out.extend(current.take());
            if (major, minor, inode) == (id.major, id.minor, id.inode) {
                current = Some(Mapping {
                    line: line.trim_end().to_string(),
                    start,
                    end,
                    offset,
                    vm_flags: Vec::new(),
                });
            }
        } else if let (Some(m), Some(flags)) = (current.as_mut(), line.strip_prefix("VmFlags:")) {
            m.vm_flags = flags.split_ascii_whitespace().map(String::from).collect();
        }
    }
    out.extend(current);
    out
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::fd::AsRawFd};

    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234                       /usr/bin/qemu-system-x86_64
Size:                  4 kB
VmFlags: rd mr mw me sd
7f2a00000000-7f2a40000000 rw-s 00000000 103:02 98765                     /mnt/pmem/vm1.img
Size:            1048576 kB
Rss:                   0 kB
VmFlags: rd wr sh mr mw me ms sf hg
7f2a40000000-7f2a40200000 ---p 00000000 00:00 0 
Size:               2048 kB
VmFlags: mr mw me sd
7f2b00000000-7f2b00200000 rw-s 00200000 103:02 98765                     /mnt/pmem/vm1.img (deleted)
VmFlags: rd wr sh mr mw me ms
";

    #[test]
    fn finds_the_files_mappings_with_their_flags_and_nothing_else() {
        let id = FileId {
            major: 0x103,
            minor: 2,
            inode: 98765,
        };
        let m = parse_smaps(SMAPS, id);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].start, 0x7f2a00000000);
        assert_eq!(m[0].len(), 1 << 30);
        assert!(m[0].has_flag("sf") && m[0].has_flag("sh"));
        assert!(m[0].line.ends_with("/mnt/pmem/vm1.img"));
        assert_eq!(m[1].offset, 0x200000);
        assert!(!m[1].has_flag("sf"));
        // Same inode on another device: not the file.
        let other = FileId { minor: 3, ..id };
        assert!(parse_smaps(SMAPS, other).is_empty());
    }

    #[test]
    fn this_process_s_shared_mapping_of_a_file_is_found_without_sf() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let id = FileId::of(f.as_file()).unwrap();
        // SAFETY: a fresh shared mapping of our own file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let m = mappings_of(std::process::id(), id).unwrap();
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, 8192) };
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].start, addr as u64);
        assert!(m[0].has_flag("sh"), "{:?}", m[0].vm_flags);
        assert!(!m[0].has_flag("sf"), "a page-cache file has no MAP_SYNC");
        assert!(mappings_of(std::process::id(), id).unwrap().is_empty());
    }
}
