// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk that fails writes under a served file, on this host, in seconds: a loop
//! device over a full tmpfs whose pages under the file's extents were punched out.
//! Owns that fixture (always torn down) and the latched-failure case; never touches
//! anything outside its temp dirs. Needs root: SKIPPED loudly without it, a failure
//! with VDP_REQUIRE_ROOT_TESTS=1.

use std::{
    fs::{self, File},
    io::{self, Write},
    sync::mpsc,
    thread,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use vdp_testkit::daemon;
use vdp_testkit::daemon::{Daemon, Scratch};
use vdp_testkit::failing_disk::{
    health, mapped, physical, prepare, text, write_and_flush, FailingDisk, MIB,
};
use vdp_testkit::root;
use vdp_testkit::root::unavailable;
use vhost_device_pmem::{blockmap, control};

/// The served file.
const FILE_SIZE: u64 = 16 * MIB;
/// Where the frontend's stores go: before the failure, after the disk recovered, and
/// after the failure record was cleared. Different pages, so a later writeback cannot
/// carry an earlier store to the disk.
const OFF_A: u64 = MIB;
const OFF_B: u64 = 8 * MIB;
const OFF_C: u64 = 12 * MIB;
const DATA_LEN: usize = 64 << 10;
/// `virtio_pmem` response status of a failed flush.
const VIRTIO_PMEM_EIO: u32 = 1;

// ---------------------------------------------------------------- helpers

/// Deterministic non-zero bytes.
fn pattern(seed: u8) -> Vec<u8> {
    (0..DATA_LEN)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The first event of kind `kind`, recent ones included.
fn wait_event(d: &Daemon, kind: &str) -> Value {
    let (tx, rx) = mpsc::channel();
    let ctl = d.control.clone();
    thread::spawn(move || {
        let _ = control::subscribe(&ctl, true, |line| {
            serde_json::from_str(line).is_ok_and(|v: Value| tx.send(v).is_ok())
        });
    });
    let deadline = Instant::now() + daemon::TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["event"] == kind => return v,
            Ok(_) => {}
            Err(_) => panic!(
                "no {kind} event within {:?}; daemon log:\n{}",
                daemon::TIMEOUT,
                d.log_text()
            ),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Progress past libtest's capture, with the time since the start.
fn phase(t0: Instant, what: &str) {
    let _ = writeln!(
        io::stderr(),
        "[{:>7.3}s] {what}",
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- the case

/// Writeback under a served file fails once; Linux reports that to each open file
/// description once, so a later fdatasync returns 0. The daemon must answer every
/// later flush with EIO anyway, say so in `status`, exit non-zero, and remember it
/// across a restart until an operator clears the record.
#[test]
fn a_failed_writeback_latches_eio_until_the_record_is_cleared() {
    let test = "failing_disk";
    if !root::prerequisites(test, &["mkfs.ext4"]) {
        return;
    }
    let t0 = Instant::now();
    let disk = match FailingDisk::new() {
        Ok(d) => d,
        Err(why) => return unavailable(test, &why),
    };
    let file = disk.mnt().join("served.img");
    prepare(&file, FILE_SIZE);
    // The extents, read before the daemon serves the file (opening it then would
    // break the daemon's lease).
    let extents = blockmap::read_extents(&File::open(&file).unwrap(), FILE_SIZE).unwrap();
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert_eq!(covered, FILE_SIZE, "{extents:?}");
    let filler = disk.fail_writes_to(&extents);
    phase(
        t0,
        &format!(
            "fixture ready: {} extent(s) punched on {}, tmpfs filled with {} MiB",
            extents.len(),
            disk.device(),
            filler / MIB
        ),
    );

    // Sockets, logs and the state directory live elsewhere: the tmpfs is full.
    let scratch = Scratch::new();
    let state = scratch.path("state");
    fs::create_dir(&state).unwrap();
    let state_arg = state.to_str().unwrap();
    let serve_args = ["--mode", "datasync", "--state-dir", state_arg];

    let started = unix_now();
    let mut d = Daemon::start(&scratch, "first", &file, &serve_args);
    let st = d.status();
    assert_eq!(st["policy"], "datasync", "{st:#}");
    let mut fe = mapped(&d);

    // 1. The disk fails the writeback: EIO, and the data is not on the media.
    let a = pattern(0xa1);
    assert_eq!(
        write_and_flush(&mut fe, &d, OFF_A, &a),
        VIRTIO_PMEM_EIO,
        "the flush whose fdatasync failed must be answered EIO\n{}",
        d.log_text()
    );
    let media_a = disk.read_media(physical(&extents, OFF_A), DATA_LEN);
    assert!(
        media_a != a && media_a.iter().all(|&b| b == 0),
        "the failed write reached the media after all; EIO would be wrong"
    );
    phase(
        t0,
        "flush 1: EIO, and the media under the store reads zeros",
    );

    // 2. The disk recovers. The next fdatasync succeeds (the error was reported to
    // this open file once), but the first store is still not on the media: an OK
    // now would tell the guest its data is durable when it is lost.
    disk.recover();
    let b = pattern(0xb2);
    let second = write_and_flush(&mut fe, &d, OFF_B, &b);
    assert_eq!(
        disk.read_media(physical(&extents, OFF_A), DATA_LEN),
        media_a,
        "the first store reached the media later"
    );
    assert_eq!(
        second,
        VIRTIO_PMEM_EIO,
        "a flush after a failed sync must stay EIO (latched), although the disk works \
         again and fdatasync now returns 0: the store before the failure is lost\n{}",
        d.log_text()
    );
    phase(t0, "flush 2 after the disk recovered: still EIO (latched)");

    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    let failure = &st["sync_failure"];
    // A loop device passes its backing file's errno up: the full tmpfs makes the
    // writeback fail with ENOSPC, which ext4 records for the file and fdatasync
    // returns. (A dm error target gives EIO; guest-tests/failing_disk.rs.)
    assert_eq!(failure["errno"], libc::ENOSPC, "{st:#}");
    assert!(
        failure["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{st:#}"
    );
    assert_eq!(failure["context"], "flush", "{st:#}");
    assert_eq!(failure["requests"], 2, "{st:#}");
    let at = failure["at"].as_u64().unwrap_or(0);
    assert!(started <= at && at <= unix_now(), "{st:#}");
    let stats = d.stats();
    assert_eq!(stats["errors"], 2, "{stats:#}");
    let ev = wait_event(&d, "sync-failed");
    assert_eq!(ev["errno"], libc::ENOSPC, "{ev}");

    // 3. SIGTERM: a daemon that lost data does not exit 0.
    drop(fe);
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "a failed daemon exited with {status} at SIGTERM\n{}",
        d.log_text()
    );
    drop(d);
    phase(t0, &format!("SIGTERM: {status}"));

    // 4. The record survives a restart: the new daemon starts failed.
    let d = Daemon::start(&scratch, "second", &file, &serve_args);
    let st = d.status();
    assert_eq!(
        st["health"],
        "failed",
        "{st:#}\nthe first daemon's log:\n{}\nthis one's:\n{}",
        fs::read_to_string(scratch.path("first.log")).unwrap_or_default(),
        d.log_text()
    );
    assert_eq!(st["sync_failure"]["errno"], libc::ENOSPC, "{st:#}");
    let mut fe = mapped(&d);
    assert_eq!(
        write_and_flush(&mut fe, &d, OFF_B, &b),
        VIRTIO_PMEM_EIO,
        "a restarted daemon must keep answering EIO while the record exists\n{}",
        d.log_text()
    );
    drop(fe);
    let mut d = d;
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert!(status.code().is_some_and(|c| c != 0), "{status}");
    drop(d);
    phase(t0, "restart with the record: failed, flush EIO");

    // 5. The operator looks at the record and clears it (daemon stopped).
    // `health` exits 1 while a record exists and prints it (JSON); 0 once cleared.
    let shown = health(&file, &state, &[]);
    assert_eq!(shown.status.code(), Some(1), "{}", text(&shown));
    let record: Value = serde_json::from_slice(&shown.stdout)
        .unwrap_or_else(|e| panic!("health printed no JSON record ({e}): {}", text(&shown)));
    assert_eq!(
        (&record["errno"], &record["context"]),
        (&libc::ENOSPC.into(), &"flush".into()),
        "{record:#}"
    );
    let cleared = health(&file, &state, &["--clear"]);
    assert!(cleared.status.success(), "{}", text(&cleared));
    let after = health(&file, &state, &[]);
    assert_eq!(after.status.code(), Some(0), "{}", text(&after));

    // 6. A daemon started after that is healthy; its flushes reach the media.
    let mut d = Daemon::start(&scratch, "third", &file, &serve_args);
    let st = d.status();
    assert_eq!(st["health"], "healthy", "{st:#}");
    assert!(st["sync_failure"].is_null(), "{st:#}");
    let mut fe = mapped(&d);
    let c = pattern(0xc3);
    assert_eq!(
        write_and_flush(&mut fe, &d, OFF_C, &c),
        0,
        "{}",
        d.log_text()
    );
    assert_eq!(
        disk.read_media(physical(&extents, OFF_C), DATA_LEN),
        c,
        "an OK flush left the store off the media"
    );
    drop(fe);
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", d.log_text());
    phase(t0, "cleared: healthy, flush OK and on the media; done");
}
