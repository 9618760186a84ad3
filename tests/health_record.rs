// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The health record under real trouble: a real sync failure (the failing disk of
//! testkit/src/failing_disk.rs) while the state directory's own filesystem (a
//! small ext4 on a loop device) is remounted read-only or full; the exit status
//! while the record is not written; the second copy in another directory; a failed
//! file moved or hard-linked. Owns these cases; never touches anything outside its
//! temporary directories and mounts. Needs root: SKIPPED loudly without it, a
//! failure with VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use serde_json::Value;
use vdp_testkit::daemon::{Daemon, Scratch};
use vdp_testkit::failing_disk::{
    health, health_of, mapped, prepare, text, write_and_flush, FailingDisk, MIB,
};
use vdp_testkit::remountable::LoopFs;
use vdp_testkit::root;
use vdp_testkit::root::unavailable;
use vhost_device_pmem::blockmap;

const FILE_SIZE: u64 = 16 * MIB;
/// Stores in different pages: each one's writeback fails anew.
const OFF_A: u64 = MIB;
const OFF_B: u64 = 8 * MIB;
/// `virtio_pmem` response status of a failed flush.
const VIRTIO_PMEM_EIO: u32 = 1;
/// `state::health::EXIT_UNRECORDED`.
const EXIT_UNRECORDED: i32 = 73;

fn pattern(seed: u8) -> Vec<u8> {
    (0..64 << 10)
        .map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A prepared file on the failing disk, its writes failing from now on.
struct Failing {
    disk: FailingDisk,
    file: PathBuf,
    scratch: Scratch,
}

fn failing_file(test: &str) -> Option<Failing> {
    if !root::prerequisites(test, &["mkfs.ext4"]) {
        return None;
    }
    let disk = match FailingDisk::new() {
        Ok(d) => d,
        Err(why) => {
            unavailable(test, &why);
            return None;
        }
    };
    let file = disk.mnt().join("served.img");
    prepare(&file, FILE_SIZE);
    let extents = blockmap::read_extents(&File::open(&file).unwrap(), FILE_SIZE).unwrap();
    disk.fail_writes_to(&extents);
    Some(Failing {
        disk,
        file,
        scratch: Scratch::new(),
    })
}

fn loop_fs(test: &str, mib: u64) -> Option<LoopFs> {
    LoopFs::new(mib)
        .inspect_err(|why| unavailable(test, why))
        .ok()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One store at `offset` and a flush, which must fail; the status after it.
fn fail_a_flush(d: &Daemon, offset: u64) -> Value {
    let mut fe = mapped(d);
    assert_eq!(
        write_and_flush(&mut fe, d, offset, &pattern(offset as u8)),
        VIRTIO_PMEM_EIO,
        "{}",
        d.log_text()
    );
    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    st
}

fn stop(mut d: Daemon) -> (Option<i32>, String) {
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    (status.code(), d.log_text())
}

/// The unit never restarts a daemon that exited because its record is not written.
fn unit_does_not_restart_on(code: i32) {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/systemd/vhost-device-pmem@.service"),
    )
    .unwrap();
    let prevented: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        prevented.contains(&code.to_string().as_str()),
        "the unit restarts on {code}: RestartPreventExitStatus={prevented:?}"
    );
}

