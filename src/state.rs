// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state directory: what the daemon keeps about one backing file across restarts
//! (its bad ranges, its health record), how those files are named, which file they
//! belong to, how they are read without trusting anything else in the directory,
//! and how they are replaced.
//!
//! Owns: naming by canonical path and by the file's identity (a moved or hard-linked
//! file still finds its records), the identity checked at load (a record of another
//! file is set aside, never applied; a record without one is refused unless
//! adopted), the checks before a record is read (a regular file owned by the
//! daemon's uid, no link, within its kind's size, opened `O_NOFOLLOW | O_NONBLOCK`),
//! the trust check of the directory, and exclusive, atomic, fsynced writes. The
//! health record's retries and second copy are [`health`]'s. Never reads or writes
//! the backing file's data.

pub mod health;

use std::{
    ffi::c_long,
    fs::{self, File},
    io::{self, Read, Write},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use rustix::fs::{FileType, Mode, OFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::trust::{self, Purpose, TrustError};

/// Who a record belongs to. Device and inode numbers alone are no identity (device
/// numbers change across reboots, inode numbers are reused), so the filesystem's id
/// and the inode's generation and birth time come with them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// The filesystem id (`f_fsid`; derived from the filesystem UUID on ext4, XFS
    /// and btrfs), hex.
    pub fsid: String,
    pub inode: u64,
    /// The inode's generation (FS_IOC_GETVERSION), where the filesystem has one.
    pub generation: Option<u64>,
    /// Birth time in nanoseconds since the epoch, where the filesystem records one.
    pub birth_ns: Option<i128>,
    /// Size when the record was written. A file that grew is the same file (prepare
    /// extends files); one that shrank is not treated as the same.
    pub size: u64,
}

impl FileIdentity {
    /// The identity of an open file, its generation included.
    pub fn of(file: &File) -> io::Result<Self> {
        Self::from_fd(file.as_fd(), inode_generation(file))
    }

    /// The identity of the file at `path`, through an `O_PATH` descriptor: no open
    /// for reading, so no lease is broken (`health` runs beside a daemon), and no
    /// generation (it needs an ioctl). [`Self::matches`] accepts a missing one.
    pub fn of_path(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
        Self::from_fd(fd.as_fd(), None)
    }

    fn from_fd(fd: BorrowedFd<'_>, generation: Option<u64>) -> io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        let fsid = rustix::fs::fstatvfs(fd)?.f_fsid;
        let birth_ns = rustix::fs::statx(
            fd,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::BTIME,
        )
        .ok()
        .filter(|s| s.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .map(|s| i128::from(s.stx_btime.tv_sec) * 1_000_000_000 + i128::from(s.stx_btime.tv_nsec));
        Ok(Self {
            fsid: format!("{fsid:016x}"),
            inode: st.st_ino,
            generation,
            birth_ns,
            size: u64::try_from(st.st_size).unwrap_or(0),
        })
    }

    /// Whether a record written for `recorded` applies to the file with this identity.
    pub fn matches(&self, recorded: &FileIdentity) -> bool {
        self.fsid == recorded.fsid
            && self.inode == recorded.inode
            && (self.generation.is_none()
                || recorded.generation.is_none()
                || self.generation == recorded.generation)
            && (self.birth_ns.is_none()
                || recorded.birth_ns.is_none()
                || self.birth_ns == recorded.birth_ns)
            && self.size >= recorded.size
    }

    /// The stem of the record names that find a file by identity, whatever its path:
    /// `@FSID-INODE`. `@` is a byte [`escape_path`] never writes, so it cannot be a
    /// path's name.
    fn stem(&self) -> String {
        format!("@{}-{}", self.fsid, self.inode)
    }
}

/// FS_IOC_GETVERSION: the inode generation (ext4, XFS, btrfs); `None` where the
/// filesystem has none (tmpfs answers ENOTTY).
fn inode_generation(file: &File) -> Option<u64> {
    // The opcode is declared with a `long` (that size is part of the number), but
    // ext4, XFS and btrfs write a 32-bit `int`: read exactly that, or the upper half
    // would be whatever was in the buffer and no record would ever match again.
    const FS_IOC_GETVERSION: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<c_long>(b'v', 1);
    // SAFETY: FS_IOC_GETVERSION writes one 32-bit generation into the getter's buffer.
    let v = unsafe {
        rustix::ioctl::ioctl(
            file.as_fd(),
            rustix::ioctl::Getter::<FS_IOC_GETVERSION, u32>::new(),
        )
    };
    v.ok().map(u64::from)
}

/// One record as stored: whose it is, then its own fields.
#[derive(Serialize, Deserialize)]
struct Stored<T> {
    /// The backing file's canonical path when the record was written (for people).
    file: String,
    /// Absent in records written by 0.1: such a record is refused unless adopted.
    #[serde(default)]
    identity: Option<FileIdentity>,
    #[serde(flatten)]
    data: T,
}

/// The kinds of record kept per backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The persistent set of bad ranges.
    BadRanges,
    /// A latched sync failure (see `durability`).
    Health,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Self::BadRanges => "badblocks.json",
            Self::Health => "health.json",
        }
    }

    /// The largest record of this kind that is read: a health record is a few
    /// hundred bytes; 64 MiB of bad ranges are about a million of them.
    pub fn max_size(self) -> u64 {
        match self {
            Self::BadRanges => 64 << 20,
            Self::Health => 64 << 10,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::BadRanges => "bad-range record",
            Self::Health => "health record",
        }
    }

    /// What an operator does about a record that cannot be read.
    fn remedy(self) -> &'static str {
        match self {
            Self::Health => {
                "it cannot say whether a sync failed, so no daemon starts on the file: check the \
                 data as after a failed sync, then run `vhost-device-pmem health --file FILE \
                 [--state-dir DIR] --clear --force` (it renames the record aside)"
            }
            Self::BadRanges => {
                "no daemon starts on the file rather than forget its bad ranges: move the record \
                 aside (or remove it) once the media was checked"
            }
        }
    }
}

