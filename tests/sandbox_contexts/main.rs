// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The context matrix of the seccomp sandbox: the real binary, under `--seccomp
//! enforce`, in each context users run it in, drives its serving path (a real
//! vhost-user frontend and flushes, the guest channel, a state save, the metrics
//! file; for `nvdimm` a QMP session, the mapping check and the guard) and is asked
//! afterwards: no call denied (`status.sandbox_denials == 0`), no service died, no
//! kernel audit line of a seccomp kill, and a clean exit at SIGTERM.
//!
//! The contexts: stderr a terminal (a pty), a pipe, a file, closed, a unix stream
//! socket with JOURNAL_STREAM as systemd sets it; every path option relative (on
//! the command line and in a relative config file) and absolute; RUST_BACKTRACE=1
//! with a panic in a service thread. And the other side: an unlisted call is
//! denied, counted and the daemon serves on; a call on the kill list still kills.
//!
//! Never reaches into the daemon: the binary runs as a child; the forced panic and
//! calls use its debug builds' `VDP_SANDBOX_TEST_HOOK` (compiled out of release
//! builds; those tests say so loudly and stop there in a release test run).

use std::{
    ffi::OsString,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            fs::MetadataExt,
            net::{UnixListener, UnixStream},
            process::{CommandExt, ExitStatusExt},
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::daemon;
use vdp_testkit::daemon::{Scratch, BIN, MIB2, TIMEOUT};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::procfs;
use vhost_device_pmem::{
    control::{self, Request},
    sandbox::FILTERS,
};

/// Where the daemon's stderr goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stderr {
    /// The slave side of a pty (openpty), TERM set: a terminal that takes colour.
    Pty,
    Pipe,
    File,
    /// fd 2 closed at exec.
    Closed,
    /// One end of a unix stream socket, JOURNAL_STREAM=dev:ino of it (as systemd
    /// connects a service's stderr to journald).
    Journal,
}

/// How the path options are given.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Paths {
    Absolute,
    /// Relative to the working directory, on the command line (with a relative
    /// `--config` holding other keys).
    RelativeFlags,
    /// Relative, in a config file named by a relative `--config`.
    RelativeConfig,
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    stderr: Stderr,
    paths: Paths,
    /// RUST_BACKTRACE=1 and a service thread that panics once the filter is on.
    panic: bool,
}

const fn cell(stderr: Stderr, paths: Paths) -> Cell {
    Cell {
        stderr,
        paths,
        panic: false,
    }
}

/// The daemon's log, however it is captured.
enum Log {
    Buffer(Arc<Mutex<Vec<u8>>>),
    File(PathBuf),
    None,
}

impl Log {
    fn text(&self) -> String {
        match self {
            Log::Buffer(b) => String::from_utf8_lossy(&b.lock().unwrap()).into_owned(),
            Log::File(p) => fs::read_to_string(p).unwrap_or_default(),
            Log::None => "(stderr closed: no log)".into(),
        }
    }
}

/// Copies everything `r` yields into the buffer until its end (or EIO: a pty's
/// master once the last slave closed).
fn capture(mut r: impl Read + Send + 'static) -> (Log, thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let h = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (Log::Buffer(buf), h)
}

/// A running daemon of one cell.
struct Run {
    child: Child,
    log: Log,
    reader: Option<thread::JoinHandle<()>>,
    control: PathBuf,
}

