// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local clients and the guest cannot starve or flood the daemon: the real binary
//! under a real descriptor limit (setrlimit in the child) with hundreds of idle
//! control clients, a second real uid in the control group, and a fake guest
//! flooding the agent channel.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
    },
    path::Path,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::daemon::{limit_descriptors, Daemon, Scratch, BIN, MIB2, TIMEOUT};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::root;
use vhost_device_pmem::control::{self, Request};

const SIZE: u64 = 2 * MIB2;

/// Lets this process hold `n` descriptors (the idle clients), if its hard limit
/// allows.
fn raise_own_descriptor_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; then a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "this test needs {n} descriptors, the hard limit is {}",
        lim.rlim_max
    );
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Polls `f` until it returns Some; panics with `what` after [`TIMEOUT`] * 3.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT * 3;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Connects `n` clients that never send anything.
fn idle_clients(path: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|i| UnixStream::connect(path).unwrap_or_else(|e| panic!("idle client {i}: {e}")))
        .collect()
}

#[test]
fn six_hundred_idle_clients_under_a_1024_descriptor_limit_leave_the_daemon_working() {
    raise_own_descriptor_limit(2048);
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", SIZE);
    let mut d = Daemon::start_prepared(&s, "d", &file, &["--mode", "fsync"], |cmd| {
        limit_descriptors(cmd, 1024)
    });
    let lines_before = d.log_text().lines().count();
    let idle = idle_clients(&d.control, 600);
    // Every one was taken (answered "closed: idle ..." or kept), none waits.
    let stats = eventually("the daemon took all 600 clients", || {
        let v = control::call(&d.control, &Request::Stats).ok()?;
        (v["stats"]["control_clients_accepted"].as_u64()? >= 601).then_some(v)
    });
    let fds = open_fds(d.pid());
    eprintln!(
        "600 idle clients: daemon descriptors {fds}, stats {}",
        stats["stats"]
    );
    assert!(
        fds < 200,
        "{fds} descriptors open in the daemon: the clients are not capped"
    );
    // Status answers, an authorised inject is saved, the VMM connects and flushes.
    let status = d.status();
    assert_eq!(status["health"], "healthy", "{status}");
    let v = control::call(
        &d.control,
        &Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["added"][0]["offset"], 4096, "{v}");
    assert!(v.get("persist_error").is_none(), "the save failed: {v}");
    let mut fe = TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(fe.flush(2).unwrap(), vec![0, 0], "{}", d.log_text());
    drop(fe);
    assert!(d.exited().is_none(), "{}", d.log_text());
    // Most idle clients were closed, with a line saying why.
    let mut told = 0;
    for mut c in idle.into_iter().take(100) {
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut line = String::new();
        let _ = c.read_to_string(&mut line);
        told += usize::from(line.contains("closed: idle"));
    }
    assert!(told >= 90, "only {told} of the first 100 were told why");
    let log = d.log_text();
    let lines = log.lines().count() - lines_before;
    eprintln!("600 idle clients: {lines} log lines");
    assert!(lines < 40, "{lines} log lines for 600 clients:\n{log}");
}

#[test]
fn out_of_descriptors_clients_are_told_so_and_a_waiting_vmm_is_served_once_they_free() {
    raise_own_descriptor_limit(1024);
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", SIZE);
    // No cap worth the name: the descriptor limit is what runs out.
    let mut d = Daemon::start_prepared(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--control-max-clients", "100000"],
        |cmd| limit_descriptors(cmd, 64),
    );
    let lines_before = d.log_text().lines().count();
    let idle = idle_clients(&d.control, 200);
    let refused = eventually("a client told the daemon is out of descriptors", || {
        let v = control::call(&d.control, &Request::Status).ok()?;
        (v["ok"] == false).then_some(v)
    });
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("out of file descriptors")),
        "{refused}"
    );
    // A VMM connecting now cannot be set up: it waits, the daemon stays up.
    let socket = d.socket.clone();
    let vmm = thread::spawn(move || -> Result<Vec<u32>, String> {
        let mut fe = TestFrontend::connect_started(&socket).map_err(|e| e.to_string())?;
        fe.flush(1).map_err(|e| e.to_string())
    });
    eventually("the VMM connection's set-up failing and retried", || {
        d.log_text()
            .contains("VMM connection set-up failed")
            .then_some(())
    });
    assert!(d.exited().is_none(), "the daemon died:\n{}", d.log_text());
    drop(idle);
    let flushed = vmm.join().unwrap();
    assert_eq!(flushed, Ok(vec![0]), "{}", d.log_text());
    assert!(d.exited().is_none(), "{}", d.log_text());
    d.wait_status("the VMM's disconnect", |s| s["connected"] == false);
    let stats = d.stats();
    assert!(stats["control_clients_shed"].as_u64() > Some(0), "{stats}");
    let log = d.log_text();
    let lines = log.lines().count() - lines_before;
    eprintln!(
        "out of descriptors: {lines} log lines, {} clients shed",
        stats["control_clients_shed"]
    );
    assert!(lines < 60, "{lines} log lines:\n{log}");
}

