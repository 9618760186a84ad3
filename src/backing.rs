// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening the backing file for serving: the checks that refuse a file before any
//! guest sees it, and the lock that keeps a second daemon off it.
//!
//! Owns: the open file descriptor, the OFD lock, and the size and permission rules.
//! Never creates, truncates, resizes or writes the file.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

/// Guests reject pmem regions that are not a multiple of this (memory section
/// alignment of virtio-pmem and NVDIMM regions).
pub const REGION_ALIGN: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("cannot open backing file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("backing file {0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("backing file {path} is {size} bytes; it must be a positive multiple of 2 MiB (2097152 bytes); `vhost-device-pmem prepare {path} --size N` makes one")]
    BadSize { path: PathBuf, size: u64 },
    #[error("backing file {0} is locked by another vhost-device-pmem, or by a VMM that still maps it from an earlier daemon; one daemon per file")]
    Locked(PathBuf),
    #[error("cannot lock backing file {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot open backing file {path}: {source}: it has the immutable attribute, which a daemon serving it with --seal sets and clears at exit; one that crashed or was killed (SIGKILL) left it set. If no daemon serves the file any more, clear it with `chattr -i {path}` and start again")]
    Immutable { path: PathBuf, source: io::Error },
    #[error("{option} {path} names the backing file {file}{how}: writing it would replace or destroy the image; give {option} a path of its own")]
    NamedByOption {
        option: &'static str,
        path: PathBuf,
        file: PathBuf,
        how: &'static str,
    },
    #[error("backing file {path} is writable by group or others (mode {mode:o}): another process could change its block map; chmod go-w it, or pass --allow-shared-permissions")]
    SharedPermissions { path: PathBuf, mode: u32 },
}

/// An opened, locked, size-checked backing file.
#[derive(Debug)]
pub struct BackingFile {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub readonly: bool,
}

