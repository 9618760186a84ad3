// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block-map guard of a served file: a file lease that tells us when another
//! process opens or truncates it, an optional immutable attribute (`--seal`, XFS),
//! change notices (inotify) on the file and on its name in its directory, and
//! re-verification of the block-map fingerprint and of the file itself (still
//! linked, still the file its path names, still its size).
//!
//! Owns: the watcher thread, the lease, the seal and the notices. Never writes file
//! data and never strengthens the policy: when the map changed, or the file was
//! deleted, renamed over, moved away or resized, it only calls the one-way
//! [`Flusher::downgrade`](crate::durability::Flusher::downgrade). The watcher sleeps
//! in one poll(2) until a signal, a notice, the next verification or the stop: an
//! idle daemon's guard never wakes on its own between verifications.

use std::{
    ffi::OsString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{error, info, warn};

use crate::{
    blockmap::{self, Filesystem},
    events::EventHub,
    region::Region,
    report::GuardStatus,
    service::Services,
    sys::{self, LeaseKind},
    {events::EventKind, util::rfc3339_now},
};

/// What the guard needs of the daemon, and nothing more: the region it watches (and
/// whose flusher it downgrades), where it announces what it sees, and its own part
/// of `status`.
#[derive(Clone)]
pub struct GuardHandles {
    pub region: Arc<Region>,
    pub events: Arc<EventHub>,
    pub guard: Arc<GuardState>,
}

/// While the lease is not held (someone else has the file open), the map is
/// re-verified and the lease retried this often.
const LEASE_RETRY: Duration = Duration::from_secs(1);
/// After a break, how long to wait before looking for the opener in /proc (it is
/// blocked in open(2) until we release, so its descriptor appears only after).
const OPENER_SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("--seal sets the immutable attribute, which is only safe on XFS; {file} is on {fs} (on ext4 it write-protects the daemon's own mapping)")]
    SealNotXfs { file: String, fs: Filesystem },
    #[error("--seal: cannot set the immutable attribute on {file}: {source}{}", seal_hint(.source))]
    Seal { file: String, source: io::Error },
    #[error("cannot start the block-map watcher: {0}")]
    Start(io::Error),
}

/// Shared guard state, read by `status`.
#[derive(Default)]
pub struct GuardState {
    status: Mutex<GuardStatus>,
}

impl GuardState {
    pub fn snapshot(&self) -> GuardStatus {
        self.status.lock().unwrap().clone()
    }

    fn update(&self, f: impl FnOnce(&mut GuardStatus)) {
        f(&mut self.status.lock().unwrap());
    }
}

/// A running guard. Dropping it stops the watcher, releases the lease and clears the
/// seal, so every way out of `serve` (signals, errors, panics) unseals the file.
pub struct Guard {
    stop: Arc<AtomicBool>,
    /// An eventfd the watcher polls: written once to wake it for the stop.
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    daemon: GuardHandles,
    sealed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let region = &self.daemon.region;
        if self.sealed {
            match sys::set_flag(&region.file, sys::FS_IMMUTABLE_FL, false) {
                Ok(()) => {
                    info!(
                        "cleared the immutable attribute of {}",
                        region.path.display()
                    );
                    self.daemon.guard.update(|s| s.sealed = false);
                    self.daemon
                        .events
                        .publish(EventKind::Sealed { sealed: false });
                }
                Err(e) => error!(
                    "cannot clear the immutable attribute of {}: {e}; clear it with `chattr -i {}`",
                    region.path.display(),
                    region.path.display()
                ),
            }
        }
    }
}

/// What the guard is asked to do: `serve`'s options, or an NVDIMM export's (which
/// cannot hold a lease: QEMU opens the file by its path and keeps it open).
#[derive(Clone, Debug)]
pub struct GuardOptions {
    /// Seconds between periodic verifications; 0: only on lease breaks.
    pub verify_interval: u64,
    pub seal: bool,
    /// Why no lease is taken, if none is (shown as the lease state).
    pub no_lease: Option<String>,
    /// Also verify at once after an inotify change notice: on the file (a write(2),
    /// fallocate, reflink, truncate, attribute or link-count change by any process,
    /// its rename; writes through a mapping make none) and on its name in its
    /// directory (another file renamed or created over it, its removal). The
    /// event-driven check where no lease is, and the only one that sees a rename
    /// over the file or its removal, which no lease reports. A watch opens
    /// nothing, so it never breaks the lease.
    pub change_notices: bool,
}

