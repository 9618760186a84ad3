// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The socket ownership race: in a socket directory a member of `--socket-group`
//! can write, that member renames each socket away the moment it appears and puts
//! a symbolic link to a root-only file in its place, while the daemon is started
//! again and again. A daemon that chowns and chmods its socket by path gives the
//! linked file to the group (root:G 0660); the daemon must never change it. The
//! attacker is a real second uid (a forked child that drops to an unused uid and
//! gid). Owns this case; never touches anything outside its temporary directory.
//! Needs root: SKIPPED loudly without it, a failure with VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    ffi::CString,
    fs,
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt},
    },
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{Scratch, BIN, MIB2, TIMEOUT};
use vdp_testkit::root;

/// Daemon starts the attacker races against.
const STARTS: usize = 150;

/// An unused uid and gid (no passwd or group entry): the attacker's.
fn unused_ids() -> (u32, u32) {
    for id in 61_000..62_000u32 {
        // SAFETY: getpwuid/getgrgid return NULL or a pointer to static storage,
        // only compared with NULL here.
        let free = unsafe { libc::getpwuid(id).is_null() && libc::getgrgid(id).is_null() };
        if free {
            return (id, id);
        }
    }
    panic!("no unused uid/gid in 61000..62000");
}

/// The attacker: a forked child, uid/gid `ids`, renaming `sock` away whenever a
/// socket is there and linking `target` in its place, until killed.
struct Attacker(libc::pid_t);

impl Attacker {
    fn start(ids: (u32, u32), sock: &Path, target: &Path) -> Self {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let (sock, moved, target) = (c(sock), c(&sock.with_extension("moved")), c(target));
        let groups = [ids.1 as libc::gid_t];
        // SAFETY: the child makes only system calls (no allocation, no locks) on
        // memory prepared before the fork, and never returns.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(ids.1) != 0
                    || libc::setuid(ids.0) != 0
                {
                    libc::_exit(3);
                }
                let mut st: libc::stat = std::mem::zeroed();
                loop {
                    // A socket at the name (not the link it left last time).
                    if libc::lstat(sock.as_ptr(), &mut st) == 0
                        && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
                        && libc::rename(sock.as_ptr(), moved.as_ptr()) == 0
                    {
                        libc::symlink(target.as_ptr(), sock.as_ptr());
                    }
                }
            }
            Self(pid)
        }
    }

    /// Still racing (it has not exited, e.g. for want of permission).
    fn alive(&self) -> bool {
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(self.0, &mut status, libc::WNOHANG) == 0 }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// Starts `serve` and waits until it listens (true) or exits (false); then stops it.
fn start_and_stop(args: &[&str], log: &Path) -> bool {
    let mut child: Child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let listened = loop {
        if fs::read_to_string(log)
            .unwrap_or_default()
            .contains("listening on")
        {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon neither listened nor exited:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(2));
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    daemon::wait_exit(&mut child);
    listened
}

#[test]
fn a_group_member_racing_rename_and_symlink_never_gets_a_root_file() {
    let test = "socket_race";
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return root::unavailable(test, "root (a second uid, chown of the socket)");
    }
    let (uid, gid) = unused_ids();
    let s = Scratch::new();
    // The attacker may pass through the scratch directory, and write the socket
    // directory; the target is root's, 0600.
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let file = s.backing_file("pmem.img", MIB2);
    let target = s.path("secret");
    fs::write(&target, b"root only").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let dir = s.path("sockets");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(0), Some(gid)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
    let sock = dir.join("vu.sock");
    let group = gid.to_string();
    let args = [
        "serve",
        "--socket-path",
        sock.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--mode",
        "fsync",
        "--socket-group",
        &group,
        "--allow-shared-socket-dir",
    ];
    let before = fs::symlink_metadata(&target).unwrap();
    let attacker = Attacker::start((uid, gid), &sock, &target);
    let log = s.path("serve.log");
    let mut listened = 0;
    for i in 0..STARTS {
        // A fresh start each time: no socket, no link left from the last round.
        let _ = fs::remove_file(&sock);
        let _ = fs::remove_file(sock.with_extension("moved"));
        if start_and_stop(&args, &log) {
            listened += 1;
        }
        let now = fs::symlink_metadata(&target).unwrap();
        assert_eq!(
            (now.uid(), now.gid(), now.mode() & 0o7777),
            (before.uid(), before.gid(), before.mode() & 0o7777),
            "start {i}: the daemon changed {} through the attacker's link\n{}",
            target.display(),
            fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            attacker.alive(),
            "the attacker could not race (ids {uid}:{gid})"
        );
    }
    drop(attacker);
    // The daemon did bind (and hand the socket to the group) every time.
    assert_eq!(
        listened,
        STARTS,
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(fs::read(&target).unwrap(), b"root only");
}
