// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reads a dm-log-writes log device image and replays it onto a copy of the data
//! device, one entry at a time, so a test can look at the disk as it was at every
//! flush point. Owns the on-disk log format only; never decides what a test asserts
//! and never touches a real device.
//!
//! The format (Linux `drivers/md/dm-log-writes.c`, version 1, little endian): the
//! super block in the first log sector (`magic`, `version`, `nr_entries` as u64,
//! `sectorsize` as u32); from byte `sectorsize` on, one entry after the other, each a
//! header sector (`sector`, `nr_sectors`, `flags`, `data_len`, all u64; a MARK keeps
//! its `data_len` bytes of text right after the header in that sector) followed by
//! `nr_sectors` sectors of written data (none for MARK, FLUSH without data, and
//! DISCARD). Sector numbers and counts are in units of `sectorsize` (the data
//! device's logical block size). Writes are logged once they are known to be on
//! stable media (at the flush that covered them, or at once for FUA), in that order.

#![allow(dead_code)] // the test binary uses only part of it

use std::ops::Range;

/// `WRITE_LOG_MAGIC`.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
pub const VERSION: u64 = 1;
/// Entry flags.
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;
/// Size of an entry header (before the sector's padding or mark text).
const ENTRY_HEADER: usize = 32;
/// Size of the super block's fields.
const SUPER_LEN: usize = 28;

/// One logged operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log (0-based).
    pub index: u64,
    /// First data-device sector written (units of the log's sector size).
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// The text of a MARK entry.
    pub mark: Option<String>,
    /// Byte offset in the log of the written data (meaningless without data).
    pub data_at: u64,
}

impl Entry {
    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    /// Whether the entry carries written data in the log.
    pub fn carries_data(&self) -> bool {
        self.nr_sectors > 0 && !self.has(DISCARD) && !self.has(MARK)
    }

    /// A point where the device promised durability: FLUSH or FUA.
    pub fn is_flush_point(&self) -> bool {
        self.has(FLUSH) || self.has(FUA)
    }
}

/// A parsed log: its sector size and every entry the super block counts.
#[derive(Debug)]
pub struct Log {
    pub sectorsize: u64,
    pub entries: Vec<Entry>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parses the whole log image. Fails on a bad super block, an unknown version, or an
/// entry that runs past the end of the image.
pub fn parse(log: &[u8]) -> Result<Log, String> {
    if log.len() < SUPER_LEN {
        return Err(format!(
            "log image of {} bytes has no super block",
            log.len()
        ));
    }
    let magic = u64_at(log, 0);
    if magic != MAGIC {
        return Err(format!(
            "bad magic {magic:#x} (want {MAGIC:#x}): not a dm-log-writes log"
        ));
    }
    let version = u64_at(log, 8);
    if version != VERSION {
        return Err(format!(
            "log version {version}, this parser knows {VERSION}"
        ));
    }
    let nr_entries = u64_at(log, 16);
    let sectorsize = u64::from(u32::from_le_bytes(log[24..28].try_into().unwrap()));
    if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return Err(format!("bad sector size {sectorsize}"));
    }
    let len = log.len() as u64;
    let mut pos = sectorsize; // entries start right after the super block's sector
    let mut entries = Vec::with_capacity(nr_entries.min(1 << 24) as usize);
    for index in 0..nr_entries {
        if pos + sectorsize > len {
            return Err(format!(
                "entry {index} of {nr_entries} starts at byte {pos}, past the log's end ({len})"
            ));
        }
        let h = &log[pos as usize..(pos + sectorsize) as usize];
        let (sector, nr_sectors, flags, data_len) =
            (u64_at(h, 0), u64_at(h, 8), u64_at(h, 16), u64_at(h, 24));
        let mark = if flags & MARK != 0 {
            let n = data_len as usize;
            if ENTRY_HEADER + n > h.len() {
                return Err(format!("mark entry {index} claims {n} bytes of text"));
            }
            Some(String::from_utf8_lossy(&h[ENTRY_HEADER..ENTRY_HEADER + n]).into_owned())
        } else {
            None
        };
        let entry = Entry {
            index,
            sector,
            nr_sectors,
            flags,
            mark,
            data_at: pos + sectorsize,
        };
        pos += sectorsize;
        if entry.carries_data() {
            let bytes = nr_sectors
                .checked_mul(sectorsize)
                .ok_or_else(|| format!("entry {index}: absurd length {nr_sectors}"))?;
            if pos + bytes > len {
                return Err(format!(
                    "entry {index}: {bytes} bytes of data at {pos} run past the log's end ({len})"
                ));
            }
            pos += bytes;
        }
        entries.push(entry);
    }
    Ok(Log {
        sectorsize,
        entries,
    })
}

