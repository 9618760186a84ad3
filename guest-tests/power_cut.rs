// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Durability tests that a page-cache read cannot fool: a VM plays the host, serves a
//! file on its virtio-blk disk and loses power right after acknowledging flushes.
//! Owns the power-cut and flush-point checks; never changes the daemon, and never
//! calls a record safe unless it was read back from the disk as the cut left it.
//!
//! - `power_cut_datasync`, `power_cut_fsync`: a VM (its disk a file here, QEMU
//!   cache=writeback, so killing the VM keeps what reached its disk and loses its page
//!   cache) makes ext4 on /dev/vda with background writeback off, prepares a 64 MiB
//!   file and runs [`inside_the_host_vm`] from this very test binary (built static;
//!   `#[ignore]`d on the host, where it cannot run):
//!   it starts the static daemon, plays the VMM with the in-process frontend (plain
//!   MAP_SHARED mapping, as QEMU 11.1 maps the region), writes numbered 4 KiB records
//!   through the mapping, sends one FLUSH per record and prints `VDP-ACK i` for each
//!   one acknowledged; after the last one (or one picked at random) it resets the
//!   machine through sysrq at once. Here the file is read back from the disk image
//!   (journal replayed on a copy, `debugfs dump`): every acknowledged record must be
//!   intact.
//! - `power_cut_volatile_loses_records`: the negative control; the same run with
//!   `--mode volatile` must lose acknowledged records, or the test could not fail.
//! - `log_writes_every_flush_point`: the VM's disk sits under dm-log-writes; after
//!   each acknowledgement the frontend drops a mark in the log. Here the log is
//!   replayed ([`logwrites`]) and at every FLUSH/FUA entry and every mark, every
//!   record acknowledged so far must be intact on the replayed disk (read at the
//!   file's fixed extents); a sample of points is also checked through a repaired
//!   filesystem.
//!
//! Knobs (environment): VDP_POWER_CUT_ROUNDS (boots per mode, default 1),
//! VDP_POWER_CUT_RECORDS (default 40), VDP_POWER_CUT_AT (`last`, the default for the
//! first round, `random`, the default for later ones, or a record number),
//! VDP_POWER_CUT_SEED, VDP_LOG_WRITES_RECORDS (default 2000), VDP_LOG_WRITES_MODE
//! (default `datasync`; `volatile` runs the log-writes negative control, which must
//! find lost records). Needs `guest-tests/setup.sh` (skips loudly without; fails with
//! VDP_REQUIRE_GUEST=1).

use vdp_testkit::frontend;
mod logwrites;

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::Write,
    ops::Range,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use vdp_testkit::daemon::Daemon;
use vdp_testkit::guest::{
    env::{num_or, optional_num, VmEnv},
    records::{self, classify, record, splitmix, Found, RECORD, RECORD_MAGIC},
    static_binaries, static_test_binary, Boot, Guest, GuestEnv,
};
use vhost_device_pmem::blockmap::{self, Extent};

/// The file the daemon serves inside the VM.
const SERVED_SIZE: u64 = 64 << 20;
/// Path of the served file inside the VM, and in its filesystem.
const SERVED_PATH: &str = "/pmem.img";
/// The VM's disk (a sparse file here); for log-writes, the data device.
const DISK_SIZE: u64 = 128 << 20;
/// The log-writes log device (sparse): mkfs, prepare's 64 MiB and the records.
const LOG_DISK_SIZE: u64 = 512 << 20;
/// Hard limit for one boot, QEMU start to the cut or power-off (TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to go away after the guest said it cuts power.
const CUT_TIMEOUT: Duration = Duration::from_secs(60);
/// Every this many flush points (and at the last one) the log-writes check also
/// repairs the filesystem and reads the records through it.
const FS_SAMPLE_EVERY: u64 = 100;

// ---- inside the VM ------------------------------------------------------------------

