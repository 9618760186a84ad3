// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The other side of the matrix: an unlisted call is denied, counted once and the
//! daemon serves on; a call on the kill list still kills; a relative path without a
//! working directory is refused.
//!
//! Owns: these cases (through the debug builds' test hook). Never reaches into the
//! daemon.

use super::*;

/// Starts `serve` (absolute paths, stderr a file) with the test hook `hook`.
fn serve_with_hook(s: &Scratch, hook: &str) -> (Result<Run, String>, Layout) {
    let dir = s.dir.path().to_path_buf();
    s.backing_file("pmem.img", 2 * MIB2);
    let l = serve_layout(&dir, Paths::Absolute);
    let log = dir.join("hook.log");
    let child = Command::new(BIN)
        .args(&l.args)
        .env("RUST_LOG", "info")
        .env("VDP_SANDBOX_TEST_HOOK", hook)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut run = Run {
        child,
        log: Log::File(log),
        reader: None,
        control: l.control.clone(),
    };
    let ready = run.wait_ready();
    (ready.map(|()| run), l)
}

#[test]
fn an_unlisted_call_is_denied_counted_once_and_the_daemon_serves_on() {
    if !hook_compiled_in("an_unlisted_call_is_denied_counted_once_and_the_daemon_serves_on") {
        return;
    }
    let s = Scratch::new();
    let (run, l) = serve_with_hook(&s, "unlisted");
    let mut run = run.unwrap();
    let st = run.wait_status("one denial", |st| st["sandbox_denials"] == 1);
    assert!(
        st["services_failed"].as_array().unwrap().is_empty(),
        "{st:#}"
    );
    // The call got ENOSYS, the daemon serves on: a VMM connects and flushes.
    let mut fe = TestFrontend::connect_started(&l.socket).unwrap();
    assert_eq!(fe.flush(2).unwrap(), vec![0; 2], "{}", run.log.text());
    // Logged once with its number and name, sent as an event, in the metrics.
    let log = run.log.text();
    let line = format!(
        "seccomp: denied system call {} (getppid) on thread \"sandbox-hook\"",
        libc::SYS_getppid
    );
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert!(log.contains("test hook: getppid returned -1"), "{log}");
    // The backlog of events (read until the stream goes quiet).
    let sub = UnixStream::connect(&l.control).unwrap();
    let req = serde_json::to_string(&Request::Events { backlog: true }).unwrap();
    writeln!(&sub, "{req}").unwrap();
    sub.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let events: Vec<Value> = BufReader::new(sub)
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "sandbox-denied")
        .collect();
    assert_eq!(denied.len(), 1, "{events:?}");
    assert_eq!(denied[0]["syscall"], libc::SYS_getppid, "{events:?}");
    assert_eq!(denied[0]["name"], "getppid", "{events:?}");
    let m = control::request(&l.control, &Request::Metrics)
        .unwrap()
        .metrics
        .unwrap();
    assert!(
        m.lines().any(
            |x| x.starts_with("vhost_device_pmem_sandbox_denials_total{") && x.ends_with(" 1")
        ),
        "{m}"
    );
    drop(fe);
    assert_eq!(run.status()["sandbox_denials"], 1);
    let st = run.terminate();
    assert!(st.success(), "{st:?}\n{}", run.log.text());
}

#[test]
fn a_call_on_the_kill_list_still_kills() {
    if !hook_compiled_in("a_call_on_the_kill_list_still_kills") {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    let (run, _) = serve_with_hook(&s, "killed");
    // Killed at once (the hook runs as the filter goes on): while starting, or
    // right after.
    let (st, log, pid) = match run {
        Ok(mut run) => (run.wait_exit().signal(), run.log.text(), run.pid()),
        Err(e) => (daemon_exit_of(&e), e, 0),
    };
    assert_eq!(st, Some(libc::SIGSYS), "{log}");
    assert!(!log.contains("socket(AF_INET) returned"), "{log}");
    assert!(
        fs::read_to_string(dir.join("hook.log"))
            .unwrap()
            .contains("VDP_SANDBOX_TEST_HOOK=killed"),
        "{log}"
    );
    // The kernel logs a kill (audit type 1326, the call's number) where it audits.
    if let Some(lines) = audit_lines(pid).filter(|_| pid != 0) {
        let nr = format!("syscall={}", libc::SYS_socket);
        assert!(
            lines.is_empty() || lines.iter().any(|x| x.contains(&nr)),
            "{lines:?}"
        );
    }
}

/// The signal in "exited with signal: N (SIG...)" of a start-up error.
fn daemon_exit_of(e: &str) -> Option<i32> {
    let rest = e.split("signal: ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

/// A relative path option while the working directory is gone cannot be made
/// absolute: refused at start-up, naming the option, before anything is opened.
#[test]
fn a_relative_path_without_a_working_directory_is_refused() {
    let s = Scratch::new();
    let gone = s.path("gone");
    fs::create_dir(&gone).unwrap();
    for args in [
        "serve --socket-path /tmp/never.sock --file pmem.img",
        "nvdimm --id nv0 --qmp-socket /tmp/never.qmp --file nv.img",
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {0} && rmdir {0} && exec {BIN} {args}",
                gone.display()
            ))
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // A configuration that cannot be used: exit 2 (usage or error).
        assert_eq!(out.status.code(), Some(2), "{args}: {err}");
        assert!(
            err.contains("file \"pmem.img\": cannot make it absolute")
                || err.contains("file \"nv.img\": cannot make it absolute"),
            "{args}: {err}"
        );
        assert!(err.contains("give an absolute path"), "{err}");
        fs::create_dir(&gone).unwrap();
    }
}