impl Log {
    /// Byte range of the data device an entry writes or discards (empty for none).
    pub fn target(&self, e: &Entry) -> Range<u64> {
        if e.has(MARK) {
            return 0..0;
        }
        let start = e.sector * self.sectorsize;
        start..start + e.nr_sectors * self.sectorsize
    }

    /// Applies one entry to `image` (the data device as replayed so far): writes its
    /// data, or zeroes a discarded range. Returns the byte range it changed.
    pub fn apply(&self, log: &[u8], e: &Entry, image: &mut [u8]) -> Result<Range<u64>, String> {
        let target = self.target(e);
        if target.is_empty() {
            return Ok(target);
        }
        if target.end > image.len() as u64 {
            return Err(format!(
                "entry {} writes {target:?}, past the data device's end ({})",
                e.index,
                image.len()
            ));
        }
        let dst = &mut image[target.start as usize..target.end as usize];
        if e.has(DISCARD) {
            dst.fill(0);
        } else {
            let at = e.data_at as usize;
            dst.copy_from_slice(&log[at..at + dst.len()]);
        }
        Ok(target)
    }
}

/// What a replay stops at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point<'a> {
    /// After applying a FLUSH or FUA entry: everything logged so far is on media.
    Flush(&'a Entry),
    /// A mark: userspace's note that something happened at this point.
    Mark(&'a str),
}

/// Replays `log` onto `image` entry by entry. After each entry that is a flush point
/// or a mark, calls `at(point, image, changed)` where `changed` lists the byte ranges
/// written since the previous call. Stops at the first error `at` returns.
pub fn replay<E>(
    log_bytes: &[u8],
    log: &Log,
    image: &mut [u8],
    mut at: impl FnMut(Point<'_>, &[u8], &[Range<u64>]) -> Result<(), E>,
) -> Result<(), ReplayError<E>> {
    let mut changed: Vec<Range<u64>> = Vec::new();
    for e in &log.entries {
        let r = log.apply(log_bytes, e, image).map_err(ReplayError::Log)?;
        if !r.is_empty() {
            changed.push(r);
        }
        let point = if let Some(m) = &e.mark {
            Point::Mark(m)
        } else if e.is_flush_point() {
            Point::Flush(e)
        } else {
            continue;
        };
        at(point, image, &changed).map_err(ReplayError::Check)?;
        changed.clear();
    }
    Ok(())
}

/// Why a replay stopped.
#[derive(Debug)]
pub enum ReplayError<E> {
    /// The log does not fit the data device.
    Log(String),
    /// The caller's check failed.
    Check(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a synthetic log the way the kernel lays it out.
    struct Writer {
        sectorsize: usize,
        buf: Vec<u8>,
        n: u64,
    }

    impl Writer {
        fn new(sectorsize: usize) -> Self {
            Self {
                sectorsize,
                buf: vec![0; sectorsize],
                n: 0,
            }
        }

        fn entry(&mut self, sector: u64, flags: u64, data: &[u8], mark: &str) {
            let mut h = vec![0u8; self.sectorsize];
            let nr = (data.len() / self.sectorsize) as u64;
            // A discard has a length but no data in the log.
            let nr = if flags & DISCARD != 0 {
                sector >> 32
            } else {
                nr
            };
            let sector = sector & 0xffff_ffff;
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
            h[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
            self.buf.extend_from_slice(&h);
            if flags & DISCARD == 0 {
                self.buf.extend_from_slice(data);
            }
            self.n += 1;
        }

        fn write(&mut self, sector: u64, data: &[u8]) {
            self.entry(sector, 0, data, "");
        }

        fn flush(&mut self) {
            self.entry(0, FLUSH, &[], "");
        }

        fn mark(&mut self, text: &str) {
            self.entry(0, MARK, &[], text);
        }

        fn finish(mut self) -> Vec<u8> {
            self.buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            self.buf[8..16].copy_from_slice(&VERSION.to_le_bytes());
            self.buf[16..24].copy_from_slice(&self.n.to_le_bytes());
            self.buf[24..28].copy_from_slice(&(self.sectorsize as u32).to_le_bytes());
            // A log device is bigger than what was logged.
            self.buf.resize(self.buf.len() + 4 * self.sectorsize, 0);
            self.buf
        }
    }

    fn sectors(n: usize, byte: u8) -> Vec<u8> {
        vec![byte; n * 512]
    }

    #[test]
    fn parses_entries_flags_marks_and_data_positions() {
        let mut w = Writer::new(512);
        w.write(8, &sectors(2, 0xaa));
        w.flush();
        w.mark("ack-0");
        w.entry(16, FLUSH | FUA | METADATA, &sectors(1, 0xbb), "");
        let bytes = w.finish();
        let log = parse(&bytes).unwrap();
        assert_eq!(log.sectorsize, 512);
        let e = &log.entries;
        assert_eq!(e.len(), 4);
        assert_eq!((e[0].sector, e[0].nr_sectors, e[0].flags), (8, 2, 0));
        assert_eq!(e[0].data_at, 1024); // super sector + header sector
        assert!(e[1].is_flush_point() && !e[1].carries_data());
        assert_eq!(e[1].data_at, 512 * 5);
        assert_eq!(e[2].mark.as_deref(), Some("ack-0"));
        assert!(!e[2].is_flush_point());
        assert!(e[3].has(FUA) && e[3].has(METADATA) && e[3].carries_data());
        assert_eq!(log.target(&e[3]), 16 * 512..17 * 512);
        assert_eq!(e[3].data_at, 512 * 7);
    }

    #[test]
    fn replay_stops_at_flush_points_and_marks_with_the_disk_as_logged() {
        let mut w = Writer::new(512);
        w.write(0, &sectors(1, 1));
        w.write(4, &sectors(2, 2));
        w.flush();
        w.mark("m1");
        w.write(0, &sectors(1, 3));
        w.entry(6, FUA, &sectors(1, 4), "");
        w.entry(4 | (2 << 32), DISCARD, &[], "");
        w.flush();
        let bytes = w.finish();
        let log = parse(&bytes).unwrap();
        let mut image = vec![0xffu8; 8 * 512];
        let mut seen = Vec::new();
        replay(&bytes, &log, &mut image, |p, img, changed| {
            let what = match p {
                Point::Flush(e) => format!("flush@{}", e.index),
                Point::Mark(m) => format!("mark {m}"),
            };
            let firsts: Vec<u8> = (0..8).map(|s| img[s * 512]).collect();
            let changed: Vec<(u64, u64)> = changed.iter().map(|r| (r.start, r.end)).collect();
            seen.push((what, firsts, changed));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    "flush@2".into(),
                    vec![1, 0xff, 0xff, 0xff, 2, 2, 0xff, 0xff],
                    vec![(0, 512), (2048, 3072)]
                ),
                (
                    "mark m1".into(),
                    vec![1, 0xff, 0xff, 0xff, 2, 2, 0xff, 0xff],
                    vec![]
                ),
                (
                    "flush@5".into(),
                    vec![3, 0xff, 0xff, 0xff, 2, 2, 4, 0xff],
                    vec![(0, 512), (3072, 3584)]
                ),
                (
                    "flush@7".into(),
                    vec![3, 0xff, 0xff, 0xff, 0, 0, 4, 0xff],
                    vec![(2048, 3072)]
                ),
            ]
        );
    }

    #[test]
    fn bigger_sectors_scale_positions_and_targets() {
        let mut w = Writer::new(4096);
        w.write(3, &vec![7u8; 8192]);
        w.flush();
        let bytes = w.finish();
        let log = parse(&bytes).unwrap();
        assert_eq!(log.sectorsize, 4096);
        assert_eq!(log.target(&log.entries[0]), 3 * 4096..5 * 4096);
        assert_eq!(log.entries[0].data_at, 8192);
        assert_eq!(log.entries[1].data_at, 4096 * 5);
        let mut image = vec![0u8; 8 * 4096];
        replay(&bytes, &log, &mut image, |_, _, _| Ok::<(), ()>(())).unwrap();
        assert!(image[3 * 4096..5 * 4096].iter().all(|&b| b == 7));
        assert!(image[..3 * 4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_failing_check_stops_the_replay_at_that_point() {
        let mut w = Writer::new(512);
        w.flush();
        w.mark("x");
        w.flush();
        let bytes = w.finish();
        let log = parse(&bytes).unwrap();
        let mut n = 0;
        let r = replay(&bytes, &log, &mut [0u8; 512], |p, _, _| {
            n += 1;
            if matches!(p, Point::Mark(_)) {
                Err("mark")
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(ReplayError::Check("mark"))), "{r:?}");
        assert_eq!(n, 2);
    }

    #[test]
    fn rejects_bad_logs() {
        assert!(parse(&[0u8; 10]).unwrap_err().contains("no super block"));
        assert!(parse(&[0u8; 4096]).unwrap_err().contains("bad magic"));
        let mut w = Writer::new(512);
        w.write(0, &sectors(4, 1));
        let mut bytes = w.finish();
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(parse(&v2).unwrap_err().contains("version 2"));
        // The super block counts an entry whose data is cut off.
        bytes.truncate(512 + 512 + 3 * 512);
        assert!(parse(&bytes).unwrap_err().contains("past the log's end"));
        // An entry that writes past the data device.
        let mut w = Writer::new(512);
        w.write(7, &sectors(2, 1));
        let bytes = w.finish();
        let log = parse(&bytes).unwrap();
        let r = replay(&bytes, &log, &mut [0u8; 4096], |_, _, _| Ok::<(), ()>(()));
        assert!(matches!(r, Err(ReplayError::Log(m)) if m.contains("past the data device")));
    }
}