impl Run {
    /// Starts `BIN args` in `cwd` with stderr as `stderr` and `env`; returns once
    /// the control socket (`control`, absolute) answers.
    fn start(
        args: &[OsString],
        cwd: &Path,
        stderr: Stderr,
        env: &[(&str, &str)],
        control: PathBuf,
        scratch: &Scratch,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LOG_STYLE")
            .env_remove("NO_COLOR")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut keep: Option<OwnedFd> = None;
        let mut log = Log::None;
        match stderr {
            Stderr::Pty => {
                let (mut master, mut slave) = (0, 0);
                // SAFETY: openpty with valid out-pointers and no name/termios/size.
                let rc = unsafe {
                    libc::openpty(
                        &mut master,
                        &mut slave,
                        std::ptr::null_mut(),
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
                // SAFETY: fresh descriptors we own.
                let (master, slave) =
                    unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
                cmd.stderr(slave).env("TERM", "xterm-256color");
                keep = Some(master.into());
            }
            Stderr::Pipe => {
                cmd.stderr(Stdio::piped());
            }
            Stderr::File => {
                let p = scratch.path(&format!("daemon-{}.log", args.len()));
                cmd.stderr(File::create(&p).unwrap());
                log = Log::File(p);
            }
            Stderr::Closed => {
                cmd.stderr(Stdio::null());
                // SAFETY: close(2) between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::close(2);
                        Ok(())
                    });
                }
            }
            Stderr::Journal => {
                let (ours, theirs) = UnixStream::pair().unwrap();
                let st = fs::metadata(format!("/proc/self/fd/{}", theirs.as_raw_fd())).unwrap();
                cmd.env("JOURNAL_STREAM", format!("{}:{}", st.dev(), st.ino()))
                    .stderr(OwnedFd::from(theirs));
                keep = Some(ours.into());
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn {BIN}: {e}"))?;
        // Our copies of the child's ends are closed by now (moved into `cmd`,
        // dropped with it): the readers see the end when the daemon exits.
        drop(cmd);
        let mut reader = None;
        match (stderr, keep) {
            (Stderr::Pty | Stderr::Journal, Some(fd)) => {
                let (l, h) = capture(File::from(fd));
                log = l;
                reader = Some(h);
            }
            (Stderr::Pipe, _) => {
                let (l, h) = capture(child.stderr.take().unwrap());
                log = l;
                reader = Some(h);
            }
            _ => {}
        }
        let mut run = Run {
            child,
            log,
            reader,
            control,
        };
        run.wait_ready()?;
        Ok(run)
    }

    /// Returns once the control socket answers; an exit meanwhile is an error.
    fn wait_ready(&mut self) -> Result<(), String> {
        let run = self;
        let deadline = Instant::now() + TIMEOUT;
        while control::call(&run.control, &Request::Status).is_err() {
            if let Some(st) = run.child.try_wait().unwrap() {
                run.join_log();
                return Err(format!(
                    "exited with {st} while starting:\n{}",
                    run.log.text()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "no control socket within {TIMEOUT:?}:\n{}",
                run.log.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&self) -> Value {
        let v = control::call(&self.control, &Request::Status)
            .unwrap_or_else(|e| panic!("status: {e}\n{}", self.log.text()));
        assert_eq!(v["ok"], true, "{v}");
        v["status"].clone()
    }

    fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {what}: {s:#}\n{}",
                self.log.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn join_log(&mut self) {
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }

    /// SIGTERM, and the exit status (the log complete).
    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let st = daemon::wait_exit(&mut self.child);
        self.join_log();
        st
    }

    /// Waits for the daemon to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let st = daemon::wait_exit(&mut self.child);
        self.join_log();
        st
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kernel log lines of a seccomp kill or log action (audit type 1326) for `pid`;
/// None when the kernel log cannot be read (not root).
fn audit_lines(pid: u32) -> Option<Vec<String>> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let pid = format!(" pid={pid} ");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("type=1326") && l.contains(&pid))
            .map(str::to_string)
            .collect(),
    )
}

/// What every cell asserts once its serving path ran: enforce on every thread,
/// no denial, no dead service (unless the cell panics one on purpose), no kill.
fn assert_clean(run: &Run, st: &Value, panicked: bool) {
    let log = run.log.text();
    assert_eq!(st["seccomp"], "enforce", "{st:#}");
    assert_eq!(st["sandbox_denials"], 0, "{st:#}\n{log}");
    let failed = st["services_failed"].as_array().unwrap();
    if panicked {
        assert_eq!(failed.len(), 1, "{st:#}\n{log}");
        assert_eq!(failed[0]["service"], "sandbox-hook", "{st:#}");
    } else {
        assert!(failed.is_empty(), "{st:#}\n{log}");
    }
    for (name, mode, filters) in procfs::thread_modes(run.pid()) {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", FILTERS.to_string().as_str()),
            "{name}"
        );
    }
    assert!(!log.contains("seccomp: denied"), "{log}");
}

/// After SIGTERM: a clean exit and no kernel audit line of a seccomp action.
fn assert_clean_exit(run: &mut Run) -> String {
    let pid = run.pid();
    let st = run.terminate();
    let log = run.log.text();
    assert_eq!(st.signal(), None, "killed: {st:?}\n{log}");
    assert!(st.success(), "{st:?}\n{log}");
    if let Some(lines) = audit_lines(pid) {
        assert!(lines.is_empty(), "{lines:?}");
    }
    log
}

/// The path options of one cell: the arguments and the absolute paths the test
/// talks to.
struct Layout {
    args: Vec<OsString>,
    control: PathBuf,
    socket: PathBuf,
    agent: PathBuf,
    state: PathBuf,
    metrics: PathBuf,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// The `serve` arguments of `paths` in scratch directory `dir` (also the working
/// directory), for backing file `pmem.img`.
fn serve_layout(dir: &Path, paths: Paths) -> Layout {
    fs::create_dir_all(dir.join("run")).unwrap();
    fs::create_dir_all(dir.join("state")).unwrap();
    fs::create_dir_all(dir.join("metrics")).unwrap();
    fs::create_dir_all(dir.join("conf")).unwrap();
    let rel = [
        ("socket-path", "run/pmem.sock"),
        ("file", "pmem.img"),
        ("control-socket", "run/pmem.ctl"),
        ("agent-socket", "run/pmem.agent"),
        ("state-dir", "state"),
        ("metrics-file", "metrics/pmem.prom"),
    ];
    let other = "mode = \"fsync\"\nmetrics-interval = 1\n";
    let mut args = os(&["serve"]);
    match paths {
        Paths::Absolute => {
            fs::write(dir.join("conf/pmem.toml"), other).unwrap();
            for (k, v) in rel {
                args.push(format!("--{k}").into());
                args.push(dir.join(v).into());
            }
            args.push("--config".into());
            args.push(dir.join("conf/pmem.toml").into());
        }
        Paths::RelativeFlags => {
            fs::write(dir.join("conf/pmem.toml"), other).unwrap();
            for (k, v) in rel {
                args.push(format!("--{k}").into());
                args.push(v.into());
            }
            args.extend(os(&["--config", "conf/pmem.toml"]));
        }
        Paths::RelativeConfig => {
            let mut text = other.to_string();
            for (k, v) in rel {
                text += &format!("{k} = \"{v}\"\n");
            }
            fs::write(dir.join("conf/pmem.toml"), text).unwrap();
            args.extend(os(&["--config", "conf/pmem.toml"]));
        }
    }
    args.extend(os(&["--seccomp", "enforce"]));
    Layout {
        args,
        control: dir.join("run/pmem.ctl"),
        socket: dir.join("run/pmem.sock"),
        agent: dir.join("run/pmem.agent"),
        state: dir.join("state"),
        metrics: dir.join("metrics/pmem.prom"),
    }
}

/// Connects as the guest agent's port and reads the daemon's hello.
fn agent_hello(path: &Path) -> (UnixStream, Value) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    (s, serde_json::from_str(&line).unwrap())
}

/// A bad range injected through the control socket, saved in the state directory
/// (a state record written under the filter).
fn inject_and_see_it_saved(control: &Path, state: &Path) {
    let v = control::call(
        control,
        &Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["persist_error"].is_null(), "{v}");
    let saved = fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".badblocks.json"))
        .unwrap_or_else(|| panic!("no bad-range record in {}", state.display()));
    assert!(fs::read_to_string(&saved).unwrap().contains("4096"));
}

