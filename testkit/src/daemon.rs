// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Runs the real `vhost-device-pmem` binary for tests: a backing file in a temporary
//! directory, the daemon as a child process (killed on drop), its log, and its
//! control socket; and the `nvdimm` export the same way ([`Export`]).
//!
//! Owns: the one daemon wrapper ([`Daemon`]) for the host, a guest and a VM that
//! plays a host, the one export wrapper ([`Export`]), their lifetimes and their
//! waits ([`Daemon::wait_status`], [`Export::wait_verified`]). Never decides what a
//! test asserts.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vhost_device_pmem::control::{self, Request};

pub use crate::BIN;
pub const MIB2: u64 = 2 << 20;
/// How long a daemon on this host may take to come up, to show a status, or to exit.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The same for a daemon serving a guest ([`Daemon::for_guest`]) or started in a VM
/// ([`Daemon::in_vm`]): TCG shares the two cores.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory for sockets, logs and backing files.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("vdp-test")
                .tempdir()
                .unwrap(),
        }
    }

    /// A scratch directory under `parent` (to choose the filesystem it is on).
    pub fn new_in(parent: &Path) -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("vdp-test")
                .tempdir_in(parent)
                .unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A backing file of `size` bytes, every byte written (non-zero) and synced, so
    /// its block map holds no holes, delayed or unwritten extents; mode 0600.
    pub fn backing_file(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        let chunk: Vec<u8> = (0..1 << 16).map(|i| (i % 251 + 1) as u8).collect();
        let mut left = size as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        f.sync_all().unwrap();
        path
    }
}

/// A running daemon (`serve`): the one wrapper the host tests, the guest tests and
/// the tests run inside a VM share. Dropping it kills the process.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    /// How long it may take to come up, to show a status, or to exit.
    timeout: Duration,
}

/// Where a daemon's sockets and log go and how it runs; see [`Daemon::launch`].
pub struct Launch<'a> {
    /// The binary: `None` for [`BIN`] (found only when used: a test running in a
    /// VM has no cargo target directory), or a static one in a VM.
    pub bin: Option<&'a Path>,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    /// `RUST_LOG` of the daemon.
    pub rust_log: &'a str,
    pub timeout: Duration,
}

impl<'a> Launch<'a> {
    /// `<name>.sock`, `<name>.ctl` and `<name>.log` in `dir`, [`BIN`] at `info`
    /// with [`TIMEOUT`].
    pub fn named(dir: &Path, name: &str) -> Self {
        Self {
            bin: None,
            socket: dir.join(format!("{name}.sock")),
            control: dir.join(format!("{name}.ctl")),
            log: dir.join(format!("{name}.log")),
            rust_log: "info",
            timeout: TIMEOUT,
        }
    }
}

/// Starts the binary with `args`, stderr (the log) to `log`.
pub fn spawn(args: &[&str], log: &Path) -> Child {
    spawn_prepared(args, log, |_| {})
}

/// As [`spawn`], with `prepare` changing the command first (another uid, a
/// descriptor limit).
pub fn spawn_prepared(args: &[&str], log: &Path, prepare: impl FnOnce(&mut Command)) -> Child {
    spawn_bin(BIN.path(), "info", args, log, prepare)
}

fn spawn_bin(
    bin: &Path,
    rust_log: &str,
    args: &[&str],
    log: &Path,
    prepare: impl FnOnce(&mut Command),
) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    prepare(&mut cmd);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
}

/// Makes `cmd`'s process start with a descriptor limit of `n` (soft and hard),
/// set with setrlimit(2) in the child, as a service manager's `LimitNOFILE=` does.
pub fn limit_descriptors(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes one system call.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
}

/// Waits for `child` to exit, killing it (and failing) after [`TIMEOUT`].
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    wait_exit_within(child, TIMEOUT, "the daemon")
}

