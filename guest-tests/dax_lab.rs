// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DAX host lab: a VM that plays the host. Its emulated NVDIMM becomes an fsdax
//! /dev/pmem0 with a DAX-mounted ext4 or XFS on it, and inside it this very test
//! binary (built static) drives the static daemon with the in-process vhost-user
//! frontend of testkit/src/frontend.rs. What only a real DAX host can show:
//!
//! - `auto` chooses `direct`, and the region really is MAP_SYNC (the frontend maps
//!   the fd it receives with MAP_SHARED_VALIDATE|MAP_SYNC; the daemon's own watch
//!   mapping carries the `sf` VmFlag);
//! - flushes make no sync syscall at all, counted by strace attached to the daemon
//!   around the flush phase only (not by the daemon's own counter);
//! - an entry written to the lab's /sys/block/pmem0/badblocks inside the served file
//!   reaches the daemon at the right file offset, and one outside it is ignored;
//! - a file renamed over the served one under `direct` downgrades it at once (a
//!   change notice, no lease break).
//!
//! `dax_lab_ext4` and `dax_lab_xfs` boot the lab (one boot each) and run
//! [`inside_the_lab`] there (it is `#[ignore]`d on the host, where it cannot run).
//! Needs `guest-tests/setup.sh` (skips loudly without; fails with VDP_REQUIRE_GUEST=1).

