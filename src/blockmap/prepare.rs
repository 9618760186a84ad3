// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `prepare`: makes a backing file block-map immutable — every byte in an allocated,
//! written, unshared extent — by zero-filling only ranges that already read as zeros
//! (holes, unwritten extents) and unsharing shared extents, then one fsync and a
//! fresh verdict.
//!
//! Owns: creating or extending the file and fixing its map, and the free-space check
//! before either. Never shrinks a file below the size it had, and never changes a
//! byte of its content: it writes only zeros, and only where FIEMAP says a read
//! returns zeros while it holds the file's lock and (where the filesystem grants one)
//! a write lease proving no one else has it open. When it fails after extending the
//! file, it truncates the file back to its original size (only the zeros it added
//! go), unless another process may have written past it.

use std::{
    fs::{File, OpenOptions},
    io::{self, IsTerminal},
    os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};
use serde::Serialize;

use crate::{
    backing::{self, REGION_ALIGN},
    blockmap::{self, Filesystem, Problem, ProblemKind, Verdict},
    sys::{self, LeaseKind},
};

/// Unit of work: between two chunks the file is consistent, progress is reported and
/// Ctrl-C or a lease break is noticed (and then everything done is fsynced).
const CHUNK: u64 = 64 << 20;
/// Zeros written per pwrite.
const WRITE_SIZE: usize = 4 << 20;
/// Scan-and-fix passes before giving up (a second pass only finds what the first
/// could not see, e.g. extents split by a concurrent writeback).
const MAX_PASSES: usize = 3;
/// Plain progress lines (no terminal) at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    BadSize(String),
    #[error("{path} does not exist; give --size to create it")]
    SizeMissing { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("{path} is {size} bytes, larger than --size {target}: prepare never shrinks a file")]
    WouldShrink {
        path: PathBuf,
        size: u64,
        target: u64,
    },
    #[error("{path}: prepare has to allocate {need} bytes ({need_mib} MiB, for {what}) but {fs} has {free} bytes ({free_mib} MiB) available; nothing was changed. Free space, or give a smaller --size")]
    NoSpace {
        path: PathBuf,
        need: u64,
        need_mib: u64,
        what: String,
        free: u64,
        free_mib: u64,
        fs: Filesystem,
    },
    #[error("{source}; {path} was truncated back to its original size, {size} bytes (the space prepare had taken is free again)")]
    TruncatedBack {
        path: PathBuf,
        size: u64,
        source: Box<PrepareError>,
    },
    #[error("{source}; {path} is left at {now} bytes (it was {size}): {why}. `truncate -s {size} {path}` restores its original size")]
    LeftExtended {
        path: PathBuf,
        size: u64,
        now: u64,
        why: String,
        source: Box<PrepareError>,
    },
    #[error("{source}; {path}, which prepare had created, was removed")]
    CreatedRemoved {
        path: PathBuf,
        source: Box<PrepareError>,
    },
    #[error("{0} is locked by another process (a vhost-device-pmem serving it, or another prepare); stop it first")]
    Locked(PathBuf),
    #[error("{path} is open in other processes ({openers}); prepare needs it to itself (it proves that with a write lease), close them first")]
    Busy { path: PathBuf, openers: String },
    #[error("{path} is a copy-on-write file on btrfs: every write to it allocates new extents, so its block map can never be immutable. Fix: give the data a No_COW file, which must be set while the file is empty: `touch NEW && chattr +C NEW && cp --reflink=never {path} NEW`, then `vhost-device-pmem prepare NEW`; or keep images on a btrfs mounted with -o nodatacow, or in a directory with `chattr +C` (new files inherit it). chattr +C on a file that already has data does not help")]
    BtrfsCow { path: PathBuf },
    #[error("{path}: {len} bytes at {offset:#x} share their blocks with another file (reflink, dedupe or snapshot), and {fs} cannot unshare in place ({source}). Fix: make an unshared copy, `cp --reflink=never {path} NEW` (on btrfs into an empty file made No_COW first with `chattr +C NEW`), then prepare NEW")]
    Unshare {
        path: PathBuf,
        offset: u64,
        len: u64,
        fs: Filesystem,
        source: io::Error,
    },
    #[error("{path} has extents prepare cannot fix ({count} range(s), first: {first}): compressed, encrypted, inline or tail-packed data cannot be written in place. Fix: copy the data into a new plain file (on btrfs a No_COW one) and prepare that")]
    Unfixable {
        path: PathBuf,
        count: usize,
        first: String,
    },
    #[error("cannot read the block map (FIEMAP) of {path} on {fs}: {source}; without one nothing can be made or proven immutable (tmpfs keeps data in memory only: serve it with --mode fsync or --mode volatile)")]
    NoBlockMap {
        path: PathBuf,
        fs: Filesystem,
        source: io::Error,
    },
    #[error("interrupted after {done} of {total} bytes; the file is consistent (every byte reads as before) and its progress is on disk: run prepare again to finish")]
    Interrupted { done: u64, total: u64 },
    #[error("another process opened {path} while prepare ran ({openers}); stopped after {done} of {total} bytes, the file is consistent: run prepare again once it has closed the file")]
    LeaseBroken {
        path: PathBuf,
        openers: String,
        done: u64,
        total: u64,
    },
    #[error("{path}: data appeared at {offset:#x} in a range that was a hole a moment ago: another process is writing the file; stopped without touching it")]
    ConcurrentWriter { path: PathBuf, offset: u64 },
    #[error("{path} still has {count} problem range(s) after prepare, first: {first}")]
    StillNotImmutable {
        path: PathBuf,
        count: usize,
        first: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Wraps an I/O error with what was being done to which file.
fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
    let path = path.to_owned();
    move |source| PrepareError::Io { what, path, source }
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Nothing (library use, tests).
    Quiet,
}

