// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The binary as people and service managers run it: exit statuses and `error:`
//! lines of every kind of failure, `--json` with the protocol version, offsets as
//! they are listed, ranges outside the file refused, sizes QEMU cannot take, what
//! tmpfs, ramfs and `volatile` really give, the journal's stream (`JOURNAL_STREAM`),
//! a terminal (a pty under `script`, the ioctls counted by `strace`), `--log-level`
//! against `RUST_LOG` and the config file, and the vhost-user backend conventions
//! (`--print-capabilities`, `serve --fd`). A missing tool or privilege is a loud
//! skip (a failure under VDP_REQUIRE_ROOT_TESTS=1).

use std::{
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            net::{UnixListener, UnixStream},
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vdp_testkit::daemon::{wait_exit, Daemon, Scratch, BIN, MIB2, TIMEOUT};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::root;
use vhost_device_pmem::{
    blockmap::{self, Filesystem},
    control::{self, Request},
};

/// What the binary says, and where: the power-cut promise, the journal, a terminal, the log level.
mod what_it_says;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts exit `code` and a stderr that is one `error: ...` line starting with
/// `start` (not a log line).
fn fails(o: &Output, code: i32, start: &str) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.starts_with(&format!("error: {start}")), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(!err.contains("ERROR") && !err.contains("\x1b"), "{err:?}");
    err
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", text(&o.stdout), text(&o.stderr)))
}