#[test]
fn a_record_refused_by_a_read_only_state_filesystem_lands_once_it_is_writable_again() {
    let test = "health_record_read_only";
    let Some(f) = failing_file(test) else { return };
    let Some(statefs) = loop_fs(test, 16) else {
        return;
    };
    let state = statefs.mnt().join("state");
    fs::create_dir(&state).unwrap();
    let args = [
        "--mode",
        "datasync",
        "--state-dir",
        s(&state),
        "--no-health-copy",
    ];
    let d = Daemon::start(&f.scratch, "ro", &f.file, &args);
    assert!(d.status()["health_record"].is_null());
    // The state filesystem goes read-only (as errors=remount-ro does), then a sync
    // of the served file fails.
    statefs.remount_ro();
    let st = fail_a_flush(&d, OFF_A);
    let rec = &st["health_record"];
    assert_eq!(rec["persisted"], false, "{st:#}");
    assert_eq!(rec["locations"][0]["written"], false, "{st:#}");
    assert!(
        rec["locations"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Read-only file system")),
        "{st:#}"
    );
    assert!(rec["pending_since"].is_string(), "{st:#}");
    // Nothing is on disk yet: what a restart would find.
    let h = health(&f.file, &state, &["--no-health-copy"]);
    assert_eq!(h.status.code(), Some(0), "{}", text(&h));

    // Writable again: the record lands with no restart.
    statefs.remount_rw();
    let st = d.wait_status("the health record written", |s| {
        s["health_record"]["persisted"] == true
    });
    let rec = &st["health_record"];
    assert!(rec["pending_since"].is_null(), "{st:#}");
    assert!(rec["attempts"].as_u64().unwrap() >= 2, "{st:#}");
    assert!(rec["locations"][0]["error"].is_null(), "{st:#}");
    let h = health(&f.file, &state, &["--no-health-copy"]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    let shown: Value = serde_json::from_slice(&h.stdout).unwrap();
    assert_eq!(shown["errno"], libc::ENOSPC, "{shown:#}");

    // Written: the exit status is a failed sync's, not the unrecorded one.
    let (code, log) = stop(d);
    assert_eq!(code, Some(1), "{log}");
    let d = Daemon::start(&f.scratch, "ro-again", &f.file, &args);
    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    assert_eq!(st["health_record"]["persisted"], true, "{st:#}");
    drop(f.disk);
}

#[test]
fn a_full_state_filesystem_keeps_the_record_pending_and_the_exit_status_says_so() {
    let test = "health_record_full";
    let Some(f) = failing_file(test) else { return };
    let Some(statefs) = loop_fs(test, 8) else {
        return;
    };
    let state = statefs.mnt().join("state");
    fs::create_dir(&state).unwrap();
    statefs.fill();
    let args = [
        "--mode",
        "datasync",
        "--state-dir",
        s(&state),
        "--no-health-copy",
    ];

    // Stopped while the record cannot be written: its own exit status, which the
    // unit does not restart (a restart would find no record: `health` says healthy).
    let d = Daemon::start(&f.scratch, "full", &f.file, &args);
    let st = fail_a_flush(&d, OFF_A);
    assert_eq!(st["health_record"]["persisted"], false, "{st:#}");
    assert!(
        st["health_record"]["locations"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{st:#}"
    );
    let (code, log) = stop(d);
    assert_eq!(code, Some(EXIT_UNRECORDED), "{log}");
    assert!(
        log.contains("is not recorded in") && log.contains("\"errno\":28"),
        "{log}"
    );
    let h = health(&f.file, &state, &["--no-health-copy"]);
    assert_eq!(h.status.code(), Some(0), "{}", text(&h));
    unit_does_not_restart_on(EXIT_UNRECORDED);

    // A second failure, then space comes back: the retry writes it, without an
    // event to wake it (its back-off), and the daemon exits as a failed one does.
    let d = Daemon::start(&f.scratch, "full-again", &f.file, &args);
    let st = fail_a_flush(&d, OFF_B);
    assert_eq!(st["health_record"]["persisted"], false, "{st:#}");
    statefs.free();
    d.wait_status("the health record written", |s| {
        s["health_record"]["persisted"] == true
    });
    let (code, log) = stop(d);
    assert_eq!(code, Some(1), "{log}");
    let h = health(&f.file, &state, &["--no-health-copy"]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    drop(f.disk);
}

#[test]
fn the_copy_in_another_filesystem_keeps_the_file_failed_while_the_state_filesystem_cannot() {
    let test = "health_record_copy";
    let Some(f) = failing_file(test) else { return };
    let Some(statefs) = loop_fs(test, 16) else {
        return;
    };
    let state = statefs.mnt().join("state");
    fs::create_dir(&state).unwrap();
    let copy = f.scratch.path("copy");
    fs::create_dir(&copy).unwrap();
    let args = [
        "--mode",
        "datasync",
        "--state-dir",
        s(&state),
        "--health-copy-dir",
        s(&copy),
    ];
    let d = Daemon::start(&f.scratch, "copy", &f.file, &args);
    statefs.remount_ro();
    let st = fail_a_flush(&d, OFF_A);
    let locs = &st["health_record"]["locations"];
    assert_eq!(
        (&locs[0]["written"], &locs[1]["written"]),
        (&false.into(), &true.into()),
        "{st:#}"
    );
    assert!(
        locs[1]["path"].as_str().unwrap().starts_with(s(&copy)),
        "{st:#}"
    );
    let (code, log) = stop(d);
    assert_eq!(code, Some(EXIT_UNRECORDED), "{log}");

    // The state filesystem still refuses: the copy alone keeps the file failed.
    let h = health(&f.file, &state, &["--health-copy-dir", s(&copy)]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    assert!(
        String::from_utf8_lossy(&h.stderr).contains(s(&copy)),
        "{}",
        text(&h)
    );
    let d = Daemon::start(&f.scratch, "copy-restart", &f.file, &args);
    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    assert_eq!(st["health_record"]["persisted"], false, "{st:#}");
    let (code, log) = stop(d);
    assert_eq!(code, Some(EXIT_UNRECORDED), "{log}");

    // Writable again: the next start writes the state directory's record at once.
    statefs.remount_rw();
    let d = Daemon::start(&f.scratch, "copy-healed", &f.file, &args);
    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    assert_eq!(st["health_record"]["persisted"], true, "{st:#}");
    let (code, log) = stop(d);
    assert_eq!(code, Some(1), "{log}");
    let h = health(&f.file, &state, &["--no-health-copy"]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    drop(f.disk);
}

#[test]
fn a_failed_file_moved_or_hard_linked_is_still_failed() {
    let test = "health_record_moved";
    let Some(f) = failing_file(test) else { return };
    // Records next to the file (no --state-dir), and a copy elsewhere.
    let copy = f.scratch.path("copy");
    fs::create_dir(&copy).unwrap();
    let args = |copy: &Path| {
        vec![
            "--mode".to_string(),
            "datasync".into(),
            "--health-copy-dir".into(),
            s(copy).into(),
        ]
    };
    let serve = |name: &str, file: &Path| {
        let a = args(&copy);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Daemon::start(&f.scratch, name, file, &a)
    };
    let d = serve("first", &f.file);
    let st = fail_a_flush(&d, OFF_A);
    assert_eq!(st["health_record"]["persisted"], true, "{st:#}");
    let (code, log) = stop(d);
    assert_eq!(code, Some(1), "{log}");

    let dir = f.disk.mnt();
    let failed = |file: &Path, health_args: &[&str], name: &str| {
        let h = health_of(file, health_args);
        assert_eq!(
            h.status.code(),
            Some(1),
            "{} ({health_args:?}): {}",
            file.display(),
            text(&h)
        );
        let d = serve(name, file);
        let st = d.status();
        assert_eq!(st["health"], "failed", "{}: {st:#}", file.display());
        let (code, log) = stop(d);
        assert_eq!(code, Some(1), "{log}");
    };
    // Renamed in its directory: found next to it by its identity, without the copy.
    let moved = dir.join("moved.img");
    fs::rename(&f.file, &moved).unwrap();
    failed(&moved, &["--no-health-copy"], "moved");
    // A hard link.
    let linked = dir.join("linked.img");
    fs::hard_link(&moved, &linked).unwrap();
    failed(&linked, &["--no-health-copy"], "linked");
    // Moved to another directory: the copy (named by path, found by identity).
    let sub = dir.join("sub");
    fs::create_dir(&sub).unwrap();
    let away = sub.join("away.img");
    fs::rename(&linked, &away).unwrap();
    failed(&away, &["--health-copy-dir", s(&copy)], "away");

    // Cleared in the directories of both its names (and the copy), the file is
    // healthy under each.
    let c = health_of(&away, &["--health-copy-dir", s(&copy), "--clear"]);
    assert_eq!(c.status.code(), Some(0), "{}", text(&c));
    let c = health_of(&moved, &["--health-copy-dir", s(&copy), "--clear"]);
    assert_eq!(c.status.code(), Some(0), "{}", text(&c));
    for file in [&moved, &away] {
        let h = health_of(file, &["--health-copy-dir", s(&copy)]);
        assert_eq!(h.status.code(), Some(0), "{}", text(&h));
    }
    drop(f.disk);
}
