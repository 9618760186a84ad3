// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-device-pmem: a vhost-user virtio-pmem backend that serves a host file whose
//! block map is immutable, so guest flushes need little or no host work.
//!
//! # The map
//!
//! Modules sit on floors; a module imports only from its own floor or the floors
//! below, and no imports form a circle (`tests/layers.rs` checks both on every
//! `cargo test`). From the bottom up:
//!
//! 1. **utilities**: [`sys`] (the raw host calls no crate wraps), [`jsonl`] (the line
//!    protocols), [`util`] (lock, busy marker, guest log limiter, wall clock),
//!    [`service`] (the thread boundary every long-lived thread goes through),
//!    [`trust`] (which directories may hold sockets and records).
//! 2. **core**: [`backing`] (opening and locking the file), [`blockmap`] (reading and
//!    judging a block map, `prepare`, `check`), [`durability`] (modes, policies, the
//!    flush executor, the latched failure), [`region`] (the file judged and its
//!    policy chosen, for either export), [`state`] (the per-file records and the
//!    health record, [`state::health`]), [`media::ranges`] (the bad-range set).
//! 3. **report**: [`events`] (the event hub) and [`report`] (the plain data of
//!    `status`, which every layer above fills through the handles it is given).
//! 4. **services**: [`device`] (the vhost-user device, the request queue, the wire
//!    format), [`media`] (media-error sources and the guest channel), [`guard`] (the
//!    lease, the seal and the block-map watcher), [`control`] (the control socket and
//!    the metrics), [`state::health`] (the health record, retried until it lands).
//! 5. **runtime**: [`host`] (the start-up steps both exports share, the one status
//!    report, signals, the exit), [`socket`], [`sandbox`], [`systemd`], [`config`].
//! 6. **apps**: [`app::serve`] (virtio-pmem over vhost-user: the accept loop) and
//!    [`app::nvdimm`] (the guarded NVDIMM: QMP and the mapping check).
//!
//! The binary (`main.rs`) stands on top. The flush path is
//! `device::queue` → `durability` (→ `device::wire` for the answer).
//!
//! This file: the error type of the daemon, and how it is reported.

pub mod app;
pub mod backing;
pub mod blockmap;
pub mod config;
pub mod control;
pub mod device;
pub mod durability;
pub mod events;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod host;
pub mod jsonl;
pub mod media;
pub mod region;
pub mod report;
pub mod sandbox;
pub mod service;
pub mod socket;
pub mod state;
pub mod sys;
pub mod systemd;
pub mod trust;
pub mod util;

use std::{io, path::PathBuf};

use crate::{
    app::nvdimm::NvdimmError, durability::ModeError, guard::GuardError, host::Step,
    region::RegionError, sandbox::SandboxError, socket::SocketError, state::RecordError,
};

/// Everything that can stop an export. Each variant carries its cause as its
/// source; [`error_chain`] prints the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Nvdimm(#[from] NvdimmError),
    #[error("vhost-user")]
    VhostUser(#[source] VhostUserError),
    #[error(
        "{file}: a sync failed; what the guest wrote may not be on stable storage (see \
         `vhost-device-pmem health`)"
    )]
    SyncFailed {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state records: {what}")]
    State {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("write the metrics file {path} (--metrics-file)")]
    MetricsFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("block the signals")]
    Signals(#[source] io::Error),
    #[error("start {0}")]
    Start(&'static str, #[source] io::Error),
    #[error("duplicate a descriptor")]
    Dup(#[source] io::Error),
    /// A start-up step that must run before the sandbox was asked for after it.
    #[error("start-up order: {0:?} after the sandbox is in place")]
    StartOrder(Step),
    /// A state record that cannot be read or trusted, or an untrusted state directory.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A sync failed and its health record is not in every location at exit (exit
    /// status `state::health::EXIT_UNRECORDED`).
    #[error(
        "the sync failure of {file} is not recorded in {missing} after {attempts} attempts: a \
         daemon started on the file could serve it as healthy. Keep it out of service until \
         the record is in place (the failure: {record})"
    )]
    HealthUnrecorded {
        file: PathBuf,
        missing: String,
        attempts: u64,
        record: String,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// vhost-user-backend's error, which implements `Display` but not
/// `std::error::Error`, as a source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VhostUserError(pub vhost_user_backend::Error);

impl From<ModeError> for Error {
    fn from(e: ModeError) -> Self {
        Self::Region(RegionError::Mode(e))
    }
}

/// `X: caused by Y: caused by Z` (the CLI puts `error: ` before it): an error and
/// every source under it, each once (a message that already says its cause, as a
/// `transparent` wrapper or a `{0}` in the text does, does not repeat it).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": caused by ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Error::SyncFailed {
            file: "/img".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        let chain = error_chain(&e);
        assert!(
            chain.starts_with("/img: a sync failed;")
                && chain.contains(": caused by Input/output error"),
            "{chain}"
        );
        // A message that already says its cause does not repeat it.
        #[derive(Debug, thiserror::Error)]
        #[error("read x: {0}")]
        struct Said(#[source] io::Error);
        let e = Said(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(error_chain(&e), "read x: Permission denied (os error 13)");
        // A transparent wrapper is not repeated.
        let e: Error = RegionError::Dup(io::Error::from_raw_os_error(libc::EMFILE)).into();
        assert_eq!(
            error_chain(&e),
            "duplicate the backing file's descriptor: caused by Too many open files (os error 24)"
        );
    }
}