/// The hint that goes with a failure to set the immutable attribute.
fn seal_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (setting or clearing it needs CAP_LINUX_IMMUTABLE: run as root, or give the \
             service that capability)"
        }
        _ => "",
    }
}

/// Starts guarding the daemon's backing file: seals it if asked, then starts the
/// watcher thread, which takes the lease and compares the map with `baseline` (the
/// fingerprint the policy was chosen with; None: the map was not immutable, so it is
/// not watched, but the lease still reports other openers).
pub fn start(
    daemon: &GuardHandles,
    services: &Arc<Services>,
    config: &GuardOptions,
) -> Result<Guard, GuardError> {
    let region = &daemon.region;
    let file_name = region.path.display().to_string();
    let wake = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )
    .map_err(|e| GuardError::Start(e.into()))?;
    let mut guard = Guard {
        stop: Arc::default(),
        wake: Arc::new(wake),
        thread: None,
        daemon: daemon.clone(),
        sealed: false,
    };
    if config.seal {
        let fs = blockmap::filesystem_of(&region.file).map_err(|source| GuardError::Seal {
            file: file_name.clone(),
            source,
        })?;
        if fs != Filesystem::Xfs {
            return Err(GuardError::SealNotXfs {
                file: file_name,
                fs,
            });
        }
        sys::set_flag(&region.file, sys::FS_IMMUTABLE_FL, true).map_err(|source| {
            GuardError::Seal {
                file: file_name.clone(),
                source,
            }
        })?;
        guard.sealed = true;
        info!("sealed {file_name} (immutable attribute set; cleared at exit, or by hand with `chattr -i {file_name}` after a crash)");
        daemon.guard.update(|s| s.sealed = true);
        daemon.events.publish(EventKind::Sealed { sealed: true });
    }
    let interval = Duration::from_secs(config.verify_interval);
    daemon.guard.update(|s| {
        s.verify_interval_secs = config.verify_interval;
        s.watching = region.baseline.is_some();
    });
    let (ready_tx, ready_rx) = mpsc::channel();
    let watcher = Watcher {
        daemon: daemon.clone(),
        stop: guard.stop.clone(),
        interval,
        baseline: region.baseline,
        lease_kind: if region.readonly {
            LeaseKind::Read
        } else {
            LeaseKind::Write
        },
        lease_held: false,
        lease_retry: false,
        change_reported: false,
        no_lease: config.no_lease.clone(),
        notices: None,
        want_notices: config.change_notices,
        signals: None,
        wake: guard.wake.clone(),
        file_reported: None,
    };
    let orphan = daemon.clone();
    let handle = services
        .spawn_owned(
            "guard",
            move |why| abandoned(&orphan, why),
            move || watcher.run(ready_tx),
        )
        .map_err(GuardError::Start)?;
    guard.thread = Some(handle);
    // The watcher has routed the lease signal to itself and taken the lease (or
    // given up on it) before serving starts.
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| GuardError::Start(io::Error::other("watcher did not start")))?
        .map_err(GuardError::Start)?;
    Ok(guard)
}

/// The guard's last word when its thread died: nothing watches the map any more, so
/// stop relying on it, durably (a `direct` region is synced whole and downgraded).
fn abandoned(handles: &GuardHandles, why: &str) {
    let flusher = &handles.region.flusher;
    let from = flusher.policy();
    let reason = format!("the block-map guard stopped ({why}); the map is no longer watched");
    handles.guard.update(|s| s.watching = false);
    if flusher.downgrade(&reason) {
        handles.events.publish(EventKind::PolicyDowngraded {
            from: from.to_string(),
            to: flusher.policy().to_string(),
            reason,
        });
    }
}

