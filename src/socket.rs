// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix socket paths the daemon listens on (vhost-user and control).
//!
//! Owns: binding with safe permissions, telling a stale socket file from one in use,
//! and removing our own socket on exit. Never removes anything that is not a socket,
//! nor a socket something still listens on, nor one the service manager passed in
//! (that one it never chmods either: its unit owns path, owner and mode).

use std::{
    ffi::CString,
    fs, io,
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {0} is in use: another process is listening on it")]
    InUse(PathBuf),
    #[error("socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot bind socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("no such group {0:?}")]
    NoGroup(String),
    #[error("cannot set owner group or mode of {path}: {source}")]
    Permissions { path: PathBuf, source: io::Error },
}

/// A listening socket: one this daemon bound (its path is removed when dropped) or
/// one it inherited from the service manager (left alone).
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Passed in by the service manager: never unlinked, never chmod'ed.
    pub inherited: bool,
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
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if !self.inherited {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with mode 0600 (0660 with `group`, which then owns it). A leftover
/// socket file nobody listens on is replaced; a live one is an error.
pub fn bind(path: &Path, group: Option<&str>) -> Result<BoundSocket, SocketError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket file {}", path.display());
                let _ = fs::remove_file(path);
            }
            Err(e) => {
                return Err(SocketError::Bind {
                    path: path.to_owned(),
                    source: e,
                })
            }
        }
    }
    // Bind under a umask that leaves no window in which others could connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(|source| SocketError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let sock = BoundSocket {
        listener,
        path: path.to_owned(),
        inherited: false,
    };
    if let Some(group) = group {
        let gid = group_id(group)?;
        let perm = |source| SocketError::Permissions {
            path: path.to_owned(),
            source,
        };
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(perm)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(perm)?;
    }
    Ok(sock)
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
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn binds_0600_and_removes_its_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let s = bind(&p, None).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn a_live_socket_is_in_use_and_a_stale_one_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let live = bind(&p, None).unwrap();
        assert!(matches!(bind(&p, None), Err(SocketError::InUse(_))));
        // A stale file: bound by a listener that is gone, path left behind.
        std::mem::forget(live.listener.try_clone().unwrap());
        let stale = UnixListener::bind(d.path().join("t")).unwrap();
        drop(stale);
        let again = bind(&d.path().join("t"), None).unwrap();
        drop(again);
        drop(live);
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
    fn regular_files_are_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"keep").unwrap();
        assert!(matches!(bind(&p, None), Err(SocketError::NotASocket(_))));
        assert_eq!(fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn group_owns_the_socket_with_0660() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let _s = bind(&p, Some("0")).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o660);
        assert!(matches!(
            bind(&d.path().join("x"), Some("no-such-group-vdp")),
            Err(SocketError::NoGroup(_))
        ));
    }
}
