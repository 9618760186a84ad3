// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-device-pmem: a vhost-user virtio-pmem backend that serves a host file whose
//! block map is immutable, so guest flushes need little or no host work.
//!
//! Where things are:
//!
//! - [`device`]: the vhost-user device ([`device::PmemBackend`]), the request queue
//!   ([`device::queue`]) and the virtio-pmem wire format ([`device::wire`]).
//! - [`durability`]: what a flush costs and promises: modes, the flush executor, the
//!   latched failure, the health vocabulary. The flush path is
//!   `device::queue` → `durability` (→ `device::wire` for the answer).
//! - [`blockmap`]: reading and judging a file's block map, `prepare`, `check`, and the
//!   guard that watches it while serving.
//! - [`media`]: media errors: their sources, the bad-range set, the guest channel.
//! - [`control`]: the control socket, events, the `status` document and the
//!   Prometheus metrics (rendered in `control::metrics`, written by
//!   `control::metrics_file`).
//! - [`state`], [`jsonl`], [`service`], [`socket`], [`backing`], [`config`], [`sys`]:
//!   the state directory (and the health record, [`state::health`]), the line
//!   protocols, service threads, sockets, opening the backing file, configuration,
//!   and the raw host calls no crate wraps; [`trust`]: which directories may hold
//!   sockets and records.
//! - [`sandbox`]: the seccomp allow-list installed once start-up is done.
//! - [`systemd`]: inherited sockets, readiness, status and the watchdog (the
//!   service manager's protocols).
//! - [`region`]: the backing file judged and its flush policy chosen; [`daemon`]:
//!   the services around it, the accept loop, the exit. This file: the error type.

pub mod backing;
pub mod blockmap;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod durability;
#[cfg(test)]
mod fuzz;
pub mod jsonl;
pub mod media;
pub mod nvdimm;
pub mod region;
pub mod sandbox;
pub mod service;
pub mod socket;
pub mod state;
pub mod sys;
pub mod systemd;
pub mod trust;

use std::io;

use crate::{
    backing::BackingError, blockmap::guard::GuardError, durability::ModeError, socket::SocketError,
    state::RecordError,
};

/// Everything that can stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("{0}")]
    Sandbox(String),
    /// The NVDIMM export refused the file or QEMU's mapping of it.
    #[error("{0}")]
    Nvdimm(String),
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error(
        "{0}; what the guest wrote may not be on stable storage (see `vhost-device-pmem health`)"
    )]
    SyncFailed(String),
    /// A state record that cannot be read or trusted, or an untrusted state directory.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A sync failed and its health record is not in every location at exit (exit
    /// status `state::health::EXIT_UNRECORDED`).
    #[error("{0}")]
    HealthUnrecorded(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}
