// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk that fails writes under the served file, with device-mapper, in a VM that
//! plays the host: ext4 on /dev/mapper/pm (linear over /dev/vda), then dm-flakey
//! `error_writes` over the served file's extents only, then all linear again.
//! Owns this case on both sides of the VM; never asserts what the VM did not report.
//!
//! `failing_disk_vm` boots the VM (one boot) and runs [`inside_the_vm`] there; the
//! static copy of this test binary drives the static daemon with the in-process
//! frontend of testkit/src/frontend.rs. Only the file's extents fail: an error
//! table over the whole device makes ext4 abort its journal, and then every daemon
//! sees EIO or EROFS whatever it does. [`inside_the_vm`] is `#[ignore]`d on the
//! host, where it cannot run. Needs `guest-tests/setup.sh` (skips loudly without;
//! fails with VDP_REQUIRE_GUEST=1).

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::daemon::Daemon;
use vdp_testkit::frontend;
use vdp_testkit::guest::{env::VmEnv, static_binaries, static_test_binary, Boot, GuestEnv};
use vhost_device_pmem::blockmap::{self, Extent};

/// Hard limit for the boot, from QEMU start to power-off (TCG).
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// The VM's disk (a sparse file on the host): /dev/vda.
const DISK_SIZE: u64 = 128 << 20;
/// The served file on the VM's ext4.
const FILE_SIZE: u64 = 16 << 20;
/// Where the frontend's stores go: during the fault, after the disk recovered, after
/// the failure record was cleared. Different pages, so a later writeback cannot
/// carry an earlier store to the disk.
const OFF_A: u64 = 1 << 20;
const OFF_B: u64 = 8 << 20;
const OFF_C: u64 = 12 << 20;
const DATA_LEN: usize = 64 << 10;
/// The console line that carries [`inside_the_vm`]'s observations.
const RESULT: &str = "VDP-FAILING-DISK-RESULT ";
/// The device-mapper device the VM's ext4 lives on.
const DM_NAME: &str = "pm";

// ---- host side: boot the VM ----------------------------------------------------