#[test]
fn a_client_that_sends_nothing_or_a_byte_at_a_time_is_closed_after_the_idle_timeout() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", SIZE);
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--control-idle-timeout", "1"],
    );
    let silent = UnixStream::connect(&d.control).unwrap();
    let drip = UnixStream::connect(&d.control).unwrap();
    let dripper = {
        let mut drip = drip.try_clone().unwrap();
        thread::spawn(move || {
            // Half a request, one byte every 100 ms, for as long as it is let in.
            for b in br#"{"command":"status""#.iter().cycle() {
                if drip.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for mut c in [&silent, &drip] {
        c.set_read_timeout(Some(TIMEOUT * 3)).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got)
            .expect("closed by the daemon, not by our read timeout");
        assert!(
            got.contains("no complete request within 1 s"),
            "the client was not told why: {got:?}"
        );
    }
    let _ = drip.shutdown(std::net::Shutdown::Both);
    dripper.join().unwrap();
    assert_eq!(d.stats()["control_clients_timed_out"], 2);
    // A client that asks in time is served as before.
    assert_eq!(d.status()["health"], "healthy");
}

/// Runs the binary as `uid` with the given primary gid and supplementary groups
/// (setpriv), as another local user would.
fn as_user(uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let groups = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let uid = uid.to_string();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid, "--regid", &uid]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.args(["--groups", &groups]);
    }
    cmd.arg(BIN).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Gids no account uses: the daemon takes numeric groups, setpriv sets them.
const CONTROL_GID: u32 = 64_711;
const OPERATOR_GID: u32 = 64_712;
const QEMU_GID: u32 = 64_713;
const NOBODY: u32 = 65_534;

fn second_uid_prerequisites(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 || !root::have_tool("setpriv") {
        root::unavailable(test, "root and setpriv (to act as a second uid)");
        return false;
    }
    true
}

/// A scratch directory others can traverse (the sockets are in it).
fn shared_scratch() -> Scratch {
    let s = Scratch::new();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    s
}

#[test]
fn a_control_group_member_reads_but_only_operators_change_state() {
    if !second_uid_prerequisites("a_control_group_member_reads_but_only_operators_change_state") {
        return;
    }
    let s = shared_scratch();
    let file = s.backing_file("pmem.img", SIZE);
    let agent = s.path("agent.sock");
    let (control_gid, operator_gid, qemu_gid) = (
        CONTROL_GID.to_string(),
        OPERATOR_GID.to_string(),
        QEMU_GID.to_string(),
    );
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &[
            "--mode",
            "fsync",
            "--agent-socket",
            agent.to_str().unwrap(),
            "--socket-group",
            &qemu_gid,
            "--control-group",
            &control_gid,
            "--operator-group",
            &operator_gid,
        ],
    );
    let ctl = d.control.to_str().unwrap();
    // QEMU's group reaches the vhost-user and agent sockets, not the control one.
    let gid = |p: &Path| fs::metadata(p).unwrap().gid();
    assert_eq!(
        (gid(&d.socket), gid(&agent), gid(&d.control)),
        (QEMU_GID, QEMU_GID, CONTROL_GID)
    );
    let o = as_user(NOBODY, &[QEMU_GID], &["status", "--control-socket", ctl]);
    assert!(
        !o.status.success(),
        "QEMU's group read the status: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("Permission denied"),
        "refused by the socket's mode: {}",
        text(&o)
    );
    // A member of the control group reads...
    let o = as_user(NOBODY, &[CONTROL_GID], &["status", "--control-socket", ctl]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("healthy"), "{}", text(&o));
    let o = as_user(
        NOBODY,
        &[CONTROL_GID],
        &["badblocks", "--control-socket", ctl, "list"],
    );
    assert!(o.status.success(), "{}", text(&o));
    // ... but may not tell the guest its data is bad, nor clear a bad range.
    for cmd in [["inject", "4096", "512"], ["clear", "4096", "512"]] {
        let mut args = vec!["badblocks", "--control-socket", ctl];
        args.extend(cmd);
        let o = as_user(NOBODY, &[CONTROL_GID], &args);
        assert!(!o.status.success(), "{cmd:?} was allowed: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("permission denied")
                && t.contains(&format!("uid {NOBODY}"))
                && t.contains(&format!("operator group {OPERATOR_GID}")),
            "{cmd:?}: {t}"
        );
    }
    assert_eq!(d.status()["bad_ranges"], serde_json::json!([]));
    // An operator (a supplementary group) may.
    let o = as_user(
        NOBODY,
        &[CONTROL_GID, OPERATOR_GID],
        &[
            "badblocks",
            "--control-socket",
            ctl,
            "inject",
            "4096",
            "512",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.status()["bad_ranges"][0]["offset"], 4096);
    // So may root (this test), on the wire.
    let v = control::call(
        &d.control,
        &Request::BadblocksClear {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(
        (v["ok"].clone(), v["changed"].clone()),
        (true.into(), true.into()),
        "{v}"
    );
    let stats = d.stats();
    assert_eq!(stats["control_requests_denied"], 2, "{stats}");
}

#[test]
fn the_daemons_own_uid_may_change_state_and_another_uid_in_the_control_group_may_not() {
    if !second_uid_prerequisites(
        "the_daemons_own_uid_may_change_state_and_another_uid_in_the_control_group_may_not",
    ) {
        return;
    }
    const DAEMON_UID: u32 = 64_714;
    let s = shared_scratch();
    let file = s.backing_file("pmem.img", SIZE);
    std::os::unix::fs::chown(s.dir.path(), Some(DAEMON_UID), Some(DAEMON_UID)).unwrap();
    std::os::unix::fs::chown(&file, Some(DAEMON_UID), Some(DAEMON_UID)).unwrap();
    let control_gid = CONTROL_GID.to_string();
    let d = Daemon::start_prepared(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--control-group", &control_gid],
        |cmd| {
            use std::os::unix::process::CommandExt;
            // Its primary group is the control group's, which it may then give
            // the socket (chown to a group one is not in is refused).
            cmd.uid(DAEMON_UID).gid(CONTROL_GID);
        },
    );
    let ctl = d.control.to_str().unwrap();
    let inject = [
        "badblocks",
        "--control-socket",
        ctl,
        "inject",
        "8192",
        "512",
    ];
    let o = as_user(NOBODY, &[CONTROL_GID], &inject);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("the daemon's uid {DAEMON_UID}")),
        "{}",
        text(&o)
    );
    let o = as_user(DAEMON_UID, &[], &inject);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.status()["bad_ranges"][0]["offset"], 8192);
}

