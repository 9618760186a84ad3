// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix socket paths the daemon listens on (vhost-user, control, guest agent).
//!
//! Owns: binding with safe permissions without a path race (the socket is bound in
//! a private directory made next to its path, given its owner group and mode there,
//! where nobody else can reach it, and only then renamed into place, never over an
//! existing name), the trust check of the socket directory, telling a stale socket
//! file from one in use, and removing our own socket on exit. Never follows a link,
//! never changes the owner or mode of a name others can reach, never removes
//! anything that is not the socket it bound, nor a socket something still listens
//! on, nor one the service manager passed in (that one it never chmods either: its
//! unit owns path, owner and mode).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, CWD};

use crate::trust::{self, Purpose, TrustError};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {0} is in use: another process is listening on it")]
    InUse(PathBuf),
    #[error("socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket path {0} appeared while the socket was bound (another daemon starting?); refusing to replace it")]
    Appeared(PathBuf),
    #[error("socket path {0} has no file name")]
    NoName(PathBuf),
    #[error("cannot bind socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("no such group {0:?}")]
    NoGroup(String),
    #[error("cannot set owner group or mode of {path}: {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Untrusted(#[from] TrustError),
}

/// How a socket is bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct BindOptions<'a> {
    /// The group that may connect (mode 0660); none: the owner only (0600).
    pub group: Option<&'a str>,
    /// Bind in a directory group or others may write (`--allow-shared-socket-dir`).
    pub allow_shared_dir: bool,
}

/// A listening socket: one this daemon bound (its path is removed when dropped) or
/// one it inherited from the service manager (left alone).
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Passed in by the service manager: never unlinked, never chmod'ed.
    pub inherited: bool,
    /// The directory it was renamed into, and the socket file's (device, inode)
    /// there: only that file is removed at the end.
    placed: Option<(OwnedFd, CString, (u64, u64))>,
}

impl BoundSocket {
    /// Wraps a socket the service manager passed in; its path (for logs and
    /// `status`) is the address it is bound to.
    pub fn inherited(listener: UnixListener) -> Self {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_owned))
            .unwrap_or_default();
        Self {
            listener,
            path,
            inherited: true,
            placed: None,
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some((dir, name, id)) = &self.placed {
            // Only the socket file this daemon put there (whatever replaced it is
            // left alone).
            let same = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| (st.st_dev, st.st_ino) == *id);
            if same {
                let _ = rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty());
            }
        }
    }
}