#[test]
fn failing_disk_vm() {
    let Some(env) = GuestEnv::load("failing_disk_vm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    File::create(&disk).unwrap().set_len(DISK_SIZE).unwrap();

    let mut boot = Boot::default()
        .with_disk(&disk)
        .with_host_tools(&["dmsetup", "mkfs.ext4"])
        .with_host_files(&["/etc/mke2fs.conf"]);
    boot.add_file(
        "vdp/vhost-device-pmem",
        &static_binaries().join("vhost-device-pmem"),
    );
    boot.add_file("vdp/failing-disk", &static_test_binary("failing_disk_vm"));

    // Kernel messages stay off the console while the test prints (the I/O errors
    // are expected); the script prints them afterwards.
    let script = format!(
        r#"
export PATH=/usr/bin:/bin:/sbin DM_DISABLE_UDEV=1
[ -b /dev/vda ] || mdev -s
sectors=$(cat /sys/block/vda/size)
/usr/bin/dmsetup create {DM_NAME} --noudevsync --table "0 $sectors linear /dev/vda 0" || exit 21
[ -b /dev/mapper/{DM_NAME} ] || exit 21
/usr/bin/mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/mapper/{DM_NAME} || exit 22
mkdir -p /mnt/disk
mount -t ext4 /dev/mapper/{DM_NAME} /mnt/disk || exit 23
echo "VDP-MOUNT $(grep ' /mnt/disk ' /proc/mounts)"
/vdp/vhost-device-pmem prepare /mnt/disk/pmem.img --size {FILE_SIZE} || exit 24
echo 1 > /proc/sys/kernel/printk
VDP_FD_DAEMON=/vdp/vhost-device-pmem VDP_FD_FILE=/mnt/disk/pmem.img \
VDP_FD_DMSETUP=/usr/bin/dmsetup VDP_FD_DISK=/dev/vda RUST_BACKTRACE=1 \
  /vdp/failing-disk --exact inside_the_vm --ignored --nocapture --test-threads=1
rc=$?
dmesg | grep -E 'I/O error|EXT4-fs|device-mapper' | tail -n 12 | sed 's/^/VDP-DMESG /'
umount /mnt/disk || echo "VDP-WARN umount failed"
/usr/bin/dmsetup remove --noudevsync {DM_NAME} || echo "VDP-WARN dmsetup remove failed"
exit $rc
"#
    );
    let started = Instant::now();
    let mut guest = env.boot_vm(dir.path(), &script, &boot);
    let rc = guest.finish(VM_TIMEOUT);
    let took = started.elapsed();
    if (21..=24).contains(&rc) {
        guest.dump();
        panic!("the VM's set-up failed with {rc} (21: dmsetup create, 22: mkfs, 23: mount, 24: prepare)");
    }
    let Some(line) = guest.console.iter().find(|l| l.contains(RESULT)).cloned() else {
        guest.dump();
        panic!(
            "the test in the VM reported nothing (exit {rc}); its panic is on the console above"
        );
    };
    let result: Value = serde_json::from_str(line.split_once(RESULT).unwrap().1.trim())
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    let _ = writeln!(
        std::io::stderr(),
        "failing disk VM ({:?} boot to power-off, {}): {result}",
        took,
        env.accel
    );
    let failed = failures(&result);
    if !failed.is_empty() {
        guest.dump();
        panic!(
            "the daemon on a failing disk (dm-flakey error_writes under the served file):\n  {}\nresult: {result:#}",
            failed.join("\n  ")
        );
    }
    assert_eq!(rc, 0, "the test in the VM failed although its result holds");
}

/// What the daemon must have done, checked on the observations of [`inside_the_vm`]
/// (in the VM before it exits, and again on the host): one line per failed
/// expectation.
fn failures(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            out.push(what.to_string());
        }
    };
    expect(
        r["flush_during_fault"] == 1,
        "the flush whose fdatasync failed must be answered EIO (1)",
    );
    expect(
        r["media_after_fault_has_store"] == false,
        "the store must not be on the disk while writes fail (else EIO is wrong)",
    );
    expect(
        r["flush_after_recovery"] == 1,
        "a flush after the disk recovered must stay EIO (1): fdatasync returns 0 again, \
         but the store from before is not on the disk",
    );
    expect(
        r["media_after_recovery_has_store"] == false,
        "the first store must still be missing from the disk after the recovery \
         (what an OK would have hidden)",
    );
    expect(
        r["status"]["health"] == "failed",
        "status.health must be \"failed\"",
    );
    expect(
        r["status"]["sync_failure"]["errno"] == libc::EIO,
        "status.sync_failure.errno must be 5 (EIO from dm-flakey)",
    );
    expect(
        r["status"]["sync_failure"]["context"] == "flush",
        "status.sync_failure.context must be \"flush\"",
    );
    expect(
        r["sigterm_exit"].as_i64().is_some_and(|c| c != 0),
        "a failed daemon must exit non-zero at SIGTERM",
    );
    expect(
        r["health_clear_exit"] == 0,
        "`health --clear` must succeed with the daemon stopped",
    );
    expect(
        r["after_clear"]["health"] == "healthy",
        "a daemon started after `health --clear` must be healthy",
    );
    expect(
        r["after_clear"]["flush"] == 0 && r["after_clear"]["media_has_store"] == true,
        "after `health --clear` a flush must be OK and its store on the disk",
    );
    out
}

// ---- inside the VM -------------------------------------------------------------

/// What the VM's script passes to [`inside_the_vm`].
struct Vm {
    daemon: PathBuf,
    file: PathBuf,
    dmsetup: PathBuf,
    disk: PathBuf,
}

const VM_VARS: [&str; 4] = [
    "VDP_FD_DAEMON",
    "VDP_FD_FILE",
    "VDP_FD_DMSETUP",
    "VDP_FD_DISK",
];

impl Vm {
    /// The VM's paths; panics outside the VM (the test is `#[ignore]`d, so it runs
    /// only when asked for, and asked for outside the VM it must not pass).
    fn from_env() -> Self {
        let env = VmEnv::load(
            &VM_VARS,
            "inside_the_vm runs only inside the failing-disk VM (failing_disk_vm boots it \
             and runs it there)",
        );
        Self {
            daemon: env.path("VDP_FD_DAEMON"),
            file: env.path("VDP_FD_FILE"),
            dmsetup: env.path("VDP_FD_DMSETUP"),
            disk: env.path("VDP_FD_DISK"),
        }
    }