struct Watcher {
    daemon: GuardHandles,
    stop: Arc<AtomicBool>,
    interval: Duration,
    baseline: Option<u64>,
    lease_kind: LeaseKind,
    lease_held: bool,
    /// The lease is wanted but not held (another process has the file open).
    lease_retry: bool,
    change_reported: bool,
    /// Why no lease is taken at all, if none is.
    no_lease: Option<String>,
    /// The inotify descriptor watching the file and its name, if change notices
    /// are on.
    notices: Option<Notices>,
    want_notices: bool,
    /// The lease signals as a descriptor (signalfd), polled with the others.
    signals: Option<OwnedFd>,
    /// Readable once the guard is dropped.
    wake: Arc<OwnedFd>,
    /// The kind of change of the file last reported (None: the file is whole).
    file_reported: Option<&'static str>,
}

/// The inotify watches: the file itself, and its directory for its name.
struct Notices {
    fd: OwnedFd,
    file: Option<i32>,
    dir: Option<i32>,
    name: OsString,
}

/// What one poll of the watcher saw.
#[derive(Default)]
struct Woken {
    stop: bool,
    lease_signal: bool,
    /// Change notices, described ("IN_MODIFY on the file", ...).
    notices: Vec<&'static str>,
}

impl Watcher {
    fn file(&self) -> &File {
        &self.daemon.region.file
    }

