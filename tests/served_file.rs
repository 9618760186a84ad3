// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The served file itself, from the real binary: renamed over (`mv`), deleted
//! (`rm`), moved away (`ln` + `rm`) or truncated (`truncate`) by another process
//! while a daemon serves it and a frontend has it mapped. `status`, the `events`
//! stream, the metrics and the log say what happened, at once (no periodic
//! verification is asked for), and an idle guard does not wake up on its own.
//! Under `direct` (a DAX filesystem only) the same change downgrades: that is
//! tested on a real file in the guard's unit tests, where the policy can be
//! forced, and in the DAX lab.
//!
//! Owns: these cases. Never needs root.

use std::{
    fs,
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vdp_testkit::daemon;
use vdp_testkit::daemon::{Daemon, Scratch, MIB2};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::prom;
use vhost_device_pmem::control;

/// Runs a host tool as an operator would; panics with its stderr if it fails.
fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every event of the daemon, recent ones first, as they come.
fn events(d: &Daemon) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    let ctl = d.control.clone();
    thread::spawn(move || {
        let _ = control::subscribe(&ctl, true, |line| {
            serde_json::from_str(line).is_ok_and(|v: Value| tx.send(v).is_ok())
        });
    });
    rx
}

fn wait_event(d: &Daemon, rx: &mpsc::Receiver<Value>, kind: &str) -> Value {
    let deadline = Instant::now() + daemon::TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["event"] == kind => return v,
            Ok(_) => {}
            Err(_) => panic!("no {kind} event; daemon log:\n{}", d.log_text()),
        }
    }
}

/// `vhost-device-pmem metrics` of the daemon, parsed strictly.
fn metrics(d: &Daemon) -> prom::Exposition {
    let out = Command::new(daemon::BIN)
        .args(["metrics", "--control-socket", d.control.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    prom::parse(&String::from_utf8(out.stdout).unwrap())
}

/// Serves `f.img` with a started, mapped frontend and no periodic verification.
fn serving(s: &Scratch) -> (Daemon, TestFrontend, std::path::PathBuf) {
    let file = s.backing_file("f.img", MIB2);
    let d = Daemon::start(s, "d", &file, &["--verify-interval", "0"]);
    let mut fe = TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    fe.map_region(0).unwrap();
    let st = d.status();
    assert!(st["guard"]["file_problem"].is_null(), "{st:#}");
    (d, fe, file)
}

/// What the daemon says once `change` happened: status, event, metric and log,
/// seen by a change notice (inotify) when `by_notice` (a lease break may see a
/// truncation first).
fn assert_reported(
    d: &Daemon,
    rx: &mpsc::Receiver<Value>,
    change: &str,
    says: &str,
    by_notice: bool,
) {
    let ev = wait_event(d, rx, "backing-file-changed");
    assert_eq!(ev["change"], change, "{ev}");
    assert!(ev["reason"].as_str().unwrap().contains(says), "{ev}");
    let st = d.status();
    let g = &st["guard"];
    assert_eq!(g["file_change"], change, "{st:#}");
    assert!(g["file_problem"].as_str().unwrap().contains(says), "{st:#}");
    assert_eq!(g["file_problems"], 1, "{st:#}");
    // A health problem, not a footnote: the top-level health says so too.
    assert_eq!(st["health"], "file-changed", "{st:#}");
    if by_notice {
        assert!(
            g["file_problem"].as_str().unwrap().contains("inotify"),
            "not seen by a change notice: {st:#}"
        );
    }
    let m = metrics(d);
    assert_eq!(m.value("vhost_device_pmem_backing_file_changed", &[]), 1.0);
    assert_eq!(
        m.value("vhost_device_pmem_backing_file_changes_total", &[]),
        1.0
    );
    let log = d.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains(says)),
        "{log}"
    );
}

#[test]
fn a_file_renamed_over_the_served_one_is_reported_at_once() {
    let s = Scratch::new();
    let (d, _fe, file) = serving(&s);
    let rx = events(&d);
    let other = s.path("other.img");
    fs::write(&other, vec![9u8; MIB2 as usize]).unwrap();
    tool("mv", &[other.to_str().unwrap(), file.to_str().unwrap()]);
    assert_reported(&d, &rx, "replaced", "renamed over", true);
    // The daemon still serves what it had open: the lease was never broken.
    let st = d.status();
    assert_eq!(st["guard"]["lease_breaks"], 0, "{st:#}");
}

#[test]
fn the_served_file_deleted_is_reported_at_once() {
    let s = Scratch::new();
    let (d, _fe, file) = serving(&s);
    let rx = events(&d);
    tool("rm", &[file.to_str().unwrap()]);
    assert_reported(&d, &rx, "deleted", "deleted", true);
}

#[test]
fn the_served_file_hard_linked_away_is_reported_at_once() {
    let s = Scratch::new();
    let (d, _fe, file) = serving(&s);
    let rx = events(&d);
    let away = s.path("away.img");
    tool("ln", &[file.to_str().unwrap(), away.to_str().unwrap()]);
    tool("rm", &[file.to_str().unwrap()]);
    assert_reported(&d, &rx, "moved", "moved away", true);
}