/// What the VM's script passes to [`inside_the_host_vm`].
struct Inside {
    daemon: PathBuf,
    file: PathBuf,
    mode: String,
    records: u64,
    nonce: u64,
    /// Reset the machine right after acknowledging this record.
    cut_after: Option<u64>,
    /// dm-log-writes device to mark after each acknowledgement, and dmsetup.
    mark: Option<(String, PathBuf)>,
}

const INSIDE_VARS: [&str; 5] = [
    "VDP_PC_DAEMON",
    "VDP_PC_FILE",
    "VDP_PC_MODE",
    "VDP_PC_RECORDS",
    "VDP_PC_NONCE",
];

impl Inside {
    /// The run's parameters; panics outside the VM (the test is `#[ignore]`d, so it
    /// runs only when asked for, and asked for outside the VM it must not pass).
    fn from_env() -> Self {
        let env = VmEnv::load(
            &INSIDE_VARS,
            "inside_the_host_vm runs only inside the VM that plays the host (power_cut_* and \
             log_writes_every_flush_point boot it and run it there)",
        );
        let cut_after = optional_num("VDP_PC_CUT_AFTER");
        let mark = std::env::var("VDP_PC_MARK_DEVICE").ok().map(|dev| {
            (
                dev,
                PathBuf::from(std::env::var("VDP_PC_DMSETUP").expect("VDP_PC_DMSETUP")),
            )
        });
        Self {
            daemon: env.path("VDP_PC_DAEMON"),
            file: env.path("VDP_PC_FILE"),
            mode: env.get("VDP_PC_MODE"),
            records: env.num("VDP_PC_RECORDS"),
            nonce: env.num("VDP_PC_NONCE"),
            cut_after,
            mark,
        }
    }
}