    fn run(mut self, ready: mpsc::Sender<io::Result<()>>) {
        let sig = libc::SIGRTMIN() + 2;
        let set = sys::sigset_of(&[sig, libc::SIGIO]);
        // Without a lease no lease signal comes: nothing to route or to wait for
        // (and the nvdimm export's seccomp profile allows no lease fcntl commands).
        let setup = sys::block_signals(&set).and_then(|()| match self.no_lease {
            None => sys::route_lease_signal(self.file(), sig, sys::gettid())
                .and_then(|()| sys::signal_fd(&set))
                .map(Some),
            Some(_) => Ok(None),
        });
        match setup {
            Ok(fd) => self.signals = fd,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
        match self.no_lease.clone() {
            None => {
                self.try_lease(true);
            }
            Some(why) => {
                info!(
                    "no lease on {}: {why}; the block map is verified periodically",
                    self.daemon.region.path.display()
                );
                self.lease_unavailable(why);
            }
        }
        if self.want_notices {
            self.notices = self.watch_notices();
        }
        // Anything that happened between the verdict and the lease is caught here.
        self.verify("at start");
        let _ = ready.send(Ok(()));

        let mut next_verify = self.next_periodic();
        while !self.stop.load(Ordering::Acquire) {
            let wait = next_verify.map(|t| t.saturating_duration_since(Instant::now()));
            let woken = self.wait(wait);
            if woken.stop || self.stop.load(Ordering::Acquire) {
                break;
            }
            if woken.lease_signal {
                self.lease_broken();
                next_verify = Some(Instant::now() + LEASE_RETRY);
            }
            if !woken.notices.is_empty() {
                self.daemon.guard.update(|s| s.change_notices += 1);
                let why = format!(
                    "after a change notice (inotify: {})",
                    woken.notices.join(", ")
                );
                self.verify(&why);
            }
            if next_verify.is_some_and(|t| Instant::now() >= t) {
                if self.lease_retry {
                    self.verify("while another process had the file open");
                    if self.try_lease(false) {
                        self.verify("after the other process closed the file");
                    }
                } else {
                    self.verify("periodic");
                }
                next_verify = self.next_periodic();
            }
        }
        if self.lease_held {
            let _ = sys::release_lease(self.file());
        }
    }

    /// Sleeps in one poll until a lease signal, a change notice, the stop, or
    /// `timeout` (None: no timeout; the guard never wakes on its own).
    fn wait(&self, timeout: Option<Duration>) -> Woken {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut woken = Woken::default();
        let wake = self.wake.as_fd();
        let mut fds = vec![PollFd::new(&wake, PollFlags::IN)];
        let signals = self.signals.as_ref().map(|s| s.as_fd());
        let notices = self.notices.as_ref().map(|n| n.fd.as_fd());
        for fd in [&signals, &notices].into_iter().flatten() {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let timeout = timeout.and_then(|d| Timespec::try_from(d).ok());
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                // Never busy-loop on a broken poll: fall back to sleeping until the
                // next verification (or a second).
                warn!("guard: poll failed: {e}");
                thread::sleep(LEASE_RETRY);
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        woken.stop = ready[0];
        let mut i = 1;
        if let Some(fd) = &self.signals {
            if ready[i] {
                let sig = libc::SIGRTMIN() + 2;
                woken.lease_signal = sys::take_signals(fd)
                    .iter()
                    .any(|&s| s == sig || s == libc::SIGIO);
            }
            i += 1;
        }
        if self.notices.is_some() && ready[i] {
            woken.notices = self.drain_notices();
        }
        woken
    }

    /// Inotify watches on the file (modifications, attribute and link-count
    /// changes, its rename, its deletion) and on its name in its directory (a file
    /// renamed or created over it, its removal or rename away).
    fn watch_notices(&self) -> Option<Notices> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let path = &self.daemon.region.path;
        let fd = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(
                    "no change notices for {}: {e}; only periodic verification",
                    path.display()
                );
                return None;
            }
        };
        let file = inotify::add_watch(
            &fd,
            path.as_path(),
            WatchFlags::MODIFY
                | WatchFlags::ATTRIB
                | WatchFlags::MOVE_SELF
                | WatchFlags::DELETE_SELF,
        )
        .map_err(|e| warn!("no change notices for {}: {e}", path.display()))
        .ok();
        let dir = parent_of(path);
        let name = path.file_name().map(ToOwned::to_owned).unwrap_or_default();
        let dir_wd = inotify::add_watch(
            &fd,
            dir,
            WatchFlags::MOVED_TO
                | WatchFlags::CREATE
                | WatchFlags::MOVED_FROM
                | WatchFlags::DELETE
                | WatchFlags::ONLYDIR,
        )
        .map_err(|e| {
            warn!(
                "no change notices for the name {} in {}: {e}; a rename over it is seen at the next verification only",
                path.display(),
                dir.display()
            )
        })
        .ok();
        if file.is_none() && dir_wd.is_none() {
            return None;
        }
        info!(
            "watching {} and its name for change notices (inotify): a change, a rename over it \
             or its removal by any process is verified at once",
            path.display()
        );
        Some(Notices {
            fd,
            file,
            dir: dir_wd,
            name,
        })
    }

    /// Reads every pending change notice; those about the file or its name,
    /// described (the directory's notices about other names are dropped).
    fn drain_notices(&self) -> Vec<&'static str> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let Some(n) = &self.notices else {
            return Vec::new();
        };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = Reader::new(&n.fd, &mut buf);
        let mut seen = Vec::new();
        let mut note = |what: &'static str| {
            if !seen.contains(&what) {
                seen.push(what);
            }
        };
        while let Ok(ev) = reader.next() {
            let flags = ev.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                note("queue overflow");
                continue;
            }
            if Some(ev.wd()) == n.file {
                for (flag, what) in [
                    (ReadFlags::MODIFY, "IN_MODIFY on the file"),
                    (ReadFlags::ATTRIB, "IN_ATTRIB on the file"),
                    (ReadFlags::MOVE_SELF, "IN_MOVE_SELF on the file"),
                    (ReadFlags::DELETE_SELF, "IN_DELETE_SELF on the file"),
                ] {
                    if flags.contains(flag) {
                        note(what);
                    }
                }
            } else if Some(ev.wd()) == n.dir
                && ev
                    .file_name()
                    .is_some_and(|f| f.to_bytes() == n.name.as_encoded_bytes())
            {
                for (flag, what) in [
                    (ReadFlags::MOVED_TO, "IN_MOVED_TO on its name"),
                    (ReadFlags::CREATE, "IN_CREATE on its name"),
                    (ReadFlags::MOVED_FROM, "IN_MOVED_FROM on its name"),
                    (ReadFlags::DELETE, "IN_DELETE on its name"),
                ] {
                    if flags.contains(flag) {
                        note(what);
                    }
                }
            }
        }
        seen
    }

    fn next_periodic(&self) -> Option<Instant> {
        if self.lease_retry {
            Some(Instant::now() + LEASE_RETRY)
        } else if self.interval.is_zero() {
            None
        } else {
            Some(Instant::now() + self.interval)
        }
    }

    /// Tries to take the lease; reports why not on the first try.
    fn try_lease(&mut self, first: bool) -> bool {
        let kind = self.lease_kind;
        match sys::take_lease(self.file(), kind) {
            Ok(()) => {
                let what = format!("{} lease held", kind.name());
                if first {
                    info!(
                        "{what} on {}: other opens and truncates are noticed at once",
                        self.daemon.region.path.display()
                    );
                } else {
                    info!("{what} again: no other process has the file open");
                }
                self.daemon.guard.update(|s| s.lease = what.clone());
                self.daemon
                    .events
                    .publish(EventKind::LeaseTaken { lease: what });
                self.lease_held = true;
                self.lease_retry = false;
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if first {
                    let openers = sys::other_openers(self.file());
                    let reason = format!(
                        "the file is open elsewhere ({}); retrying every {}s, verifying the map meanwhile",
                        describe(&openers),
                        LEASE_RETRY.as_secs()
                    );
                    warn!(
                        "no {} lease on {}: {reason}",
                        kind.name(),
                        self.daemon.region.path.display()
                    );
                    self.lease_unavailable(reason);
                }
                self.lease_retry = true;
                false
            }
            Err(e) => {
                let reason = match e.raw_os_error() {
                    Some(libc::EINVAL) => format!("the filesystem grants no leases ({e})"),
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        format!("not the file's owner and no CAP_LEASE ({e})")
                    }
                    _ => e.to_string(),
                };
                warn!(
                    "no lease on {}: {reason}; only periodic verification guards the map",
                    self.daemon.region.path.display()
                );
                self.lease_unavailable(reason);
                self.lease_retry = false;
                false
            }
        }
    }

    /// Records in `status` and as an event that no lease is held, and why.
    fn lease_unavailable(&self, reason: String) {
        self.daemon
            .guard
            .update(|s| s.lease = format!("unavailable: {reason}"));
        self.daemon
            .events
            .publish(EventKind::LeaseUnavailable { reason });
    }

    /// Another process opens (or truncates) the file: let it go on, name it, and
    /// watch the map closely until the lease can be taken again.
    fn lease_broken(&mut self) {
        if !self.lease_held {
            return;
        }
        // Releasing at once lets the opener proceed instead of hanging for
        // /proc/sys/fs/lease-break-time; the lease is a tripwire, not a lock.
        if let Err(e) = sys::release_lease(self.file()) {
            warn!("cannot release the broken lease: {e}");
        }
        self.lease_held = false;
        self.lease_retry = true;
        thread::sleep(OPENER_SETTLE);
        let openers = sys::other_openers(self.file());
        let reason = format!(
            "another process opened or truncated the file ({}); the block map is re-verified every {}s until it closes the file",
            describe(&openers),
            LEASE_RETRY.as_secs()
        );
        warn!(
            "lease on {} broken: {reason}",
            self.daemon.region.path.display()
        );
        self.daemon.guard.update(|s| {
            s.lease = format!("broken: {reason}");
            s.lease_breaks += 1;
        });
        self.daemon
            .events
            .publish(EventKind::LeaseBroken { reason, openers });
        self.verify("after the lease broke");
    }

    /// Checks the file itself (see [`file_problem`]), then compares the map with the
    /// baseline; a difference is reported (and downgrades `direct`).
    fn verify(&mut self, why: &str) {
        let region = &self.daemon.region;
        match file_problem(&region.file, &region.path, region.size) {
            Some((change, what)) => self.file_changed(change, format!("{what} (seen {why})")),
            None => {
                if let Some(was) = self.file_reported.take() {
                    info!(
                        "{}: the path names the served file again, at its size (it was {was}); \
                         the change stays recorded",
                        region.path.display()
                    );
                }
            }
        }
        let Some(baseline) = self.baseline else {
            return;
        };
        let result = blockmap::watch_fingerprint(self.file());
        self.daemon.guard.update(|s| {
            s.verifications += 1;
            s.last_verified = Some(rfc3339_now());
        });
        match result {
            Ok(fp) if fp == baseline => {}
            Ok(fp) => {
                self.baseline = Some(fp);
                let problems: Vec<String> = blockmap::inspect(self.file())
                    .map(|v| {
                        v.problems
                            .iter()
                            .take(16)
                            .map(ToString::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let reason = if problems.is_empty() {
                    format!("the block map changed ({why}): extents moved or were replaced")
                } else {
                    format!(
                        "the block map changed ({why}): {} (first problem: {})",
                        if problems.len() == 1 {
                            "1 problem range".to_string()
                        } else {
                            format!("{} problem ranges", problems.len())
                        },
                        problems[0]
                    )
                };
                self.map_changed(reason, problems);
            }
            Err(e) => {
                let reason = format!("the block map cannot be re-read ({why}): {e}");
                self.daemon.events.publish(EventKind::VerifyFailed {
                    error: e.to_string(),
                });
                self.map_changed(reason, Vec::new());
            }
        }
    }

    fn map_changed(&mut self, reason: String, problems: Vec<String>) {
        error!("{}: {reason}", self.daemon.region.path.display());
        self.daemon
            .guard
            .update(|s| s.map_changed = Some(reason.clone()));
        if !self.change_reported || !problems.is_empty() {
            self.daemon.events.publish(EventKind::BlockMapChanged {
                reason: reason.clone(),
                problems,
            });
        }
        self.change_reported = true;
        let flusher = &self.daemon.region.flusher;
        let from = flusher.policy();
        if flusher.downgrade(&reason) {
            self.daemon.events.publish(EventKind::PolicyDowngraded {
                from: from.to_string(),
                to: flusher.policy().to_string(),
                reason,
            });
        }
    }
}

impl Watcher {
    /// The served file was deleted, renamed over, moved away or resized: said once
    /// per kind of change, in the log, `status`, an event; `direct` is made durable
    /// and downgraded as for a lost block map.
    fn file_changed(&mut self, change: &'static str, reason: String) {
        if self.file_reported == Some(change) {
            return;
        }
        self.file_reported = Some(change);
        error!("{}: {reason}", self.daemon.region.path.display());
        self.daemon.guard.update(|s| {
            s.file_problem = Some(reason.clone());
            s.file_change = Some(change.into());
            s.file_problems += 1;
        });
        self.daemon.events.publish(EventKind::BackingFileChanged {
            change: change.into(),
            reason: reason.clone(),
        });
        let flusher = &self.daemon.region.flusher;
        let from = flusher.policy();
        if flusher.downgrade(&reason) {
            self.daemon.events.publish(EventKind::PolicyDowngraded {
                from: from.to_string(),
                to: flusher.policy().to_string(),
                reason,
            });
        }
    }
}

/// The directory holding `path` ("." for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What is wrong with the served file, if anything: it has no name left
/// (`st_nlink` 0: deleted, or renamed over), its path names another file or none
/// (moved away, or hard-linked elsewhere and unlinked), or its size is not the
/// served size (truncated, or extended). The kind of change and a sentence.
pub fn file_problem(file: &File, path: &Path, served: u64) -> Option<(&'static str, String)> {
    let shown = path.display();
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Some(("unreadable", format!("cannot fstat the served file: {e}"))),
    };
    let named = fs::metadata(path);
    let same = matches!(&named, Ok(m) if m.dev() == meta.dev() && m.ino() == meta.ino());
    let lost = "everything the guest writes from now on is lost when the daemon exits";
    if meta.nlink() == 0 {
        return Some(match &named {
            Ok(m) => (
                "replaced",
                format!(
                    "the served file was renamed over: {shown} now names another file (inode {}) \
                     and the served one has no name left; {lost}",
                    m.ino()
                ),
            ),
            Err(_) => (
                "deleted",
                format!(
                    "the served file was deleted: {shown} is gone and it has no name left; {lost}"
                ),
            ),
        });
    }
    if !same {
        let now = match &named {
            Ok(m) => format!("now names another file (inode {})", m.ino()),
            Err(e) => format!("does not resolve ({e})"),
        };
        return Some((
            "moved",
            format!(
                "the served file was moved away: {shown} {now}, and the served file (inode {}) \
                 has {} name(s) elsewhere; a restart would not serve it",
                meta.ino(),
                meta.nlink()
            ),
        ));
    }
    if meta.len() != served {
        let change = if meta.len() < served {
            "truncated"
        } else {
            "resized"
        };
        return Some((
            change,
            format!(
                "the served file was {change}: {shown} is {} bytes, {served} are served{}",
                meta.len(),
                if meta.len() < served {
                    "; the guest's accesses past the end fault (SIGBUS in the VMM)"
                } else {
                    ""
                }
            ),
        ));
    }
    None
}

fn describe(openers: &[String]) -> String {
    if openers.is_empty() {
        "opener not found in /proc: it already closed the file, or truncated it by path".into()
    } else {
        openers.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::durability::{Flusher, Policy};

    fn handles(policy: Policy) -> GuardHandles {
        let f = tempfile::tempfile().unwrap();
        GuardHandles {
            region: Arc::new(Region {
                path: PathBuf::from("/img"),
                file: f.try_clone().unwrap(),
                size: 2 << 20,
                readonly: false,
                flusher: Flusher::new(f, policy),
                baseline: Some(1),
                mode_requested: crate::durability::Mode::Auto,
                policy_reason: "test".into(),
            }),
            events: Arc::default(),
            guard: Arc::default(),
        }
    }

    #[test]
    fn without_a_lease_or_an_interval_a_change_notice_alone_catches_a_punched_hole() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&vec![7u8; 2 << 20]).unwrap();
        f.sync_all().unwrap();
        let baseline = blockmap::watch_fingerprint(&f).unwrap();
        let h = GuardHandles {
            region: Arc::new(Region {
                path: path.clone(),
                file: f.try_clone().unwrap(),
                size: 2 << 20,
                readonly: false,
                flusher: Flusher::new(f.try_clone().unwrap(), Policy::Direct),
                baseline: Some(baseline),
                mode_requested: crate::durability::Mode::Auto,
                policy_reason: "test".into(),
            }),
            events: Arc::default(),
            guard: Arc::default(),
        };
        let services: Arc<Services> = Arc::default();
        let guard = start(
            &h,
            &services,
            &GuardOptions {
                verify_interval: 0,
                seal: false,
                no_lease: Some("test".into()),
                change_notices: true,
            },
        )
        .unwrap();
        assert_eq!(h.region.flusher.policy(), Policy::Direct);
        // Another process punches a hole: no lease, no periodic verification.
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        sys::fallocate(
            &other,
            sys::FALLOC_FL_PUNCH_HOLE | sys::FALLOC_FL_KEEP_SIZE,
            0,
            1 << 20,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.region.flusher.policy() == Policy::Direct {
            assert!(Instant::now() < deadline, "the punched hole went unnoticed");
            thread::sleep(Duration::from_millis(20));
        }
        let s = h.guard.snapshot();
        assert!(s.change_notices >= 1, "{s:?}");
        assert!(s.map_changed.unwrap().contains("inotify"));
        drop(guard);
    }

    /// A written, synced 2 MiB file under `dir`, and the guard's handles on it
    /// under `policy` with its real block-map fingerprint as the baseline.
    fn served(dir: &Path, policy: Policy) -> (PathBuf, GuardHandles) {
        use std::io::Write;
        let path = dir.join("f.img");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&vec![7u8; 2 << 20]).unwrap();
        f.sync_all().unwrap();
        let baseline = blockmap::watch_fingerprint(&f).unwrap();
        let h = GuardHandles {
            region: Arc::new(Region {
                path: path.clone(),
                file: f.try_clone().unwrap(),
                size: 2 << 20,
                readonly: false,
                flusher: Flusher::new(f, policy),
                baseline: Some(baseline),
                mode_requested: crate::durability::Mode::Auto,
                policy_reason: "test".into(),
            }),
            events: Arc::default(),
            guard: Arc::default(),
        };
        (path, h)
    }

    /// As `serve` starts it: a lease, no periodic verification, change notices.
    fn serve_guard(h: &GuardHandles) -> Guard {
        let services: Arc<Services> = Arc::default();
        start(
            h,
            &services,
            &GuardOptions {
                verify_interval: 0,
                seal: false,
                no_lease: None,
                change_notices: true,
            },
        )
        .unwrap()
    }

    fn wait_for_file_problem(h: &GuardHandles) -> GuardStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = h.guard.snapshot();
            if s.file_problem.is_some() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the change went unnoticed: {s:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_served_file_renamed_over_deleted_moved_or_truncated_downgrades_direct() {
        type Change = fn(&Path);
        let cases: [(&str, Change); 4] = [
            ("replaced", |p| {
                let other = p.with_file_name("other.img");
                std::fs::write(&other, vec![1u8; 2 << 20]).unwrap();
                std::fs::rename(&other, p).unwrap();
            }),
            ("deleted", |p| std::fs::remove_file(p).unwrap()),
            ("moved", |p| {
                std::fs::hard_link(p, p.with_file_name("g.img")).unwrap();
                std::fs::remove_file(p).unwrap();
            }),
            ("truncated", |p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(1 << 20).unwrap();
            }),
        ];
        for (change, act) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (path, h) = served(dir.path(), Policy::Direct);
            let rx = h.events.subscribe(false);
            let guard = serve_guard(&h);
            let before = h.guard.snapshot();
            assert!(before.lease.contains("write lease held"), "{before:?}");
            assert!(before.file_problem.is_none(), "{before:?}");
            act(&path);
            let s = wait_for_file_problem(&h);
            assert_eq!(s.file_problems, 1, "{change}: {s:?}");
            assert_eq!(s.file_change.as_deref(), Some(change), "{s:?}");
            let fl = &h.region.flusher;
            let deadline = Instant::now() + Duration::from_secs(10);
            while fl.policy() == Policy::Direct {
                assert!(Instant::now() < deadline, "{change}: direct stayed");
                thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(fl.policy(), Policy::Datasync, "{change}");
            assert!(fl.stats.snapshot().syncs >= 1, "{change}: not made durable");
            // Both events, in this order: what happened, then the downgrade.
            let mut events = Vec::new();
            while !events
                .iter()
                .any(|e: &String| e.contains("policy-downgraded"))
            {
                let e = rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| panic!("{change}: no downgrade event: {events:?}"));
                events.push(e.to_line());
            }
            let changed = events
                .iter()
                .position(|e| {
                    e.contains("\"backing-file-changed\"")
                        && e.contains(&format!("\"change\":\"{change}\""))
                })
                .unwrap_or_else(|| panic!("{change}: {events:?}"));
            assert!(changed < events.len() - 1, "{change}: {events:?}");
            drop(guard);
        }
    }

    #[test]
    fn a_guard_that_dies_leaves_direct_durable_and_downgraded() {
        let h = handles(Policy::Direct);
        let rx = h.events.subscribe(false);
        abandoned(&h, "boom");
        let fl = &h.region.flusher;
        assert_eq!(fl.policy(), Policy::Datasync);
        assert!(fl
            .downgrade_reason()
            .unwrap()
            .contains("guard stopped (boom)"));
        assert_eq!(
            fl.stats.snapshot().syncs,
            1,
            "the whole file was not synced"
        );
        let ev = rx.try_recv().unwrap().to_line();
        assert!(ev.contains("policy-downgraded"), "{ev}");
        assert!(!h.guard.snapshot().watching);
        // datasync never relied on the map: nothing to do but say it is unwatched.
        let h = handles(Policy::Datasync);
        abandoned(&h, "boom");
        assert_eq!(h.region.flusher.policy(), Policy::Datasync);
        assert!(h.region.flusher.downgrade_reason().is_none());
    }
}