fn env_of(c: &Cell) -> Vec<(&'static str, &'static str)> {
    if c.panic {
        vec![("RUST_BACKTRACE", "1"), ("VDP_SANDBOX_TEST_HOOK", "panic")]
    } else {
        vec![]
    }
}

/// In a release test run the binary has no test hook: say so loudly, and stop.
fn hook_compiled_in(test: &str) -> bool {
    if cfg!(debug_assertions) {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {test}: needs the debug build's VDP_SANDBOX_TEST_HOOK \
         (run without --release)\n"
    );
    false
}

/// One `serve` cell: start, a frontend connects and flushes, the agent gets its
/// hello, a bad range is saved, the metrics file is rewritten with the
/// connection counted; then the checks and a clean SIGTERM.
fn serve_cell(c: Cell) {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let before = fs::read(&file).unwrap();
    let l = serve_layout(&dir, c.paths);
    let mut run = Run::start(&l.args, &dir, c.stderr, &env_of(&c), l.control.clone(), &s)
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    if c.panic {
        run.wait_status("the forced panic", |st| {
            !st["services_failed"].as_array().unwrap().is_empty()
        });
    }
    let mut fe = TestFrontend::connect_started(&l.socket)
        .unwrap_or_else(|e| panic!("{c:?}: {e}\n{}", run.log.text()));
    assert_eq!(fe.flush(3).unwrap(), vec![0; 3], "{}", run.log.text());
    let (_agent, hello) = agent_hello(&l.agent);
    assert_eq!(hello["type"], "hello", "{hello}");
    inject_and_see_it_saved(&l.control, &l.state);
    // A metrics file written under the filter (the first one is written before it).
    let deadline = Instant::now() + TIMEOUT;
    while !fs::read_to_string(&l.metrics)
        .unwrap_or_default()
        .lines()
        .any(|x| x.starts_with("vhost_device_pmem_connections_total{") && x.ends_with(" 1"))
    {
        assert!(Instant::now() < deadline, "{}", run.log.text());
        thread::sleep(Duration::from_millis(50));
    }
    let st = run.status();
    assert!(st["connected"].as_bool().unwrap(), "{st:#}");
    // Relative or not, the daemon works with absolute paths from start-up on.
    assert_eq!(st["file"], file.display().to_string(), "{st:#}");
    assert_eq!(st["socket"], l.socket.display().to_string(), "{st:#}");
    assert_clean(&run, &st, c.panic);
    drop(fe);
    let log = assert_clean_exit(&mut run);
    check_log(&c, &log);
    // Nothing of the log went into the file (fd 2 closed: std reopens it on
    // /dev/null before main, so the first open cannot take its number).
    assert_eq!(fs::read(&file).unwrap(), before, "the backing file changed");
}