/// What prepare did.
#[derive(Debug, Serialize)]
pub struct PrepareReport {
    pub file: String,
    pub created: bool,
    pub size_before: u64,
    pub size: u64,
    /// Bytes of holes and unwritten extents now written with zeros.
    pub zeroed: u64,
    /// Bytes of shared extents now unshared.
    pub unshared: u64,
    /// FALLOC_FL_WRITE_ZEROES did the zeroing (else fallocate + written zeros).
    pub write_zeroes: bool,
    /// A write lease proved that no other process had the file open.
    pub lease: bool,
    pub passes: usize,
    pub seconds: f64,
    pub verdict: Verdict,
}

/// Rounds up to the 2 MiB region alignment.
pub fn round_to_region(size: u64) -> u64 {
    size.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// What to do with one problem range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Reads as zeros (hole, unwritten): write zeros.
    Zero,
    /// Shared blocks: unshare.
    Unshare,
    /// Dirty data not yet allocated: write it back.
    Writeback,
    Unfixable,
}

fn action_of(p: &Problem) -> Action {
    match &p.kind {
        ProblemKind::Hole => Action::Zero,
        ProblemKind::Flags(names) => {
            let has = |n: &str| names.contains(&n);
            if names.iter().any(|n| {
                matches!(
                    *n,
                    "encoded" | "encrypted" | "inline" | "tail-packed" | "not-aligned"
                )
            }) {
                Action::Unfixable
            } else if has("delalloc") {
                Action::Writeback
            } else if has("shared") {
                Action::Unshare
            } else if has("unwritten") {
                Action::Zero
            } else {
                // "unknown" without delalloc: data the filesystem cannot place.
                Action::Unfixable
            }
        }
    }
}

