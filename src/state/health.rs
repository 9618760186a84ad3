// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The health record of one backing file: restored at start-up, written when a sync
//! failure is latched, retried until it lands, kept in two directories, and shown or
//! cleared by the operator's `health` command.
//!
//! Owns: where the record goes (the state directory, and a second copy in
//! `--health-copy-dir`, by default [`DEFAULT_COPY_DIR`] when it exists), the retry
//! thread (asleep while nothing is pending; while a write is pending it retries
//! with back-off, at once when the mount table changes), what `status` says about
//! the record, the exit status of a daemon that ends with it unwritten
//! ([`EXIT_UNRECORDED`]), and `health [--clear [--force]]`. Never decides that a
//! sync failed (`durability` does) and never clears a record by itself.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use log::{error, info, warn};
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::{Kind, RecordError, StateFiles};
use crate::{
    durability::{Flusher, SyncFailure},
    events::{EventHub, EventKind},
    service::Services,
    trust::Purpose,
    util::rfc3339_now,
    Error,
};

/// Where the second copy of a health record goes when `--health-copy-dir` is not
/// given and this directory exists.
pub const DEFAULT_COPY_DIR: &str = "/var/lib/vhost-device-pmem";

/// Exit status of a daemon that ends with a sync failure it could not record in
/// every location (EX_CANTCREAT): a daemon started next could serve the file as
/// healthy, so the service unit does not restart on it (`RestartPreventExitStatus=`).
pub const EXIT_UNRECORDED: u8 = 73;

/// The first retry of a failed write, and the longest wait between two.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// `--health-copy-dir` / `--no-health-copy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HealthCopy {
    /// [`DEFAULT_COPY_DIR`] when it exists, else none.
    #[default]
    Default,
    Dir(PathBuf),
    /// No second copy.
    Off,
}

/// How the records of a file are found and trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordOptions {
    pub health_copy: HealthCopy,
    /// Trust records without a file identity (`--adopt-legacy-records`).
    pub adopt_legacy: bool,
}

impl RecordOptions {
    /// The copy directory in effect.
    pub fn copy_dir(&self) -> Option<PathBuf> {
        match &self.health_copy {
            HealthCopy::Off => None,
            HealthCopy::Dir(d) => Some(d.clone()),
            HealthCopy::Default => Path::new(DEFAULT_COPY_DIR)
                .is_dir()
                .then(|| DEFAULT_COPY_DIR.into()),
        }
    }