/// Why a record was not read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{kind} {path} is corrupt ({reason}); {remedy}", kind = kind.describe(), remedy = kind.remedy())]
    Corrupt {
        kind: Kind,
        path: PathBuf,
        reason: String,
    },
    #[error("{kind} {path} is not trusted: {reason}; {remedy}", kind = kind.describe(), remedy = kind.remedy())]
    Untrusted {
        kind: Kind,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{kind} {path} carries no file identity (written by version 0.1, or put there by hand), \
         so it cannot be told from a record of another file: not trusted. If it is this file's, \
         start once with --adopt-legacy-records (it is rewritten with the identity)",
        kind = kind.describe()
    )]
    Legacy { kind: Kind, path: PathBuf },
    #[error(transparent)]
    Directory(#[from] TrustError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl RecordError {
    /// A record that is there but cannot be used (corrupt, untrusted, legacy): what
    /// `health --clear --force` sets aside.
    pub fn unreadable(&self) -> bool {
        matches!(
            self,
            Self::Corrupt { .. } | Self::Untrusted { .. } | Self::Legacy { .. }
        )
    }
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> Self {
        let kind = match &e {
            RecordError::Io { source, .. } => source.kind(),
            RecordError::Directory(_) => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// A record found for this file, and under which name.
#[derive(Debug)]
pub struct Found<T> {
    pub path: PathBuf,
    pub data: T,
}

/// What one name holds.
enum Slot<T> {
    Missing,
    /// A record of this file.
    Applies(Stored<T>),
    /// A record of another file (identity mismatch, or a 0.1 base-name record
    /// naming another path).
    OtherFile(Stored<T>),
}

/// What `clear` did.
#[derive(Debug, Default)]
pub struct Cleared {
    /// Records of this file that were removed.
    pub removed: Vec<PathBuf>,
    /// Records that could not be read (with why), renamed aside: (record, new name,
    /// reason).
    pub set_aside: Vec<(PathBuf, PathBuf, String)>,
}

/// The state files of one backing file in one directory.
#[derive(Clone, Debug)]
pub struct StateFiles {
    dir: PathBuf,
    stem: String,
    backing: PathBuf,
    identity: FileIdentity,
    /// In a state directory, 0.1 named records after the file's base name only.
    legacy_stem: Option<String>,
    /// Trust records without an identity (`--adopt-legacy-records`).
    adopt_legacy: bool,
    /// The uid a record must belong to (the daemon's).
    uid: u32,
}

impl StateFiles {
    /// Names the state files of `backing` (canonicalised here): next to it as
    /// `<name>.<kind>`, or in `state_dir` under its whole canonical path escaped
    /// (`/vm-a/disk.img` → `vm\x2da-disk.img.<kind>`), so two images with the same
    /// name in different directories never share a record; and in the same
    /// directory under its identity (`@FSID-INODE.<kind>`), so a moved or linked
    /// file finds them. `file` is the open backing file, whose identity every
    /// record carries; without it the identity is read through an `O_PATH`
    /// descriptor. The directory must pass [`trust::check_directory`].
    pub fn new(
        backing: &Path,
        state_dir: Option<&Path>,
        file: Option<&File>,
    ) -> Result<Self, RecordError> {
        let canonical = fs::canonicalize(backing).map_err(|source| RecordError::Io {
            path: backing.to_path_buf(),
            source,
        })?;
        let (dir, stem) = match state_dir {
            Some(d) => (absolute(d), escape_path(&canonical)),
            None => (
                canonical
                    .parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
                canonical
                    .file_name()
                    .map_or_else(|| "backing".into(), |n| n.to_string_lossy().into_owned()),
            ),
        };
        trust::check_directory(&dir, Purpose::StateDir)?;
        let identity = match file {
            Some(f) => FileIdentity::of(f),
            None => FileIdentity::of_path(&canonical),
        }
        .map_err(|source| RecordError::Io {
            path: canonical.clone(),
            source,
        })?;
        let legacy_stem = state_dir.and_then(|_| {
            canonical
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        });
        Ok(Self {
            dir,
            stem,
            backing: canonical,
            identity,
            legacy_stem,
            adopt_legacy: false,
            uid: rustix::process::geteuid().as_raw(),
        })
    }

    /// The same file's records in another directory (the health record's second
    /// copy), named as in a state directory; no 0.1 names there.
    pub fn in_dir(&self, dir: &Path, purpose: Purpose) -> Result<Self, RecordError> {
        let dir = absolute(dir);
        trust::check_directory(&dir, purpose)?;
        Ok(Self {
            stem: escape_path(&self.backing),
            dir,
            legacy_stem: None,
            ..self.clone()
        })
    }

    /// Trust records without a file identity (written by 0.1): `--adopt-legacy-records`.
    pub fn adopting_legacy(mut self, yes: bool) -> Self {
        self.adopt_legacy = yes;
        self
    }

    /// The directory the records are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The backing file's canonical path.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The record's name after the file's path.
    pub fn path(&self, kind: Kind) -> PathBuf {
        self.dir.join(format!("{}.{}", self.stem, kind.suffix()))
    }

    /// The record's name after the file's identity.
    pub fn identity_path(&self, kind: Kind) -> PathBuf {
        self.dir
            .join(format!("{}.{}", self.identity.stem(), kind.suffix()))
    }

    fn legacy_path(&self, kind: Kind) -> Option<PathBuf> {
        self.legacy_stem
            .as_ref()
            .map(|s| self.dir.join(format!("{s}.{}", kind.suffix())))
    }

    /// Every name a record of this file may have here: path, identity, 0.1 name.
    fn names(&self, kind: Kind) -> Vec<PathBuf> {
        let mut v = vec![self.path(kind), self.identity_path(kind)];
        v.extend(self.legacy_path(kind));
        v
    }

    /// Loads a record: by the file's path, then by its identity, then under the
    /// name 0.1 used. A missing one is `None`; a corrupt, untrusted or identity-less
    /// one (unless adopted) is an error (nothing recorded may be forgotten
    /// silently); a record of another file under the path's name (identity
    /// mismatch) is renamed aside with a warning and is `None`.
    pub fn load<T: DeserializeOwned>(&self, kind: Kind) -> Result<Option<T>, RecordError> {
        Ok(self.find(kind, true)?.map(|f| f.data))
    }

    /// As [`Self::load`], with the name it was found under; `set_aside` false leaves
    /// another file's record where it is (for `health`, which changes nothing).
    pub fn find<T: DeserializeOwned>(
        &self,
        kind: Kind,
        set_aside: bool,
    ) -> Result<Option<Found<T>>, RecordError> {
        for path in self.names(kind) {
            match self.read_slot::<T>(&path, kind)? {
                Slot::Missing => {}
                Slot::Applies(stored) => {
                    if stored.identity.is_none() {
                        info!(
                            "adopting {} (no file identity; --adopt-legacy-records): it is \
                             rewritten with this file's identity at the next save",
                            path.display()
                        );
                    }
                    return Ok(Some(Found {
                        path,
                        data: stored.data,
                    }));
                }
                Slot::OtherFile(stored) => {
                    let legacy = Some(&path) == self.legacy_path(kind).as_ref();
                    if legacy {
                        warn!(
                            "{} (written by an older version, named after the base name only) \
                             belongs to {}, not {}: not applied",
                            path.display(),
                            stored.file,
                            self.backing.display()
                        );
                    } else if set_aside {
                        let aside = self.set_aside(&path, "stale")?;
                        warn!(
                            "{} was written for another file ({}: recorded {:?}, now {:?}); set \
                             aside as {} and not applied",
                            path.display(),
                            stored.file,
                            stored.identity,
                            self.identity,
                            aside.display()
                        );
                    } else {
                        warn!(
                            "{} was written for another file ({}): not applied",
                            path.display(),
                            stored.file
                        );
                    }
                }
            }
        }
        Ok(None)
    }

    /// Whether both the path's and the identity's name hold a record of this file.
    pub fn complete<T: DeserializeOwned>(&self, kind: Kind) -> Result<bool, RecordError> {
        for path in [self.path(kind), self.identity_path(kind)] {
            match self.read_slot::<T>(&path, kind)? {
                Slot::Applies(s) if s.identity.is_some() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Reads one name: opened without following a link and without blocking (a
    /// FIFO planted there must not hang start-up), then it must be a regular file
    /// of the daemon's uid, within the kind's size, valid JSON of this kind.
    fn read_slot<T: DeserializeOwned>(
        &self,
        path: &Path,
        kind: Kind,
    ) -> Result<Slot<T>, RecordError> {
        let Some(bytes) = self.read_trusted(path, kind)? else {
            return Ok(Slot::Missing);
        };
        let stored: Stored<T> =
            serde_json::from_slice(&bytes).map_err(|e| RecordError::Corrupt {
                kind,
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let legacy = Some(path) == self.legacy_path(kind).as_deref();
        if legacy {
            // 0.1's base name, shared by every image of that name: only the file it
            // names may use it.
            let same = fs::canonicalize(&stored.file).is_ok_and(|p| p == self.backing);
            if !same {
                return Ok(Slot::OtherFile(stored));
            }
        }
        match &stored.identity {
            None if self.adopt_legacy => Ok(Slot::Applies(stored)),
            None => Err(RecordError::Legacy {
                kind,
                path: path.to_path_buf(),
            }),
            Some(then) if self.identity.matches(then) => Ok(Slot::Applies(stored)),
            Some(_) => Ok(Slot::OtherFile(stored)),
        }
    }

    fn read_trusted(&self, path: &Path, kind: Kind) -> Result<Option<Vec<u8>>, RecordError> {
        let untrusted = |reason: String| RecordError::Untrusted {
            kind,
            path: path.to_path_buf(),
            reason,
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        let fd = match rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP) => {
                return Err(untrusted("it is a symbolic link".into()));
            }
            // A socket cannot be opened.
            Err(rustix::io::Errno::NXIO) => return Err(untrusted("it is a socket".into())),
            Err(e) => {
                return Err(RecordError::Io {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| RecordError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        let ty = FileType::from_raw_mode(st.st_mode);
        if ty != FileType::RegularFile {
            return Err(untrusted(format!(
                "it is {}, not a regular file",
                file_type_name(ty)
            )));
        }
        if st.st_uid != self.uid {
            return Err(untrusted(format!(
                "it belongs to uid {}, not to this daemon's uid {}",
                st.st_uid, self.uid
            )));
        }
        let max = kind.max_size();
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        if size > max {
            return Err(untrusted(format!(
                "it is {size} bytes, more than a {} may be ({max})",
                kind.describe()
            )));
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| RecordError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes.len() as u64 > max {
            return Err(untrusted(format!("it grew past {max} bytes while read")));
        }
        Ok(Some(bytes))
    }

    /// Replaces a record, under the path's name and the identity's: for each, a new
    /// temporary file in the same directory, created exclusively (never through an
    /// existing name or a symbolic link), written and fsynced, renamed over the old
    /// record; then the directory fsynced.
    pub fn save<T: Serialize>(&self, kind: Kind, data: &T) -> io::Result<()> {
        let stored = Stored {
            file: self.backing.display().to_string(),
            identity: Some(self.identity.clone()),
            data,
        };
        let mut text = serde_json::to_string_pretty(&stored)?;
        text.push('\n');
        for path in [self.path(kind), self.identity_path(kind)] {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut tmp = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".tmp")
                .tempfile_in(&self.dir)?;
            tmp.write_all(text.as_bytes())?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Removes this file's records (under every name, and syncs the directory); a
    /// missing one is fine, another file's is left alone. Returns whether there
    /// was one. A record that cannot be read is an error.
    pub fn remove(&self, kind: Kind) -> Result<bool, RecordError> {
        Ok(!self
            .clear::<serde_json::Value>(kind, false)?
            .removed
            .is_empty())
    }

    /// Removes this file's records of `kind`, as [`Self::remove`]; with `force`, a
    /// record that cannot be read (corrupt, untrusted, without identity) is renamed
    /// aside (`NAME.corrupt-SECS`) instead of being an error. Nothing is changed
    /// when an error is returned.
    pub fn clear<T: DeserializeOwned>(
        &self,
        kind: Kind,
        force: bool,
    ) -> Result<Cleared, RecordError> {
        let mut remove = Vec::new();
        let mut aside = Vec::new();
        for path in self.names(kind) {
            match self.read_slot::<T>(&path, kind) {
                Ok(Slot::Missing | Slot::OtherFile(_)) => {}
                Ok(Slot::Applies(_)) => remove.push(path),
                Err(e) if force && e.unreadable() => aside.push((path, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        // Under the names of the file's other paths (before a move, another hard
        // link): every record of this file here goes. Records that cannot be read
        // under those names are another file's business.
        let suffix = format!(".{}", kind.suffix());
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if name.starts_with('.') || !name.ends_with(&suffix) || remove.contains(&path) {
                    continue;
                }
                if aside.iter().any(|(p, _)| p == &path) {
                    continue;
                }
                if let Ok(Slot::Applies(_)) = self.read_slot::<T>(&path, kind) {
                    remove.push(path);
                }
            }
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Io { path, source }
        };
        let mut done = Cleared::default();
        for path in remove {
            fs::remove_file(&path).map_err(io(&path))?;
            done.removed.push(path);
        }
        for (path, why) in aside {
            let to = self.set_aside(&path, "corrupt")?;
            done.set_aside.push((path, to, why));
        }
        if !done.removed.is_empty() || !done.set_aside.is_empty() {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
        }
        Ok(done)
    }

    /// Renames `path` to `PATH.WHY-SECS` (never over an existing name).
    fn set_aside(&self, path: &Path, why: &str) -> Result<PathBuf, RecordError> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut n = 0;
        loop {
            let aside = PathBuf::from(if n == 0 {
                format!("{}.{why}-{secs}", path.display())
            } else {
                format!("{}.{why}-{secs}.{n}", path.display())
            });
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                path,
                rustix::fs::CWD,
                &aside,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => return Ok(aside),
                Err(rustix::io::Errno::EXIST) if n < 100 => n += 1,
                // A filesystem without RENAME_NOREPLACE: the name was free a moment ago
                // in a directory only this daemon (or root) writes.
                Err(rustix::io::Errno::INVAL) if !aside.exists() => {
                    fs::rename(path, &aside).map_err(|source| RecordError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?;
                    return Ok(aside);
                }
                Err(e) => {
                    return Err(RecordError::Io {
                        path: path.to_path_buf(),
                        source: e.into(),
                    })
                }
            }
        }
    }
}

fn file_type_name(ty: FileType) -> &'static str {
    match ty {
        FileType::Fifo => "a FIFO",
        FileType::Directory => "a directory",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        FileType::Symlink => "a symbolic link",
        _ => "not a regular file",
    }
}

/// `path` made absolute against the working directory (as given when that fails).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A path as one file name, the way systemd escapes paths: the leading `/` dropped,
/// `/` → `-`, and `-`, `\`, a leading `.` and any byte outside `[A-Za-z0-9:_.]`
/// as `\xNN`. Reversible, so distinct paths never share a name.
pub fn escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut out = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        n: u32,
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A backing file `name` in `dir` and its state files (next to it, or in `state`).
    fn backing(dir: &Path, name: &str, state: Option<&Path>) -> (PathBuf, StateFiles) {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        let s = StateFiles::new(&p, state, Some(&f)).unwrap();
        (p, s)
    }

    #[test]
    fn distinct_paths_get_distinct_names() {
        let a = escape_path(Path::new("/vm-a/disk.img"));
        let b = escape_path(Path::new("/vm/a-disk.img"));
        assert_eq!(a, "vm\\x2da-disk.img");
        assert_eq!(b, "vm-a\\x2ddisk.img");
        assert_ne!(a, b);
        assert_eq!(
            escape_path(Path::new("/.hidden/x y")),
            "\\x2ehidden-x\\x20y"
        );
        // No path escapes to an identity's name.
        assert!(!escape_path(Path::new("/@a-1")).starts_with('@'));
    }

    #[test]
    fn two_images_with_one_name_in_one_state_dir_do_not_share_records() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut files = Vec::new();
        for vm in ["vm-a", "vm-b"] {
            fs::create_dir(d.path().join(vm)).unwrap();
            files.push(backing(&d.path().join(vm), "disk.img", Some(&state)).1);
        }
        files[0].save(Kind::BadRanges, &Rec { n: 1 }).unwrap();
        assert_eq!(
            files[0].load::<Rec>(Kind::BadRanges).unwrap(),
            Some(Rec { n: 1 })
        );
        assert_eq!(files[1].load::<Rec>(Kind::BadRanges).unwrap(), None);
        assert_ne!(
            files[0].path(Kind::BadRanges),
            files[1].path(Kind::BadRanges)
        );
        // The record under the path's name and under the identity's; no temporary
        // files are left.
        let id = files[0].identity_path(Kind::BadRanges);
        let mut want = vec![
            "vm\\x2da-disk.img.badblocks.json".to_string(),
            id.file_name().unwrap().to_string_lossy().into_owned(),
        ];
        want.sort();
        let prefix = escape_path(d.path());
        let got: Vec<String> = names(&state)
            .into_iter()
            .map(|n| n.replacen(&format!("{prefix}-"), "", 1))
            .collect();
        assert_eq!(got, want);
        assert!(files[0].complete::<Rec>(Kind::BadRanges).unwrap());
        assert!(!files[1].complete::<Rec>(Kind::BadRanges).unwrap());
    }

    #[test]
    fn a_base_name_record_of_0_1_is_refused_unless_adopted_and_then_only_by_its_file() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut imgs = Vec::new();
        for vm in ["vm-a", "vm-b"] {
            fs::create_dir(d.path().join(vm)).unwrap();
            let p = d.path().join(vm).join("disk.img");
            File::create(&p).unwrap();
            imgs.push(p);
        }
        // 0.1: `<state>/disk.img.badblocks.json`, naming vm-a's image, no identity.
        fs::write(
            state.join("disk.img.badblocks.json"),
            format!(r#"{{"file":"{}","n":5}}"#, imgs[0].display()),
        )
        .unwrap();
        let of =
            |p: &Path| StateFiles::new(p, Some(&state), Some(&File::open(p).unwrap())).unwrap();
        let e = of(&imgs[0]).load::<Rec>(Kind::BadRanges).unwrap_err();
        assert!(matches!(e, RecordError::Legacy { .. }), "{e}");
        assert!(e.to_string().contains("--adopt-legacy-records"), "{e}");
        assert_eq!(
            of(&imgs[0])
                .adopting_legacy(true)
                .load::<Rec>(Kind::BadRanges)
                .unwrap(),
            Some(Rec { n: 5 })
        );
        // vm-b's image never takes vm-a's record, adopted or not.
        assert_eq!(of(&imgs[1]).load::<Rec>(Kind::BadRanges).unwrap(), None);
        assert_eq!(
            of(&imgs[1])
                .adopting_legacy(true)
                .load::<Rec>(Kind::BadRanges)
                .unwrap(),
            None
        );
    }

    #[test]
    fn an_identity_less_record_next_to_the_file_is_refused_unless_adopted() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = backing(d.path(), "disk.img", None);
        // As planted (or written by 0.1): the whole file bad, no identity.
        fs::write(
            s.path(Kind::BadRanges),
            format!(r#"{{"file":"{}","n":9}}"#, p.display()),
        )
        .unwrap();
        let e = s.load::<Rec>(Kind::BadRanges).unwrap_err();
        assert!(matches!(e, RecordError::Legacy { .. }), "{e}");
        let adopted = s.clone().adopting_legacy(true);
        assert_eq!(
            adopted.load::<Rec>(Kind::BadRanges).unwrap(),
            Some(Rec { n: 9 })
        );
        // Once rewritten it carries the identity, and is trusted without the flag.
        adopted.save(Kind::BadRanges, &Rec { n: 9 }).unwrap();
        assert_eq!(s.load::<Rec>(Kind::BadRanges).unwrap(), Some(Rec { n: 9 }));
    }

    #[test]
    fn a_record_of_a_replaced_file_is_set_aside_not_applied() {
        let d = tempfile::tempdir().unwrap();
        let (p, old) = backing(d.path(), "disk.img", None);
        old.save(Kind::Health, &Rec { n: 7 }).unwrap();
        // A new file at the same path (another inode, at least another birth).
        let keep = File::create(d.path().join("keep")).unwrap();
        fs::remove_file(&p).unwrap();
        let f = File::create(&p).unwrap();
        drop(keep);
        let new = StateFiles::new(&p, None, Some(&f)).unwrap();
        assert_eq!(new.load::<Rec>(Kind::Health).unwrap(), None);
        assert!(!new.path(Kind::Health).exists());
        let aside: Vec<_> = names(d.path())
            .into_iter()
            .filter(|n| n.starts_with("disk.img.health.json.stale-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        // The same file still matches its own record.
        new.save(Kind::Health, &Rec { n: 8 }).unwrap();
        assert_eq!(new.load::<Rec>(Kind::Health).unwrap(), Some(Rec { n: 8 }));
        assert!(new.remove(Kind::Health).unwrap());
        assert!(!new.remove(Kind::Health).unwrap());
        assert!(!new.path(Kind::Health).exists());
        assert!(!new.identity_path(Kind::Health).exists());
    }

    #[test]
    fn a_moved_or_linked_file_finds_its_record_by_identity() {
        let d = tempfile::tempdir().unwrap();
        for state in [None, Some(d.path().join("state"))] {
            let dir = tempfile::tempdir_in(d.path()).unwrap();
            if let Some(s) = &state {
                let _ = fs::create_dir(s);
            }
            let (p, s) = backing(dir.path(), "f.img", state.as_deref());
            s.save(Kind::Health, &Rec { n: 1 }).unwrap();
            let moved = dir.path().join("g.img");
            fs::rename(&p, &moved).unwrap();
            for by_path in [false, true] {
                // As `serve` sees it (the open file) and as `health` does (O_PATH).
                let f = File::open(&moved).unwrap();
                let g =
                    StateFiles::new(&moved, state.as_deref(), (!by_path).then_some(&f)).unwrap();
                let found = g.find::<Rec>(Kind::Health, false).unwrap().unwrap();
                assert_eq!(found.data, Rec { n: 1 });
                assert_eq!(found.path, g.identity_path(Kind::Health));
                assert!(!g.complete::<Rec>(Kind::Health).unwrap());
            }
            let linked = dir.path().join("h.img");
            fs::hard_link(&moved, &linked).unwrap();
            let h = StateFiles::new(&linked, state.as_deref(), None).unwrap();
            assert_eq!(h.load::<Rec>(Kind::Health).unwrap(), Some(Rec { n: 1 }));
            // A record under the new path's name too (the daemon rewrites it there).
            let g = StateFiles::new(&moved, state.as_deref(), None).unwrap();
            g.save(Kind::Health, &Rec { n: 2 }).unwrap();
            // Clearing through one name clears every record of the file: under its
            // identity, its old path, its other paths.
            assert!(h.remove(Kind::Health).unwrap());
            assert_eq!(g.load::<Rec>(Kind::Health).unwrap(), None);
            assert_eq!(s.load::<Rec>(Kind::Health).unwrap(), None);
            let left: Vec<_> = names(state.as_deref().unwrap_or(dir.path()))
                .into_iter()
                .filter(|n| n.ends_with(".health.json"))
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    #[test]
    fn a_corrupt_record_is_an_error_and_force_sets_it_aside() {
        let d = tempfile::tempdir().unwrap();
        let (_, s) = backing(d.path(), "disk.img", None);
        fs::write(s.path(Kind::Health), "{not json").unwrap();
        let e = s.load::<Rec>(Kind::Health).unwrap_err();
        assert!(matches!(e, RecordError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("--clear --force"), "{e}");
        // Without force nothing changes; with it the record is renamed aside.
        assert!(s.clear::<Rec>(Kind::Health, false).is_err());
        assert_eq!(
            fs::read_to_string(s.path(Kind::Health)).unwrap(),
            "{not json"
        );
        let done = s.clear::<Rec>(Kind::Health, true).unwrap();
        assert!(done.removed.is_empty());
        assert_eq!(done.set_aside.len(), 1, "{done:?}");
        let (from, to, why) = &done.set_aside[0];
        assert_eq!(from, &s.path(Kind::Health));
        assert!(why.contains("corrupt"), "{why}");
        assert_eq!(fs::read_to_string(to).unwrap(), "{not json");
        assert_eq!(s.load::<Rec>(Kind::Health).unwrap(), None);
    }

    #[test]
    fn only_a_regular_file_of_the_daemons_uid_within_the_size_is_read() {
        let d = tempfile::tempdir().unwrap();
        let (_, s) = backing(d.path(), "disk.img", None);
        let rec = s.path(Kind::Health);
        let untrusted = |why: &str| {
            let e = s.load::<Rec>(Kind::Health).unwrap_err();
            assert!(
                matches!(&e, RecordError::Untrusted { reason, .. } if reason.contains(why)),
                "{why}: {e}"
            );
        };
        // A link planted where a record goes is not followed.
        let target = d.path().join("victim");
        fs::write(&target, "precious").unwrap();
        symlink(&target, &rec).unwrap();
        untrusted("symbolic link");
        // ... and a save replaces the link, never writing through it.
        s.save(Kind::Health, &Rec { n: 1 }).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(s.load::<Rec>(Kind::Health).unwrap(), Some(Rec { n: 1 }));
        fs::remove_file(&rec).unwrap();
        fs::remove_file(s.identity_path(Kind::Health)).unwrap();
        // A socket, a directory.
        let l = std::os::unix::net::UnixListener::bind(&rec).unwrap();
        untrusted("socket");
        drop(l);
        fs::remove_file(&rec).unwrap();
        fs::create_dir(&rec).unwrap();
        untrusted("a directory");
        fs::remove_dir(&rec).unwrap();
        // Too large to be a health record.
        fs::write(&rec, vec![b' '; Kind::Health.max_size() as usize + 1]).unwrap();
        untrusted("bytes, more than");
        fs::remove_file(&rec).unwrap();
        // Another uid's (as root: given away).
        if rustix::process::geteuid().is_root() {
            s.save(Kind::Health, &Rec { n: 2 }).unwrap();
            std::os::unix::fs::chown(&rec, Some(4242), None).unwrap();
            assert_eq!(fs::metadata(&rec).unwrap().uid(), 4242);
            untrusted("belongs to uid 4242");
        }
    }

    #[test]
    fn a_state_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let p = d.path().join("disk.img");
        let f = File::create(&p).unwrap();
        let e = StateFiles::new(&p, Some(&shared), Some(&f)).unwrap_err();
        assert!(matches!(e, RecordError::Directory(_)), "{e}");
        assert!(
            e.to_string().contains("writable by group and others"),
            "{e}"
        );
        // The file's own directory is checked the same way.
        let q = shared.join("disk.img");
        let g = File::create(&q).unwrap();
        assert!(StateFiles::new(&q, None, Some(&g)).is_err());
    }
}
