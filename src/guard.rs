// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block-map guard of a served file: a file lease that tells us when another
//! process opens or truncates it, an optional immutable attribute (`--seal`, XFS),
//! and periodic re-verification of the block-map fingerprint.
//!
//! Owns: the watcher thread, the lease and the seal. Never writes file data and never
//! strengthens the policy: when the map changed it only calls the one-way
//! [`Flusher::downgrade`](crate::durability::Flusher::downgrade).

use std::{
    fs::File,
    io,
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

/// Longest the watcher sleeps before looking at its stop flag.
const TICK: Duration = Duration::from_millis(200);
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
    #[error("--seal: cannot set the immutable attribute on {file}: {source}")]
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
    thread: Option<JoinHandle<()>>,
    daemon: GuardHandles,
    sealed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
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
    /// Also verify at once after an inotify change notice on the file (a write(2),
    /// fallocate, reflink, truncate or attribute change by any process; writes
    /// through a mapping make none): the event-driven check where no lease is.
    pub change_notices: bool,
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
    let mut guard = Guard {
        stop: Arc::default(),
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
    /// The inotify descriptor watching the file, if change notices are on.
    notices: Option<std::os::fd::OwnedFd>,
    want_notices: bool,
}

impl Watcher {
    fn file(&self) -> &File {
        &self.daemon.region.file
    }

    fn run(mut self, ready: mpsc::Sender<io::Result<()>>) {
        let sig = libc::SIGRTMIN() + 2;
        let set = sys::sigset_of(&[sig, libc::SIGIO]);
        // Without a lease no lease signal comes: nothing to route (and the
        // nvdimm export's seccomp profile allows no lease fcntl commands).
        let setup = sys::block_signals(&set).and_then(|()| match self.no_lease {
            None => sys::route_lease_signal(self.file(), sig, sys::gettid()),
            Some(_) => Ok(()),
        });
        if let Err(e) = setup {
            let _ = ready.send(Err(e));
            return;
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
        if self.want_notices && self.baseline.is_some() {
            self.notices = self.watch_notices();
        }
        // Anything that happened between the verdict and the lease is caught here.
        self.verify("at start");
        let _ = ready.send(Ok(()));

        let mut next_verify = self.next_periodic();
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let wait = next_verify.map_or(TICK, |t| t.saturating_duration_since(now).min(TICK));
            if self.drain_notices() {
                self.daemon.guard.update(|s| s.change_notices += 1);
                self.verify("after a change notice (inotify)");
            }
            if let Some((s, _fd)) = sys::wait_signal(&set, wait) {
                if s == sig || s == libc::SIGIO {
                    self.lease_broken();
                    next_verify = Some(Instant::now() + LEASE_RETRY);
                }
                continue;
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

    /// An inotify watch for modifications and attribute changes of the file.
    fn watch_notices(&self) -> Option<std::os::fd::OwnedFd> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let path = &self.daemon.region.path;
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).and_then(|fd| {
            inotify::add_watch(&fd, path.as_path(), WatchFlags::MODIFY | WatchFlags::ATTRIB)
                .map(|_| fd)
        });
        match fd {
            Ok(fd) => {
                info!(
                    "watching {} for change notices (inotify): a change by any process is verified within {TICK:?}",
                    path.display()
                );
                Some(fd)
            }
            Err(e) => {
                warn!(
                    "no change notices for {}: {e}; only periodic verification",
                    path.display()
                );
                None
            }
        }
    }

    /// Reads every pending change notice; true if there was one.
    fn drain_notices(&self) -> bool {
        let Some(fd) = &self.notices else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut any = false;
        while let Ok(n) = rustix::io::read(fd, &mut buf) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
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

    /// Compares the map with the baseline; a difference is reported (and downgrades
    /// `direct`).
    fn verify(&mut self, why: &str) {
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

fn describe(openers: &[String]) -> String {
    if openers.is_empty() {
        "opener not found in /proc: it already closed the file, or truncated it by path".into()
    } else {
        openers.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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