#[test]
fn the_served_file_truncated_is_reported_at_once() {
    let s = Scratch::new();
    let (d, _fe, file) = serving(&s);
    let rx = events(&d);
    // GNU truncate opens with O_NONBLOCK: the daemon's write lease fails its first
    // open with EAGAIN (and breaks); the lease is released at once, so the
    // operator's second try goes through.
    let deadline = Instant::now() + daemon::TIMEOUT;
    loop {
        let out = Command::new("truncate")
            .args(["-s", "1M", file.to_str().unwrap()])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Resource temporarily unavailable") && Instant::now() < deadline,
            "{err}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_reported(&d, &rx, "truncated", "truncated", false);
    assert_eq!(fs::metadata(&file).unwrap().len(), 1 << 20);
}

/// The voluntary context switches of the daemon's thread called `name`.
fn switches(pid: u32, name: &str) -> u64 {
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name) {
            let st = fs::read_to_string(t.join("status")).unwrap();
            return st
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        }
    }
    panic!("no thread {name} in {pid}");
}

#[test]
fn an_idle_guard_makes_no_wake_ups_of_its_own() {
    // The default verification interval (60 s) is far away: between two of them,
    // with nothing happening to the file, the guard thread sleeps in one poll.
    let s = Scratch::new();
    let file = s.backing_file("f.img", MIB2);
    let d = Daemon::start(&s, "d", &file, &[]);
    let before = switches(d.pid(), "guard");
    thread::sleep(Duration::from_secs(2));
    let after = switches(d.pid(), "guard");
    assert_eq!(
        after,
        before,
        "the idle guard woke up {} times",
        after - before
    );
    // And it still answers a notice at once.
    let rx = events(&d);
    tool("rm", &[file.to_str().unwrap()]);
    assert_reported(&d, &rx, "deleted", "deleted", true);
}

/// A QMP monitor that hot-plugs `id` without a fuss (this process plays QEMU: it
/// maps the file itself, so the export's mapping check finds it here).
fn obliging_monitor(listener: std::os::unix::net::UnixListener, size: u64) {
    use std::io::{BufRead, BufReader, Write};
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        writeln!(
            w,
            r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 1, "major": 11}}, "package": ""}}, "capabilities": []}}}}"#
        )
        .unwrap();
        let mut plugged = false;
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let req: Value = serde_json::from_str(&line).unwrap();
            line.clear();
            let ret = match req["execute"].as_str().unwrap() {
                "query-memory-devices" if plugged => serde_json::json!([{
                    "type": "nvdimm",
                    "data": {"id": "nv0", "addr": 4294967296u64, "size": size, "memdev": "/objects/mem-nv0"}
                }]),
                "query-memory-devices" => serde_json::json!([]),
                "device_add" => {
                    plugged = true;
                    serde_json::json!({})
                }
                _ => serde_json::json!({}),
            };
            writeln!(w, "{}", serde_json::json!({"return": ret, "id": req["id"]})).unwrap();
        }
    });
}

#[test]
fn an_nvdimm_export_reports_its_file_deleted_under_its_own_sandbox() {
    use std::os::{fd::AsRawFd, unix::net::UnixListener};
    let s = Scratch::new();
    let file = s.backing_file("nv.img", MIB2);
    // "QEMU" maps the file, shared, as memory-backend-file would.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    // SAFETY: a fresh shared mapping of an open file; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MIB2 as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let qmp = s.path("qmp.sock");
    obliging_monitor(UnixListener::bind(&qmp).unwrap(), MIB2);
    let ctl = s.path("nv.ctl");
    let log = s.path("nvdimm.log");
    let mut child = daemon::spawn(
        &[
            "nvdimm",
            "--file",
            file.to_str().unwrap(),
            "--mode",
            "volatile",
            "--qmp-socket",
            qmp.to_str().unwrap(),
            "--id",
            "nv0",
            "--control-socket",
            ctl.to_str().unwrap(),
        ],
        &log,
    );
    let mut status = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + daemon::TIMEOUT;
        loop {
            if let Ok(v) = control::call(&ctl, &control::Request::Status) {
                if pred(&v["status"]) {
                    return v["status"].clone();
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "the export exited ({st}): {}",
                    fs::read_to_string(&log).unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "never {what}: {}",
                fs::read_to_string(&log).unwrap()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    status("guarding", &|s| s["guard"]["watching"].is_boolean());
    tool("rm", &[file.to_str().unwrap()]);
    let st = status("the deletion reported", &|s| {
        !s["guard"]["file_change"].is_null()
    });
    assert_eq!(st["guard"]["file_change"], "deleted", "{st:#}");
    assert!(
        st["guard"]["file_problem"]
            .as_str()
            .unwrap()
            .contains("inotify"),
        "{st:#}"
    );
    assert_eq!(st["seccomp"], "enforce", "{st:#}");
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, MIB2 as usize) };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = daemon::wait_exit(&mut child);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        status.code().is_some(),
        "killed by a signal (SIGSYS?): {text}"
    );
}
