// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the binary says, and where it says it: what tmpfs, ramfs and `volatile`
//! really give (the power-cut promise and the exit log), the journal's stream
//! (`JOURNAL_STREAM`), a terminal (a pty under `script`, the ioctls counted by
//! `strace`), and `--log-level` against `RUST_LOG` and the config file.
//!
//! Owns: these cases and the mounts they make. Never shares a mount or a daemon
//! between tests.

use super::*;

/// A mounted filesystem of `fstype` under `dir` (root), unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(fstype: &str, dir: PathBuf) -> Option<Self> {
        fs::create_dir_all(&dir).unwrap();
        root::run(
            "mount",
            &[
                "-t",
                fstype,
                "-o",
                "size=64m",
                "vdp-test",
                dir.to_str().unwrap(),
            ],
        )
        .ok()
        .map(|_| Self(dir))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = root::run("umount", &[self.0.to_str().unwrap()]);
    }
}

/// Serves `file` (with `extra`), returns `status.promise` and the log after SIGTERM.
fn promise_and_exit_log(s: &Scratch, name: &str, file: &Path, extra: &[&str]) -> (String, String) {
    let mut d = Daemon::start(s, name, file, extra);
    let promise = d.status()["promise"].as_str().unwrap().to_string();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success(), "{}", d.log_text());
    (promise, d.log_text())
}

