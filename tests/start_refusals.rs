// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Start-up refusals that keep the image whole, from the real binary: a path
//! option that names the backing file (the same path, a relative one, a hard link,
//! a symlink; `--metrics-file`, the sockets, a state record) is refused before
//! anything is written, and a file left immutable by a daemon that was killed
//! while serving it with `--seal` is refused with the `chattr -i` that frees it.
//!
//! Owns: these cases. The `--seal` case needs root, loop devices and mkfs.xfs:
//! without them it prints SKIPPED, unless VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    fs,
    os::unix::fs::symlink,
    path::Path,
    process::{Command, Stdio},
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{serve_fails, serve_fails_on, Daemon, Scratch, MIB2};
use vdp_testkit::loopfs;
use vdp_testkit::root;

/// Asserts `serve` with `args` refused to start, saying `option` names the
/// backing file, and `file` still holds `data`.
fn refused(s: &Scratch, args: &[&str], option: &str, file: &Path, data: &[u8]) {
    let (status, log) = serve_fails(s, args);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("{option} ")) && log.contains("names the backing file"),
        "{args:?}: {log}"
    );
    assert!(
        fs::read(file).unwrap() == data,
        "{args:?}: the image changed"
    );
}

#[test]
fn a_metrics_file_naming_the_backing_file_is_refused_by_path_link_or_symlink() {
    // The metrics file must be named *.prom: an image called so, or a link to an
    // image under such a name.
    let s = Scratch::new();
    let file = s.backing_file("vm.prom", MIB2);
    let data = fs::read(&file).unwrap();
    let sock = s.path("v.sock");
    let f = file.to_str().unwrap();
    let base = ["--socket-path", sock.to_str().unwrap(), "--file", f];
    let link = s.path("hard.prom");
    fs::hard_link(&file, &link).unwrap();
    let sym = s.path("sym.prom");
    symlink(&file, &sym).unwrap();
    for metrics in [f, link.to_str().unwrap(), sym.to_str().unwrap()] {
        let mut args = base.to_vec();
        args.extend(["--metrics-file", metrics]);
        refused(&s, &args, "--metrics-file", &file, &data);
    }
    // A relative path to it, from the daemon's working directory.
    let log = s.path("relative.log");
    let out = Command::new(daemon::BIN)
        .current_dir(s.dir.path())
        .args([
            "serve",
            "--socket-path",
            "v.sock",
            "--file",
            "vm.prom",
            "--metrics-file",
            "./vm.prom",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let text = fs::read_to_string(&log).unwrap();
    assert!(!out.success(), "{text}");
    assert!(text.contains("names the backing file"), "{text}");
    assert!(fs::read(&file).unwrap() == data);
    // And a metrics file of its own still works.
    let d = Daemon::start(
        &s,
        "ok",
        &file,
        &["--metrics-file", s.path("m.prom").to_str().unwrap()],
    );
    assert!(s.path("m.prom").exists(), "{}", d.log_text());
}

#[test]
fn sockets_and_state_records_naming_the_backing_file_are_refused() {
    let s = Scratch::new();
    let file = s.backing_file("f.img", MIB2);
    let data = fs::read(&file).unwrap();
    let f = file.to_str().unwrap();
    let sock = s.path("v.sock");
    let sock = sock.to_str().unwrap();
    refused(
        &s,
        &["--socket-path", f, "--file", f],
        "--socket-path",
        &file,
        &data,
    );
    for option in ["--control-socket", "--agent-socket"] {
        refused(
            &s,
            &["--socket-path", sock, "--file", f, option, f],
            option,
            &file,
            &data,
        );
    }
    // A state directory whose health record is a symlink to the image (planted,
    // or left by a mistaken `ln -s`).
    let state = s.path("state");
    fs::create_dir(&state).unwrap();
    let canonical = fs::canonicalize(&file).unwrap();
    let record = state.join(format!(
        "{}.health.json",
        vhost_device_pmem::state::escape_path(&canonical)
    ));
    symlink(&file, &record).unwrap();
    refused(
        &s,
        &[
            "--socket-path",
            sock,
            "--file",
            f,
            "--state-dir",
            state.to_str().unwrap(),
        ],
        "the health record (--state-dir)",
        &file,
        &data,
    );
}

#[test]
fn an_nvdimm_control_socket_naming_the_backing_file_is_refused() {
    let s = Scratch::new();
    let file = s.backing_file("nv.img", MIB2);
    let data = fs::read(&file).unwrap();
    let f = file.to_str().unwrap();
    let log = s.path("nvdimm.log");
    let mut child = daemon::spawn(
        &[
            "nvdimm",
            "--file",
            f,
            "--mode",
            "volatile",
            "--qmp-socket",
            s.path("qmp.sock").to_str().unwrap(),
            "--id",
            "nv0",
            "--control-socket",
            f,
        ],
        &log,
    );
    let status = daemon::wait_exit(&mut child);
    let text = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("--control-socket ") && text.contains("names the backing file"),
        "{text}"
    );
    assert!(fs::read(&file).unwrap() == data);
}

#[test]
fn a_file_left_immutable_by_a_killed_sealing_daemon_is_refused_naming_chattr() {
    if !root::prerequisites("start_refusals", &["mkfs.xfs", "chattr"]) {
        return;
    }
    let m = loopfs::LoopFs::new("mkfs.xfs", &["-q", "-f"], 320);
    let s = Scratch::new_in(&m.mnt());
    let file = s.backing_file("f.img", MIB2);
    let d = Daemon::start(&s, "sealed", &file, &["--seal"]);
    assert_eq!(d.status()["guard"]["sealed"], true, "{}", d.log_text());
    // Killed: no chance to clear the attribute.
    d.signal(libc::SIGKILL);
    drop(d);
    let sock = s.path("again.sock");
    let (status, log) = serve_fails_on(&s, &sock, &file, &["--seal"]);
    let hint = format!("chattr -i {}", file.display());
    let cleared = root::run("chattr", &["-i", file.to_str().unwrap()]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("immutable attribute"), "{log}");
    assert!(log.contains(&hint), "no `{hint}` in: {log}");
    cleared.unwrap();
    // What the hint says works.
    let d = Daemon::start(&s, "after", &file, &["--seal"]);
    assert_eq!(d.status()["guard"]["sealed"], true);
}