/// Prepares `path` (creating it if `size` is given), returning what was done.
pub fn prepare(
    path: &Path,
    size: Option<u64>,
    progress: Progress,
) -> Result<PrepareReport, PrepareError> {
    let started = Instant::now();
    let io_err = |what| io_err(path, what);
    // Ctrl-C, SIGTERM and the lease signal are taken between chunks, never mid-chunk.
    // Blocked before any thread (the progress bar's) starts, so they all inherit it.
    let lease_sig = libc::SIGRTMIN() + 2;
    let sigs = sys::sigset_of(&[libc::SIGINT, libc::SIGTERM, lease_sig, libc::SIGIO]);
    sys::block_signals(&sigs).map_err(io_err("block signals for"))?;

    let existed = path.exists();
    if !existed && size.is_none() {
        return Err(PrepareError::SizeMissing {
            path: path.to_owned(),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| PrepareError::Open {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(io_err("stat"))?;
    if !meta.file_type().is_file() {
        return Err(PrepareError::NotRegular(path.to_owned()));
    }
    backing::lock(&file, false).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => PrepareError::Locked(path.to_owned()),
        _ => PrepareError::Io {
            what: "lock",
            path: path.to_owned(),
            source: e,
        },
    })?;
    if meta.permissions().mode() & 0o022 != 0 {
        warn!("{} is writable by group or others; `serve` will refuse it unless --allow-shared-permissions (chmod go-w it)", path.display());
    }

    // A write lease is granted only while no other open file description exists, and
    // any later open breaks it: while it is held, nobody else can write the file.
    // Another process may hold the file open for a moment only (a child between fork
    // and exec inherits every descriptor until exec closes it, a backup scanner, ...):
    // try for a second before calling it busy.
    let take = || {
        sys::route_lease_signal(&file, lease_sig, sys::gettid())
            .and_then(|()| sys::take_lease(&file, LeaseKind::Write))
    };
    let mut taken = take();
    for _ in 0..20 {
        if !matches!(&taken, Err(e) if e.raw_os_error() == Some(libc::EAGAIN)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        taken = take();
    }
    let lease = match taken {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            let openers = sys::other_openers(&file);
            return Err(PrepareError::Busy {
                path: path.to_owned(),
                openers: if openers.is_empty() {
                    "not found in /proc".into()
                } else {
                    openers.join(", ")
                },
            });
        }
        Err(e) => {
            warn!(
                "no write lease on {} ({e}): checking every range reads as zeros before writing it",
                path.display()
            );
            false
        }
    };
    let result = prepare_locked(
        path,
        &file,
        meta.len(),
        size,
        progress,
        lease,
        !existed,
        &sigs,
        lease_sig,
        started,
    );
    if lease {
        let _ = sys::release_lease(&file);
    }
    // A file this call created and could not prepare at all is not left behind.
    match result {
        Err(e) if !existed && file.metadata().is_ok_and(|m| m.len() == 0) => {
            let _ = std::fs::remove_file(path);
            Err(match e {
                PrepareError::TruncatedBack { source, .. } => PrepareError::CreatedRemoved {
                    path: path.to_owned(),
                    source,
                },
                e => e,
            })
        }
        r => r,
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_locked(
    path: &Path,
    file: &File,
    size_before: u64,
    size: Option<u64>,
    progress: Progress,
    lease: bool,
    created: bool,
    sigs: &libc::sigset_t,
    lease_sig: libc::c_int,
    started: Instant,
) -> Result<PrepareReport, PrepareError> {
    let io_err = |what| io_err(path, what);
    let fs = blockmap::filesystem_of(file).map_err(io_err("statfs"))?;
    if fs == Filesystem::Btrfs {
        let flags = sys::get_flags(file).map_err(io_err("read attributes of"))?;
        if flags & sys::FS_NOCOW_FL == 0 {
            if size_before == 0 {
                sys::set_flag(file, sys::FS_NOCOW_FL, true)
                    .map_err(io_err("set No_COW (chattr +C) on"))?;
                info!(
                    "{}: empty file on btrfs, set No_COW (chattr +C) before writing",
                    path.display()
                );
            } else {
                return Err(PrepareError::BtrfsCow {
                    path: path.to_owned(),
                });
            }
        }
    }

    let requested = size.unwrap_or(size_before);
    let target = round_to_region(requested.max(1));
    if target != requested {
        info!(
            "size {requested} rounded up to {target} ({} MiB): guests need a multiple of 2 MiB",
            target >> 20
        );
    }
    if size_before > target {
        return Err(PrepareError::WouldShrink {
            path: path.to_owned(),
            size: size_before,
            target,
        });
    }

    // Refuse what cannot be fixed, or a filesystem without FIEMAP (tmpfs), before
    // changing anything (an empty file is probed with a one-byte request).
    let extents =
        blockmap::read_extents_with(file, size_before.max(1), true).map_err(|source| {
            PrepareError::NoBlockMap {
                path: path.to_owned(),
                fs,
                source,
            }
        })?;
    let existing = blockmap::find_problems(&extents, size_before);
    check_fixable(path, &existing)?;
    check_space(path, file, fs, &existing, size_before, target)?;

    if target > size_before {
        // The new range is a hole (reads as zeros) and is zero-filled below like any
        // other; delayed allocation then allocates it in large extents, and reserves
        // the space at write time, so a full filesystem fails early.
        file.set_len(target).map_err(io_err("extend"))?;
        info!(
            "{}: extended from {size_before} to {target} bytes",
            path.display()
        );
        let result = fix_map(
            path,
            file,
            fs,
            size_before,
            target,
            progress,
            lease,
            created,
            sigs,
            lease_sig,
            started,
        );
        return result.map_err(|e| undo_extension(path, file, size_before, target, lease, e));
    }
    fix_map(
        path,
        file,
        fs,
        size_before,
        target,
        progress,
        lease,
        created,
        sigs,
        lease_sig,
        started,
    )
}

/// Refuses, before anything changes, a run the filesystem has no room for: the
/// bytes to allocate are the holes of the file as it is (shared extents count
/// too: unsharing copies them) and the whole extension, against what statvfs says
/// is available (`f_bavail`: the blocks ext4 reserves for root are not counted;
/// the filesystem's own metadata, a few blocks per extent, is not either).
fn check_space(
    path: &Path,
    file: &File,
    fs: Filesystem,
    existing: &[Problem],
    size_before: u64,
    target: u64,
) -> Result<(), PrepareError> {
    let (mut holes, mut shared) = (0u64, 0u64);
    for p in existing {
        match (&p.kind, action_of(p)) {
            (ProblemKind::Hole, _) => holes += p.length,
            (_, Action::Unshare) => shared += p.length,
            _ => {}
        }
    }
    let extension = target - size_before;
    let need = holes + shared + extension;
    let vfs = rustix::fs::fstatvfs(file).map_err(|e| PrepareError::Io {
        what: "statvfs",
        path: path.to_owned(),
        source: e.into(),
    })?;
    let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    if need <= free {
        return Ok(());
    }
    let mut parts = Vec::new();
    if extension > 0 {
        parts.push(format!("extending it from {size_before} to {target} bytes"));
    }
    if holes > 0 {
        parts.push(format!("{holes} bytes of holes"));
    }
    if shared > 0 {
        parts.push(format!("unsharing {shared} bytes of shared extents"));
    }
    Err(PrepareError::NoSpace {
        path: path.to_owned(),
        need,
        need_mib: need.div_ceil(1 << 20),
        what: parts.join(", "),
        free,
        free_mib: free >> 20,
        fs,
    })
}

/// After a failure past the extension: truncates the file back to `size_before`
/// (only zeros prepare wrote are beyond it), unless another process may have
/// written there (the lease broke, data appeared in a hole, or without a lease
/// another process has the file open), or the run was only interrupted (running
/// prepare again finishes it). Says which in the error.
fn undo_extension(
    path: &Path,
    file: &File,
    size_before: u64,
    target: u64,
    lease: bool,
    e: PrepareError,
) -> PrepareError {
    let keep = |why: String, source: PrepareError| PrepareError::LeftExtended {
        path: path.to_owned(),
        size: size_before,
        now: target,
        why,
        source: Box::new(source),
    };
    match e {
        PrepareError::Interrupted { .. } => {
            return keep(
                "prepare was interrupted; running it again finishes it".into(),
                e,
            )
        }
        PrepareError::LeaseBroken { .. } | PrepareError::ConcurrentWriter { .. } => {
            return keep(
                "another process has the file open and may have written past the original end"
                    .into(),
                e,
            )
        }
        _ => {}
    }
    if !lease {
        let openers = sys::other_openers(file);
        if !openers.is_empty() {
            return keep(
                format!(
                    "other processes have it open ({}) and may have written past the original end",
                    openers.join(", ")
                ),
                e,
            );
        }
    }
    match file.set_len(size_before).and_then(|()| file.sync_all()) {
        Ok(()) => {
            warn!(
                "{}: prepare failed after extending it; truncated it back to its original {size_before} bytes",
                path.display()
            );
            PrepareError::TruncatedBack {
                path: path.to_owned(),
                size: size_before,
                source: Box::new(e),
            }
        }
        Err(t) => keep(format!("truncating it back failed: {t}"), e),
    }
}

/// Makes the map of the file (now `target` bytes) immutable and proves it.
#[allow(clippy::too_many_arguments)]
fn fix_map(
    path: &Path,
    file: &File,
    fs: Filesystem,
    size_before: u64,
    target: u64,
    progress: Progress,
    lease: bool,
    created: bool,
    sigs: &libc::sigset_t,
    lease_sig: libc::c_int,
    started: Instant,
) -> Result<PrepareReport, PrepareError> {
    let io_err = |what| io_err(path, what);
    let mut w = Worker {
        path,
        file,
        fs,
        careful: !lease,
        write_zeroes: None,
        zeros: vec![0u8; WRITE_SIZE],
        sigs,
        lease_sig,
        done: 0,
        total: 0,
        zeroed: 0,
        unshared: 0,
        bar: None,
        last_log: Instant::now(),
        progress,
    };
    let mut passes = 0;
    loop {
        let extents =
            blockmap::read_extents(file, target).map_err(io_err("read the block map of"))?;
        let problems = blockmap::find_problems(&extents, target);
        check_fixable(path, &problems)?;
        if problems.is_empty() || passes == MAX_PASSES {
            break;
        }
        passes += 1;
        w.total = w.done + problems.iter().map(|p| p.length).sum::<u64>();
        if passes == 1 {
            info!(
                "{}: {} problem range(s), {} bytes to fix on {fs}",
                path.display(),
                problems.len(),
                w.total
            );
            w.start_progress();
        }
        for p in &problems {
            w.fix(p)?;
        }
        // Delayed allocations and unwritten conversions settle before the re-scan.
        w.stage("writing back");
        sys::writeback(file, 0, 0, true).map_err(io_err("write back"))?;
    }
    w.finish_progress();
    file.sync_all().map_err(io_err("fsync"))?;
    let verdict = blockmap::inspect(file).map_err(io_err("inspect"))?;
    if !verdict.immutable() {
        return Err(PrepareError::StillNotImmutable {
            path: path.to_owned(),
            count: verdict.problems.len(),
            first: verdict
                .problems
                .first()
                .map_or("empty file".into(), ToString::to_string),
        });
    }
    Ok(PrepareReport {
        file: path.display().to_string(),
        created,
        size_before,
        size: verdict.size,
        zeroed: w.zeroed,
        unshared: w.unshared,
        write_zeroes: w.write_zeroes == Some(true),
        lease,
        passes,
        seconds: started.elapsed().as_secs_f64(),
        verdict,
    })
}

fn check_fixable(path: &Path, problems: &[Problem]) -> Result<(), PrepareError> {
    let bad: Vec<&Problem> = problems
        .iter()
        .filter(|p| action_of(p) == Action::Unfixable)
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(first) => Err(PrepareError::Unfixable {
            path: path.to_owned(),
            count: bad.len(),
            first: first.to_string(),
        }),
    }
}

struct Worker<'a> {
    path: &'a Path,
    file: &'a File,
    fs: Filesystem,
    /// No lease: verify a range still reads as zeros right before zero-filling it.
    careful: bool,
    /// Whether FALLOC_FL_WRITE_ZEROES works here (None: not tried yet).
    write_zeroes: Option<bool>,
    zeros: Vec<u8>,
    sigs: &'a libc::sigset_t,
    lease_sig: libc::c_int,
    done: u64,
    total: u64,
    zeroed: u64,
    unshared: u64,
    bar: Option<indicatif::ProgressBar>,
    last_log: Instant,
    progress: Progress,
}

impl Worker<'_> {
    fn io_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
        io_err(self.path, what)
    }

    fn fix(&mut self, p: &Problem) -> Result<(), PrepareError> {
        let action = action_of(p);
        let end = p.offset + p.length;
        let mut off = p.offset;
        while off < end {
            // Chunks end on CHUNK boundaries so that runs line up across re-runs.
            let len = ((off / CHUNK + 1) * CHUNK).min(end) - off;
            match action {
                Action::Zero => self.zero(off, len)?,
                Action::Unshare => self.unshare(off, len)?,
                Action::Writeback => {
                    sys::writeback(self.file, off, len, true).map_err(self.io_err("write back"))?
                }
                Action::Unfixable => unreachable!("refused before any work"),
            }
            off += len;
            self.done += len;
            self.report();
            self.between_chunks()?;
        }
        Ok(())
    }

    fn zero(&mut self, off: u64, len: u64) -> Result<(), PrepareError> {
        if self.careful {
            self.verify_zeros(off, len)?;
        }
        if self.write_zeroes != Some(false) {
            match sys::fallocate(self.file, sys::FALLOC_FL_WRITE_ZEROES, off, len) {
                Ok(()) => {
                    self.write_zeroes = Some(true);
                    self.zeroed += len;
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) =>
                {
                    if self.write_zeroes.is_none() {
                        let say = || {
                            info!("FALLOC_FL_WRITE_ZEROES not supported here ({e}); writing zeros")
                        };
                        match &self.bar {
                            Some(bar) => bar.suspend(say),
                            None => say(),
                        }
                    }
                    self.write_zeroes = Some(false);
                }
                Err(e) => return Err(self.io_err("zero (FALLOC_FL_WRITE_ZEROES)")(e)),
            }
        }
        // Plain zeros: holes get delayed allocation (large extents, space reserved
        // at write time); unwritten extents are converted at writeback. No fallocate
        // first: writing into unwritten extents costs a conversion per I/O, which
        // made prepare 35% slower than dd on XFS.
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(WRITE_SIZE as u64) as usize;
            self.file
                .write_all_at(&self.zeros[..n], pos)
                .map_err(self.io_err("write zeros to"))?;
            pos += n as u64;
        }
        // No sync_file_range per chunk: the kernel's flusher writes back on another
        // core while this thread copies, and its dirty throttling bounds memory, as
        // for dd. Measured: per-chunk writeback from this thread cost ~25% on XFS.
        // A stop (Ctrl-C, lease break) fsyncs before exiting, and a crash can only
        // lose zeros that read as zeros anyway.
        self.zeroed += len;
        Ok(())
    }

    /// Without a lease: a range FIEMAP called a hole must still read as zeros.
    fn verify_zeros(&mut self, off: u64, len: u64) -> Result<(), PrepareError> {
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(WRITE_SIZE as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(self.io_err("read"))?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(PrepareError::ConcurrentWriter {
                    path: self.path.to_owned(),
                    offset: pos + i as u64,
                });
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn unshare(&mut self, off: u64, len: u64) -> Result<(), PrepareError> {
        sys::fallocate(
            self.file,
            sys::FALLOC_FL_UNSHARE_RANGE | sys::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => PrepareError::Unshare {
                path: self.path.to_owned(),
                offset: off,
                len,
                fs: self.fs,
                source,
            },
            _ => PrepareError::Io {
                what: "unshare (FALLOC_FL_UNSHARE_RANGE)",
                path: self.path.to_owned(),
                source,
            },
        })?;
        self.unshared += len;
        Ok(())
    }

    /// Takes a pending Ctrl-C/SIGTERM or lease break: makes the progress durable and
    /// stops with an error that says how to resume.
    fn between_chunks(&mut self) -> Result<(), PrepareError> {
        let Some((sig, _)) = sys::wait_signal(self.sigs, Duration::ZERO) else {
            return Ok(());
        };
        self.finish_progress();
        let _ = self.file.sync_all();
        if sig == self.lease_sig || sig == libc::SIGIO {
            let _ = sys::release_lease(self.file);
            std::thread::sleep(Duration::from_millis(100));
            let openers = sys::other_openers(self.file);
            return Err(PrepareError::LeaseBroken {
                path: self.path.to_owned(),
                openers: if openers.is_empty() {
                    "it already closed it".into()
                } else {
                    openers.join(", ")
                },
                done: self.done,
                total: self.total,
            });
        }
        Err(PrepareError::Interrupted {
            done: self.done,
            total: self.total,
        })
    }

    fn start_progress(&mut self) {
        let bar = match self.progress {
            Progress::Auto if io::stderr().is_terminal() => indicatif::ProgressBar::new(self.total),
            _ => return,
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("prepare");
        self.bar = Some(bar);
    }

    fn report(&mut self) {
        if let Some(bar) = &self.bar {
            bar.set_length(self.total);
            bar.set_position(self.done);
        } else if self.progress != Progress::Quiet && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            info!(
                "{}: {} of {} MiB done ({}%)",
                self.path.display(),
                self.done >> 20,
                self.total >> 20,
                self.done * 100 / self.total.max(1)
            );
        }
    }

    /// Names what the work is waiting for once every chunk has been written.
    fn stage(&self, what: &'static str) {
        match &self.bar {
            Some(bar) => bar.set_message(what),
            None if self.progress != Progress::Quiet => {
                info!("{}: {what}", self.path.display())
            }
            None => {}
        }
    }

    fn finish_progress(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn sizes_round_up_to_the_region_alignment() {
        assert_eq!(round_to_region(1), 2 << 20);
        assert_eq!(round_to_region(2 << 20), 2 << 20);
        assert_eq!(round_to_region((2 << 20) + 1), 4 << 20);
    }

    #[test]
    fn problems_map_to_the_right_action() {
        let p = |kind| Problem {
            offset: 0,
            length: 4096,
            kind,
        };
        assert_eq!(action_of(&p(ProblemKind::Hole)), Action::Zero);
        assert_eq!(
            action_of(&p(ProblemKind::Flags(vec!["unwritten"]))),
            Action::Zero
        );
        assert_eq!(
            action_of(&p(ProblemKind::Flags(vec!["shared"]))),
            Action::Unshare
        );
        assert_eq!(
            action_of(&p(ProblemKind::Flags(vec!["unknown", "delalloc"]))),
            Action::Writeback
        );
        assert_eq!(
            action_of(&p(ProblemKind::Flags(vec!["encoded", "shared"]))),
            Action::Unfixable
        );
        assert_eq!(
            action_of(&p(ProblemKind::Flags(vec!["unknown"]))),
            Action::Unfixable
        );
    }

    /// On whatever filesystem holds the temp dir: data survives, holes are filled,
    /// the size is rounded up, and shrinking is refused.
    #[test]
    fn prepare_fills_holes_keeps_data_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        {
            let mut f = File::create(&path).unwrap();
            f.write_all(b"hello").unwrap();
            f.write_all_at(b"world", 3 << 20).unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let r = prepare(&path, Some(5 << 20), Progress::Quiet).unwrap();
        assert_eq!(r.size, 6 << 20);
        assert!(r.verdict.immutable(), "{:?}", r.verdict.problems);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(&after[..before.len()], &before[..]);
        assert!(after[before.len()..].iter().all(|&b| b == 0));
        // Again: nothing to do.
        let r = prepare(&path, None, Progress::Quiet).unwrap();
        assert_eq!((r.zeroed, r.passes), (0, 0));
        let e = prepare(&path, Some(2 << 20), Progress::Quiet).unwrap_err();
        assert!(matches!(e, PrepareError::WouldShrink { .. }), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 6 << 20);
        // A size that rounds to the current one is fine.
        prepare(&path, Some((4 << 20) + 1), Progress::Quiet).unwrap();
        let e = prepare(&dir.path().join("new"), None, Progress::Quiet).unwrap_err();
        assert!(matches!(e, PrepareError::SizeMissing { .. }), "{e}");
    }

    #[test]
    fn a_filesystem_without_fiemap_is_refused_before_any_change() {
        let dir = Path::new("/dev/shm");
        let Ok(probe) = tempfile::tempfile_in(dir) else {
            return;
        };
        if blockmap::filesystem_of(&probe).ok() != Some(Filesystem::Tmpfs) {
            return;
        }
        let path = dir.join(format!("vdp-prepare-test-{}", std::process::id()));
        let e = prepare(&path, Some(4 << 20), Progress::Quiet).unwrap_err();
        assert!(matches!(e, PrepareError::NoBlockMap { .. }), "{e}");
        assert!(e.to_string().contains("tmpfs"), "{e}");
        assert!(!path.exists(), "the file prepare created was left behind");
    }

    #[test]
    fn a_file_open_elsewhere_is_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let other = File::create(&path).unwrap();
        other.set_len(2 << 20).unwrap();
        let e = prepare(&path, None, Progress::Quiet).unwrap_err();
        assert!(matches!(e, PrepareError::Busy { .. }), "{e}");
        assert!(!blockmap::inspect(&other).unwrap().immutable());
    }
}
