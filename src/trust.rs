// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which directories the daemon trusts with its sockets and records: the rule of
//! sshd's StrictModes, applied to the directory and to every directory above it.
//!
//! Owns: that rule and its errors. A directory is trusted when root or the daemon's
//! own uid owns it and neither its group nor others may write it; above it, a
//! directory others may write is accepted only when it is sticky (like `/tmp`: others
//! may add names there but never rename or remove ours). The directory itself may be
//! sticky only for sockets (a name planted there in advance makes the bind fail; it
//! is never followed), never for records (a planted name could keep a failure record
//! from being written). Every symbolic link on the way must belong to root or the
//! daemon's uid. Never creates, changes or removes anything.

use std::{
    fmt,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

/// What a directory is checked for (its rule and the advice in the error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Where a listening socket is bound (`--socket-path`, `--control-socket`,
    /// `--agent-socket`).
    Sockets,
    /// Where the records of a backing file live (`--state-dir`, or the file's own
    /// directory).
    StateDir,
    /// Where the second copy of a health record lives (`--health-copy-dir`).
    HealthCopy,
}

impl Purpose {
    fn hint(self) -> &'static str {
        match self {
            Self::Sockets => {
                "bind the socket in a directory only root or this daemon's user can write \
                 (e.g. /run/vhost-device-pmem), or accept this one with --allow-shared-socket-dir \
                 (the socket is then still bound in a private directory and renamed into place)"
            }
            Self::StateDir => {
                "give --state-dir a directory only root or this daemon's user can write \
                 (the default is the backing file's own directory)"
            }
            Self::HealthCopy => {
                "give --health-copy-dir a directory only root or this daemon's user can write, \
                 or --no-health-copy"
            }
        }
    }

    /// Whether the directory itself (not an ancestor) may be sticky and writable by
    /// others.
    fn sticky_ok(self) -> bool {
        self == Self::Sockets
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sockets => "socket directory",
            Self::StateDir => "state directory",
            Self::HealthCopy => "health copy directory",
        })
    }
}

/// A directory that is not trusted, and why.
#[derive(Debug, thiserror::Error)]
#[error("{purpose} {dir}: {reason}; {hint}", hint = purpose.hint())]
pub struct TrustError {
    pub purpose: Purpose,
    pub dir: PathBuf,
    pub reason: String,
}

/// Checks that `dir` (absolute or relative to the working directory) may hold what
/// `purpose` puts there; see the module's rule.
pub fn check_directory(dir: &Path, purpose: Purpose) -> Result<(), TrustError> {
    check_directory_for(dir, purpose, rustix::process::geteuid().as_raw())
}

/// [`check_directory`] for a daemon running as `uid`.
pub fn check_directory_for(dir: &Path, purpose: Purpose, uid: u32) -> Result<(), TrustError> {
    let fail = |reason: String| TrustError {
        purpose,
        dir: dir.to_path_buf(),
        reason,
    };
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| fail(format!("cannot resolve the relative path: {e}")))?
            .join(dir)
    };
    let canonical = std::fs::canonicalize(&absolute).map_err(|e| fail(e.to_string()))?;
    // The path as given (its symbolic links, and where they lead at each step), and
    // the path they resolve to.
    for path in [&absolute, &canonical] {
        let prefixes = prefixes(path);
        let last = prefixes.len().saturating_sub(1);
        for (i, prefix) in prefixes.iter().enumerate() {
            let link = std::fs::symlink_metadata(prefix)
                .map_err(|e| fail(format!("{}: {e}", prefix.display())))?;
            if link.file_type().is_symlink() && !trusted_owner(link.uid(), uid) {
                return Err(fail(format!(
                    "{} is a symbolic link of uid {}, neither root nor this daemon's uid {uid}: \
                     its owner could point it elsewhere",
                    prefix.display(),
                    link.uid()
                )));
            }
            let meta = std::fs::metadata(prefix)
                .map_err(|e| fail(format!("{}: {e}", prefix.display())))?;
            if !meta.is_dir() {
                return Err(fail(format!("{} is not a directory", prefix.display())));
            }
            if !trusted_owner(meta.uid(), uid) {
                return Err(fail(format!(
                    "{} belongs to uid {}, neither root nor this daemon's uid {uid}: its owner could \
                     replace what the daemon keeps there",
                    prefix.display(),
                    meta.uid()
                )));
            }
            let mode = meta.permissions().mode();
            let sticky = mode & 0o1000 != 0;
            let writable = mode & 0o022;
            let sticky_accepted = sticky && (i < last || purpose.sticky_ok());
            if writable != 0 && !sticky_accepted {
                let who = match (writable & 0o020 != 0, writable & 0o002 != 0) {
                    (true, true) => "group and others",
                    (true, false) => "its group",
                    _ => "others",
                };
                return Err(fail(format!(
                    "{} is writable by {who} (mode {:04o}, uid {}, gid {}){}: they could rename what \
                     the daemon puts there and plant a link in its place",
                    prefix.display(),
                    mode & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    if sticky {
                        " and sticky, which is not enough for the directory that holds records"
                    } else {
                        ""
                    }
                )));
            }
        }
    }
    Ok(())
}