    /// The directories the health record of `state`'s file is kept in: its state
    /// directory first, then the copy (none when it is the same directory).
    pub fn locations(&self, state: &StateFiles) -> Result<Vec<StateFiles>, RecordError> {
        let primary = state.clone().adopting_legacy(self.adopt_legacy);
        let mut out = vec![primary];
        if let Some(dir) = self.copy_dir() {
            let copy = state
                .in_dir(&dir, Purpose::HealthCopy)?
                .adopting_legacy(self.adopt_legacy);
            let (a, b) = (
                std::fs::metadata(copy.dir()),
                std::fs::metadata(state.dir()),
            );
            match (a, b) {
                (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => {}
                (Ok(a), Ok(b)) => {
                    if a.dev() == b.dev() {
                        info!(
                            "the health record's copy in {} is on the same filesystem as {}: it \
                             does not survive that filesystem failing (--health-copy-dir)",
                            copy.dir().display(),
                            state.dir().display()
                        );
                    }
                    out.push(copy);
                }
                (Err(e), _) | (_, Err(e)) => {
                    return Err(RecordError::Io {
                        path: copy.dir().to_path_buf(),
                        source: e,
                    })
                }
            }
        }
        Ok(out)
    }
}

pub use crate::report::{HealthRecordStatus, RecordLocation};

#[derive(Default)]
struct RecordState {
    record: Option<SyncFailure>,
    written: Vec<bool>,
    errors: Vec<Option<String>>,
    pending_since: Option<String>,
    attempts: u64,
}

struct Shared {
    file: PathBuf,
    locations: Vec<StateFiles>,
    state: Mutex<RecordState>,
    /// Serialises the writes (the flush thread's first one and the retries).
    writing: Mutex<()>,
    /// Written when a write became pending.
    wake: OwnedFd,
    /// Written when the recorder stops.
    stop: OwnedFd,
    /// `/proc/self/mountinfo`: readable as POLLPRI when the mount table changes (a
    /// filesystem remounted read-write, say).
    mounts: Option<File>,
}

/// The health record of one backing file while a daemon serves it.
pub struct HealthRecorder {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl HealthRecorder {
    /// Restores a sync failure recorded by an earlier run, in any location (the file
    /// is then served as `failed`: every flush EIO) and writes it where it is
    /// missing; records the next one when the flusher latches it (with the
    /// `sync-failed` event); starts the retry thread. A record that cannot be read
    /// stops the start-up: nothing recorded may be forgotten.
    pub fn start(
        flusher: &Flusher,
        state: &StateFiles,
        options: &RecordOptions,
        events: Arc<EventHub>,
        services: &Arc<Services>,
    ) -> Result<Self, Error> {
        let locations = options.locations(state)?;
        let eventfd = |what| {
            rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).map_err(|e| {
                Error::Io {
                    what,
                    source: e.into(),
                }
            })
        };
        let n = locations.len();
        let mut found = None;
        for loc in &locations {
            if let Some(f) = loc.find::<SyncFailure>(Kind::Health, true)? {
                found.get_or_insert(f);
            }
        }
        let mut st = RecordState {
            written: vec![false; n],
            errors: vec![None; n],
            ..RecordState::default()
        };
        if let Some(f) = found {
            let r = &f.data;
            error!(
                "{}: a sync failed in an earlier run ({} during {}, at {}; recorded in {}): serving \
                 it as FAILED, every flush is answered EIO. Check the data, then run \
                 `vhost-device-pmem health --file {} --clear` and restart",
                state.backing().display(),
                r.error,
                r.context,
                r.at,
                f.path.display(),
                state.backing().display()
            );
            flusher.restore_failure(r.clone());
            for (i, loc) in locations.iter().enumerate() {
                st.written[i] = loc.complete::<SyncFailure>(Kind::Health)?;
            }
            st.record = Some(f.data);
        }
        info!(
            "health record of {}: {}{}",
            state.backing().display(),
            locations[0].path(Kind::Health).display(),
            match locations.get(1) {
                Some(c) => format!(", copy {}", c.path(Kind::Health).display()),
                None => " (no second copy: --health-copy-dir)".into(),
            }
        );
        let shared = Arc::new(Shared {
            file: state.backing().to_path_buf(),
            locations,
            state: Mutex::new(st),
            writing: Mutex::new(()),
            wake: eventfd("eventfd")?,
            stop: eventfd("eventfd")?,
            mounts: File::open("/proc/self/mountinfo")
                .inspect_err(|e| {
                    warn!("cannot watch the mount table ({e}): health record retries wait their back-off")
                })
                .ok(),
        });
        // A restored record missing from a location (the file was moved, an earlier
        // write failed, the copy is new) is written there now.
        if shared.pending() && !shared.attempt() {
            shared.wake();
        }
        let hook = {
            let shared = shared.clone();
            move |f: &SyncFailure| {
                shared.record(f);
                events.publish(EventKind::SyncFailed {
                    errno: f.errno,
                    error: f.error.clone(),
                    context: f.context.to_string(),
                });
            }
        };
        flusher.set_failure_hook(Box::new(hook));
        let thread = {
            let shared = shared.clone();
            services
                .spawn_owned("health-record", |_| {}, move || shared.run())
                .map_err(|source| Error::Io {
                    what: "start the health record's writer",
                    source,
                })?
        };
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The record's state for `status`; `None` while no sync failed.
    pub fn report(&self) -> Option<HealthRecordStatus> {
        let st = lock(&self.shared.state);
        st.record.as_ref()?;
        Some(HealthRecordStatus {
            persisted: st.written.iter().all(|w| *w),
            locations: self
                .shared
                .locations
                .iter()
                .enumerate()
                .map(|(i, l)| RecordLocation {
                    path: l.path(Kind::Health).display().to_string(),
                    written: st.written[i],
                    error: st.errors[i].clone(),
                })
                .collect(),
            pending_since: st.pending_since.clone(),
            attempts: st.attempts,
        })
    }