/// Binds `path` with mode 0600 (0660 with a group, which then owns it). A leftover
/// socket file nobody listens on is replaced; a live one, or any other file, is an
/// error. The directory must pass [`trust::check_directory`] unless
/// `allow_shared_dir`; either way the socket is bound in a private directory, its
/// owner and mode set there, and renamed into place without replacing anything.
pub fn bind(path: &Path, options: BindOptions<'_>) -> Result<BoundSocket, SocketError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| SocketError::NoName(path.clone()))?;
    let name = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name))
        .map_err(|_| SocketError::NoName(path.clone()))?;
    match trust::check_directory(parent, Purpose::Sockets) {
        Ok(()) => {}
        Err(e) if options.allow_shared_dir => log::warn!(
            "{e} -- accepted (--allow-shared-socket-dir); binding {} through a private directory",
            path.display()
        ),
        Err(e) => return Err(e.into()),
    }
    let gid = options.group.map(group_id).transpose()?;
    let bind_err = |source: io::Error| SocketError::Bind {
        path: path.clone(),
        source,
    };
    let dir = rustix::fs::openat(
        CWD,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| bind_err(e.into()))?;
    replace_stale(&dir, &name, &path)?;

    let private = PrivateDir::new(&dir, &name).map_err(bind_err)?;
    // The socket's node is made where only this daemon can reach it; its mode and
    // group are set there, before anyone can see it.
    let listener = UnixListener::bind(private.socket_path()).map_err(bind_err)?;
    let perm = |e: rustix::io::Errno| SocketError::Permissions {
        path: path.clone(),
        source: e.into(),
    };
    if let Some(gid) = gid {
        rustix::fs::chownat(
            &private.fd,
            name.as_c_str(),
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(perm)?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    rustix::fs::chmodat(
        &private.fd,
        name.as_c_str(),
        Mode::from_raw_mode(mode),
        AtFlags::empty(),
    )
    .map_err(perm)?;
    let st = rustix::fs::statat(&private.fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| bind_err(e.into()))?;
    place(&private.fd, &dir, &name, &path)?;
    drop(private);
    Ok(BoundSocket {
        listener,
        path,
        inherited: false,
        placed: Some((dir, name, (st.st_dev, st.st_ino))),
    })
}

/// A stale socket file at `name` (nobody listens) is removed; a live one or any
/// other file is an error.
fn replace_stale(dir: &OwnedFd, name: &CString, path: &Path) -> Result<(), SocketError> {
    let st = match rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => {
            return Err(SocketError::Bind {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    let through_dir = format!(
        "/proc/self/fd/{}/{}",
        dir.as_raw_fd(),
        name.to_string_lossy()
    );
    match UnixStream::connect(&through_dir) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Still the same stale file: remove it (a name that changed meanwhile
            // is not ours to remove).
            let again = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW);
            if again.is_ok_and(|a| (a.st_dev, a.st_ino) == (st.st_dev, st.st_ino)) {
                log::info!("replacing stale socket file {}", path.display());
                let _ = rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty());
            }
            Ok(())
        }
        Err(e) => Err(SocketError::Bind {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Renames the bound socket from the private directory to `name` in `dir`, never
/// over an existing name.
fn place(from: &OwnedFd, dir: &OwnedFd, name: &CString, path: &Path) -> Result<(), SocketError> {
    let r = rustix::fs::renameat_with(
        from,
        name.as_c_str(),
        dir,
        name.as_c_str(),
        RenameFlags::NOREPLACE,
    );
    match r {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(SocketError::Appeared(path.to_owned())),
        // A filesystem without RENAME_NOREPLACE: link(2) never replaces either.
        Err(rustix::io::Errno::INVAL) => {
            match rustix::fs::linkat(
                from,
                name.as_c_str(),
                dir,
                name.as_c_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => {
                    let _ = rustix::fs::unlinkat(from, name.as_c_str(), AtFlags::empty());
                    Ok(())
                }
                Err(rustix::io::Errno::EXIST) => Err(SocketError::Appeared(path.to_owned())),
                Err(e) => Err(SocketError::Bind {
                    path: path.to_owned(),
                    source: e.into(),
                }),
            }
        }
        Err(e) => Err(SocketError::Bind {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// A directory only this process's uid can enter, made next to the socket's path
/// (`.NAME.bind-PID-N`) and removed when dropped (with anything left in it).
struct PrivateDir<'a> {
    parent: &'a OwnedFd,
    dir_name: CString,
    name: CString,
    fd: OwnedFd,
}

impl<'a> PrivateDir<'a> {
    fn new(parent: &'a OwnedFd, name: &CString) -> io::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let mut tries = 0;
        loop {
            let dir_name = CString::new(format!(
                ".{}.bind-{}-{}",
                name.to_string_lossy(),
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            match rustix::fs::mkdirat(parent, dir_name.as_c_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                // Names taken (by someone who can write the directory): a few more.
                Err(rustix::io::Errno::EXIST) if tries < 100 => {
                    tries += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let fd = rustix::fs::openat(
                parent,
                dir_name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .inspect_err(|_| {
                let _ = rustix::fs::unlinkat(parent, dir_name.as_c_str(), AtFlags::REMOVEDIR);
            })?;
            let me = Self {
                parent,
                dir_name,
                name: name.clone(),
                fd,
            };
            // What was opened must be the directory made above: this uid's, mode
            // 0700 (a directory swapped in by someone who can write the parent is
            // theirs, or has their mode).
            let st = rustix::fs::fstat(&me.fd)?;
            if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the private directory for the bind was replaced by someone else",
                ));
            }
            return Ok(me);
        }
    }

    /// The socket's name in this directory, through the descriptor (no path an
    /// other user could change is walked).
    fn socket_path(&self) -> String {
        format!(
            "/proc/self/fd/{}/{}",
            self.fd.as_fd().as_raw_fd(),
            self.name.to_string_lossy()
        )
    }
}

impl Drop for PrivateDir<'_> {
    fn drop(&mut self) {
        // The socket if it is still here (an error after the bind).
        let _ = rustix::fs::unlinkat(&self.fd, self.name.as_c_str(), AtFlags::empty());
        // The directory, if it is still the one made (a name swapped in by someone
        // else is theirs).
        let same = rustix::fs::fstat(&self.fd).ok().zip(
            rustix::fs::statat(
                self.parent,
                self.dir_name.as_c_str(),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .ok(),
        );
        if same.is_some_and(|(a, b)| (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)) {
            let _ = rustix::fs::unlinkat(self.parent, self.dir_name.as_c_str(), AtFlags::REMOVEDIR);
        }
    }
}

pub(crate) fn group_id(name: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = CString::new(name).map_err(|_| SocketError::NoGroup(name.into()))?;
    // SAFETY: getgrnam takes a NUL-terminated string and returns a pointer into
    // static storage or NULL; we read one field immediately, before any other call.
    let gr = unsafe { libc::getgrnam(cname.as_ptr()) };
    if gr.is_null() {
        return Err(SocketError::NoGroup(name.into()));
    }
    // SAFETY: non-null pointer returned by getgrnam, see above.
    Ok(unsafe { (*gr).gr_gid })
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::{MetadataExt, PermissionsExt},
    };

    use super::*;

    fn opts(group: Option<&str>) -> BindOptions<'_> {
        BindOptions {
            group,
            allow_shared_dir: false,
        }
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn binds_0600_leaves_no_private_directory_and_removes_its_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let s = bind(&p, opts(None)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(entries(d.path()), ["s"]);
        // It listens at its path (the rename kept the binding).
        UnixStream::connect(&p).unwrap();
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn a_live_socket_is_in_use_and_a_stale_one_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let live = bind(&p, opts(None)).unwrap();
        assert!(matches!(bind(&p, opts(None)), Err(SocketError::InUse(_))));
        // A stale file: bound by a listener that is gone, path left behind.
        let stale = UnixListener::bind(d.path().join("t")).unwrap();
        drop(stale);
        let again = bind(&d.path().join("t"), opts(None)).unwrap();
        drop(again);
        drop(live);
        assert_eq!(entries(d.path()), Vec::<String>::new());
    }

    #[test]
    fn an_inherited_socket_keeps_its_path_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let l = UnixListener::bind(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
        let s = BoundSocket::inherited(l);
        assert_eq!(s.path, p);
        drop(s);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o666);
    }

    #[test]
    fn regular_files_and_links_are_never_replaced_or_followed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"keep").unwrap();
        let before = fs::metadata(&p).unwrap().mode();
        assert!(matches!(
            bind(&p, opts(None)),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(fs::read(&p).unwrap(), b"keep");
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(matches!(
            bind(&l, opts(Some("0"))),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(fs::metadata(&p).unwrap().mode(), before);
        assert_eq!(entries(d.path()), ["f", "l"]);
    }

    #[test]
    fn group_owns_the_socket_with_0660() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let _s = bind(&p, opts(Some("0"))).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o660);
        assert_eq!(fs::metadata(&p).unwrap().gid(), 0);
        assert!(matches!(
            bind(&d.path().join("x"), opts(Some("no-such-group-vdp"))),
            Err(SocketError::NoGroup(_))
        ));
    }

    #[test]
    fn a_shared_directory_is_refused_unless_allowed_and_sticky_is_fine() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o770)).unwrap();
        let p = shared.join("s");
        let e = bind(&p, opts(None)).err().unwrap();
        assert!(matches!(e, SocketError::Untrusted(_)), "{e}");
        assert!(e.to_string().contains("--allow-shared-socket-dir"), "{e}");
        assert!(!p.exists());
        let s = bind(
            &p,
            BindOptions {
                group: Some("0"),
                allow_shared_dir: true,
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o660);
        drop(s);
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        let _s = bind(&p, opts(None)).unwrap();
        assert_eq!(entries(&shared), ["s"]);
    }

    #[test]
    fn only_the_socket_it_bound_is_removed_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let s = bind(&p, opts(None)).unwrap();
        // Someone moved it away and put a file there.
        fs::rename(&p, d.path().join("moved")).unwrap();
        fs::write(&p, b"theirs").unwrap();
        drop(s);
        assert_eq!(fs::read(&p).unwrap(), b"theirs");
    }

    #[test]
    fn a_long_directory_path_is_fine_the_name_alone_counts() {
        let d = tempfile::tempdir().unwrap();
        let mut dir = d.path().to_path_buf();
        for _ in 0..6 {
            dir.push("a-rather-long-directory-name");
        }
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vhost-user.sock");
        assert!(p.as_os_str().len() > 108);
        let _s = bind(&p, opts(None)).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(
            &fs::symlink_metadata(&p).unwrap().file_type()
        ));
    }
}
