// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Runs the real `vhost-device-pmem` binary for tests: a backing file in a temporary
//! directory, the daemon as a child process (killed on drop), its log, and its
//! control socket.
//!
//! Include it with `#[path = "support/daemon.rs"] mod daemon;`.
#![allow(dead_code)]

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

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-pmem");
pub const MIB2: u64 = 2 << 20;
/// How long a daemon may take to come up or to exit.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A scratch directory for sockets, logs and backing files.
pub struct Scratch {
    pub dir: tempfile::TempDir,
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

/// A running daemon. Dropping it kills the process.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

/// Starts the binary with `args`, stderr (the log) to `log`.
pub fn spawn(args: &[&str], log: &Path) -> Child {
    spawn_prepared(args, log, |_| {})
}

/// As [`spawn`], with `prepare` changing the command first (another uid, a
/// descriptor limit).
pub fn spawn_prepared(args: &[&str], log: &Path, prepare: impl FnOnce(&mut Command)) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    prepare(&mut cmd);
    cmd.spawn().unwrap()
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
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not exit within {TIMEOUT:?}");
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
        let socket = scratch.path(&format!("{name}.sock"));
        Self::launch(scratch, &socket, name, file, extra)
    }

    /// As [`Self::start`], on a given vhost-user socket path.
    pub fn start_on(
        scratch: &Scratch,
        socket: &Path,
        name: &str,
        file: &Path,
        extra: &[&str],
    ) -> Self {
        Self::launch(scratch, socket, name, file, extra).unwrap_or_else(|log| panic!("{log}"))
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
        let socket = scratch.path(&format!("{name}.sock"));
        Self::launch_prepared(scratch, &socket, name, file, extra, prepare)
            .unwrap_or_else(|log| panic!("{log}"))
    }

    fn launch(
        scratch: &Scratch,
        socket: &Path,
        name: &str,
        file: &Path,
        extra: &[&str],
    ) -> Result<Self, String> {
        Self::launch_prepared(scratch, socket, name, file, extra, |_| {})
    }

    fn launch_prepared(
        scratch: &Scratch,
        socket: &Path,
        name: &str,
        file: &Path,
        extra: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Self, String> {
        let control = scratch.path(&format!("{name}.ctl"));
        let log = scratch.path(&format!("{name}.log"));
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
        let mut d = Daemon {
            child: spawn_prepared(&args, &log, prepare),
            socket: socket.to_owned(),
            control,
            log,
        };
        let deadline = Instant::now() + TIMEOUT;
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
                    "the daemon did not come up within {TIMEOUT:?}:\n{}",
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

    fn call(&self, req: Request, key: &str) -> Value {
        let v = control::call(&self.control, &req).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        v[key].clone()
    }

    /// The `status` document.
    pub fn status(&self) -> Value {
        self.call(Request::Status, "status")
    }

    /// The `stats` document.
    pub fn stats(&self) -> Value {
        self.call(Request::Stats, "stats")
    }

    /// Polls `status` until `pred` holds; panics with the last status after [`TIMEOUT`].
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
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

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// Waits for the daemon to exit (after a signal).
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
