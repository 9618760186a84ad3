// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exported region: the backing file, judged once at start-up, and the flush
//! executor under the policy that verdict allows.
//!
//! Owns: the order "open and lock the file, read its block map, choose the policy"
//! and the region every part of the daemon shares. Never serves, never watches.

use std::{fs::File, path::PathBuf};

use log::{info, warn};

use crate::{
    backing::BackingFile,
    blockmap,
    config::Config,
    durability::{choose_policy, Flusher, Policy},
    io_err, Error,
};

/// The exported region: the backing file and how flushes of it are made durable.
pub struct Region {
    pub path: PathBuf,
    /// Handed to the VMM with SHMEM_MAP.
    pub file: File,
    pub size: u64,
    pub readonly: bool,
    pub flusher: Flusher,
    /// Block-map fingerprint the policy was chosen with, if the map was immutable
    /// (the guard watches for any change from it).
    pub baseline: Option<u64>,
}

/// Opens and judges the backing file and picks the durability policy.
pub fn open_region(config: &Config) -> Result<(Region, String), Error> {
    let backing = BackingFile::open(
        &config.file,
        config.readonly,
        config.allow_shared_permissions,
    )?;
    if !backing.size.is_power_of_two() {
        // The daemon announces the file's size as its shared-memory region; QEMU
        // (11.1, vhost-user-test-device-pci) makes it a PCI BAR and aborts on a
        // size that is not a power of two (an assertion in pci_register_bar).
        warn!(
            "{}: {} bytes is not a power of two: QEMU 11.1 aborts when it creates the \
             device (`pci_register_bar: Assertion is_power_of_2(size)`); size the file \
             to a power of two for QEMU",
            config.file.display(),
            backing.size
        );
    }
    let verdict = match blockmap::inspect(&backing.file) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(
                "cannot read the block map of {}: {e}; it is treated as not immutable",
                config.file.display()
            );
            None
        }
    };
    if let Some(v) = &verdict {
        v.log(&config.file);
    }
    let (policy, reason) = choose_policy(
        config.mode,
        config.readonly,
        verdict.as_ref(),
        &config.file.display().to_string(),
    )?;
    let flusher = Flusher::new(
        backing.file.try_clone().map_err(io_err("dup backing fd"))?,
        policy,
    );
    if policy == Policy::Volatile {
        warn!("**************************************************************");
        warn!("* VOLATILE MODE: {}", flusher.promise());
        warn!("**************************************************************");
    } else if flusher.filesystem().is_some_and(|f| f.memory_only()) {
        warn!("{}: {}", config.file.display(), flusher.promise());
    }
    info!("durability: {policy} ({reason}); {}", flusher.promise());
    Ok((
        Region {
            path: backing.path,
            file: backing.file,
            size: backing.size,
            readonly: backing.readonly,
            flusher,
            baseline: verdict
                .as_ref()
                .filter(|v| v.immutable())
                .map(|v| v.fingerprint),
        },
        reason,
    ))
}
