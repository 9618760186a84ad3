// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `prepare` against a real full filesystem (a 64 MiB ext4 on a loop device): a
//! size the filesystem has no room for is refused before anything changes, naming
//! what it needs and what is free; and when the space goes while prepare runs (the
//! test fills the filesystem after the check: `strace` stops prepare right after
//! it extended the file), the file is truncated back to its original size, its
//! data untouched, and prepare says so.
//!
//! Owns: these cases. Needs root, loop devices, mkfs.ext4 and strace: without them
//! a test prints SKIPPED, unless VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::loopfs::LoopFs;
use vdp_testkit::root::prerequisites;

use vdp_testkit::BIN;
const MIB: u64 = 1 << 20;

fn small_ext4() -> LoopFs {
    // -m 0: no blocks reserved for root, so "available" is all that is free.
    LoopFs::new("mkfs.ext4", &["-q", "-F", "-m", "0"], 64)
}

/// A file of `len` bytes of a pattern, synced, mode 0600.
fn data_file(path: &Path, len: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    data
}

fn prepare(path: &Path, size: &str) -> Output {
    Command::new(BIN)
        .args(["prepare", path.to_str().unwrap(), "--size", size])
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_size_the_filesystem_has_no_room_for_is_refused_before_anything_changes() {
    if !prerequisites("prepare_space", &["mkfs.ext4"]) {
        return;
    }
    let m = small_ext4();
    let free = m.available();
    // A new file: refused, and not left behind.
    let new = m.path("new.img");
    let out = prepare(&new, "1T");
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("has to allocate 1099511627776 bytes"), "{err}");
    assert!(err.contains("bytes") && err.contains("available"), "{err}");
    let named_free: u64 = err
        .split(" but ext4 has ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no free figure in: {err}"));
    assert!(
        named_free <= free + MIB && named_free + MIB >= free,
        "says {named_free} free, statvfs says {free}: {err}"
    );
    assert!(!new.exists(), "the refused file was left behind");
    assert!(m.available() + MIB >= free, "space was taken");
    // A file with data: refused, its size and bytes as they were.
    let old = m.path("old.img");
    let data = data_file(&old, 4 * MIB);
    let out = prepare(&old, "1T");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing was changed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::metadata(&old).unwrap().len(), 4 * MIB);
    assert!(fs::read(&old).unwrap() == data, "the data changed");
}

/// Takes every free block of the filesystem holding `path` (fallocate, MiB by MiB
/// then block by block, until ENOSPC).
fn fill(path: &Path) {
    let f = File::create(path).unwrap();
    let mut off = 0u64;
    for step in [MIB, 4096] {
        loop {
            match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), off, step) {
                Ok(()) => off += step,
                Err(rustix::io::Errno::NOSPC) => break,
                Err(e) => panic!("fallocate: {e}"),
            }
        }
    }
    f.sync_all().unwrap();
}

#[test]
fn space_gone_after_the_check_truncates_the_file_back_to_its_original_size() {
    if !prerequisites("prepare_space", &["mkfs.ext4", "strace"]) {
        return;
    }
    let m = small_ext4();
    let img = m.path("f.img");
    let data = data_file(&img, 4 * MIB);
    // 40 MiB fit in the ~58 MiB free: the check passes. strace stops prepare
    // (SIGSTOP) right after its first ftruncate, the extension, and says so in its
    // trace.
    let trace = m.path("strace.out");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=ftruncate",
            "-e",
            "inject=ftruncate:signal=SIGSTOP:when=1",
            "-o",
            trace.to_str().unwrap(),
            &*BIN,
            "prepare",
            img.to_str().unwrap(),
            "--size",
            "40M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: u32 = loop {
        let text = fs::read_to_string(&trace).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("--- stopped by SIGSTOP ---"))
        {
            break line.split_whitespace().next().unwrap().parse().unwrap();
        }
        if let Some(st) = strace.try_wait().unwrap() {
            panic!("prepare ended ({st}) before it was stopped:\n{text}");
        }
        assert!(Instant::now() < deadline, "prepare never stopped: {text}");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        40 * MIB,
        "not extended yet"
    );
    // Stopped after the check: the space goes now.
    fill(&m.path("filler"));
    assert!(m.available() < MIB, "the filesystem is not full");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::CONT,
    )
    .unwrap();
    let out = strace.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    eprintln!("{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("truncated back to its original size, 4194304 bytes"),
        "{err}"
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), 4 * MIB, "{err}");
    assert!(fs::read(&img).unwrap() == data, "the data changed");
    // Its space is free again.
    fs::remove_file(m.path("filler")).unwrap();
    assert!(m.available() > 40 * MIB);
}