fn trusted_owner(owner: u32, uid: u32) -> bool {
    owner == 0 || owner == uid
}

/// `/`, `/a`, `/a/b`, ... `path` (lexically; `..` and `.` are kept as steps, so each
/// prefix is what the kernel walks through).
fn prefixes(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => continue,
            _ => cur.push(c.as_os_str()),
        }
        out.push(cur.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A private directory to build in (tempdir is 0700, its ancestors are /tmp-like).
    fn base() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("vdp-trust")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn a_private_directory_under_a_sticky_one_is_trusted_for_everything() {
        let d = base();
        let me = rustix::process::geteuid().as_raw();
        for p in [Purpose::Sockets, Purpose::StateDir, Purpose::HealthCopy] {
            check_directory_for(d.path(), p, me).unwrap();
        }
    }

    #[test]
    fn group_or_other_write_is_refused_and_says_who() {
        let d = base();
        let me = rustix::process::geteuid().as_raw();
        let shared = d.path().join("shared");
        fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o770);
        let e = check_directory_for(&shared, Purpose::Sockets, me).unwrap_err();
        assert!(e.to_string().contains("writable by its group"), "{e}");
        assert!(e.to_string().contains("--allow-shared-socket-dir"), "{e}");
        chmod(&shared, 0o757);
        let e = check_directory_for(&shared, Purpose::StateDir, me).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
        assert!(e.to_string().contains("--state-dir"), "{e}");
        // Below a shared directory, a private one is not safe either: the shared one
        // lets its writers rename it.
        let below = shared.join("private");
        fs::create_dir(&below).unwrap();
        chmod(&below, 0o700);
        let e = check_directory_for(&below, Purpose::StateDir, me).unwrap_err();
        assert!(e.reason.starts_with(&shared.display().to_string()), "{e}");
    }

    #[test]
    fn a_sticky_directory_holds_sockets_and_ancestors_but_not_records() {
        let d = base();
        let me = rustix::process::geteuid().as_raw();
        let sticky = d.path().join("tmp");
        fs::create_dir(&sticky).unwrap();
        chmod(&sticky, 0o1777);
        check_directory_for(&sticky, Purpose::Sockets, me).unwrap();
        let e = check_directory_for(&sticky, Purpose::StateDir, me).unwrap_err();
        assert!(e.reason.contains("sticky"), "{e}");
        let e = check_directory_for(&sticky, Purpose::HealthCopy, me).unwrap_err();
        assert!(e.to_string().contains("--no-health-copy"), "{e}");
        let below = sticky.join("mine");
        fs::create_dir(&below).unwrap();
        check_directory_for(&below, Purpose::StateDir, me).unwrap();
    }

    #[test]
    fn another_users_directory_or_link_is_refused() {
        let d = base();
        // Seen as a daemon of another uid, the test's (root's or the user's) own
        // directories belong to someone else, unless they are root's.
        let me = rustix::process::geteuid().as_raw();
        let other = if me == 0 { 4242 } else { me + 1 };
        if me != 0 {
            let e = check_directory_for(d.path(), Purpose::StateDir, other).unwrap_err();
            assert!(e.reason.contains("belongs to uid"), "{e}");
        }
        // A link to a trusted directory is as trusted as its owner.
        let target = d.path().join("target");
        fs::create_dir(&target).unwrap();
        let link = d.path().join("link");
        symlink(&target, &link).unwrap();
        check_directory_for(&link, Purpose::StateDir, me).unwrap();
        if me == 0 {
            std::os::unix::fs::lchown(&link, Some(other), None).unwrap();
            let e = check_directory_for(&link, Purpose::StateDir, me).unwrap_err();
            assert!(e.reason.contains("symbolic link of uid 4242"), "{e}");
            let owned = d.path().join("owned");
            fs::create_dir(&owned).unwrap();
            std::os::unix::fs::chown(&owned, Some(other), None).unwrap();
            let e = check_directory_for(&owned, Purpose::Sockets, me).unwrap_err();
            assert!(e.reason.contains("belongs to uid 4242"), "{e}");
        }
        let file = d.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = check_directory_for(&file, Purpose::StateDir, me).unwrap_err();
        assert!(e.reason.contains("not a directory"), "{e}");
    }
}