    /// At exit: stops the retries, tries once more, and says whether the record is
    /// everywhere. [`Error::HealthUnrecorded`] (exit status [`EXIT_UNRECORDED`])
    /// when it is not, with the record in the log so it can be put in place.
    pub fn finish(&self) -> Result<(), Error> {
        self.stop_thread();
        if !self.shared.pending() || self.shared.attempt() {
            return Ok(());
        }
        let st = lock(&self.shared.state);
        let missing: Vec<String> = self
            .shared
            .locations
            .iter()
            .enumerate()
            .filter(|(i, _)| !st.written[*i])
            .map(|(i, l)| {
                format!(
                    "{} ({})",
                    l.path(Kind::Health).display(),
                    st.errors[i].as_deref().unwrap_or("not written")
                )
            })
            .collect();
        let json = st
            .record
            .as_ref()
            .and_then(|r| serde_json::to_string(r).ok())
            .unwrap_or_default();
        Err(Error::HealthUnrecorded {
            file: self.shared.file.clone(),
            missing: missing.join(", "),
            attempts: st.attempts,
            record: json,
        })
    }

    fn stop_thread(&self) {
        if let Some(t) = lock(&self.thread).take() {
            let _ = rustix::io::write(&self.shared.stop, &1u64.to_ne_bytes());
            let _ = t.join();
        }
    }
}

impl Drop for HealthRecorder {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

impl Shared {
    fn pending(&self) -> bool {
        let st = lock(&self.state);
        st.record.is_some() && st.written.iter().any(|w| !w)
    }

    fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// A failure was latched: record it everywhere now (before the flush that saw
    /// it is answered); what fails is left to the retry thread.
    fn record(&self, f: &SyncFailure) {
        {
            let mut st = lock(&self.state);
            st.record = Some(f.clone());
            st.written.fill(false);
        }
        if !self.attempt() {
            self.wake();
        }
    }

    /// Writes the record to every location still missing it; true when none is.
    fn attempt(&self) -> bool {
        let _writing = lock(&self.writing);
        let (record, todo, attempt) = {
            let mut st = lock(&self.state);
            let Some(record) = st.record.clone() else {
                return true;
            };
            let todo: Vec<usize> = (0..self.locations.len())
                .filter(|i| !st.written[*i])
                .collect();
            if todo.is_empty() {
                return true;
            }
            st.attempts += 1;
            (record, todo, st.attempts)
        };
        let mut results = Vec::new();
        for i in todo {
            results.push((i, self.locations[i].save(Kind::Health, &record)));
        }
        let mut st = lock(&self.state);
        for (i, r) in results {
            let path = self.locations[i].path(Kind::Health);
            match r {
                Ok(()) => {
                    if st.errors[i].take().is_some() {
                        info!(
                            "the sync failure of {} is recorded in {} (attempt {attempt})",
                            self.file.display(),
                            path.display()
                        );
                    }
                    st.written[i] = true;
                }
                Err(e) => {
                    let first = st.errors[i].is_none();
                    st.errors[i] = Some(e.to_string());
                    if first {
                        error!(
                            "cannot record the sync failure in {}: {e}; retrying (back-off {FIRST_RETRY:?} \
                             to {MAX_RETRY:?}, and at once when a filesystem is remounted). Until it \
                             lands a daemon started next would not know about it, and this one exits \
                             {EXIT_UNRECORDED} if it ends first",
                            path.display()
                        );
                    } else {
                        warn!(
                            "still cannot record the sync failure in {} (attempt {attempt}): {e}",
                            path.display()
                        );
                    }
                }
            }
        }
        let done = st.written.iter().all(|w| *w);
        if done {
            st.pending_since = None;
        } else if st.pending_since.is_none() {
            st.pending_since = Some(rfc3339_now());
        }
        done
    }

