// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bad byte ranges of a backing file: the merged set, and its persistent record.
//!
//! Owns: range arithmetic at 512-byte precision (merge on insert, split on clear) and
//! the state file, replaced atomically and fsynced so a daemon or VM restart loses
//! nothing. Never reads or writes the backing file itself.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Sector size of the badblocks interfaces (Linux's `badblocks` attribute, ndctl).
pub const SECTOR: u64 = 512;

/// One bad range of the backing file, in bytes, sector-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BadRange {
    pub offset: u64,
    pub length: u64,
}

impl BadRange {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Widens `[offset, offset + length)` to whole sectors.
    pub fn sector_aligned(offset: u64, length: u64) -> Self {
        let start = offset / SECTOR * SECTOR;
        let end = offset.saturating_add(length).div_ceil(SECTOR) * SECTOR;
        Self {
            offset: start,
            length: end - start,
        }
    }
}

/// A set of disjoint, non-adjacent ranges (adjacent or overlapping ones are merged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadRanges {
    /// start -> end (exclusive)
    map: BTreeMap<u64, u64>,
}

impl BadRanges {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn list(&self) -> Vec<BadRange> {
        self.map
            .iter()
            .map(|(&s, &e)| BadRange {
                offset: s,
                length: e - s,
            })
            .collect()
    }

    /// Adds a range (sector-aligned outward). Returns whether the set changed.
    pub fn insert(&mut self, r: BadRange) -> bool {
        if r.length == 0 {
            return false;
        }
        let r = BadRange::sector_aligned(r.offset, r.length);
        let (mut start, mut end) = (r.offset, r.end());
        // Everything overlapping or touching [start, end] merges into it.
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        if let [(s, e)] = touching.as_slice() {
            if *s <= start && *e >= end {
                return false;
            }
        }
        for (s, e) in touching {
            self.map.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        true
    }

    /// Removes a range (sector-aligned inward, so no bad byte is ever dropped by
    /// rounding). Returns whether the set changed.
    pub fn clear(&mut self, r: BadRange) -> bool {
        let start = r.offset.div_ceil(SECTOR) * SECTOR;
        let end = r.offset.saturating_add(r.length) / SECTOR * SECTOR;
        if end <= start {
            return false;
        }
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for &(s, e) in &hit {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
        }
        !hit.is_empty()
    }

    /// The parts of the set that intersect `[offset, offset + length)`.
    pub fn overlapping(&self, offset: u64, length: u64) -> Vec<BadRange> {
        let end = offset.saturating_add(length);
        self.map
            .range(..end)
            .filter(|(_, &e)| e > offset)
            .map(|(&s, &e)| BadRange {
                offset: s.max(offset),
                length: e.min(end) - s.max(offset),
            })
            .collect()
    }
}

/// On-disk form of the state file.
#[derive(Serialize, Deserialize)]
struct StateFile {
    /// The backing file the ranges belong to (informational; the name of the state
    /// file is what ties them together).
    file: String,
    ranges: Vec<BadRange>,
}

/// Where the ranges of `backing` are recorded: `<state_dir or backing's
/// directory>/<backing's file name>.badblocks.json`.
pub fn state_path(backing: &Path, state_dir: Option<&Path>) -> PathBuf {
    let name = backing
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backing".into());
    let dir = state_dir
        .map(Path::to_path_buf)
        .or_else(|| backing.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(format!("{name}.badblocks.json"))
}

/// Loads the recorded ranges; a missing state file is an empty set.
pub fn load(path: &Path) -> io::Result<BadRanges> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BadRanges::default()),
        Err(e) => return Err(e),
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    let mut set = BadRanges::default();
    for r in state.ranges {
        set.insert(r);
    }
    Ok(set)
}

/// Replaces the state file atomically: write a temporary file, fsync it, rename it
/// over the old one, fsync the directory.
pub fn save(path: &Path, backing: &Path, set: &BadRanges) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let state = StateFile {
        file: backing.display().to_string(),
        ranges: set.list(),
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(&state)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64) -> BadRange {
        BadRange { offset, length }
    }

    #[test]
    fn inserts_align_to_sectors_and_merge_overlapping_and_adjacent_ranges() {
        let mut s = BadRanges::default();
        assert!(s.insert(r(100, 10)));
        assert_eq!(s.list(), vec![r(0, 512)]);
        assert!(s.insert(r(512, 512))); // adjacent
        assert!(s.insert(r(4096, 512)));
        assert_eq!(s.list(), vec![r(0, 1024), r(4096, 512)]);
        assert!(!s.insert(r(0, 1024)), "already covered");
        assert!(s.insert(r(1000, 3200))); // bridges both
        assert_eq!(s.list(), vec![r(0, 4608)]);
        assert!(!s.insert(r(7, 0)));
    }

    #[test]
    fn clear_splits_and_never_drops_a_partially_cleared_sector() {
        let mut s = BadRanges::default();
        s.insert(r(0, 8192));
        assert!(s.clear(r(1024, 1024)));
        assert_eq!(s.list(), vec![r(0, 1024), r(2048, 6144)]);
        // Half a sector is not cleared.
        assert!(!s.clear(r(2048, 256)));
        assert!(s.clear(r(0, 1 << 20)));
        assert!(s.is_empty());
    }

    #[test]
    fn overlapping_clips_to_the_window() {
        let mut s = BadRanges::default();
        s.insert(r(1024, 2048));
        s.insert(r(8192, 512));
        assert_eq!(s.overlapping(2048, 7000), vec![r(2048, 1024), r(8192, 512)]);
        assert!(s.overlapping(4096, 1024).is_empty());
    }

    #[test]
    fn the_state_file_round_trips_and_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let backing = d.path().join("disk.img");
        let p = state_path(&backing, None);
        assert_eq!(p, d.path().join("disk.img.badblocks.json"));
        assert!(load(&p).unwrap().is_empty());
        let mut s = BadRanges::default();
        s.insert(r(4096, 512));
        s.insert(r(1 << 30, 4096));
        save(&p, &backing, &s).unwrap();
        assert_eq!(load(&p).unwrap(), s);
        s.clear(r(4096, 512));
        save(&p, &backing, &s).unwrap();
        assert_eq!(load(&p).unwrap(), s);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        let other = state_path(&backing, Some(Path::new("/var/lib/x")));
        assert_eq!(other, PathBuf::from("/var/lib/x/disk.img.badblocks.json"));
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_set() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.badblocks.json");
        fs::write(&p, "{not json").unwrap();
        let e = load(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("x.badblocks.json"));
    }
}
