// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest channel under a real thread limit: a daemon running as a uid of its
//! own with RLIMIT_NPROC set (setrlimit in the child before exec), and other
//! processes of that uid taking what is left of the limit (RLIMIT_NPROC counts
//! every task of the user), so the reader thread of the next agent connection
//! cannot start. The failure is reported and retried, and once those processes
//! end the same connection gets its hello: the guest channel is not lost.
//!
//! Owns: this case. Needs root (setpriv to another uid): without it the test
//! prints SKIPPED, unless VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use std::os::unix::process::CommandExt;
use vdp_testkit::daemon;
use vdp_testkit::daemon::{Scratch, MIB2};
use vdp_testkit::root;
use vhost_device_pmem::control::{self, Request};

/// The names of the threads of `pid`.
fn threads(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

fn wait_for(what: &str, log: &Path, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "never: {what}\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's RLIMIT_NPROC: its uid's tasks, all processes counted.
const LIMIT: u64 = 40;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_reader_thread_that_cannot_start_is_retried_and_the_channel_survives() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 || !root::have_tool("setpriv") {
        root::unavailable(
            "thread_limits",
            "root and setpriv (a daemon under another uid)",
        );
        return;
    }
    // A uid of its own: RLIMIT_NPROC counts every task of the user.
    let uid = 3_900_000 + std::process::id() % 100_000;
    let s = Scratch::new();
    let file = s.backing_file("f.img", MIB2);
    for p in [s.dir.path(), file.as_path()] {
        std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    }
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let (sock, ctl, agent, log) = (
        s.path("v.sock"),
        s.path("c.sock"),
        s.path("agent.sock"),
        s.path("d.log"),
    );
    let id = uid.to_string();
    let mut cmd = Command::new("setpriv");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
        .arg(daemon::BIN)
        .args(["serve", "--socket-path"])
        .arg(&sock)
        .arg("--file")
        .arg(&file)
        .arg("--control-socket")
        .arg(&ctl)
        .arg("--agent-socket")
        .arg(&agent)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Killed(child);
    let pid = d.0.id();
    wait_for("the control socket answers", &log, || {
        control::call(&ctl, &Request::Status).is_ok()
    });
    // The control client thread of that call ends; then no thread comes or goes
    // by itself, and the limit is what there is.
    wait_for("the control client thread ends", &log, || {
        !threads(pid).iter().any(|t| t.starts_with("control-cl"))
    });
    // Other processes of the uid take the rest of the limit.
    let n = threads(pid).len() as u64;
    assert!(n < LIMIT, "{n} threads");
    let ballast: Vec<Killed> = (n..LIMIT)
        .map(|_| {
            Killed(
                Command::new("setpriv")
                    .args([
                        "--reuid",
                        &id,
                        "--regid",
                        &id,
                        "--clear-groups",
                        "sleep",
                        "600",
                    ])
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for b in &ballast {
        let comm = format!("/proc/{}/comm", b.0.id());
        wait_for("a ballast process runs as the uid", &log, || {
            fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
        });
    }
    // The agent connects: its reader thread cannot start.
    let conn = UnixStream::connect(&agent).unwrap();
    wait_for("the failed start is reported", &log, || {
        fs::read_to_string(&log)
            .unwrap()
            .contains("guest channel reader thread failed")
    });
    let before = threads(pid).len();
    // The shortage passes: the same connection gets its hello.
    drop(ballast);
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    let text = fs::read_to_string(&log).unwrap();
    let hello: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}\n{text}"));
    assert_eq!(hello["type"], "hello", "{line}");
    assert!(threads(pid).len() > before);
    let st = control::call(&ctl, &Request::Status).unwrap();
    let st = &st["status"];
    assert!(
        st["agent"]["thread_spawn_failures"].as_u64().unwrap() >= 1,
        "{st:#}"
    );
    assert_eq!(st["agent"]["connected"], true, "{st:#}");
    assert_eq!(st["services_failed"], serde_json::json!([]), "{st:#}");
    assert!(text.contains("started after"), "{text}");
}