use std::{
    fs::{self, File},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc::{channel, Receiver},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::daemon::Daemon;
use vdp_testkit::frontend;
use vdp_testkit::guest::{
    env::VmEnv,
    fsdax_convert,
    in_vm::{strace_window, vm_flags, SyncMapping, SYNC_CALLS},
    lab_boot, static_test_binary, GuestEnv,
};
use vhost_device_pmem::{
    blockmap::{self, Extent},
    control::{self, Request},
};

/// Hard limit for one lab boot, from QEMU start to power-off (TCG).
const LAB_TIMEOUT: Duration = Duration::from_secs(300);
/// The emulated NVDIMM (sparse file on the host).
const NVDIMM_SIZE: u64 = 512 << 20;
/// The file the daemon serves in the lab.
const SERVED_SIZE: u64 = 64 << 20;
/// Flush requests in the strace window.
const FLUSHES: u64 = 200;
/// Hard limit for a badblocks entry to reach the daemon (the target is 1 s).
const BADBLOCKS_TIMEOUT: Duration = Duration::from_secs(10);

// ---- host side: boot the lab ---------------------------------------------------

#[test]
fn dax_lab_ext4() {
    run_lab("ext4");
}

#[test]
fn dax_lab_xfs() {
    run_lab("xfs");
}

/// Boots the lab with `fs` on the fsdax NVDIMM and runs [`inside_the_lab`] there.
fn run_lab(fs_name: &str) {
    let Some(env) = GuestEnv::load(&format!("dax_lab_{fs_name}")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nvdimm = dir.path().join("nvdimm.img");
    File::create(&nvdimm).unwrap().set_len(NVDIMM_SIZE).unwrap();

    let (mut boot, mkfs) = lab_boot(fs_name);
    boot.add_file("vdp/dax-lab", &static_test_binary("dax_lab"));

    let fsdax = fsdax_convert(0);
    let script = format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
{fsdax}
mkdir -p /mnt/lab
{mkfs} /dev/pmem0 || exit 21
mount -o dax /dev/pmem0 /mnt/lab || exit 22
echo "VDP-MOUNT $(grep ' /mnt/lab ' /proc/mounts)"
/vdp/vhost-device-pmem prepare /mnt/lab/pmem.img --size {SERVED_SIZE} || exit 23
VDP_LAB_FS={fs_name} VDP_LAB_DAEMON=/vdp/vhost-device-pmem VDP_LAB_FILE=/mnt/lab/pmem.img \
VDP_LAB_STRACE=/usr/bin/strace VDP_LAB_BADBLOCKS=/sys/block/pmem0/badblocks RUST_BACKTRACE=1 \
  /vdp/dax-lab --exact inside_the_lab --ignored --nocapture --test-threads=1
rc=$?
umount /mnt/lab || exit 24
exit $rc
"#
    );
    let started = Instant::now();
    let mut guest = env.boot_lab(dir.path(), &nvdimm, &script, &boot);
    let rc = guest.finish(LAB_TIMEOUT);
    let took = started.elapsed();
    if rc != 0 {
        guest.dump();
        panic!("the {fs_name} lab failed with {rc} (20: fsdax, 21: mkfs, 22: mount, 23: prepare, 24: umount, else the test inside)");
    }
    let mount = guest.expect("VDP-MOUNT", Duration::ZERO);
    assert!(
        mount.contains(&format!(" {fs_name} ")) && mount.contains("dax"),
        "{mount}"
    );
    let line = guest.expect("VDP-LAB-RESULT ", Duration::ZERO);
    let result: Value =
        serde_json::from_str(line.split_once("VDP-LAB-RESULT ").unwrap().1.trim()).unwrap();
    // The test inside asserted all of this; check that it ran what we think it ran.
    assert_eq!(result["filesystem"], fs_name, "{result:#}");
    assert_eq!(result["policy"], "direct", "{result:#}");
    assert_eq!(result["flushes"], FLUSHES, "{result:#}");
    for call in SYNC_CALLS {
        assert_eq!(result["strace_flush_window"][call], 0, "{result:#}");
    }
    assert_eq!(result["stats_syncs"], 0, "{result:#}");
    assert_eq!(result["file_replaced"]["policy"], "datasync", "{result:#}");
    let _ = writeln!(
        std::io::stderr(),
        "DAX host lab ({fs_name}, {:?} boot to power-off, {}): {result}",
        took,
        env.accel
    );
}

// ---- inside the lab --------------------------------------------------------------

/// What the lab script passes to [`inside_the_lab`].
struct Lab {
    fs: String,
    daemon: PathBuf,
    file: PathBuf,
    strace: PathBuf,
    badblocks: PathBuf,
}

const LAB_VARS: [&str; 5] = [
    "VDP_LAB_FS",
    "VDP_LAB_DAEMON",
    "VDP_LAB_FILE",
    "VDP_LAB_STRACE",
    "VDP_LAB_BADBLOCKS",
];

impl Lab {
    /// The lab's paths; panics outside the lab (the test is `#[ignore]`d, so it runs
    /// only when asked for, and asked for outside the lab it must not pass).
    fn from_env() -> Self {
        let env = VmEnv::load(
            &LAB_VARS,
            "inside_the_lab runs only inside the DAX host lab VM (dax_lab_ext4 and dax_lab_xfs \
             boot it and run it there)",
        );
        Self {
            fs: env.get("VDP_LAB_FS"),
            daemon: env.path("VDP_LAB_DAEMON"),
            file: env.path("VDP_LAB_FILE"),
            strace: env.path("VDP_LAB_STRACE"),
            badblocks: env.path("VDP_LAB_BADBLOCKS"),
        }
    }
}

/// Runs in the lab VM, against the DAX-mounted, prepared file: policy and MAP_SYNC,
/// flushes without sync syscalls, host badblocks to file offsets. Ignored on the
/// host (where it cannot run); the lab runs it with `--ignored`.
#[test]
#[ignore = "runs only inside the DAX host lab VM (dax_lab_ext4 and dax_lab_xfs run it there)"]
fn inside_the_lab() {
    let lab = Lab::from_env();
    let scratch = tempfile::tempdir().unwrap();
    let mut result = json!({ "filesystem": lab.fs });

    // a. The file is DAX and MAP_SYNC-capable, and auto would choose direct.
    let out = Command::new(&lab.daemon)
        .arg("check")
        .arg(&lab.file)
        .arg("--json")
        .output()
        .unwrap();
    let check: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(check["filesystem"], lab.fs.as_str(), "{check:#}");
    assert_eq!(check["dax"], true, "{check:#}");
    assert_eq!(check["map_sync"], true, "{check:#}");
    assert_eq!(check["immutable"], true, "{check:#}");
    assert_eq!(check["auto_policy"], "direct", "{check:#}");
    result["check"] = json!({"dax": check["dax"], "map_sync": check["map_sync"],
        "immutable": check["immutable"], "extents": check["extents"]});

    // The extent map, read now: opening the file once the daemon serves it would
    // break its lease. FIEMAP physical offsets are bytes on /dev/pmem0, the device
    // whose badblocks sectors are numbered the same way.
    let extents = blockmap::read_extents(&File::open(&lab.file).unwrap(), SERVED_SIZE).unwrap();
    let inside: [u64; 2] = [(40 << 20) + 5 * 512, (50 << 20) + 7 * 512];
    let inside_sectors = inside.map(|off| device_sector(&extents, off));
    let outside_sector = sector_outside(&extents, &lab.badblocks);

    let mut daemon = Daemon::in_vm(&lab.daemon, &lab.file, scratch.path(), "d", &[]);
    let status = daemon.status();
    assert_eq!(status["mode_requested"], "auto", "{status:#}");
    assert_eq!(status["policy"], "direct", "{status:#}");
    result["policy"] = status["policy"].clone();
    result["policy_reason"] = status["policy_reason"].clone();

    // a. The frontend maps what it receives with MAP_SYNC, as a VMM that wants
    // synchronous faults would; stores through it reach the file.
    let mut fe = frontend::TestFrontend::connect(&daemon.socket).unwrap();
    fe.start().unwrap();
    assert_eq!(
        fe.maps.wait_for(1, frontend::TIMEOUT),
        1,
        "{}",
        daemon.log_text()
    );
    let (region_fd, len) = fe.maps.with(0, |m| (m.file.try_clone().unwrap(), m.len));
    assert_eq!(len, SERVED_SIZE);
    let map = SyncMapping::new(&region_fd, len as usize).expect("MAP_SHARED_VALIDATE|MAP_SYNC");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    map.write(1 << 20, &pattern);
    let mut back = vec![0u8; pattern.len()];
    region_fd.read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(
        back, pattern,
        "a store through the MAP_SYNC mapping is not in the file"
    );
    let own_flags = vm_flags(std::process::id(), |start, _, _| start == map.addr());
    assert!(
        own_flags
            .iter()
            .any(|f| f.split_whitespace().any(|x| x == "sf")),
        "the frontend's MAP_SYNC mapping has no sf flag: {own_flags:?}"
    );
    fe.map_region(0).unwrap();
    daemon.wait_status("region_mapped", |s| s["region_mapped"] == true);
    // The daemon's own (memory-failure watch) mapping of the file is MAP_SYNC too.
    let canonical = fs::canonicalize(&lab.file).unwrap();
    let daemon_flags = vm_flags(daemon.pid(), |_, perms, path| {
        perms.starts_with("r--s") && Path::new(path) == canonical
    });
    assert!(
        daemon_flags
            .iter()
            .any(|f| f.split_whitespace().any(|x| x == "sf")),
        "the daemon's read-only mapping of the file has no sf flag: {daemon_flags:?}\n{}",
        daemon.log_text()
    );
    result["frontend_map_sync"] = json!(true);
    result["daemon_mapping_sf"] = json!(true);

    // b. Flushes make no sync syscall. strace follows every thread of the daemon
    // (the vring worker answers flushes) during the flush phase only: the daemon
    // fsyncs when the VMM disconnects and at exit, both outside the window. write is
    // counted too, as a control that strace saw the requests being served: the
    // worker writes the call eventfd to signal completions (at most once per round
    // trip, fewer when it finds the next request already queued; 83 to 110 for the
    // 110 round trips in the lab runs).
    let before = daemon.stats();
    let counts = strace_window(&lab.strace, daemon.pid(), &["write"], || {
        for _ in 0..FLUSHES / 2 {
            assert_eq!(fe.flush(1).unwrap(), vec![0]);
        }
        for _ in 0..FLUSHES / 20 {
            assert_eq!(fe.flush(10).unwrap(), vec![0; 10]);
        }
    });
    let after = daemon.stats();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
    assert_eq!(
        n(&after, "flush_requests") - n(&before, "flush_requests"),
        FLUSHES
    );
    assert_eq!(n(&after, "syncs"), 0, "{after:#}");
    assert_eq!(n(&after, "errors"), 0, "{after:#}");
    for call in SYNC_CALLS {
        assert_eq!(counts[call], 0, "{call} during flushes: {counts:?}");
    }
    assert!(counts["write"] > 0, "strace saw nothing: {counts:?}");
    result["flushes"] = json!(FLUSHES);
    result["stats_syncs"] = after["syncs"].clone();
    result["strace_flush_window"] = json!(counts);

    // c. Host badblocks, as the lab's pmem driver keeps them, reach the daemon.
    let events = subscribe(&daemon.control);
    let expect = |off: u64| json!([{"offset": off, "length": 512}]);
    let t0 = Instant::now();
    write_badblocks(&lab.badblocks, inside_sectors[0]);
    let ev = next_bad_ranges_event(&events, t0 + BADBLOCKS_TIMEOUT);
    let event_latency = ev.0 - t0;
    assert_eq!(ev.1["source"], "host-device", "{}", ev.1);
    assert_eq!(ev.1["added"], expect(inside[0]), "{}", ev.1);
    let list = daemon.call(&Request::BadblocksList);
    let list_latency = t0.elapsed();
    assert_eq!(list["ranges"], expect(inside[0]), "{list}");
    let _ = writeln!(
        std::io::stderr(),
        "badblocks sector {} (file offset {:#x}): event after {event_latency:?}, listed after {list_latency:?}",
        inside_sectors[0],
        inside[0]
    );

    // A sector outside the file is ignored. The next inside entry is the proof that
    // the daemon read the attribute with the outside one in it.
    write_badblocks(&lab.badblocks, outside_sector);
    thread::sleep(Duration::from_secs(2));
    let list = daemon.call(&Request::BadblocksList);
    assert_eq!(list["ranges"], expect(inside[0]), "{list}");
    let t1 = Instant::now();
    write_badblocks(&lab.badblocks, inside_sectors[1]);
    let ev = next_bad_ranges_event(&events, t1 + BADBLOCKS_TIMEOUT);
    let second_latency = ev.0 - t1;
    assert_eq!(ev.1["added"], expect(inside[1]), "{}", ev.1);
    let list = daemon.call(&Request::BadblocksList);
    assert_eq!(
        list["ranges"],
        json!([{"offset": inside[0], "length": 512}, {"offset": inside[1], "length": 512}]),
        "{list}"
    );
    let attr = fs::read_to_string(&lab.badblocks).unwrap();
    result["badblocks"] = json!({
        "attribute": attr.lines().collect::<Vec<_>>(),
        "inside_sectors": inside_sectors, "file_offsets": inside,
        "outside_sector": outside_sector, "outside_ignored": true,
        "event_latency_ms": event_latency.as_secs_f64() * 1e3,
        "list_latency_ms": list_latency.as_secs_f64() * 1e3,
        "second_event_latency_ms": second_latency.as_secs_f64() * 1e3,
    });

    // Control for the strace method: the same window around something that does
    // fsync (recording an operator range persists the state file and its directory)
    // must count it.
    let control_counts = strace_window(&lab.strace, daemon.pid(), &[], || {
        let answer = daemon.call(&Request::BadblocksInject {
            offset: 60 << 20,
            length: 512,
        });
        assert_eq!(answer["ok"], true, "{answer}");
    });
    assert!(
        control_counts["fsync"] > 0,
        "strace missed the state file's fsync: {control_counts:?}"
    );
    result["strace_control_window"] = json!(control_counts);

    // d. Memory failure: poison one page of the served file (MADV_HWPOISON through
    // our own mapping; the lab kernel has CONFIG_MEMORY_FAILURE). The kernel tells
    // every early-kill process mapping that page with SIGBUS BUS_MCEERR_AO; the
    // daemon's watch mapping makes it one of them.
    let poison_off: u64 = 8 << 20;
    let t2 = Instant::now();
    // SAFETY: advising one page of our own live mapping; we never touch it again.
    let rc = unsafe {
        libc::madvise(
            (map.addr() + poison_off as usize) as *mut libc::c_void,
            4096,
            libc::MADV_HWPOISON,
        )
    };
    let err = std::io::Error::last_os_error();
    assert_eq!(rc, 0, "MADV_HWPOISON: {err}");
    // Earlier events (the operator range of the strace control) may still be queued.
    let ev = loop {
        let ev = next_bad_ranges_event(&events, t2 + BADBLOCKS_TIMEOUT);
        if ev.1["source"] != "operator" {
            break ev;
        }
    };
    let poison_latency = ev.0 - t2;
    assert_eq!(ev.1["source"], "memory-failure", "{}", ev.1);
    // The kernel reports the poison at the granularity of the daemon's mapping of the
    // page (si_addr_lsb): 4 KiB where it is mapped by a PTE, 2 MiB where by a PMD
    // (seen on ext4). The range must hold the page and be one such naturally aligned
    // unit.
    let added = &ev.1["added"][0];
    let (off, len) = (
        added["offset"].as_u64().unwrap(),
        added["length"].as_u64().unwrap(),
    );
    assert!(
        (len == 4096 || len == 2 << 20)
            && off % len == 0
            && off <= poison_off
            && poison_off + 4096 <= off + len,
        "{}",
        ev.1
    );
    result["memory_failure"] = json!({
        "file_offset": poison_off,
        "reported": added,
        "event_latency_ms": poison_latency.as_secs_f64() * 1e3,
    });

    drop(map);
    drop(fe);

    // e. The block map changes under `direct`: another opener (its open breaks the
    // lease) punches a hole. The daemon downgrades to datasync and syncs the whole
    // file, all of it under the seccomp filter (the daemon's default, enforce).
    assert_eq!(daemon.status()["seccomp"], "enforce");
    let t3 = Instant::now();
    let writer = fs::OpenOptions::new().write(true).open(&lab.file).unwrap();
    vhost_device_pmem::sys::fallocate(
        &writer,
        vhost_device_pmem::sys::FALLOC_FL_PUNCH_HOLE | vhost_device_pmem::sys::FALLOC_FL_KEEP_SIZE,
        20 << 20,
        2 << 20,
    )
    .unwrap();
    let status = loop {
        let st = daemon.status();
        if st["downgraded"].is_string() {
            break st;
        }
        assert!(t3.elapsed() < BADBLOCKS_TIMEOUT, "no downgrade: {st:#}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["policy"], "datasync", "{status:#}");
    assert_eq!(status["health"], "downgraded", "{status:#}");
    // Steps a-e under another kernel and the lab's glibc: nothing denied.
    assert_eq!(
        status["sandbox_denials"],
        0,
        "{status:#}\n{}",
        daemon.log_text()
    );
    drop(writer);
    result["downgrade"] = json!({
        "reason": status["downgraded"],
        "latency_ms": t3.elapsed().as_secs_f64() * 1e3,
    });

    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());

    // f. The served file itself goes under `direct`: another file is renamed over
    // it (no open, so no lease break). A change notice sees it at once; the daemon
    // makes the file durable and downgrades, as for a changed block map.
    let second = lab.file.with_file_name("renamed-over.img");
    let out = Command::new(&lab.daemon)
        .args(["prepare", second.to_str().unwrap(), "--size", "8M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut daemon = Daemon::in_vm(
        &lab.daemon,
        &second,
        scratch.path(),
        "f",
        &["--verify-interval", "0"],
    );
    assert_eq!(daemon.status()["policy"], "direct");
    let other = lab.file.with_file_name("other.img");
    fs::write(&other, vec![1u8; 8 << 20]).unwrap();
    let t4 = Instant::now();
    fs::rename(&other, &second).unwrap();
    let status = daemon.wait_status("the downgrade after the rename", |s| {
        s["downgraded"].is_string()
    });
    assert_eq!(status["policy"], "datasync", "{status:#}");
    // The worse of the two: the file itself changed (and `direct` is downgraded).
    assert_eq!(status["health"], "file-changed", "{status:#}");
    assert_eq!(status["guard"]["file_change"], "replaced", "{status:#}");
    assert_eq!(status["guard"]["lease_breaks"], 0, "{status:#}");
    result["file_replaced"] = json!({
        "policy": status["policy"],
        "file_problem": status["guard"]["file_problem"],
        "latency_ms": t4.elapsed().as_secs_f64() * 1e3,
    });
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    println!("VDP-LAB-RESULT {result}");
}

/// The /dev/pmem0 sector holding byte `offset` of the file.
fn device_sector(extents: &[Extent], offset: u64) -> u64 {
    blockmap::physical_offset(extents, offset)
        .unwrap_or_else(|| panic!("no extent holds {offset:#x}: {extents:?}"))
        / 512
}

/// A sector of the device no extent of the file covers (from the end down).
fn sector_outside(extents: &[Extent], badblocks: &Path) -> u64 {
    let size: u64 = fs::read_to_string(badblocks.with_file_name("size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (0..size)
        .rev()
        .step_by(8)
        .find(|s| {
            let b = s * 512;
            !extents
                .iter()
                .any(|e| e.physical <= b && b < e.physical + e.length)
        })
        .expect("the file covers the whole device")
}

/// Marks one sector bad, in ONE write(2): sysfs parses each write on its own.
fn write_badblocks(path: &Path, sector: u64) {
    let line = format!("{sector} 1\n");
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let n = f.write(line.as_bytes()).unwrap();
    assert_eq!(n, line.len(), "short write to {}", path.display());
}

/// Subscribes to the daemon's events; lines arrive with the time they were read.
fn subscribe(control_path: &Path) -> Receiver<(Instant, Value)> {
    let (tx, rx) = channel();
    let path = control_path.to_owned();
    thread::spawn(move || {
        let _ = control::subscribe(&path, false, |line| {
            let v = serde_json::from_str(line).unwrap_or(Value::Null);
            tx.send((Instant::now(), v)).is_ok()
        });
    });
    let (_, ack) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ack["events"], "subscribed", "{ack}");
    rx
}

/// The next `bad-ranges-changed` event (others are skipped), or a panic at `deadline`.
fn next_bad_ranges_event(rx: &Receiver<(Instant, Value)>, deadline: Instant) -> (Instant, Value) {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, ev)) if ev["event"] == "bad-ranges-changed" => return (at, ev),
            Ok(_) => continue,
            Err(e) => panic!("no bad-ranges-changed event within {BADBLOCKS_TIMEOUT:?}: {e}"),
        }
    }
}