    /// Runs dmsetup without udev (the VM has none); panics with its output on failure.
    fn dmsetup(&self, args: &[&str]) -> String {
        let out = Command::new(&self.dmsetup)
            .args(args)
            .env("DM_DISABLE_UDEV", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dmsetup {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Replaces the live table of the device-mapper device (load, suspend, resume:
    /// the suspend waits for the I/O in flight, so none straddles the switch). The
    /// filesystem is not frozen (`--nolockfs`): a freeze syncs it, and once a write
    /// under the served file has failed that sync reports the error again and the
    /// suspend fails with EIO (seen under load in CI).
    fn switch_table(&self, table: &str, dir: &Path) -> String {
        let path = dir.join("table");
        fs::write(&path, table).unwrap();
        self.dmsetup(&["load", DM_NAME, path.to_str().unwrap()]);
        self.dmsetup(&["suspend", "--nolockfs", "--noudevsync", DM_NAME]);
        self.dmsetup(&["resume", "--noudevsync", DM_NAME]);
        self.dmsetup(&["table", DM_NAME])
    }

    /// What the disk holds at `physical`, read with O_DIRECT from below
    /// device-mapper (past every cache in the VM).
    fn read_disk(&self, physical: u64, len: usize) -> Vec<u8> {
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.disk)
            .unwrap();
        let mut buf = vec![0u8; len + 4096];
        let skip = buf.as_ptr().align_offset(4096);
        dev.read_exact_at(&mut buf[skip..skip + len], physical)
            .unwrap();
        buf[skip..skip + len].to_vec()
    }

    fn disk_sectors(&self) -> u64 {
        let name = self.disk.file_name().unwrap().to_str().unwrap();
        fs::read_to_string(format!("/sys/block/{name}/size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

/// The device-mapper table over the whole disk: linear, except dm-flakey with
/// `error_writes` over `failing` (byte ranges, sorted, disjoint). Up interval 0 and
/// down interval > 0: always down; reads pass, writes fail with EIO.
fn table(disk: &Path, sectors: u64, failing: &[(u64, u64)]) -> String {
    let disk = disk.display();
    let mut lines = Vec::new();
    let mut at = 0u64;
    for &(start, len) in failing {
        let (start, len) = (start / 512, len / 512);
        if start > at {
            lines.push(format!("{at} {} linear {disk} {at}", start - at));
        }
        lines.push(format!(
            "{start} {len} flakey {disk} {start} 0 180 1 error_writes"
        ));
        at = start + len;
    }
    if at < sectors {
        lines.push(format!("{at} {} linear {disk} {at}", sectors - at));
    }
    lines.join("\n") + "\n"
}

/// The file's extents as sorted, merged physical byte ranges.
fn physical_ranges(extents: &[Extent]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = extents.iter().map(|e| (e.physical, e.length)).collect();
    r.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, len) in r {
        match merged.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => merged.push((start, len)),
        }
    }
    merged
}

/// The physical offset (on the disk) of byte `offset` of the file.
fn physical(extents: &[Extent], offset: u64) -> u64 {
    blockmap::physical_offset(extents, offset)
        .unwrap_or_else(|| panic!("no extent holds {offset:#x}: {extents:?}"))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..DATA_LEN)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Runs in the VM against the prepared file on ext4 on /dev/mapper/pm: serve in
/// `datasync` mode, fail the writes under the file, recover, and record what the
/// daemon answered; prints the observations, then checks them ([`failures`]).
/// Ignored on the host (where it cannot run); the VM runs it with `--ignored`.
#[test]
#[ignore = "runs only inside the failing-disk VM (failing_disk_vm runs it there)"]
fn inside_the_vm() {
    let vm = Vm::from_env();
    let t0 = Instant::now();
    let ms = |t: Instant| (t.elapsed().as_secs_f64() * 1e3).round();
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    fs::create_dir(&state).unwrap();
    let mut r = json!({});

    // The extents, read before the daemon serves the file (opening it then would
    // break the daemon's lease). Physical offsets are bytes on /dev/mapper/pm, which
    // maps /dev/vda one to one.
    let extents = blockmap::read_extents(&File::open(&vm.file).unwrap(), FILE_SIZE).unwrap();
    assert_eq!(
        extents.iter().map(|e| e.length).sum::<u64>(),
        FILE_SIZE,
        "{extents:?}"
    );
    let ranges = physical_ranges(&extents);
    let sectors = vm.disk_sectors();
    r["extents"] = json!(ranges);

    let args = ["--mode", "datasync", "--state-dir", state.to_str().unwrap()];
    let mut daemon = Daemon::in_vm(&vm.daemon, &vm.file, scratch.path(), "first", &args);
    r["policy"] = daemon.status()["policy"].clone();
    assert_eq!(r["policy"], "datasync", "{}", daemon.log_text());
    let mut fe = mapped(&daemon);

    // 1. Writes under the file fail.
    let t = Instant::now();
    r["table_fault"] = json!(vm.switch_table(&table(&vm.disk, sectors, &ranges), scratch.path()));
    r["switch_ms"] = json!(ms(t));
    let a = pattern(0xa1);
    let t = Instant::now();
    r["flush_during_fault"] = write_and_flush(&mut fe, OFF_A, &a);
    r["flush_during_fault_ms"] = json!(ms(t));
    let disk_a = vm.read_disk(physical(&extents, OFF_A), DATA_LEN);
    r["media_after_fault_has_store"] = json!(disk_a == a);

    // 2. The disk recovers: all linear again.
    r["table_recovered"] = json!(vm.switch_table(
        &format!("0 {sectors} linear {} 0\n", vm.disk.display()),
        scratch.path()
    ));
    r["flush_after_recovery"] = write_and_flush(&mut fe, OFF_B, &pattern(0xb2));
    r["media_after_recovery_has_store"] =
        json!(vm.read_disk(physical(&extents, OFF_A), DATA_LEN) == a);
    let status = daemon.status();
    r["status"] = json!({"health": status["health"], "sync_failure": status["sync_failure"]});
    r["stats_errors"] = daemon.stats()["errors"].clone();

    // 3. SIGTERM.
    drop(fe);
    r["sigterm_exit"] = json!(daemon.terminate());

    // 4. The operator clears the record; a new daemon is healthy and its flushes
    // reach the disk (which shows the disk really recovered).
    let out = Command::new(&vm.daemon)
        .arg("health")
        .arg("--file")
        .arg(&vm.file)
        .arg("--state-dir")
        .arg(&state)
        .arg("--clear")
        .output()
        .unwrap();
    r["health_clear_exit"] = json!(out.status.code());
    if !out.status.success() {
        r["health_clear_stderr"] = json!(String::from_utf8_lossy(&out.stderr));
    }
    let mut daemon = Daemon::in_vm(&vm.daemon, &vm.file, scratch.path(), "third", &args);
    let health = daemon.status()["health"].clone();
    let mut fe = mapped(&daemon);
    let c = pattern(0xc3);
    let flush = write_and_flush(&mut fe, OFF_C, &c);
    let media = vm.read_disk(physical(&extents, OFF_C), DATA_LEN) == c;
    r["after_clear"] = json!({"health": health, "flush": flush, "media_has_store": media});
    drop(fe);
    r["after_clear"]["sigterm_exit"] = json!(daemon.terminate());
    r["total_ms"] = json!(ms(t0));

    println!("{RESULT}{r}");
    let failed = failures(&r);
    assert!(failed.is_empty(), "{}\n{r:#}", failed.join("\n"));
}

/// A frontend that went through init and start, with the region mapped.
fn mapped(d: &Daemon) -> frontend::TestFrontend {
    let mut fe = frontend::TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    fe.map_region(0).unwrap();
    fe
}

/// One store through the mapping and one flush request: its status, or the error.
fn write_and_flush(fe: &mut frontend::TestFrontend, offset: u64, data: &[u8]) -> Value {
    fe.write_pmem(offset, data).unwrap();
    match fe.flush(1) {
        Ok(st) => json!(st[0]),
        Err(e) => json!(format!("no answer: {e}")),
    }
}
