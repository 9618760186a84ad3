// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon as a test running *inside* a VM starts it (the DAX lab, the VM that
//! plays a host): the static binary as a child process, its log, its control socket.
//!
//! Owns: the child's lifetime (killed on drop) and the waits on it. Never decides what
//! a test asserts.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vhost_device_pmem::control::{self, Request};

/// How long the daemon may take to come up, to answer a status wait, or to exit (TCG).
const TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon started by a test inside a VM.
pub struct VmDaemon {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    log: PathBuf,
}

impl VmDaemon {
    /// `daemon serve --file FILE --socket-path DIR/NAME.sock --control-socket
    /// DIR/NAME.ctl EXTRA...`; returns once the control socket answers.
    pub fn start(daemon: &Path, file: &Path, dir: &Path, name: &str, extra: &[&str]) -> Self {
        let (socket, control, log) = (
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}.ctl")),
            dir.join(format!("{name}.log")),
        );
        let child = Command::new(daemon)
            .arg("serve")
            .arg("--file")
            .arg(file)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Self {
            child,
            socket,
            control,
            log,
        };
        let deadline = Instant::now() + TIMEOUT;
        while control::call(&d.control, &Request::Status).is_err() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited with {st}:\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not come up:\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a request that must succeed; the whole answer.
    pub fn call(&self, req: &Request) -> Value {
        let v = control::call(&self.control, req).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        v
    }

    pub fn status(&self) -> Value {
        self.call(&Request::Status)["status"].clone()
    }

    pub fn stats(&self) -> Value {
        self.call(&Request::Stats)["stats"].clone()
    }

    /// Polls `status` until `pred` holds.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {what}: {s:#}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait; the exit code, `None` if a signal ended it.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon ignored SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VmDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
