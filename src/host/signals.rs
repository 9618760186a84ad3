// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The signals, each on purpose: SIGINT and SIGTERM stop the export (the data made
//! durable first); SIGHUP is logged and ignored (nothing is reloaded: a changed
//! configuration needs a restart, and the metrics file is rewritten whole each
//! time, so there is nothing to reopen); SIGUSR1 logs the status line; SIGUSR2 and
//! SIGALRM are logged and ignored; SIGPIPE is ignored (a peer that left shows as
//! EPIPE on the write). None of them can end the daemon without its final sync.
//!
//! Owns: the signal mask of every thread and the signal thread. Never decides what
//! stopping means for an export (the caller says it, the services do it).

use std::{io, os::fd::OwnedFd, sync::Arc};

use log::{info, warn};
use rustix::fd::FromRawFd;

use super::Shared;
use crate::{service, systemd};

/// The signals the signal thread takes.
pub const HANDLED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// The blocked set and the descriptor that reads it.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks [`HANDLED`] in this thread (and so in every thread it starts) and
    /// ignores SIGPIPE. Call before any thread starts.
    pub fn block() -> io::Result<Self> {
        // SAFETY: SIG_IGN for SIGPIPE is a valid disposition; no handler runs.
        if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
        let set = crate::sys::sigset_of(&HANDLED);
        crate::sys::block_signals(&set)?;
        // SAFETY: a valid set; a new descriptor is returned or -1.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Takes the signals on a service thread until shutdown. `stopping` is logged
    /// with the signal that stops the export.
    pub(super) fn spawn(self, shared: Arc<Shared>, stopping: &'static str) -> io::Result<()> {
        let services = shared.services.clone();
        services.spawn(
            "signals",
            |_| {},
            move || {
                while let Ok(true) =
                    service::wait_readable(&shared.services, rustix::fd::AsFd::as_fd(&self.fd))
                {
                    let Some(sig) = self.read() else { continue };
                    let name = signal_name(sig);
                    match sig {
                        libc::SIGINT | libc::SIGTERM => {
                            info!("{name}: {stopping}");
                            systemd::notify_stopping();
                            shared.services.shutdown();
                            return;
                        }
                        libc::SIGUSR1 => info!("{name}: {}", shared.status_line()),
                        libc::SIGHUP => info!(
                            "{name}: ignored; nothing is reloaded (restart the daemon to \
                             change its configuration)"
                        ),
                        _ => info!("{name}: ignored"),
                    }
                }
            },
        )
    }

    /// One pending signal, if any.
    fn read(&self) -> Option<libc::c_int> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match rustix::io::read(&self.fd, &mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first field, a u32 in native order.
                let signo = u32::from_ne_bytes(info[..4].try_into().unwrap());
                libc::c_int::try_from(signo).ok()
            }
            Ok(_) => None,
            Err(e) => {
                if e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR {
                    warn!("reading the signal descriptor: {e}");
                }
                None
            }
        }
    }
}

/// SIGINT, SIGTERM, ... for the log.
pub fn signal_name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGALRM => "SIGALRM".into(),
        n => format!("signal {n}"),
    }
}