#[test]
fn memory_only_filesystems_and_volatile_say_nothing_survives_a_power_cut() {
    let s = Scratch::new();
    // volatile on a disk filesystem.
    let f = s.backing_file("v.img", MIB2);
    let (promise, log) = promise_and_exit_log(&s, "v", &f, &["--mode", "volatile"]);
    assert!(promise.starts_with("NOTHING IS PERSISTENT"), "{promise}");
    assert!(!log.contains("data is durable"), "{log}");
    assert!(
        log.contains("policy volatile: nothing was made durable"),
        "{log}"
    );
    // datasync on a disk filesystem still says it is durable.
    let f = s.backing_file("d.img", MIB2);
    let (promise, log) = promise_and_exit_log(&s, "d", &f, &["--mode", "datasync"]);
    assert_eq!(
        promise,
        "each flush request is durable after one shared fdatasync"
    );
    assert!(log.contains("data is durable per policy datasync"), "{log}");

    // tmpfs: /dev/shm where it is one, else a mount.
    let shm = Path::new("/dev/shm");
    let on_shm = fs::File::open(shm)
        .ok()
        .and_then(|d| blockmap::filesystem_of(&d).ok())
        == Some(Filesystem::Tmpfs);
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut mounts = Vec::new();
    let mut dirs: Vec<(&str, PathBuf)> = Vec::new();
    let shm_scratch = on_shm.then(|| Scratch::new_in(shm));
    if let Some(sc) = &shm_scratch {
        dirs.push(("tmpfs", sc.dir.path().to_owned()));
    } else if is_root {
        mounts.extend(Mount::new("tmpfs", s.path("tmpfs")));
        dirs.push(("tmpfs", s.path("tmpfs")));
    }
    if is_root {
        mounts.extend(Mount::new("ramfs", s.path("ramfs")));
        dirs.push(("ramfs", s.path("ramfs")));
    } else {
        root::unavailable("memory_only_filesystems", "root (to mount a ramfs)");
    }
    assert!(!dirs.is_empty() || !is_root, "no tmpfs to test on");
    for (fs_name, dir) in &dirs {
        let file = dir.join("m.img");
        fs::write(&file, vec![1u8; MIB2 as usize]).unwrap();
        for mode in ["auto", "fsync"] {
            let name = format!("{fs_name}-{mode}");
            let (promise, log) = promise_and_exit_log(&s, &name, &file, &["--mode", mode]);
            assert!(
                promise.starts_with("NOTHING SURVIVES A POWER CUT"),
                "{fs_name} {mode}: {promise}"
            );
            assert!(
                promise.contains(&format!("the file is on {fs_name}")),
                "{promise}"
            );
            assert!(!log.contains("data is durable"), "{fs_name} {mode}: {log}");
            assert!(
                log.contains(
                    "memory only): the data does not survive a reboot or power cut; exiting"
                ),
                "{log}"
            );
        }
        let (promise, log) =
            promise_and_exit_log(&s, &format!("{fs_name}-v"), &file, &["--mode", "volatile"]);
        assert!(
            promise.contains(&format!("on {fs_name}, which keeps it in memory only")),
            "{promise}"
        );
        assert!(
            log.contains("nothing survives a reboot or power cut; exiting"),
            "{log}"
        );
        // check names the filesystem and says so too.
        let o = run(&["check", file.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
        let e = text(&o.stderr);
        assert!(e.contains(&format!("{fs_name} keeps files in memory only: nothing on it survives a reboot or power cut")), "{e}");
    }
    drop(shm_scratch);
    drop(mounts);
}

/// Runs the binary with stderr a unix stream socket whose device and inode are in
/// `JOURNAL_STREAM` (as systemd connects a service to the journal); `ready` runs
/// while it runs (it gets the child's pid). What arrived on the socket, and the
/// exit status.
fn under_journal(
    args: &[&str],
    env: &[(&str, &str)],
    ready: impl FnOnce(u32),
) -> (ExitStatus, String) {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let st = rustix::fs::fstat(&theirs).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(OwnedFd::from(theirs)));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    ready(child.id());
    let status = wait_exit(&mut child);
    let mut got = String::new();
    ours.set_read_timeout(Some(TIMEOUT)).unwrap();
    ours.read_to_string(&mut got).unwrap();
    (status, got)
}

#[test]
fn on_the_journal_stream_every_line_has_its_priority_and_no_colour_or_time() {
    let s = Scratch::new();
    // A command's error: priority 3.
    let gone = s.path("gone.ctl");
    let (status, got) = under_journal(
        &["status", "--control-socket", gone.to_str().unwrap()],
        &[],
        |_| {},
    );
    assert_eq!(status.code(), Some(2));
    assert!(
        got.starts_with("<3>error: cannot reach the daemon at "),
        "{got:?}"
    );

    // A daemon's life: warnings (volatile), info, an error (a bad range), the exit.
    let f = s.backing_file("j.img", MIB2);
    let ctl = s.path("j.ctl");
    let (status, got) = under_journal(
        &[
            "serve",
            "--mode",
            "volatile",
            "--socket-path",
            s.path("j.sock").to_str().unwrap(),
            "--control-socket",
            ctl.to_str().unwrap(),
            f.to_str().unwrap(),
        ],
        &[("RUST_LOG", "debug")],
        |pid| {
            wait_for_control(&ctl);
            let a = control::call(
                &ctl,
                &Request::BadblocksInject {
                    offset: 4096,
                    length: 512,
                },
            )
            .unwrap();
            assert_eq!(a["ok"], true, "{a}");
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        },
    );
    assert!(status.success(), "{got}");
    assert!(!got.contains('\x1b'), "{got:?}");
    let mut seen = std::collections::BTreeSet::new();
    for line in got.lines() {
        let (prio, msg) = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap_or_else(|| panic!("no priority prefix: {line:?}"));
        assert!(["3", "4", "6", "7"].contains(&prio), "{line:?}");
        // No timestamp and no "[... LEVEL target]" of the human format.
        assert!(!msg.starts_with('[') && !msg.starts_with("20"), "{line:?}");
        seen.insert(prio.to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["3", "4", "6", "7"],
        "{got}"
    );
    assert!(got.contains("<4>* VOLATILE MODE"), "{got}");
    assert!(got.contains("<3>media error (operator)"), "{got}");
    assert!(
        got.contains("<6>policy volatile: nothing was made durable"),
        "{got}"
    );

    // JOURNAL_STREAM naming something else: the human format.
    let (_, got) = under_journal(
        &["status", "--control-socket", gone.to_str().unwrap()],
        &[("JOURNAL_STREAM", "1:1")],
        |_| {},
    );
    assert!(got.starts_with("error: cannot reach"), "{got:?}");
}

#[test]
fn on_a_terminal_lines_are_coloured_without_an_ioctl_per_line() {
    let test = "on_a_terminal_lines_are_coloured_without_an_ioctl_per_line";
    if !root::have_tool("script") || !root::have_tool("strace") {
        root::unavailable(test, "the `script` and `strace` tools");
        return;
    }
    let s = Scratch::new();
    let f = s.backing_file("t.img", MIB2);
    let ctl = s.path("t.ctl");
    let trace = s.path("trace");
    // `script` gives the daemon a pty as stdin, stdout and stderr; strace records
    // every ioctl of every thread. The seccomp filter is on (enforce, the default).
    let inner = format!(
        "strace -f -qq -e trace=ioctl -o {} {BIN} serve --socket-path {} --control-socket {} {}",
        trace.display(),
        s.path("t.sock").display(),
        ctl.display(),
        f.display()
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pty_out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = pty_out.read_to_end(&mut b);
        b
    });
    wait_for_control(&ctl);
    // Ten log lines after the sandbox is in place: one per bad range.
    for i in 0..10u64 {
        let a = control::call(
            &ctl,
            &Request::BadblocksInject {
                offset: 4096 * (i + 1),
                length: 512,
            },
        )
        .unwrap();
        assert_eq!(a["ok"], true, "{a}");
    }
    let st = control::call(&ctl, &Request::Status).unwrap();
    let pid = st["status"]["pid"].as_i64().unwrap();
    assert_eq!(st["status"]["seccomp"], "enforce");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child);
    drop(child.stdin.take());
    let out = text(&reader.join().unwrap());
    assert!(status.success(), "{status}: {out}");
    let errors = out
        .lines()
        .filter(|l| l.contains("media error (operator)"))
        .count();
    assert_eq!(errors, 10, "{out}");
    assert!(out.contains("\x1b["), "no colour on a terminal: {out:?}");
    // One terminal check of stderr, at start-up: before the backing file is even
    // judged (its first FIEMAP), long before the sandbox and the ten lines.
    let trace = fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let is_check = |l: &&&str| l.contains("ioctl(2, TCGETS");
    let tty_checks = lines.iter().filter(is_check).count();
    let judged = lines
        .iter()
        .position(|l| l.contains("FS_IOC_FIEMAP"))
        .expect("a FIEMAP in the trace");
    assert!(
        tty_checks <= 1 && !lines[judged..].iter().any(|l| is_check(&l)),
        "{tty_checks} terminal checks of stderr for {} log lines:\n{trace}",
        out.lines().count()
    );
}

#[test]
fn the_log_level_flag_wins_over_rust_log_which_wins_over_the_config_file() {
    let s = Scratch::new();
    let missing = s.path("missing.img");
    let toml = s.path("p.toml");
    let lines = |flag: Option<&str>, rust_log: Option<&str>, file_level: &str| {
        fs::write(
            &toml,
            format!(
                "socket-path = \"{}\"\nfile = \"{}\"\nlog-level = \"{file_level}\"\n",
                s.path("l.sock").display(),
                missing.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", toml.to_str().unwrap()])
            .env_remove("RUST_LOG");
        if let Some(l) = flag {
            cmd.args(["--log-level", l]);
        }
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        let o = cmd.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
        text(&o.stderr).lines().count()
    };
    // The missing file is one error line.
    assert_eq!(lines(None, None, "error"), 1);
    assert_eq!(lines(None, None, "off"), 0);
    assert_eq!(lines(None, Some("error"), "off"), 1);
    assert_eq!(lines(None, Some("off"), "error"), 0);
    assert_eq!(lines(Some("error"), Some("off"), "off"), 1);
    assert_eq!(lines(Some("off"), Some("error"), "error"), 0);
}
