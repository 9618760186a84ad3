// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target: the `/sys/block/*/badblocks` text parser and the translation of the
//! sectors it yields into file ranges. Owns only properties; never touches sysfs.

use proptest::{collection::vec, prelude::*, prop_oneof};

use crate::{
    blockmap::Extent,
    media::{
        ranges::SECTOR,
        sources::{disk_sectors_to_file, parse_badblocks},
    },
};

/// An independent reading of one decimal token (digits, an optional leading '+'),
/// in u128 so nothing overflows: what the text says the number is.
fn says(token: &str) -> Option<u128> {
    let digits = token.strip_prefix('+').unwrap_or(token);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 30 {
        return None;
    }
    digits.parse().ok()
}

/// Text in the kernel's shape ("SECTOR COUNT\n") with noise mixed in.
fn text() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("+7".to_string()),
        "[0-9]{1,25}",
    ];
    let line = prop_oneof![
        4 => (number.clone(), number.clone()).prop_map(|(a, b)| format!("{a} {b}")),
        1 => (number.clone(), number, "[ \t]{0,3}[a-z0-9 ]{0,6}").prop_map(|(a, b, c)| format!("{a}\t{b}{c}")),
        1 => "\\PC{0,24}",
        1 => Just(String::new()),
    ];
    (vec(line, 0..12), "(\n|\r\n)").prop_map(|(lines, nl)| lines.join(&nl))
}

#[test]
fn badblocks_text() {
    super::run("badblocks-text", text(), |text| {
        let parsed = parse_badblocks(&text);
        // Each entry is, in order, what one line's first two tokens say.
        let mut lines = text.lines();
        for &(s, n) in &parsed {
            prop_assert!(n > 0, "a zero-length entry from {text:?}");
            let found = lines.by_ref().any(|l| {
                let mut t = l.split_whitespace();
                matches!((t.next().and_then(says), t.next().and_then(says)),
                    (Some(a), Some(b)) if a == u128::from(s) && b == u128::from(n))
            });
            prop_assert!(
                found,
                "({s}, {n}) is not what any later line of {text:?} says"
            );
        }
        Ok(())
    });
}

#[test]
fn badblocks_round_trip() {
    let entries = vec((any::<u64>(), 1u64..=u64::MAX), 0..20);
    super::run("badblocks-round-trip", entries, |entries| {
        let text: String = entries.iter().map(|(s, n)| format!("{s} {n}\n")).collect();
        prop_assert_eq!(parse_badblocks(&text), entries);
        Ok(())
    });
}

/// Extents of a file as FIEMAP reports them (sane sizes), bad sectors anywhere.
fn sectors_and_extents() -> impl Strategy<Value = (Vec<(u64, u64)>, u64, Vec<Extent>)> {
    let sector = prop_oneof![
        0u64..1 << 16,
        any::<u64>(),
        (u64::MAX - 1000)..=u64::MAX,
        (u64::MAX / SECTOR - 1000)..=(u64::MAX / SECTOR + 1000),
    ];
    let count = prop_oneof![1u64..64, any::<u64>()];
    let extent = (0u64..1 << 40, 0u64..1 << 40, 1u64..1 << 30).prop_map(|(l, p, n)| Extent {
        logical: l,
        physical: p,
        length: n,
        flags: 0,
    });
    (
        vec((sector, count), 0..8),
        prop_oneof![Just(0u64), 0u64..1 << 20, any::<u64>()],
        vec(extent, 0..6),
    )
}

#[test]
fn badblocks_to_file_ranges() {
    super::run(
        "badblocks-to-file",
        sectors_and_extents(),
        |(bad, part, extents)| {
            let out = disk_sectors_to_file(&bad, part, &extents);
            for r in &out {
                prop_assert!(r.length > 0);
                // Inside some extent, at a device byte that one of the bad sectors covers.
                let ok = extents.iter().any(|e| {
                    let (l, p, n) = (e.logical as u128, e.physical as u128, e.length as u128);
                    let (s, t) = (r.offset as u128, r.offset as u128 + r.length as u128);
                    s >= l && t <= l + n && {
                        let (ds, dt) = (p + (s - l), p + (t - l));
                        bad.iter().any(|&(sec, cnt)| {
                            sec >= part && {
                                let b = (sec - part) as u128 * SECTOR as u128;
                                let e = b + cnt as u128 * SECTOR as u128;
                                ds >= b && dt <= e
                            }
                        })
                    }
                });
                prop_assert!(ok, "{r:?} is not a bad part of any extent");
            }
            Ok(())
        },
    );
}
