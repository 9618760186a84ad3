// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a test running *inside* a VM (the DAX lab, the nested lab) measures of the
//! daemon it started ([`crate::daemon::Daemon::in_vm`]): its sync syscalls under
//! strace, the VmFlags of its mappings, and a MAP_SYNC mapping of its own.
//!
//! Owns: the strace child and the mapping (both ended on drop). Never decides what
//! a test asserts.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::channel,
    thread,
    time::{Duration, Instant},
};

/// Syscalls that could make anything durable; none may happen during flushes.
pub const SYNC_CALLS: [&str; 6] = [
    "fsync",
    "fdatasync",
    "msync",
    "sync_file_range",
    "syncfs",
    "sync",
];

/// Counts the daemon's [`SYNC_CALLS`] and `extra` syscalls, all threads, while `f`
/// runs: strace attaches before and detaches after (its `-c` summary).
pub fn strace_window(
    strace: &Path,
    pid: u32,
    extra: &[&str],
    f: impl FnOnce(),
) -> BTreeMap<String, u64> {
    let names: Vec<&str> = SYNC_CALLS.iter().chain(extra).copied().collect();
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("strace.txt");
    let mut strace = Command::new(strace)
        .args(["-f", "-c", "-o"])
        .arg(&summary)
        .args(["-p", &pid.to_string(), "-e"])
        .arg(format!("trace={}", names.join(",")))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "strace: Process N attached with M threads" comes once every thread is.
    let (tx, rx) = channel();
    let stderr = strace.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("attached") => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("strace did not attach: {e}: {seen:?}"),
        }
    }
    f();
    // SIGINT: strace detaches from every thread and writes the summary.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    wait_child(&mut strace, "strace");
    let text = fs::read_to_string(&summary).unwrap();
    let mut counts: BTreeMap<String, u64> = names.iter().map(|n| (n.to_string(), 0)).collect();
    // "% time  seconds  usecs/call  calls  errors  syscall": calls is the fourth
    // column; errors may be empty, the name is always last.
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() {
            if let (Some(c), Ok(calls)) = (counts.get_mut(*cols.last().unwrap()), cols[3].parse()) {
                *c = calls;
            }
        }
    }
    let _ = writeln!(std::io::stderr(), "strace -c of pid {pid}:\n{text}");
    counts
}

pub fn wait_child(child: &mut Child, what: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The VmFlags lines of the mappings of process `pid` that `pick(start, perms,
/// path)` selects, from /proc/PID/smaps.
pub fn vm_flags(pid: u32, pick: impl Fn(usize, &str, &str) -> bool) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let mut current = false;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if current {
                out.push(flags.trim().to_string());
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        // A mapping header: "start-end perms offset dev inode [path]".
        if let Some((start, _)) = cols.first().and_then(|c| c.split_once('-')) {
            if let (Ok(start), Some(perms)) = (usize::from_str_radix(start, 16), cols.get(1)) {
                if cols.len() >= 5 && !cols[0].ends_with(':') {
                    current = pick(start, perms, cols.get(5).copied().unwrap_or(""));
                }
            }
        }
    }
    out
}

/// A MAP_SHARED_VALIDATE|MAP_SYNC read-write mapping of a whole file.
pub struct SyncMapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl SyncMapping {
    pub fn new(file: &File, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping at a kernel-chosen address, owned by the result.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { addr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr as usize
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: in bounds of our own live mapping; the file is not truncated.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.addr.cast::<u8>().add(offset),
                data.len(),
            )
        };
    }
}

impl Drop for SyncMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly our mapping.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