/// The log lines `log` holds after its first `skip`, each checked: one line per
/// record (env_logger's `[` first), no control character from anyone.
fn checked_lines(log: &str, skip: usize) -> usize {
    let mut n = 0;
    for line in log.lines().skip(skip) {
        assert!(
            line.starts_with('[') && !line.trim_start().starts_with("[2030"),
            "a line that is not one of the daemon's records (forged by the guest?): {line:?}"
        );
        assert!(
            !line.chars().any(char::is_control),
            "a control character in the log: {line:?}"
        );
        n += 1;
    }
    n
}

#[test]
fn a_guest_flooding_the_agent_channel_gets_a_bounded_escaped_log() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", SIZE);
    let agent = s.path("agent.sock");
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--agent-socket", agent.to_str().unwrap()],
    );
    let before = d.log_text().lines().count();
    // Plays the guest's end of the virtio-serial port.
    let port = UnixStream::connect(&agent).unwrap();
    let mut hello = String::new();
    BufReader::new(&port).read_line(&mut hello).unwrap();
    assert!(hello.contains("hello"), "{hello}");
    let forged = r"\n[2030-01-01T00:00:00Z ERROR vhost_device_pmem] forged line\r\u001b[2K\u202e";
    let mut w = std::io::BufWriter::new(&port);
    const ERRORS: u64 = 200_000;
    for i in 0..ERRORS {
        writeln!(w, r#"{{"type":"error","message":"boom {i}{forged}"}}"#).unwrap();
    }
    for _ in 0..1000 {
        writeln!(
            w,
            r#"{{"type":"attached","device":"/dev/pmem0{forged}","data_offset":0}}"#
        )
        .unwrap();
        writeln!(w, r#"{{"type":"applied","sectors":[[8,1]]}}"#).unwrap();
        // Not a message: the decoder's error quotes the guest's tag.
        writeln!(w, r#"{{"type":"x{forged}"}}"#).unwrap();
    }
    w.flush().unwrap();
    let st = eventually("the daemon read every message", || {
        let st = d.status();
        (st["agent"]["messages"] == ERRORS + 2000 && st["agent"]["bad_messages"] == 1000)
            .then_some(st)
    });
    let last = st["agent"]["last_error"].as_str().unwrap();
    assert!(
        last.starts_with("boom 199999\\n[2030") && !last.chars().any(char::is_control),
        "{last:?}"
    );
    let log = d.log_text();
    let lines = checked_lines(&log, before);
    eprintln!(
        "agent flood: {} messages, {lines} log lines, {} bytes of log",
        ERRORS + 3000,
        log.len()
    );
    assert!(lines < 60, "{lines} log lines:\n{log}");
    assert!(log.contains(
        r"boom 0\n[2030-01-01T00:00:00Z ERROR vhost_device_pmem] forged line\r\u{1b}[2K\u{202e}"
    ));
}