#[test]
fn every_kind_of_failure_has_its_exit_status_and_an_error_line() {
    let s = Scratch::new();
    let gone = s.path("gone.ctl");
    let gone = gone.to_str().unwrap();
    // The daemon cannot be reached: 2, with the cause.
    for cmd in ["status", "stats", "metrics"] {
        let e = fails(
            &run(&[cmd, "--control-socket", gone]),
            2,
            &format!("cannot reach the daemon at {gone}: caused by "),
        );
        assert!(e.contains("No such file or directory"), "{e}");
    }
    fails(
        &run(&["badblocks", "list", "--control-socket", gone]),
        2,
        "cannot reach the daemon",
    );
    fails(
        &run(&["events", "--control-socket", gone]),
        2,
        "events of the daemon",
    );
    // Usage: clap's own message and 2.
    for args in [
        &["badblocks", "list"][..],
        &["nosuchcommand"],
        &["health"],
        &[
            "badblocks",
            "inject",
            "0x1M",
            "512",
            "--control-socket",
            gone,
        ],
        &["serve", "--fd=3", "--socket-path", "/s", "/f"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).starts_with("error: "), "{args:?}");
    }
    // A file that cannot be read: 2.
    let missing = s.path("missing.img");
    let missing = missing.to_str().unwrap();
    fails(&run(&["check", missing]), 2, &format!("{missing}: "));
    let o = run(&["check", "--json", missing]);
    assert_eq!(
        (o.status.code(), json(&o)["v"].as_u64()),
        (Some(2), Some(1))
    );
    // prepare could not do it: 1.
    let dir = s.path("a-directory");
    fs::create_dir(&dir).unwrap();
    fails(&run(&["prepare", dir.to_str().unwrap()]), 1, "");
    // A daemon's configuration error: 2, logged (its errors are log lines).
    let o = run(&["serve", "--socket-path", "/s"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("missing file"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["nvdimm", "--config", missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("cannot read config file"),
        "{}",
        text(&o.stderr)
    );
    // A daemon that refuses its file: 1.
    let o = run(&[
        "serve",
        "--socket-path",
        s.path("x.sock").to_str().unwrap(),
        missing,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
}

#[test]
fn health_takes_the_file_as_an_argument_and_says_json_with_the_version() {
    let s = Scratch::new();
    let f = s.backing_file("h.img", MIB2);
    let f = f.to_str().unwrap();
    for args in [&["health", f][..], &["health", "--file", f]] {
        let o = run(args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains("healthy"), "{}", text(&o.stdout));
    }
    let v = json(&run(&["health", f, "--json"]));
    assert_eq!(
        (v["v"].as_u64(), v["healthy"].as_bool()),
        (Some(1), Some(true)),
        "{v}"
    );
    assert!(v["failure"].is_null());
}

#[test]
fn read_commands_print_json_with_the_version_and_refusals_exit_1() {
    let s = Scratch::new();
    let file = s.backing_file("r.img", 2 * MIB2);
    let d = Daemon::start(&s, "r", &file, &["--seccomp", "off"]);
    let ctl = d.control.to_str().unwrap().to_string();
    for cmd in ["status", "stats", "metrics"] {
        let o = run(&[cmd, "--json", "--control-socket", &ctl]);
        assert!(o.status.success(), "{cmd}: {}", text(&o.stderr));
        let v = json(&o);
        assert_eq!(
            (v["v"].as_u64(), v["ok"].as_bool()),
            (Some(1), Some(true)),
            "{cmd}: {v}"
        );
    }
    // status and stats are JSON without --json too; metrics is the exposition.
    assert_eq!(
        json(&run(&["status", "--control-socket", &ctl]))["status"]["size"],
        2 * MIB2
    );
    let m = run(&["metrics", "--control-socket", &ctl]);
    assert!(text(&m.stdout).starts_with("# HELP"), "{}", text(&m.stdout));

    // Offsets as they are listed: inject in hex, list, clear what the list says.
    let o = run(&[
        "badblocks",
        "inject",
        "0x200000",
        "0x200",
        "--control-socket",
        &ctl,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("recorded as bad: offset 0x200000 length 0x200"),
        "{}",
        text(&o.stdout)
    );
    let o = run(&["badblocks", "list", "--control-socket", &ctl]);
    let line = text(&o.stdout);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &words[..4],
        ["offset", "0x200000", "length", "0x200"],
        "{line}"
    );
    let v = json(&run(&[
        "badblocks",
        "list",
        "--json",
        "--control-socket",
        &ctl,
    ]));
    assert_eq!(v["v"], 1, "{v}");
    assert_eq!(v["ranges"][0]["offset"], 0x200000, "{v}");
    let o = run(&[
        "badblocks",
        "clear",
        words[1],
        words[3],
        "--control-socket",
        &ctl,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("cleared [0x200000, 0x200200)"),
        "{}",
        text(&o.stdout)
    );
    assert!(text(&o.stdout).contains("no bad ranges"));

    // Outside the 4 MiB file: refused, with the daemon's reason, exit 1.
    for args in [
        &["inject", "0x400000", "512"][..],
        &["inject", "4M", "1K"],
        &["clear", "0x3fffff", "2"],
    ] {
        let mut full = vec!["badblocks"];
        full.extend_from_slice(args);
        full.extend(["--control-socket", &ctl]);
        let e = fails(
            &run(&full),
            1,
            &format!("{ctl}: the daemon refused the request: "),
        );
        assert!(
            e.contains("is not inside the file: it has 0x400000 bytes"),
            "{e}"
        );
    }
    let v = json(&run(&[
        "badblocks",
        "list",
        "--json",
        "--control-socket",
        &ctl,
    ]));
    assert_eq!(v["ranges"], serde_json::json!([]), "{v}");
}

#[test]
fn a_size_qemu_aborts_on_fails_check_and_prepare_rounds_it_to_a_power_of_two() {
    let s = Scratch::new();
    let f = s.path("q.img");
    let f = f.to_str().unwrap();
    let o = run(&["prepare", f, "--size", "96M"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    if o.stderr.is_empty() {
        panic!("prepare of a 96 MiB file warned nothing");
    }
    let err = text(&o.stderr);
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        warning.contains("not a power of two") && warning.contains("--power-of-two"),
        "{warning}"
    );
    let o = run(&["check", f]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let out = text(&o.stdout);
    assert!(
        out.contains("problem for QEMU: 100663296 bytes is not a power of two"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "next: run `vhost-device-pmem prepare {f} --power-of-two`"
        )),
        "{out}"
    );
    let o = run(&["check", "--json", f]);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert_eq!(
        (
            v["v"].as_u64(),
            v["immutable"].as_bool(),
            v["qemu_size_ok"].as_bool()
        ),
        (Some(1), Some(true), Some(false)),
        "{v}"
    );
    assert!(
        v["qemu_problem"]
            .as_str()
            .unwrap()
            .contains("pci_register_bar"),
        "{v}"
    );
    // The fix the check names.
    let o = run(&["prepare", f, "--power-of-two"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("warning"), "{}", text(&o.stderr));
    assert_eq!(fs::metadata(f).unwrap().len(), 128 << 20);
    let o = run(&["check", "--json", f]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    assert_eq!(json(&o)["qemu_problem"], Value::Null);
}

fn wait_for_control(ctl: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while control::call(ctl, &Request::Status).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn print_capabilities_prints_json_and_ignores_everything_else() {
    for args in [
        &["--print-capabilities"][..],
        &["serve", "--no-such-option", "--print-capabilities"],
    ] {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        let v = json(&o);
        assert_eq!(v["type"], "pmem", "{v}");
        assert!(v["features"].as_array().is_some(), "{v}");
    }
}

/// Starts `serve --fd=5` with `listener` as descriptor 5.
fn serve_on_fd(listener: &impl AsRawFd, extra: &[&str], log: &Path) -> std::process::Child {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--fd=5", "--seccomp", "off"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    // SAFETY: dup2 is async-signal-safe; it gives the child the listener as fd 5
    // (without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn serve_fd_listens_on_the_inherited_descriptor() {
    let s = Scratch::new();
    let f = s.backing_file("fd.img", MIB2);
    let sock = s.path("fd.sock");
    let ctl = s.path("fd.ctl");
    let listener = UnixListener::bind(&sock).unwrap();
    let log = s.path("fd.log");
    let mut child = serve_on_fd(
        &listener,
        &[
            "--control-socket",
            ctl.to_str().unwrap(),
            f.to_str().unwrap(),
        ],
        &log,
    );
    drop(listener);
    wait_for_control(&ctl);
    let st = control::call(&ctl, &Request::Status).unwrap();
    assert_eq!(st["status"]["socket"], sock.to_str().unwrap(), "{st}");
    // A VMM connects to the path and flushes.
    let mut fe = TestFrontend::connect_started(&sock)
        .unwrap_or_else(|e| panic!("{e}\n{}", fs::read_to_string(&log).unwrap()));
    assert_eq!(fe.flush(1).unwrap(), vec![0]);
    drop(fe);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child).success());
    // The daemon never unlinks a socket it was given.
    assert!(sock.exists());

    // Not a listening socket: a usage error naming --fd.
    let (a, _b) = UnixStream::pair().unwrap();
    let mut child = serve_on_fd(&a, &[f.to_str().unwrap()], &log);
    assert_eq!(wait_exit(&mut child).code(), Some(2));
    let l = fs::read_to_string(&log).unwrap();
    assert!(
        l.contains("inherited descriptor 5 (--fd) is not a listening unix stream socket"),
        "{l}"
    );
    let o = run(&["serve", "--fd=77", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("not an open descriptor"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn completions_and_the_exit_status_table_are_there() {
    let o = run(&["completions", "bash"]);
    assert!(o.status.success());
    let bash = text(&o.stdout);
    assert!(bash.contains("complete") && bash.contains("badblocks") && bash.contains("health"));
    assert!(!bash.contains("generate-docs"));
    assert!(run(&["completions", "nosuchshell"]).status.code() == Some(2));
    // The same exit statuses in --help and in the README's table.
    let help = text(&run(&["--help"]).stdout);
    let table = help
        .split("Exit status (every subcommand):")
        .nth(1)
        .expect("an exit status section in --help");
    let codes_of = |t: &str, pick: &dyn Fn(&str) -> Option<String>| -> Vec<String> {
        t.lines().filter_map(pick).collect()
    };
    let help_codes = codes_of(table, &|l: &str| {
        let w = l.split_whitespace().next()?;
        (w.parse::<u8>().is_ok() && l.starts_with("  ") && !l.starts_with("      "))
            .then(|| w.to_string())
    });
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Exit status")
        .nth(1)
        .expect("README: ## Exit status");
    let section = section.split("\n## ").next().unwrap();
    let readme_codes = codes_of(section, &|l: &str| {
        let cell = l.strip_prefix("| ")?.split(" |").next()?.trim();
        cell.parse::<u8>().is_ok().then(|| cell.to_string())
    });
    assert_eq!(help_codes, ["0", "1", "2", "75"], "{table}");
    assert_eq!(readme_codes, help_codes, "{section}");
}