/// Runs in the VM that plays the host: serves the prepared file with the static
/// daemon, writes and flushes records through the frontend's mapping, prints an
/// acknowledgement per record, then either resets the machine at once (a power cut)
/// or, with marks, stops cleanly. Ignored on the host (where it cannot run); the VM
/// runs it with `--ignored`.
#[test]
#[ignore = "runs only inside the VM that plays the host (power_cut_* and log_writes_every_flush_point run it there)"]
fn inside_the_host_vm() {
    let run = Inside::from_env();
    if let Some(cut) = run.cut_after {
        assert!(
            cut < run.records,
            "cut after {cut} of {} records",
            run.records
        );
    }
    let scratch = tempfile::tempdir().unwrap();

    // The file's extents, read before the daemon serves it (opening it later would
    // break the daemon's lease). Its block map is immutable from here on, so the
    // host can find every record at a fixed offset of the disk.
    let extents = blockmap::read_extents(&File::open(&run.file).unwrap(), SERVED_SIZE).unwrap();
    let ext: Vec<[u64; 3]> = extents
        .iter()
        .map(|e| [e.logical, e.physical, e.length])
        .collect();
    say(&format!("VDP-EXTENTS {}", json!(ext)));

    // Everything the cut needs is ready before the first record: nothing but one
    // write(2) runs between the last acknowledgement and the reset.
    let mut sysrq = run.cut_after.map(|_| {
        fs::write("/proc/sys/kernel/sysrq", "1").expect("enable sysrq");
        OpenOptions::new()
            .write(true)
            .open("/proc/sysrq-trigger")
            .expect("/proc/sysrq-trigger")
    });

    let mut daemon = Daemon::in_vm(
        &run.daemon,
        &run.file,
        scratch.path(),
        "d",
        &["--mode", &run.mode],
    );
    let status = daemon.status();
    assert_eq!(status["policy"], run.mode.as_str(), "{status:#}");

    let mut fe = frontend::TestFrontend::connect(&daemon.socket).unwrap();
    fe.start().unwrap();
    assert_eq!(
        fe.maps.wait_for(1, frontend::TIMEOUT),
        1,
        "no SHMEM_MAP:\n{}",
        daemon.log_text()
    );
    assert_eq!(fe.maps.with(0, |m| m.len), SERVED_SIZE);
    // Plain MAP_SHARED, exactly as QEMU 11.1 maps a SHMEM_MAP region.
    fe.map_region(0).unwrap();

    let t0 = Instant::now();
    for i in 0..run.records {
        fe.write_pmem(i * RECORD as u64, &record(run.nonce, i))
            .unwrap();
        let status = fe.flush(1).unwrap_or_else(|e| {
            panic!("flush of record {i}: {e}\n{}", daemon.log_text());
        });
        assert_eq!(
            status,
            vec![0],
            "flush of record {i}\n{}",
            daemon.log_text()
        );
        say(&format!("VDP-ACK {i}"));
        if run.cut_after == Some(i) {
            say(&format!("VDP-CUT {i}"));
            // The console line must leave the UART before the machine goes.
            // SAFETY: tcdrain on our own stdout.
            unsafe { libc::tcdrain(1) };
            let _ = sysrq.as_mut().unwrap().write_all(b"b");
            // Not reached: the reset ends QEMU (-no-reboot).
            loop {
                thread::sleep(Duration::from_secs(1));
            }
        }
        if let Some((dev, dmsetup)) = &run.mark {
            let out = Command::new(dmsetup)
                .args(["message", dev, "0", "mark", &format!("ack-{i}")])
                .env("DM_DISABLE_UDEV", "1")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "dmsetup message {dev} mark ack-{i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let stats = daemon.stats();
    drop(fe);
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    say(&format!(
        "VDP-INSIDE-DONE records={} secs={secs:.1} flush_requests={} syncs={}",
        run.records, stats["flush_requests"], stats["syncs"]
    ));
}

/// One console line, on its way before this returns.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---- host side: the VM that plays the host ------------------------------------------

/// The static daemon and this test binary, built static, for the VM.
struct Binaries {
    daemon: PathBuf,
    test: PathBuf,
}

impl Binaries {
    fn build() -> Self {
        Self {
            daemon: static_binaries().join("vhost-device-pmem"),
            test: static_test_binary("power_cut"),
        }
    }

    /// The extras of one boot: mkfs (and dmsetup), our binaries, the disks.
    fn boot(&self, tools: &[&str], disks: &[&Path]) -> Boot {
        let mut boot = Boot::default()
            .with_host_tools(tools)
            .with_host_files(&["/etc/mke2fs.conf"]);
        boot.add_file("vdp/vhost-device-pmem", &self.daemon);
        boot.add_file("vdp/power-cut", &self.test);
        for d in disks {
            boot = boot.with_disk(d);
        }
        boot
    }
}

/// Shell that waits (up to 30 s) for the virtio-blk disks `disks` to appear: the
/// driver probes them asynchronously. Exits 20 if one does not.
fn wait_for_disks(disks: &[&str]) -> String {
    disks
        .iter()
        .map(|d| {
            format!(
                "i=0; while [ ! -b {d} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n\
                 [ -b {d} ] || {{ echo 'VDP-NO-DISK {d}'; exit 20; }}\n"
            )
        })
        .collect()
}

/// Shell that makes and mounts ext4 on `$DEV` with background writeback off (so
/// only what the daemon syncs reaches the disk before a cut) and prepares the served
/// file. Exits 21 (mkfs), 22 (mount), 23 (prepare).
fn host_setup(dev: &str) -> String {
    format!(
        r#"
echo 95 > /proc/sys/vm/dirty_ratio
echo 90 > /proc/sys/vm/dirty_background_ratio
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 8640000 > /proc/sys/vm/dirty_expire_centisecs
/usr/bin/mkfs.ext4 -q -F -b 4096 -E nodiscard {dev} || exit 21
mkdir -p /mnt/host
mount -t ext4 -o commit=600,noinit_itable {dev} /mnt/host || exit 22
/vdp/vhost-device-pmem prepare /mnt/host{SERVED_PATH} --size {SERVED_SIZE} || exit 23
sync
echo "VDP-PREPARED $(grep ' /mnt/host ' /proc/mounts)"
"#
    )
}

/// The command line that runs [`inside_the_host_vm`] in the VM, with `extra`
/// variables.
fn inside_cmd(mode: &str, records: u64, nonce: u64, extra: &str) -> String {
    format!(
        "VDP_PC_DAEMON=/vdp/vhost-device-pmem VDP_PC_FILE=/mnt/host{SERVED_PATH} \
         VDP_PC_MODE={mode} VDP_PC_RECORDS={records} VDP_PC_NONCE={nonce} {extra} \
         RUST_BACKTRACE=1 /vdp/power-cut --exact inside_the_host_vm --ignored --nocapture --test-threads=1"
    )
}

/// A seed for this run: VDP_POWER_CUT_SEED, or the clock.
fn seed() -> u64 {
    std::env::var("VDP_POWER_CUT_SEED").map_or_else(
        |_| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            splitmix(t.as_nanos() as u64 ^ u64::from(std::process::id()))
        },
        |v| v.parse().expect("VDP_POWER_CUT_SEED"),
    )
}

/// The numbers after `prefix` on the console, in order (console lines may carry a
/// carriage return or kernel noise before the marker).
fn console_numbers(guest: &Guest, prefix: &str) -> Vec<u64> {
    guest
        .console
        .iter()
        .filter_map(|l| l.split_once(prefix))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

fn console_value(guest: &Guest, prefix: &str) -> Option<String> {
    guest
        .console
        .iter()
        .find_map(|l| l.split_once(prefix))
        .map(|(_, rest)| rest.trim().to_string())
}

/// Repairs a copy of the ext4 image at `image` (journal replayed, as a mount after
/// the crash would) and reads the served file out of it.
fn recover_served_file(image: &Path, scratch: &Path) -> Result<Vec<u8>, String> {
    let copy = scratch.join("fsck-copy.img");
    fs::copy(image, &copy).map_err(|e| format!("copy {}: {e}", image.display()))?;
    let result = recover_in_place(&copy, scratch);
    let _ = fs::remove_file(&copy);
    result
}

/// [`recover_served_file`] on an image that may be changed.
fn recover_in_place(image: &Path, scratch: &Path) -> Result<Vec<u8>, String> {
    records::recover_ext4_file(image, SERVED_PATH, SERVED_SIZE, scratch)
}

// ---- power cut ----------------------------------------------------------------------

#[test]
fn power_cut_datasync() {
    power_cut("datasync");
}

#[test]
fn power_cut_fsync() {
    power_cut("fsync");
}

/// The negative control: without syncs, records acknowledged before a power cut are
/// gone. If this ever keeps every record, the power-cut tests prove nothing.
#[test]
fn power_cut_volatile_loses_records() {
    power_cut("volatile");
}

/// What one cut left.
struct Cut {
    acked: u64,
    intact: u64,
    zero: u64,
    other: u64,
    cut_after: u64,
    boot: Duration,
}

fn power_cut(mode: &str) {
    let test = if mode == "volatile" {
        "power_cut_volatile_loses_records".to_string()
    } else {
        format!("power_cut_{mode}")
    };
    let Some(env) = GuestEnv::load(&test) else {
        return;
    };
    let rounds = num_or("VDP_POWER_CUT_ROUNDS", 1);
    let records = num_or("VDP_POWER_CUT_RECORDS", 40);
    assert!(rounds >= 1 && records >= 1);
    let at = std::env::var("VDP_POWER_CUT_AT").ok();
    let mut rng = seed();
    let bins = Binaries::build();
    let mut cuts = Vec::new();
    for round in 1..=rounds {
        rng = splitmix(rng);
        let cut_after = match at.as_deref() {
            None if round == 1 => records - 1,
            Some("last") => records - 1,
            None | Some("random") => rng % records,
            Some(n) => n.parse::<u64>().expect("VDP_POWER_CUT_AT").min(records - 1),
        };
        let cut = cut_once(&env, &bins, mode, records, cut_after, splitmix(rng));
        let _ = writeln!(
            std::io::stderr(),
            "VDP-POWER-CUT mode={mode} round={round} records_acked={} records_intact={} \
             lost={} lost_zero={} lost_other={} cut_after={} boot_secs={:.1} accel={}",
            cut.acked,
            cut.intact,
            cut.acked - cut.intact,
            cut.zero,
            cut.other,
            cut.cut_after,
            cut.boot.as_secs_f64(),
            env.accel
        );
        cuts.push(cut);
    }
    for (round, c) in cuts.iter().enumerate() {
        let round = round + 1;
        if mode == "volatile" {
            assert!(
                c.intact < c.acked,
                "round {round}: --mode volatile kept all {} acknowledged records through a \
                 power cut: this harness cannot see lost data (is background writeback on?)",
                c.acked
            );
        } else {
            assert_eq!(
                c.intact,
                c.acked,
                "round {round}: --mode {mode} lost {} of {} acknowledged records in a power cut \
                 after record {} ({} never reached the disk, {} damaged)",
                c.acked - c.intact,
                c.acked,
                c.cut_after,
                c.zero,
                c.other
            );
        }
    }
}

/// One boot: records 0..=cut_after acknowledged, then the power goes.
fn cut_once(
    env: &GuestEnv,
    bins: &Binaries,
    mode: &str,
    records: u64,
    cut_after: u64,
    nonce: u64,
) -> Cut {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    File::create(&disk).unwrap().set_len(DISK_SIZE).unwrap();
    let boot = bins.boot(&["mkfs.ext4"], &[&disk]);
    let script = format!(
        "export PATH=/usr/bin:/bin:/sbin\n{}{}\n{}\nrc=$?\necho \"VDP-NO-CUT $rc\"\nexit $rc\n",
        wait_for_disks(&["/dev/vda"]),
        host_setup("/dev/vda"),
        inside_cmd(
            mode,
            records,
            nonce,
            &format!("VDP_PC_CUT_AFTER={cut_after}")
        )
    );
    let started = Instant::now();
    let mut guest = env.boot_vm(dir.path(), &script, &boot);
    guest.expect("VDP-CUT ", BOOT_TIMEOUT);
    let exit = guest.wait_exit(CUT_TIMEOUT);
    let took = started.elapsed();
    if exit.is_none() {
        guest.dump();
        panic!("QEMU still ran {CUT_TIMEOUT:?} after the guest cut the power");
    }
    if guest
        .console
        .iter()
        .any(|l| l.contains("VDP-RESULT") || l.contains("VDP-NO-CUT"))
    {
        guest.dump();
        panic!("the guest went on after the cut: the reset did not happen at once");
    }
    let acks = console_numbers(&guest, "VDP-ACK ");
    let expected: Vec<u64> = (0..=cut_after).collect();
    if acks != expected {
        guest.dump();
        panic!("acknowledgements on the console: {acks:?}, expected 0..={cut_after}");
    }

    let file = recover_served_file(&disk, dir.path()).unwrap_or_else(|e| {
        guest.dump();
        panic!("recovering the VM's filesystem after the cut: {e}")
    });
    let mut cut = Cut {
        acked: acks.len() as u64,
        intact: 0,
        zero: 0,
        other: 0,
        cut_after,
        boot: took,
    };
    for &i in &acks {
        let at = i as usize * RECORD;
        match classify(&file[at..at + RECORD], &record(nonce, i)) {
            Found::Intact => cut.intact += 1,
            Found::Zero => cut.zero += 1,
            Found::Other => cut.other += 1,
        }
    }
    cut
}

/// Every flush point (dm-log-writes under the VM's disk) and its checker.
mod flush_points;
