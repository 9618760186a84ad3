// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Numbered records for the durability tests (the power cuts of a VM that plays the
//! host, and of the nested DAX lab), what a record slot holds when read back, and
//! the recovery of a file from an ext4 image as a mount after the cut would see it.
//! Owns the record format; never decides how many records must survive.

use std::{fs, path::Path, process::Command};

/// One record: 4 KiB, one page.
pub const RECORD: usize = 4096;
pub const RECORD_MAGIC: &[u8; 8] = b"VDPREC01";

/// Record `i` of the run with `nonce`: magic, i, nonce, a checksum of the rest, and
/// filler that differs per record and per run.
pub fn record(nonce: u64, i: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[..8].copy_from_slice(RECORD_MAGIC);
    r[8..16].copy_from_slice(&i.to_le_bytes());
    r[16..24].copy_from_slice(&nonce.to_le_bytes());
    let mut x = nonce ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    for chunk in r[32..].chunks_mut(8) {
        x = splitmix(x);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let sum = fnv1a(&r[32..]);
    r[24..32].copy_from_slice(&sum.to_le_bytes());
    r
}

pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a record slot holds when read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Intact,
    /// All zeros: the write never reached the disk.
    Zero,
    /// Anything else (torn, stale, garbage).
    Other,
}

pub fn classify(found: &[u8], expected: &[u8]) -> Found {
    if found == expected {
        Found::Intact
    } else if found.iter().all(|&b| b == 0) {
        Found::Zero
    } else {
        Found::Other
    }
}

/// Recovers file `path` (its size must be `size`) from the ext4 image `image`,
/// which is changed: `e2fsck -fy` replays the journal and repairs the image as a
/// mount after the crash would, then `debugfs` dumps the file into `scratch`.
pub fn recover_ext4_file(
    image: &Path,
    path: &str,
    size: u64,
    scratch: &Path,
) -> Result<Vec<u8>, String> {
    let out = Command::new("e2fsck")
        .arg("-fy")
        .arg(image)
        .output()
        .map_err(|e| format!("e2fsck: {e}"))?;
    // 0: clean, 1: errors corrected (the journal replayed counts); else a failure.
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != 1 {
        return Err(format!(
            "e2fsck -fy exited {code}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dump = scratch.join("recovered-file.out");
    let _ = fs::remove_file(&dump);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", dump.display()))
        .arg(image)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    let data = fs::read(&dump).map_err(|e| {
        format!(
            "debugfs dump of {path} made nothing ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let _ = fs::remove_file(&dump);
    if data.len() as u64 != size {
        return Err(format!(
            "{path} has {} bytes after recovery, not {size}",
            data.len()
        ));
    }
    Ok(data)
}
