// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who reaches an instance's sockets, as an operator's host lays them out (root):
//! the directories and sockets made with the owners and modes the shipped socket
//! units and the instance example declare (parsed from those files): the units'
//! sockets bound there as systemd binds them, the agent socket bound by the real
//! daemon with the example's `socket-group`, and `setpriv` clients of other uids and
//! groups connecting. A host without group kvm (a build container) lends a group
//! every Debian system has in its place.
//! QEMU's user (group kvm, as its primary group or a supplementary one) connects to
//! `vhost-user.sock` and `agent.sock` and not to `control.sock`; a uid outside kvm
//! connects to none.
//!
//! Owns: that check, and the helper that connects as the other uid (this test
//! binary, copied where that uid may run it). Never touches the host's /run.

use vdp_testkit::daemon;
use vdp_testkit::root;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use daemon::{Daemon, Scratch, MIB2};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Set for the helper run: the socket to connect to.
const HELPER_ENV: &str = "VDP_SOCKET_ACCESS_CONNECT";
/// A uid that is in no group the test names (Debian's nobody).
const OUTSIDER: u32 = 65534;

/// The `[Socket]` settings of a shipped unit.
fn socket_settings(unit: &str) -> BTreeMap<String, String> {
    let text = fs::read_to_string(Path::new(REPO).join("configs/systemd").join(unit)).unwrap();
    let mut out = BTreeMap::new();
    let mut in_socket = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_socket = line == "[Socket]";
            continue;
        }
        if !in_socket || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// An octal mode as a unit writes it.
fn mode(s: &str) -> u32 {
    u32::from_str_radix(s, 8).unwrap_or_else(|e| panic!("mode {s:?}: {e}"))
}