    /// The retry thread: asleep until a write is pending; then a retry after each
    /// back-off (doubling from [`FIRST_RETRY`] to [`MAX_RETRY`]) and at once when
    /// the mount table changes, until everything is written or the recorder stops.
    fn run(&self) {
        let mut backoff = FIRST_RETRY;
        loop {
            let pending = self.pending();
            let timeout = rustix::event::Timespec {
                tv_sec: backoff.as_secs() as _,
                tv_nsec: backoff.subsec_nanos() as _,
            };
            let mut fds = vec![
                PollFd::new(&self.stop, PollFlags::IN),
                PollFd::new(&self.wake, PollFlags::IN),
            ];
            if let (true, Some(m)) = (pending, &self.mounts) {
                fds.push(PollFd::new(m, PollFlags::PRI));
            }
            match rustix::event::poll(&mut fds, pending.then_some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // Never a busy loop: wait the back-off instead.
                    warn!("health record: poll failed: {e}");
                    std::thread::sleep(backoff);
                }
            }
            if !fds[0].revents().is_empty() {
                return;
            }
            if !fds[1].revents().is_empty() {
                // A new pending write (its first attempt just failed): back-off anew.
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&self.wake, &mut buf);
                backoff = FIRST_RETRY;
                continue;
            }
            let remounted = fds.get(2).is_some_and(|f| !f.revents().is_empty());
            if !pending {
                continue;
            }
            if remounted {
                info!("the mount table changed: retrying the health record now");
            }
            if self.attempt() {
                backoff = FIRST_RETRY;
            } else if !remounted {
                backoff = (backoff * 2).min(MAX_RETRY);
            }
        }
    }
}

/// `vhost-device-pmem health`: shows the record of `file` (exit status 0: none, 1:
/// one), or with `clear` removes it from every location (0). A record that cannot
/// be read is an error (2) that changes nothing, unless `force`: then it is renamed
/// aside and the command says so.
pub fn command(
    file: &Path,
    state_dir: Option<&Path>,
    options: &RecordOptions,
    clear: bool,
    force: bool,
    json: bool,
) -> u8 {
    // With `json`, one document on stdout (the protocol version `v`, the verdict,
    // the failure, what was cleared) instead of the text; the same exit status.
    let mut doc = serde_json::json!({
        "v": crate::jsonl::PROTOCOL_VERSION,
        "file": file.display().to_string(),
        "healthy": false,
        "failure": null,
        "cleared": false,
    });
    let mut text: Vec<u8> = Vec::new();
    let out = &mut text;
    let result = (|| -> Result<u8, RecordError> {
        let state = StateFiles::new(file, state_dir, None)?;
        let locations = options.locations(&state)?;
        let mut found = Vec::new();
        let mut unreadable = Vec::new();
        for loc in &locations {
            match loc.find::<SyncFailure>(Kind::Health, false) {
                Ok(Some(f)) => found.push(f),
                Ok(None) => {}
                Err(e) if e.unreadable() => unreadable.push(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(f) = found.first() {
            doc["failure"] = serde_json::to_value(&f.data).unwrap_or_default();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&f.data).unwrap_or_default()
            );
        }
        let where_ = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let may_set_aside = clear && force;
        if !unreadable.is_empty() && !may_set_aside {
            for e in &unreadable {
                eprintln!("{}: {e}", file.display());
            }
            eprintln!(
                "{}: {} record(s) cannot be read; `--clear --force` renames them aside (and \
                 removes a readable one); nothing was changed",
                file.display(),
                unreadable.len()
            );
            return Ok(2);
        }
        if !clear {
            let Some(f) = found.first() else {
                let _ = writeln!(
                    out,
                    "{}: healthy (no sync failure recorded in {})",
                    file.display(),
                    where_(
                        &locations
                            .iter()
                            .map(|l| l.path(Kind::Health))
                            .collect::<Vec<_>>()
                    )
                );
                doc["healthy"] = true.into();
                return Ok(0);
            };
            eprintln!(
                "{}: a sync failed during {} ({}), recorded in {}; check the data, then run with \
                 --clear",
                file.display(),
                f.data.context,
                f.data.error,
                where_(&found.iter().map(|f| f.path.clone()).collect::<Vec<_>>())
            );
            return Ok(1);
        }
        let mut removed = Vec::new();
        for loc in &locations {
            let done = loc.clear::<SyncFailure>(Kind::Health, force)?;
            for (from, to, why) in done.set_aside {
                let _ = writeln!(
                    out,
                    "{}: could not be read ({why}); renamed to {}",
                    from.display(),
                    to.display()
                );
            }
            removed.extend(done.removed);
        }
        if !removed.is_empty() {
            let _ = writeln!(out, "removed {}", where_(&removed));
        }
        let _ = writeln!(
            out,
            "{}: no health record left; the next daemon serves it as healthy",
            file.display()
        );
        doc["healthy"] = true.into();
        doc["cleared"] = (!removed.is_empty()).into();
        Ok(0)
    })();
    let code = result.unwrap_or_else(|e| {
        eprintln!("{}: {e}", file.display());
        doc["error"] = e.to_string().into();
        2
    });
    let mut stdout = std::io::stdout().lock();
    if json {
        let _ = writeln!(stdout, "{doc}");
    } else {
        let _ = stdout.write_all(&text);
    }
    code
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