/// What the log shows in each context.
fn check_log(c: &Cell, log: &str) {
    if c.stderr == Stderr::Closed {
        return;
    }
    assert!(log.contains("seccomp sandbox on (enforce)"), "{log}");
    if c.stderr == Stderr::Pty {
        // The style was chosen at start-up on a terminal: colour, and no per-line
        // terminal test (it would be a denied ioctl).
        assert!(log.contains("\x1b["), "no colour on a terminal: {log:?}");
    } else {
        assert!(!log.contains("\x1b["), "colour off a terminal: {log:?}");
    }
    if c.panic {
        assert!(
            log.contains("forced by VDP_SANDBOX_TEST_HOOK=panic"),
            "{log}"
        );
        // std's backtrace printer ran under the filter (RUST_BACKTRACE=1).
        assert!(log.contains("stack backtrace:"), "{log}");
        assert!(log.contains("service thread sandbox-hook died"), "{log}");
    }
}

macro_rules! cells {
    ($runner:ident: $($name:ident => $cell:expr,)*) => {$(
        #[test]
        fn $name() {
            let c: Cell = $cell;
            if c.panic && !hook_compiled_in(stringify!($name)) {
                return;
            }
            $runner(c);
        }
    )*};
}

cells! { serve_cell:
    serve_stderr_pty => cell(Stderr::Pty, Paths::Absolute),
    serve_stderr_pipe => cell(Stderr::Pipe, Paths::Absolute),
    serve_stderr_file => cell(Stderr::File, Paths::Absolute),
    serve_stderr_closed => cell(Stderr::Closed, Paths::Absolute),
    serve_stderr_journal_stream => cell(Stderr::Journal, Paths::Absolute),
    serve_relative_paths_on_the_command_line => cell(Stderr::File, Paths::RelativeFlags),
    serve_relative_paths_in_a_relative_config_file => cell(Stderr::File, Paths::RelativeConfig),
    serve_rust_backtrace_and_a_panicking_service_on_a_pty =>
        Cell { panic: true, ..cell(Stderr::Pty, Paths::RelativeFlags) },
}

/// The other side: what a denial costs, and what still kills.
mod denials;
/// The `nvdimm` cells, against a fake QMP monitor in this process.
mod nvdimm;