/// A group's gid from the host's group database; `None` if the host has no such
/// group (a build container): the test then stands in an unused gid for it.
fn gid_of(name: &str) -> Option<u32> {
    let c = CString::new(name).unwrap();
    // SAFETY: getgrnam with a valid C string; the result is read at once.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: non-null result of getgrnam.
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

/// A group every Debian system has, standing in for QEMU's on a host without it:
/// the daemon takes a group by name, so the stand-in must have one.
const STAND_INS: [&str; 3] = ["disk", "tty", "adm"];

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// What systemd does for a `ListenStream=` path: creates the missing parent
/// directories with `DirectoryMode=`, owned by root (SocketUser=/SocketGroup= are
/// the socket's, not the directories'), binds, then gives the socket its
/// `SocketUser=`/`SocketGroup=` and `SocketMode=` (default 0666).
fn listen_like_systemd(
    root: &Path,
    settings: &BTreeMap<String, String>,
    group_gid: &dyn Fn(&str) -> u32,
) -> (PathBuf, UnixListener) {
    let path = settings["ListenStream"].replace("%i", "vm0-pmem0");
    let path = root.join(path.trim_start_matches('/'));
    let dir_mode = mode(settings.get("DirectoryMode").map_or("0755", String::as_str));
    let mut missing = Vec::new();
    let mut d = path.parent().unwrap();
    while !d.exists() {
        missing.push(d.to_path_buf());
        d = d.parent().unwrap();
    }
    for d in missing.iter().rev() {
        fs::create_dir(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(dir_mode)).unwrap();
        chown(d, 0, 0);
    }
    let l = UnixListener::bind(&path).unwrap();
    let gid = settings.get("SocketGroup").map_or(0, |g| group_gid(g));
    chown(&path, 0, gid);
    let m = mode(settings.get("SocketMode").map_or("0666", String::as_str));
    fs::set_permissions(&path, fs::Permissions::from_mode(m)).unwrap();
    (path, l)
}

/// Connects to `sock` as `uid`, with `gid` as primary group and `groups` as the
/// supplementary ones; `Ok` or the errno.
fn connect_as(helper: &Path, sock: &Path, uid: u32, gid: u32, groups: &[u32]) -> Result<(), i32> {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", list.join(",")));
    }
    let out = c
        .arg("--")
        .arg(helper)
        .args([
            "--exact",
            "connect_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("VDP-CONNECT ").map(|(_, v)| v.trim()))
        .unwrap_or_else(|| {
            panic!(
                "the helper said nothing: {}\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    match line {
        "ok" => Ok(()),
        e => Err(e.parse().unwrap()),
    }
}

/// The helper: run as another uid by [`connect_as`]; does nothing otherwise.
#[test]
fn connect_helper() {
    let Some(p) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    match UnixStream::connect(&p) {
        Ok(_) => println!("VDP-CONNECT ok"),
        Err(e) => println!("VDP-CONNECT {}", e.raw_os_error().unwrap_or(-1)),
    }
}

#[test]
fn qemus_group_reaches_the_vhost_user_and_agent_sockets_and_nobody_else_any() {
    const NAME: &str = "socket_access";
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return root::unavailable(NAME, "root (chown, setpriv to other uids)");
    }
    if !root::have_tool("setpriv") {
        return root::unavailable(NAME, "the `setpriv` tool (util-linux)");
    }
    let vu = socket_settings("vhost-device-pmem@.socket");
    let ctl = socket_settings("vhost-device-pmem-control@.socket");
    let instance: toml::Table =
        fs::read_to_string(Path::new(REPO).join("configs/systemd/instance.toml"))
            .unwrap()
            .parse()
            .unwrap();
    // QEMU's group is the vhost-user socket's.
    let qemu_group = vu
        .get("SocketGroup")
        .expect("vhost-device-pmem@.socket sets no SocketGroup=: QEMU cannot connect")
        .clone();
    let host_group = if gid_of(&qemu_group).is_some() {
        qemu_group.clone()
    } else {
        let g = STAND_INS
            .iter()
            .find(|g| gid_of(g).is_some())
            .expect("a stand-in group");
        eprintln!("socket_access: no group {qemu_group} on this host; {g} stands in");
        g.to_string()
    };
    let qemu_gid = gid_of(&host_group).unwrap();
    let resolve = |name: &str| -> u32 {
        if name == qemu_group {
            qemu_gid
        } else {
            gid_of(name).unwrap_or_else(|| panic!("group {name} of a unit"))
        }
    };

    let top = tempfile::tempdir().unwrap();
    let root_dir = top.path();
    fs::set_permissions(root_dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(root_dir.join("run")).unwrap();
    fs::set_permissions(root_dir.join("run"), fs::Permissions::from_mode(0o755)).unwrap();
    // The other uid must be able to run the helper: a copy outside the build tree.
    let helper = root_dir.join("helper");
    fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();

    // The socket units start in either order: the first makes the directories.
    let (vu_path, _vu) = listen_like_systemd(root_dir, &vu, &resolve);
    let (ctl_path, _ctl) = listen_like_systemd(root_dir, &ctl, &resolve);
    let agent = instance["agent-socket"].as_str().expect("agent-socket");
    let agent_path = root_dir.join(agent.trim_start_matches('/'));
    assert_eq!(agent_path.parent(), vu_path.parent());
    // The daemon binds the agent socket itself, with the example's socket-group.
    let agent_group = instance
        .get("socket-group")
        .and_then(|g| g.as_str())
        .expect("instance.toml sets no socket-group: QEMU cannot reach agent.sock");
    assert_eq!(
        agent_group, qemu_group,
        "the agent socket's group is QEMU's"
    );
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &[
            "--mode",
            "fsync",
            "--agent-socket",
            agent_path.to_str().unwrap(),
            "--socket-group",
            &host_group,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent_path.exists() {
        assert!(
            Instant::now() < deadline,
            "no agent socket:\n{}",
            d.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let m = fs::metadata(&agent_path).unwrap();
    eprintln!(
        "socket_access: agent.sock as the daemon bound it: {:o} {}:{}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid()
    );
    for p in [
        vu_path.parent().unwrap(),
        vu_path.parent().unwrap().parent().unwrap(),
    ] {
        let m = fs::metadata(p).unwrap();
        eprintln!(
            "socket_access: {} {:o} {}:{}",
            p.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        );
    }

    let eacces = Err(libc::EACCES);
    // QEMU as libvirt runs it on Debian: libvirt-qemu, primary group kvm.
    let qemu_primary = |s: &Path| connect_as(&helper, s, OUTSIDER, qemu_gid, &[]);
    // A QEMU user with kvm as a supplementary group only.
    let qemu_supplementary = |s: &Path| connect_as(&helper, s, OUTSIDER, OUTSIDER, &[qemu_gid]);
    // Anyone else.
    let outsider = |s: &Path| connect_as(&helper, s, OUTSIDER, OUTSIDER, &[]);

    for (who, f) in [
        (
            "kvm as primary group",
            &qemu_primary as &dyn Fn(&Path) -> Result<(), i32>,
        ),
        ("kvm as supplementary group", &qemu_supplementary),
    ] {
        assert_eq!(f(&vu_path), Ok(()), "{who}: vhost-user.sock");
        assert_eq!(f(&agent_path), Ok(()), "{who}: agent.sock");
        assert_eq!(f(&ctl_path), eacces, "{who}: control.sock");
    }
    for s in [&vu_path, &agent_path, &ctl_path] {
        assert_eq!(outsider(s), eacces, "a uid outside kvm: {}", s.display());
    }
    // Root (the operator) reaches all three.
    for s in [&vu_path, &agent_path, &ctl_path] {
        UnixStream::connect(s).unwrap();
    }
}