impl BackingFile {
    /// Opens `path` for serving. `readonly` opens O_RDONLY and takes a shared lock
    /// (several read-only daemons may share a file; none may share with a writer).
    pub fn open(
        path: &Path,
        readonly: bool,
        allow_shared_permissions: bool,
    ) -> Result<Self, BackingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            // O_NONBLOCK: a lease on the file (ours, left on the open file a VMM
            // still maps after a daemon died) fails the open with EWOULDBLOCK at
            // once instead of blocking it for lease-break-time (45 s by default).
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    BackingError::Locked(path.to_owned())
                } else if source.raw_os_error() == Some(libc::EPERM) && !readonly && immutable(path)
                {
                    BackingError::Immutable {
                        path: path.to_owned(),
                        source,
                    }
                } else {
                    BackingError::Open {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| BackingError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK).map_err(|e| {
            BackingError::Open {
                path: path.to_owned(),
                source: e.into(),
            }
        })?;
        let meta = file.metadata().map_err(|source| BackingError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(BackingError::NotRegular(path.to_owned()));
        }
        let size = meta.size();
        if size == 0 || size % REGION_ALIGN != 0 {
            return Err(BackingError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        let mode = meta.permissions().mode();
        if !readonly && mode & 0o022 != 0 && !allow_shared_permissions {
            return Err(BackingError::SharedPermissions {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        lock(&file, readonly).map_err(|source| {
            if matches!(
                source.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EACCES)
            ) {
                BackingError::Locked(path.to_owned())
            } else {
                BackingError::Lock {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            readonly,
        })
    }
}

/// Whether `path` has the immutable attribute (`chattr +i`), as statx reports it.
fn immutable(path: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )
    .is_ok_and(|st| {
        st.stx_attributes_mask.contains(StatxAttributes::IMMUTABLE)
            && st.stx_attributes.contains(StatxAttributes::IMMUTABLE)
    })
}

/// Refuses path options that name the backing file `file` (opened from `path`):
/// by identity when the option's path exists (the same inode under any name: the
/// path itself, a hard link, a symlink to it), else by canonical path. Each
/// option is a (name as the operator wrote it, path) pair; `None`s are skipped.
/// Run before anything is written, so that a metrics file, a state record or a
/// socket can never replace the image.
pub fn refuse_paths_naming(
    file: &File,
    path: &Path,
    options: &[(&'static str, Option<&Path>)],
) -> Result<(), BackingError> {
    let me = file.metadata().map_err(|source| BackingError::Open {
        path: path.to_owned(),
        source,
    })?;
    let canonical = std::fs::canonicalize(path).ok();
    for (option, p) in options {
        let Some(p) = p else { continue };
        let how = match std::fs::metadata(p) {
            Ok(m) if m.dev() == me.dev() && m.ino() == me.ino() => {
                if std::fs::symlink_metadata(p).is_ok_and(|l| l.file_type().is_symlink()) {
                    " (through a symlink)"
                } else if canonical.is_some() && std::fs::canonicalize(p).ok() == canonical {
                    ""
                } else {
                    " (a hard link to it)"
                }
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // It cannot be looked at: compare the names at least.
            Err(_) => {
                let named = p
                    .parent()
                    .and_then(|d| std::fs::canonicalize(d).ok())
                    .zip(p.file_name())
                    .map(|(d, n)| d.join(n));
                if named.is_none() || named != canonical {
                    continue;
                }
                ""
            }
        };
        return Err(BackingError::NamedByOption {
            option,
            path: p.to_path_buf(),
            file: path.to_owned(),
            how,
        });
    }
    Ok(())
}

/// Takes an open-file-description lock on the whole file: it belongs to this open
/// file (not the process), survives fork/exec hygiene, and is released when the
/// daemon exits, however it exits.
pub(crate) fn lock(file: &File, shared: bool) -> io::Result<()> {
    // SAFETY: zeroed flock is a valid value; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file, however it grows
                  // SAFETY: valid fd, valid flock pointer for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn file_of(size: u64, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        fs::set_permissions(f.path(), fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn sizes_that_are_not_2mib_multiples_are_refused_and_left_alone() {
        for size in [0, 4096, (2 << 20) + 4096] {
            let f = file_of(size, 0o600);
            let e = BackingFile::open(f.path(), false, false).unwrap_err();
            assert!(matches!(e, BackingError::BadSize { .. }), "{size}: {e}");
            assert!(e.to_string().contains("multiple of 2 MiB"));
            assert_eq!(fs::metadata(f.path()).unwrap().len(), size);
        }
    }

    #[test]
    fn a_second_writer_is_refused_naming_the_file() {
        let f = file_of(2 << 20, 0o600);
        let first = BackingFile::open(f.path(), false, false).unwrap();
        let e = BackingFile::open(f.path(), false, false).unwrap_err();
        assert!(matches!(e, BackingError::Locked(_)), "{e}");
        assert!(e.to_string().contains(&f.path().display().to_string()));
        // Readers are refused too while a writer holds it.
        assert!(BackingFile::open(f.path(), true, false).is_err());
        drop(first);
        let r1 = BackingFile::open(f.path(), true, false).unwrap();
        let _r2 = BackingFile::open(f.path(), true, false).unwrap();
        assert!(BackingFile::open(f.path(), false, false).is_err());
        drop(r1);
    }

    #[test]
    fn group_writable_files_need_an_explicit_opt_in() {
        let f = file_of(2 << 20, 0o660);
        let e = BackingFile::open(f.path(), false, false).unwrap_err();
        assert!(matches!(e, BackingError::SharedPermissions { .. }), "{e}");
        BackingFile::open(f.path(), false, true).unwrap();
    }

    #[test]
    fn directories_and_missing_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = BackingFile::open(d.path(), false, false).unwrap_err();
        assert!(e.to_string().contains(&d.path().display().to_string()));
        let e = BackingFile::open(&d.path().join("nope"), false, false).unwrap_err();
        assert!(matches!(e, BackingError::Open { .. }));
    }
}
