// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bad byte ranges of a backing file: the merged set, and its persistent record.
//!
//! Owns: range arithmetic at 512-byte precision (merge on insert, split on clear) and
//! the record's form; where and how it is stored is `state`'s. Never reads or writes
//! the backing file itself.

use std::collections::BTreeMap;

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
    /// One past the last byte; saturates (a range reported near 2^64 is clipped to
    /// the file by whoever records it, it never wraps).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// Widens `[offset, offset + length)` to whole sectors.
    pub fn sector_aligned(offset: u64, length: u64) -> Self {
        let start = offset / SECTOR * SECTOR;
        let end = offset
            .saturating_add(length)
            .checked_next_multiple_of(SECTOR)
            .unwrap_or(u64::MAX / SECTOR * SECTOR);
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

/// The bad ranges as recorded in the state directory (see `state`).
#[derive(Serialize, Deserialize, Default)]
pub struct RangesRecord {
    pub ranges: Vec<BadRange>,
}

impl From<&BadRanges> for RangesRecord {
    fn from(set: &BadRanges) -> Self {
        Self { ranges: set.list() }
    }
}

impl From<RangesRecord> for BadRanges {
    fn from(rec: RangesRecord) -> Self {
        let mut set = BadRanges::default();
        for r in rec.ranges {
            set.insert(r);
        }
        set
    }
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
    fn ends_never_overflow() {
        let r = BadRange {
            offset: u64::MAX - 511,
            length: 4096,
        };
        assert_eq!(r.end(), u64::MAX);
        let mut s = BadRanges::default();
        s.insert(r);
        assert_eq!(s.list().len(), 1);
    }
}
