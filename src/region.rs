// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exported region: the backing file, judged once at start-up, and the flush
//! executor under the policy that verdict allows.
//!
//! Owns: the order "open and lock the file, read its block map, choose the policy"
//! for both exports, and the region every part of the daemon shares. Never serves,
//! never watches.

use std::{fs::File, io, path::PathBuf};

use log::{info, warn};

use crate::{
    backing::{BackingError, BackingFile},
    blockmap::{self, Verdict},
    durability::{choose_policy, Flusher, Mode, ModeError, Policy},
};

/// How the region reaches the guest; the rules differ a little.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// A virtio-pmem device over vhost-user (`serve`): QEMU makes the region a PCI
    /// BAR, so its size should be a power of two.
    VirtioPmem,
    /// An NVDIMM that QEMU maps itself (`nvdimm`): `direct` or `volatile` only,
    /// since the guest has no flush request to send.
    Nvdimm,
}

/// What to open and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub file: PathBuf,
    pub mode: Mode,
    pub readonly: bool,
    pub allow_shared_permissions: bool,
    pub export: Export,
}

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// `nvdimm --mode direct` on a file that does not qualify.
    #[error(
        "refused as an NVDIMM: an NVDIMM on a page-cache (non-DAX) file is never durable, the \
         guest has no flush request to send. Use a file on a DAX filesystem (`--prepare` makes \
         its block map immutable), or `--mode volatile` for a scratch guest"
    )]
    NvdimmNotDirect(#[source] ModeError),
    #[error("duplicate the backing file's descriptor")]
    Dup(#[source] io::Error),
}

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
    /// The mode asked for, and why the policy in force was chosen.
    pub mode_requested: Mode,
    pub policy_reason: String,
}

impl Region {
    /// Opens and locks the backing file, judges its block map and picks the
    /// durability policy the mode and the verdict allow.
    pub fn open(spec: &RegionSpec) -> Result<Self, RegionError> {
        let backing = BackingFile::open(&spec.file, spec.readonly, spec.allow_shared_permissions)?;
        if spec.export == Export::VirtioPmem && !backing.size.is_power_of_two() {
            // The daemon announces the file's size as its shared-memory region; QEMU
            // (11.1, vhost-user-test-device-pci) makes it a PCI BAR and aborts on a
            // size that is not a power of two (an assertion in pci_register_bar).
            warn!(
                "{}: {} bytes is not a power of two: QEMU 11.1 aborts when it creates the \
                 device (`pci_register_bar: Assertion is_power_of_2(size)`); size the file \
                 to a power of two for QEMU",
                spec.file.display(),
                backing.size
            );
        }
        let verdict = match blockmap::inspect(&backing.file) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(
                    "cannot read the block map of {}: {e}; it is treated as not immutable",
                    spec.file.display()
                );
                None
            }
        };
        if let Some(v) = &verdict {
            v.log(&spec.file);
        }
        let (policy, reason) = judge(spec, verdict.as_ref())?;
        let flusher = Flusher::new(backing.file.try_clone().map_err(RegionError::Dup)?, policy);
        if policy == Policy::Volatile {
            warn!("**************************************************************");
            warn!("* VOLATILE MODE: {}", flusher.promise());
            warn!("**************************************************************");
        } else if flusher.filesystem().is_some_and(|f| f.memory_only()) {
            warn!("{}: {}", spec.file.display(), flusher.promise());
        }
        info!("durability: {policy} ({reason}); {}", flusher.promise());
        Ok(Region {
            path: backing.path,
            file: backing.file,
            size: backing.size,
            readonly: backing.readonly,
            flusher,
            baseline: verdict
                .as_ref()
                .filter(|v| v.immutable())
                .map(|v| v.fingerprint),
            mode_requested: spec.mode,
            policy_reason: reason,
        })
    }
}

/// The policy for `spec` given the verdict, with the reason.
fn judge(spec: &RegionSpec, verdict: Option<&Verdict>) -> Result<(Policy, String), RegionError> {
    let file = spec.file.display().to_string();
    match spec.export {
        Export::VirtioPmem => Ok(choose_policy(spec.mode, spec.readonly, verdict, &file)?),
        Export::Nvdimm => match spec.mode {
            Mode::Volatile => Ok((
                Policy::Volatile,
                "requested explicitly with --mode volatile (pmem=off)".into(),
            )),
            _ => choose_policy(Mode::Direct, false, verdict, &file)
                .map_err(RegionError::NvdimmNotDirect),
        },
    }
}