/// Waits for `child` (`what`) to exit, killing it (and failing) after `timeout`.
pub fn wait_exit_within(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `serve` with `args` expecting it to refuse to start; returns exit status and log.
pub fn serve_fails(scratch: &Scratch, args: &[&str]) -> (ExitStatus, String) {
    let log = scratch.path(&format!("refused-{}.log", std::process::id()));
    let mut full = vec!["serve"];
    full.extend_from_slice(args);
    let mut child = spawn(&full, &log);
    let status = wait_exit(&mut child);
    (status, fs::read_to_string(&log).unwrap())
}

/// As [`serve_fails`], for the common case: `serve --socket-path SOCK --file FILE`
/// and `extra`.
pub fn serve_fails_on(
    scratch: &Scratch,
    sock: &Path,
    file: &Path,
    extra: &[&str],
) -> (ExitStatus, String) {
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    serve_fails(scratch, &args)
}

impl Daemon {
    /// Serves `file` on `<name>.sock` with control socket `<name>.ctl`, plus `extra`
    /// flags; returns once the control socket answers.
    pub fn start(scratch: &Scratch, name: &str, file: &Path, extra: &[&str]) -> Self {
        Self::start_on(
            scratch,
            &scratch.path(&format!("{name}.sock")),
            name,
            file,
            extra,
        )
    }

    /// As [`Self::start`], but a daemon that refuses to start is an `Err` with its log.
    pub fn try_start(
        scratch: &Scratch,
        name: &str,
        file: &Path,
        extra: &[&str],
    ) -> Result<Self, String> {
        Self::launch(Launch::named(scratch.dir.path(), name), file, extra, |_| {})
    }

    /// As [`Self::start`], on a given vhost-user socket path.
    pub fn start_on(
        scratch: &Scratch,
        socket: &Path,
        name: &str,
        file: &Path,
        extra: &[&str],
    ) -> Self {
        let launch = Launch {
            socket: socket.to_owned(),
            ..Launch::named(scratch.dir.path(), name)
        };
        Self::launch(launch, file, extra, |_| {}).unwrap_or_else(|log| panic!("{log}"))
    }

    /// As [`Self::start`], with `prepare` changing the command first (see
    /// [`spawn_prepared`]).
    pub fn start_prepared(
        scratch: &Scratch,
        name: &str,
        file: &Path,
        extra: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        Self::launch(
            Launch::named(scratch.dir.path(), name),
            file,
            extra,
            prepare,
        )
        .unwrap_or_else(|log| panic!("{log}"))
    }

    /// The daemon a guest test boots QEMU against: `vu.sock`, `ctl.sock` and
    /// `daemon.log` in `dir`, logging at `debug`, [`GUEST_TIMEOUT`].
    pub fn for_guest(dir: &Path, file: &Path, extra: &[&str]) -> Self {
        let launch = Launch {
            socket: dir.join("vu.sock"),
            control: dir.join("ctl.sock"),
            log: dir.join("daemon.log"),
            rust_log: "debug",
            timeout: GUEST_TIMEOUT,
            ..Launch::named(dir, "daemon")
        };
        Self::launch(launch, file, extra, |_| {}).unwrap_or_else(|log| panic!("{log}"))
    }

    /// The daemon a test running *inside* a VM starts (the DAX lab, the VM that
    /// plays a host): the static binary `bin`, `<name>.sock`, `<name>.ctl` and
    /// `<name>.log` in `dir`, [`GUEST_TIMEOUT`].
    pub fn in_vm(bin: &Path, file: &Path, dir: &Path, name: &str, extra: &[&str]) -> Self {
        let launch = Launch {
            bin: Some(bin),
            timeout: GUEST_TIMEOUT,
            ..Launch::named(dir, name)
        };
        Self::launch(launch, file, extra, |_| {}).unwrap_or_else(|log| panic!("{log}"))
    }

    /// `serve --socket-path S --file FILE --control-socket C EXTRA...` as `launch`
    /// says, `prepare` changing the command first; returns once the control socket
    /// answers, or `Err` with the log if the daemon exits first.
    pub fn launch(
        launch: Launch,
        file: &Path,
        extra: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Self, String> {
        let Launch {
            bin,
            socket,
            control,
            log,
            rust_log,
            timeout,
        } = launch;
        let mut args = vec![
            "serve",
            "--socket-path",
            socket.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let bin = bin.unwrap_or_else(|| BIN.path());
        let child = spawn_bin(bin, rust_log, &args, &log, prepare);
        let mut d = Daemon {
            child,
            socket: socket.clone(),
            control: control.clone(),
            log: log.clone(),
            timeout,
        };
        let deadline = Instant::now() + timeout;
        // The control socket is bound after the vhost-user one, and asking it does
        // not count as a VMM connection.
        while control::call(&d.control, &Request::Status).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                return Err(format!(
                    "the daemon exited with {status} while starting:\n{}",
                    d.log_text()
                ));
            }
            if Instant::now() > deadline {
                panic!(
                    "the daemon did not come up within {timeout:?}:\n{}",
                    d.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (its exit status, if not).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a request that must succeed (`"ok": true`); the whole answer.
    pub fn call(&self, req: &Request) -> Value {
        let v = control::call(&self.control, req)
            .unwrap_or_else(|e| panic!("control {}: {e}\n{}", req.name(), self.log_text()));
        assert_eq!(v["ok"], true, "{v}");
        v
    }

    /// The `status` document.
    pub fn status(&self) -> Value {
        self.call(&Request::Status)["status"].clone()
    }

    /// The `stats` document.
    pub fn stats(&self) -> Value {
        self.call(&Request::Stats)["stats"].clone()
    }

    /// Polls `status` until `pred` holds; panics with the last status after the
    /// daemon's timeout ([`TIMEOUT`], or [`GUEST_TIMEOUT`]).
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + self.timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("status never showed {what}: {s:#}\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls the log until it contains `needle`; panics with it after the timeout.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + self.timeout;
        while !self.log_text().contains(needle) {
            if Instant::now() > deadline {
                panic!("the daemon never logged {needle:?}:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// Waits for the daemon to exit (after a signal).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let what = format!("the daemon (its log: {})", self.log.display());
        wait_exit_within(&mut self.child, self.timeout, &what)
    }

    /// SIGTERM and wait; the exit code, `None` if a signal ended it.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.wait_exit().code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `nvdimm` export (the other front end): the one wrapper of the NVDIMM
/// guest tests and of the nested lab. Dropping it kills the process.
pub struct Export {
    child: Child,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Export {
    /// `bin nvdimm ARGS --control-socket DIR/NAME.ctl`, its log `DIR/NAME.log` at
    /// `rust_log`; returns at once (see [`Self::wait_verified`]).
    pub fn spawn(bin: &Path, dir: &Path, name: &str, args: &[&str], rust_log: &str) -> Self {
        let control = dir.join(format!("{name}.ctl"));
        let log = dir.join(format!("{name}.log"));
        let mut full = vec!["nvdimm"];
        full.extend_from_slice(args);
        full.extend(["--control-socket", control.to_str().unwrap()]);
        let child = spawn_bin(bin, rust_log, &full, &log, |_| {});
        Self {
            child,
            control,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (its exit status, if not).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The whole answer to `req`, `None` while the control socket does not answer.
    pub fn call(&self, req: &Request) -> Option<Value> {
        control::call(&self.control, req).ok()
    }

    /// The `status` document, `None` while the control socket does not answer.
    pub fn try_status(&self) -> Option<Value> {
        Some(self.call(&Request::Status)?["status"].clone())
    }

    /// The `status` document of an export that answers.
    pub fn status(&self) -> Value {
        let v = control::call(&self.control, &Request::Status)
            .unwrap_or_else(|e| panic!("the export's control socket: {e}\n{}", self.log_text()));
        assert_eq!(v["ok"], true, "{v}");
        v["status"].clone()
    }

    /// The event backlog, as far as it goes within a second.
    pub fn events(&self) -> Vec<Value> {
        use std::{
            io::{BufRead, BufReader},
            os::unix::net::UnixStream,
        };
        let s = UnixStream::connect(&self.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        writeln!(
            &s,
            "{}",
            serde_json::json!({"command": "events", "backlog": true})
        )
        .unwrap();
        BufReader::new(&s)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Waits until `status` shows QEMU's mapping verified; returns it. Panics if
    /// the export exits first or `timeout` passes.
    pub fn wait_verified(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                if s["nvdimm"]["mapping_verified"] == true {
                    return s;
                }
            }
            if let Some(st) = self.exited() {
                panic!("the NVDIMM export exited with {st}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the NVDIMM export never verified QEMU's mapping:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to end by itself; its exit code (-1: a signal).
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the export did not exit:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and [`Self::wait`] (20 s).
    pub fn terminate(&mut self) -> i32 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
