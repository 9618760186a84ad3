// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon under the service manager's real protocols: started by
//! `systemd-socket-activate` with inherited, named sockets; READY/STATUS/WATCHDOG/
//! STOPPING read from a NOTIFY_SOCKET datagram socket; a restart while a VMM maps
//! the region; and the unit files checked by `systemd-analyze verify`.
//! Never mocks a protocol: a missing tool is a loud skip (a failure under
//! VDP_REQUIRE_ROOT_TESTS=1).

use std::{
    fs,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixDatagram,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{wait_exit, Scratch, BIN, MIB2, TIMEOUT};
use vdp_testkit::frontend;
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::root;
use vhost_device_pmem::control::{self, Request};

const ACTIVATE: &str = "systemd-socket-activate";

/// Whether `tool` is there; a loud skip (or a failure in CI) if not.
fn have(test: &str, tool: &str) -> bool {
    if root::have_tool(tool) {
        return true;
    }
    root::unavailable(test, &format!("the `{tool}` tool (part of systemd)"));
    false
}

/// The daemon started by `systemd-socket-activate`, which listens on the two sockets
/// and execs the daemon (same pid) at the first connection, passing them named.
struct Activated {
    child: Child,
    vhost_user: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Activated {
    fn start(s: &Scratch, file: &Path, env: &[(&str, &str)]) -> Self {
        let vhost_user = s.path("vhost-user.sock");
        let control = s.path("control.sock");
        let log = s.path("activated.log");
        let mut cmd = Command::new(ACTIVATE);
        cmd.arg("-l")
            .arg(&vhost_user)
            .arg("-l")
            .arg(&control)
            .arg("--fdname=vhost-user:control")
            .arg("-E")
            .arg("RUST_LOG=info");
        for (k, v) in env {
            cmd.arg("-E").arg(format!("{k}={v}"));
        }
        // No --socket-path and no --control-socket: the inherited sockets stand in.
        cmd.args([&*BIN, "serve", "--mode", "fsync", "--file"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !(vhost_user.exists() && control.exists()) {
            assert!(Instant::now() < deadline, "{ACTIVATE} did not listen");
            thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            vhost_user,
            control,
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn term(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        wait_exit(&mut self.child)
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn inherited_sockets_serve_a_vmm_and_the_control_socket_and_are_left_in_place() {
    if !have("inherited_sockets", ACTIVATE) {
        return;
    }
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let mut d = Activated::start(&s, &file, &[]);
    // Whatever mode the socket has is the unit's business: the daemon keeps it.
    fs::set_permissions(&d.vhost_user, fs::Permissions::from_mode(0o640)).unwrap();
    let vu_inode = fs::metadata(&d.vhost_user).unwrap().ino();

    // The first connection starts the daemon on the inherited vhost-user socket.
    let mut fe = TestFrontend::connect_started(&d.vhost_user)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    fe.map_region(0).unwrap();
    fe.write_pmem(0, b"activated").unwrap();
    assert_eq!(fe.flush(2).unwrap(), vec![0, 0], "{}", d.log_text());

    // The control socket is the inherited one, and status names the inherited path.
    let st = control::call(&d.control, &Request::Status).unwrap();
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(
        st["status"]["socket"],
        d.vhost_user.display().to_string(),
        "{st}"
    );
    assert_eq!(st["status"]["policy"], "fsync");
    let stats = control::call(&d.control, &Request::Stats).unwrap();
    assert!(stats["stats"]["syncs"].as_u64().unwrap() >= 1, "{stats}");
    let log = d.log_text();
    assert!(log.contains("(inherited)"), "{log}");

    drop(fe);
    assert!(d.term().success(), "{}", d.log_text());
    // Never unlinked, never replaced, never chmod'ed.
    for p in [&d.vhost_user, &d.control] {
        assert!(p.exists(), "{} was removed:\n{}", p.display(), d.log_text());
    }
    let meta = fs::metadata(&d.vhost_user).unwrap();
    assert_eq!(meta.ino(), vu_inode);
    assert_eq!(meta.mode() & 0o777, 0o640);
}

/// Reads notification datagrams until `pred` holds for one; all read so far.
fn recv_until(rx: &UnixDatagram, seen: &mut Vec<String>, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no {what} among {seen:#?}");
        match rx.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = pred(&msg);
                seen.push(msg);
                if hit {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
    if !have("notify", ACTIVATE) {
        return;
    }
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let notify = s.path("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut d = Activated::start(
        &s,
        &file,
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            // 400 ms: pings at least every 200 ms while healthy.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    // A control request is the first connection: it starts the daemon.
    let st = control::call(&d.control, &Request::Status).unwrap();
    assert_eq!(st["ok"], true, "{st}");

    let mut seen = Vec::new();
    recv_until(&rx, &mut seen, "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let ready = seen.last().unwrap().clone();
    assert!(
        ready.contains("STATUS=policy fsync, health healthy"),
        "{ready}"
    );
    // Pings keep coming while the daemon makes progress.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        recv_until(&rx, &mut seen, "WATCHDOG=1", |m| {
            m.lines().any(|l| l == "WATCHDOG=1")
        });
        pings += 1;
    }
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "3 pings took {took:?}");

    assert!(d.term().success(), "{}", d.log_text());
    recv_until(&rx, &mut seen, "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
}

#[test]
fn a_restart_while_a_vmm_maps_the_region_exits_75_at_once() {
    // What a restart does to a running VM, measured with the test frontend: the
    // frontend keeps the region it mapped; a new daemon on the same file finds the
    // lock held and exits with the status the unit does not restart.
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let mut first = daemon::Daemon::start(&s, "first", &file, &["--mode", "fsync"]);
    let mut fe = TestFrontend::connect(&first.socket).unwrap();
    fe.start().unwrap();
    assert_eq!(fe.maps.wait_for(1, frontend::TIMEOUT), 1);
    fe.map_region(0).unwrap();
    assert_eq!(fe.flush(1).unwrap(), vec![0]);
    // The daemon dies (as a crash would): the VMM's connection is gone for good.
    first.signal(libc::SIGKILL);
    first.wait_exit();
    let t = Instant::now();
    assert!(fe.flush(1).is_err(), "a flush after the daemon died");
    eprintln!(
        "a flush after the daemon died: no answer, given up after {:?}",
        t.elapsed()
    );

    let started = Instant::now();
    let (status, log) = daemon::serve_fails(
        &s,
        &[
            "--socket-path",
            s.path("second.sock").to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
            "--mode",
            "fsync",
        ],
    );
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("locked"), "{log}");
    // Not blocked for lease-break-time by the lease left on the VMM's open file.
    eprintln!("the second daemon exited 75 after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Once the VMM is gone (the mapping dropped), a new daemon starts.
    drop(fe);
    let again = daemon::Daemon::start(&s, "again", &file, &["--mode", "fsync"]);
    assert_eq!(again.status()["policy"], "fsync");
}

/// The repository's unit files.
fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/systemd")
}

#[test]
fn units_pass_systemd_analyze_verify_against_an_installed_root() {
    if !have("systemd_analyze_verify", "systemd-analyze") {
        return;
    }
    // The host's own units (sysinit.target, sockets.target, ...) the ours depend on.
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists());
    let Some(host_units) = host_units else {
        root::unavailable("systemd_analyze_verify", "the host's systemd units");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let sys = r.join("usr/lib/systemd/system");
    fs::create_dir_all(&sys).unwrap();
    for e in fs::read_dir(host_units).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), sys.join(e.file_name())).unwrap();
        }
    }
    let etc = r.join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap();
    let mut units = Vec::new();
    for e in fs::read_dir(unit_dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".service") || name.ends_with(".socket") {
            fs::copy(unit_dir().join(&name), etc.join(&name)).unwrap();
            units.push(name.replace("@.", "@vm0-pmem0."));
        }
    }
    units.sort();
    assert_eq!(
        units,
        [
            "vhost-device-pmem-control@vm0-pmem0.socket",
            "vhost-device-pmem@vm0-pmem0.service",
            "vhost-device-pmem@vm0-pmem0.socket"
        ]
    );
    // The metrics drop-in, for every instance, as docs/operations.md installs it.
    let dropin = etc.join("vhost-device-pmem@.service.d");
    fs::create_dir_all(&dropin).unwrap();
    fs::copy(unit_dir().join("metrics.conf"), dropin.join("metrics.conf")).unwrap();
    // The guest agent's unit (its package installs it in a guest), on a port's
    // kernel name as its udev rule starts it.
    fs::copy(agent_dir().join(AGENT_UNIT), etc.join(AGENT_UNIT)).unwrap();
    units.push(AGENT_UNIT.replace("@.", "@vport1p1."));
    // ExecStart= must exist in the root: install the binaries where the units say.
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::copy(BIN, r.join("usr/bin/vhost-device-pmem")).unwrap();
    fs::copy(
        env!("CARGO_BIN_EXE_vhost-device-pmem-agent"),
        r.join("usr/bin/vhost-device-pmem-agent"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    // Warnings (an unknown key, a bad value) do not fail verify: none is allowed.
    assert!(stderr.trim().is_empty(), "{stderr}");
    // The drop-in was read: the service's writable paths include the collector's.
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", r.display()))
        .args([
            "cat-config",
            "systemd/system/vhost-device-pmem@.service.d/metrics.conf",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ReadWritePaths=/var/lib/prometheus/node-exporter"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest agent's unit and udev rule, shipped by its package.
fn agent_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/agent")
}

const AGENT_UNIT: &str = "vhost-device-pmem-agent@.service";

/// The rule starts the shipped unit, on the port name the agent and the shipped
/// VMM configurations use, with the kernel name the unit's BindsTo= expects.
#[test]
fn the_agents_udev_rule_starts_its_unit_on_the_agent_port() {
    let rules = fs::read_to_string(agent_dir().join("60-vhost-device-pmem-agent.rules")).unwrap();
    let rule: Vec<&str> = rules
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rule.len(), 1, "{rules}");
    let rule = rule[0];
    let key = |k: &str| -> String {
        let (_, rest) = rule
            .split_once(k)
            .unwrap_or_else(|| panic!("no {k} in {rule}"));
        rest.split('"').nth(1).unwrap().to_string()
    };
    assert_eq!(key("SUBSYSTEM=="), "virtio-ports");
    assert_eq!(key("KERNEL=="), "vport*");
    assert_eq!(key("TAG+="), "systemd");
    // The port name glob takes the agent's default port (and the libvirt XML's).
    let glob = key("ATTR{name}==");
    let prefix = glob.strip_suffix('*').expect("a prefix glob");
    let default_port = vhost_device_pmem::media::channel::DEFAULT_PORT_NAME;
    assert!(default_port.starts_with(prefix), "{glob} vs {default_port}");
    let xml = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/libvirt-domain.xml"),
    )
    .unwrap();
    assert!(xml.contains(&format!("name='{default_port}'")), "{xml}");
    // It wants the shipped template on the kernel name (%k, e.g. vport1p1).
    assert_eq!(
        key("ENV{SYSTEMD_WANTS}+="),
        AGENT_UNIT.replace("@.", "@%k.")
    );
    let unit = fs::read_to_string(agent_dir().join(AGENT_UNIT)).unwrap();
    for line in [
        "BindsTo=dev-%i.device",
        "ExecStart=/usr/bin/vhost-device-pmem-agent --port-path /dev/%i",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} not in the unit");
    }
    assert!(
        !unit.contains("[Install]"),
        "udev starts it; nothing enables it"
    );
    let cargo =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    for asset in [
        "[\"packaging/agent/vhost-device-pmem-agent@.service\", \"usr/lib/systemd/system/\", \"644\"]",
        "[\"packaging/agent/60-vhost-device-pmem-agent.rules\", \"usr/lib/udev/rules.d/\", \"644\"]",
    ] {
        assert!(cargo.contains(asset), "{asset} not in Cargo.toml");
    }
}
