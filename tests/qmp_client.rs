// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `nvdimm`'s QMP client against monitors written here that misbehave, from the
//! real binary under its seccomp sandbox (`enforce`, the default): one that drips
//! a byte every half second is given up at `--qmp-timeout` (an absolute deadline
//! per exchange, not per read), and one that floods events before it answers
//! leaves the export's memory bounded.
//!
//! Owns: these fake monitors. Never needs root or QEMU.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    process::{Child, ExitStatus},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{Scratch, MIB2};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""}, "capabilities": ["oob"]}}"#;

/// `nvdimm --mode volatile` of a fresh file against the monitor at `qmp`.
fn export(s: &Scratch, qmp: &std::path::Path, timeout: &str) -> (Child, std::path::PathBuf) {
    let file = s.backing_file("nv.img", MIB2);
    let log = s.path("nvdimm.log");
    let child = daemon::spawn(
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
            "--qmp-timeout",
            timeout,
        ],
        &log,
    );
    (child, log)
}

fn exited(child: &mut Child, log: &std::path::Path) -> (ExitStatus, String) {
    let status = daemon::wait_exit(child);
    (status, fs::read_to_string(log).unwrap())
}

/// The peak resident set of `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_monitor_dripping_a_byte_per_half_second_is_given_up_at_the_timeout() {
    let s = Scratch::new();
    let sock = s.path("qmp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let f = finished.clone();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        // A minute of greeting at this rate.
        for b in format!("{GREETING}\n").bytes() {
            if conn.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(500));
        }
        f.store(true, Ordering::SeqCst);
    });
    let (mut child, log) = export(&s, &sock, "2");
    let (status, log) = exited(&mut child, &log);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("not done within 2s"),
        "no deadline error: {log}"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the export waited for the whole drip: {log}"
    );
}

#[test]
fn a_monitor_flooding_events_before_it_answers_leaves_memory_bounded() {
    let s = Scratch::new();
    let sock = s.path("qmp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (pid_tx, pid_rx) = mpsc::channel::<u32>();
    let (rss_tx, rss_rx) = mpsc::channel::<u64>();
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let pid = pid_rx.recv().unwrap();
        writeln!(w, "{GREETING}").unwrap();
        let answer = |r: &mut BufReader<UnixStream>, w: &mut UnixStream, flood: usize| {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            // Events of 900 KiB (under the line cap, over the events' budget),
            // 120 of them (105 MiB) before the answer.
            let payload = "e".repeat(900 << 10);
            for _ in 0..flood {
                writeln!(w, r#"{{"event": "FLOOD", "data": {{"s": "{payload}"}}}}"#).ok()?;
            }
            Some(req)
        };
        let req = answer(&mut r, &mut w, 0).unwrap();
        writeln!(w, r#"{{"return": {{}}, "id": {}}}"#, req["id"]).unwrap();
        let req = answer(&mut r, &mut w, 120).unwrap();
        assert_eq!(req["execute"], "query-memory-devices");
        writeln!(w, r#"{{"return": [], "id": {}}}"#, req["id"]).unwrap();
        // The next command is the hot-plug: measure, then refuse it.
        let req = answer(&mut r, &mut w, 0).unwrap();
        rss_tx.send(peak_rss_kib(pid)).unwrap();
        writeln!(
            w,
            r#"{{"error": {{"class": "GenericError", "desc": "no"}}, "id": {}}}"#,
            req["id"]
        )
        .unwrap();
        let mut rest = String::new();
        let _ = r.read_line(&mut rest);
    });
    // A generous deadline: the flood takes seconds through a debug build.
    let (mut child, log) = export(&s, &sock, "300");
    pid_tx.send(child.id()).unwrap();
    let rss = rss_rx
        .recv_timeout(Duration::from_secs(300))
        .unwrap_or_else(|_| panic!("{}", fs::read_to_string(&log).unwrap()));
    let (status, log) = exited(&mut child, &log);
    assert!(!status.success(), "{log}");
    assert!(log.contains("hot-plug refused by QEMU"), "{log}");
    // 105 MiB of events went by; a few MiB (one line, its parse) may be in use.
    eprintln!("peak RSS after the flood: {rss} KiB");
    assert!(
        rss < 48 << 10,
        "peak RSS {rss} KiB after a 105 MiB event flood\n{log}"
    );
}
