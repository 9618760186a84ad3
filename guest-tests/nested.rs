// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DAX host for real: the lab VM (L1: an emulated NVDIMM turned fsdax, ext4 or
//! XFS mounted `-o dax` on it) runs QEMU 11.1 itself and boots a guest of its own
//! (L2) with both exports of one file each on L1's DAX filesystem:
//!
//! - a virtio-pmem device served by the daemon (`direct` on a prepared file), which
//!   L2 mounts with DAX and writes numbered records to, one `fsync` each;
//! - an NVDIMM hot-plugged by `vhost-device-pmem nvdimm` (QEMU maps its file with
//!   MAP_SYNC), which L2 turns into fsdax, mounts with DAX and writes records to
//!   through a MAP_SYNC mapping with cache-line write-backs and a fence only.
//!
//! In L2, `mmap(MAP_SYNC)` must fail on the virtio-pmem mount (an asynchronous
//! region) and succeed on the NVDIMM's. In L1, strace follows the daemon through the
//! whole record phase: no sync syscall at all. Then either L1 powers off cleanly and
//! checks the records through its own filesystem (XFS), or L1 loses power at once
//! (sysrq reset, its ext4 mounted `commit=600` with background writeback off: its
//! page cache and uncommitted journal die, its NVDIMM's contents stay in the file
//! here). The host recovers L1's filesystem from that file (the fsdax data offset
//! was printed before) and every acknowledged record of both exports must be in it.
//! The negative control runs the same with sparse, unprepared files, the daemon in
//! `volatile` and the NVDIMM exported `--mode volatile` (QEMU maps it without
//! MAP_SYNC): both must lose records, or the proof could not fail.
//!
//! Owns: the nested boots and their checks. Never changes the daemon, and never
//! calls a record safe unless it was read back from where the cut left it.
//! `in_l1` and `in_l2` are `#[ignore]`d: they run only inside the VMs that run them.
//! Needs `guest-tests/setup.sh` (skips loudly without; fails with VDP_REQUIRE_GUEST=1).
//! Knob: VDP_NESTED_RECORDS (records per export, default 16).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::daemon::Daemon;
use vdp_testkit::guest::{
    agent_qemu_args, fsdax_convert,
    in_vm::{strace_window, vm_flags, SyncMapping, SYNC_CALLS},
    lab_boot,
    records::{classify, record, recover_ext4_file, splitmix, Found, RECORD},
    run, static_binaries, static_test_binary, Boot, Guest, GuestEnv,
};
use vhost_device_pmem::{
    blockmap::{
        self,
        prepare::{self, Progress},
        Extent,
    },
    control,
};

/// Hard limit for one L1 boot, QEMU start to power-off or cut (nested TCG).
const L1_TIMEOUT: Duration = Duration::from_secs(900);
/// How long L2 may take from its QEMU's start to the end of its records.
const L2_TIMEOUT: Duration = Duration::from_secs(600);
/// L1's emulated NVDIMM (a sparse file here).
const L1_NVDIMM_SIZE: u64 = 1 << 30;
/// Each export's file on L1's DAX filesystem.
const EXPORT_SIZE: u64 = 64 << 20;
/// Where L1 mounts its DAX filesystem; the exported files are in its root.
const L1_MOUNT: &str = "/mnt/lab";
const VIRTIO_FILE: &str = "virtio.img";
const NVDIMM_FILE: &str = "nvdimm.img";
/// The NVDIMM's ids in L2's QEMU.
const NVDIMM_ID: &str = "nv1";

/// Which files and modes a boot exports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    /// Prepared files; the daemon `direct`, the NVDIMM exported with MAP_SYNC.
    Durable,
    /// Sparse files; the daemon `volatile`, the NVDIMM `--mode volatile`.
    Volatile,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Durable => "durable",
            Case::Volatile => "volatile",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "durable" => Case::Durable,
            "volatile" => Case::Volatile,
            _ => panic!("unknown case {s}"),
        }
    }
}

// ---- host side -------------------------------------------------------------------

/// Lab checks on ext4, then L1 loses power: every acknowledged record survives.
#[test]
fn nested_ext4_power_cut_keeps_acknowledged_records() {
    run_nested(
        "nested_ext4_power_cut_keeps_acknowledged_records",
        "ext4",
        Case::Durable,
        true,
    );
}

/// The negative control of the power cut: volatile exports of sparse files lose
/// acknowledged records.
#[test]
fn nested_ext4_power_cut_volatile_loses_records() {
    run_nested(
        "nested_ext4_power_cut_volatile_loses_records",
        "ext4",
        Case::Volatile,
        true,
    );
}

/// Lab checks on XFS; L1 powers off cleanly and reads the records back itself.
#[test]
fn nested_xfs() {
    run_nested("nested_xfs", "xfs", Case::Durable, false);
}

fn records_per_export() -> u64 {
    std::env::var("VDP_NESTED_RECORDS")
        .ok()
        .map(|v| v.parse().expect("VDP_NESTED_RECORDS"))
        .unwrap_or(16)
}

fn run_nested(test: &str, fs_name: &str, case: Case, cut: bool) {
    let Some(env) = GuestEnv::load(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let records = records_per_export();
    let nonce = splitmix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );

    let env_line = format!(
        "VDP_NESTED_FS={fs_name} VDP_NESTED_CASE={} VDP_NESTED_CUT={} VDP_NESTED_RECORDS={records} \\\nVDP_NESTED_NONCE={nonce}",
        case.name(),
        u8::from(cut)
    );
    let (nvdimm, script, boot) = l1_rig(
        &env,
        dir.path(),
        fs_name,
        &l2_script(records, nonce),
        "in_l1",
        &env_line,
    );
    let started = Instant::now();
    let mut guest = env.boot_lab_with(dir.path(), &nvdimm, &script, &boot, "2G");
    if cut {
        guest.expect("VDP-CUT", L1_TIMEOUT);
        if guest.wait_exit(Duration::from_secs(60)).is_none() {
            guest.dump();
            panic!("L1 still ran 60 s after it cut its power");
        }
        if guest.console.iter().any(|l| l.contains("VDP-NO-CUT")) {
            guest.dump();
            panic!("L1 went on after the cut: the reset did not happen at once");
        }
    } else {
        let rc = guest.finish(L1_TIMEOUT);
        if rc != 0 {
            guest.dump();
            panic!("L1 failed with {rc} (20: fsdax, 21: mkfs, 22: mount, 24: umount, 25: QEMU tree, else in_l1)");
        }
    }
    let took = started.elapsed();
    let mount = guest.expect("VDP-MOUNT", Duration::ZERO);
    assert!(
        mount.contains(&format!(" {fs_name} ")) && mount.contains("dax"),
        "{mount}"
    );
    let l1: Value = console_json(&guest, "VDP-L1-RESULT ");
    let l2 = L2Report::parse(
        guest
            .console
            .iter()
            .filter_map(|l| l.split_once("VDP-L2 "))
            .map(|(_, r)| r),
    );

    // What L1 asserted, checked again here so a test that ran nothing cannot pass.
    assert_eq!(l1["case"], case.name(), "{l1:#}");
    assert_eq!(l2.mapsync["virtio_pmem"], "EOPNOTSUPP", "{:#}", l2.mapsync);
    assert_eq!(l2.mapsync["nvdimm"], "ok", "{:#}", l2.mapsync);
    assert_eq!(
        l2.acks_v.len() as u64,
        records,
        "virtio-pmem acks: {:?}",
        l2.acks_v
    );
    assert_eq!(
        l2.acks_n.len() as u64,
        records,
        "NVDIMM acks: {:?}",
        l2.acks_n
    );
    let expect_policy = if case == Case::Durable {
        "direct"
    } else {
        "volatile"
    };
    assert_eq!(l1["daemon"]["policy"], expect_policy, "{l1:#}");
    assert_eq!(l1["nvdimm"]["mode"], expect_policy, "{l1:#}");
    assert_eq!(l1["nvdimm"]["attached"], "hot-plugged", "{l1:#}");
    assert_eq!(l1["nvdimm"]["mapping_verified"], true, "{l1:#}");
    assert_eq!(l1["nvdimm"]["health_after"], "healthy", "{l1:#}");
    assert_eq!(l1["nvdimm"]["interval_syncs_after"], 0, "{l1:#}");
    // The exporter's sf and QEMU's mapping as L1 read it itself agree.
    let sf = case == Case::Durable;
    assert_eq!(l1["nvdimm"]["exporter_sf"], sf, "{l1:#}");
    assert_eq!(l1["nvdimm"]["qemu_mapping_sf"], sf, "{l1:#}");
    if case == Case::Durable {
        for call in SYNC_CALLS {
            assert_eq!(l1["strace"][call], 0, "{call}: {l1:#}");
        }
    }
    assert!(
        l1["daemon"]["flush_requests"].as_u64().unwrap() >= records,
        "{l1:#}"
    );

    let tally = if cut {
        // The cut left L1's filesystem as its NVDIMM holds it, from the data offset.
        let offset = console_u64(&guest, "VDP-DATAOFF0 ");
        let image = fs::read(&nvdimm).unwrap();
        let fs_image = dir.path().join("l1-fs.img");
        fs::write(&fs_image, &image[offset as usize..]).unwrap();
        drop(image);
        let scratch = dir.path();
        let virtio = recover_ext4_file(&fs_image, &format!("/{VIRTIO_FILE}"), EXPORT_SIZE, scratch)
            .unwrap_or_else(|e| panic!("recovering L1's filesystem: {e}"));
        let nvdimm_file =
            recover_ext4_file(&fs_image, &format!("/{NVDIMM_FILE}"), EXPORT_SIZE, scratch)
                .unwrap_or_else(|e| panic!("recovering L1's filesystem: {e}"));
        l2.tally(nonce, &virtio, &nvdimm_file)
    } else {
        serde_json::from_value(l1["verify"].clone()).expect("L1's verify result")
    };
    let _ = writeln!(
        std::io::stderr(),
        "VDP-NESTED fs={fs_name} case={} cut={cut} secs={:.0} records={records} tally={tally:?} \
         l1={l1} mapsync={}",
        case.name(),
        took.as_secs_f64(),
        l2.mapsync
    );
    for (export, t) in &tally {
        assert_eq!(t.acked, records, "{export}: {t:?}");
        match case {
            Case::Durable => assert_eq!(
                t.intact,
                t.acked,
                "{export} lost {} of {} acknowledged records ({} zero, {} damaged)",
                t.acked - t.intact,
                t.acked,
                t.zero,
                t.other
            ),
            Case::Volatile => assert!(
                t.intact < t.acked,
                "{export}: the volatile export of a sparse file kept all {} acknowledged \
                 records through the cut: this test cannot see lost data",
                t.acked
            ),
        }
    }
}

/// Everything for one L1 boot: its NVDIMM (a sparse file in `dir`), its script and
/// its extras. L1 makes `fs_name` on the fsdax NVDIMM, mounts it with DAX on
/// [`L1_MOUNT`] (ext4 with `commit=600`) with background writeback off, and runs
/// test `l1_test` of this binary with the `VDP_*` assignments in `env_line`; L2's
/// QEMU tree is the setup's trixie tree on a read-only disk, L2's kernel and
/// initramfs (with `l2_script` as its /test.sh, made here: L1 has no tools to make
/// one) are in L1's initramfs.
fn l1_rig(
    env: &GuestEnv,
    dir: &Path,
    fs_name: &str,
    l2_script: &str,
    l1_test: &str,
    env_line: &str,
) -> (PathBuf, String, Boot) {
    let nvdimm = dir.join("l1-nvdimm.img");
    File::create(&nvdimm)
        .unwrap()
        .set_len(L1_NVDIMM_SIZE)
        .unwrap();
    let tree = dir.join("qemu-tree.img");
    File::create(&tree).unwrap().set_len(1 << 30).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&env.qemu_root)
        .arg(&tree));

    let l2dir = dir.join("l2");
    fs::create_dir_all(&l2dir).unwrap();
    let test_bin = static_test_binary("nested");
    let mut l2boot = Boot::default()
        .with_host_tools(&["mkfs.ext4"])
        .with_host_files(&["/etc/mke2fs.conf"]);
    l2boot.add_file("vdp/nested", &test_bin);
    l2boot.add_file("agent", &static_binaries().join("vhost-device-pmem-agent"));
    let l2_initrd = env.initrd_for(&l2dir, l2_script, &l2boot);
    let l2_env = l2dir.join("env.sh");
    fs::write(
        &l2_env,
        "# the guest environment inside the lab\nVDP_QEMU_ROOT=/qemu\n\
         VDP_KERNEL=/l2/vmlinuz\nVDP_INITRAMFS=/l2/initrd\nVDP_ACCEL=tcg\n",
    )
    .unwrap();

    // ext4 with a long commit interval: only what is synced reaches the NVDIMM's
    // metadata before a cut.
    let mount_opts = if fs_name == "ext4" {
        "dax,commit=600"
    } else {
        "dax"
    };
    let (mut boot, mkfs) = lab_boot(fs_name);
    boot.add_file("vdp/nested", &test_bin);
    boot.add_file("l2/vmlinuz", &env.kernel);
    boot.add_file("l2/initrd", &l2_initrd);
    boot.add_file("l2/env.sh", &l2_env);
    boot.qemu_args.extend([
        "-drive".into(),
        format!(
            "file={},if=none,id=tree,format=raw,readonly=on",
            tree.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=tree".into(),
    ]);
    let fsdax = fsdax_convert(0);
    let script = format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
{fsdax}
mkdir -p /qemu {L1_MOUNT}
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mount -o ro /dev/vda /qemu || exit 25
{mkfs} /dev/pmem0 || exit 21
mount -o {mount_opts} /dev/pmem0 {L1_MOUNT} || exit 22
echo "VDP-MOUNT $(grep ' {L1_MOUNT} ' /proc/mounts)"
# Only what is synced reaches the NVDIMM's metadata before a cut.
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 1 > /proc/sys/kernel/sysrq
VDP_GUEST_CACHE=/l2 VDP_NESTED_DAEMON=/vdp/vhost-device-pmem VDP_NESTED_STRACE=/usr/bin/strace \
{env_line} RUST_BACKTRACE=1 /vdp/nested --exact {l1_test} --ignored --nocapture --test-threads=1
rc=$?
echo "VDP-NO-CUT $rc"
[ $rc = 0 ] || exit $rc
umount {L1_MOUNT} || exit 24
"#
    );
    (nvdimm, script, boot)
}

/// L2's /test.sh: DAX-mounts the virtio-pmem device (there at boot, /dev/pmem0),
/// says it is up, waits for the NVDIMM to be hot-plugged (region 1), makes it
/// fsdax, DAX-mounts it and runs [`in_l2`]. Exits 30-35 where a step fails.
fn l2_script(records: u64, nonce: u64) -> String {
    let fsdax = fsdax_convert(1);
    format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
/agent 2>/dev/console &
mkdir -p /mnt/v /mnt/n
/usr/bin/mkfs.ext4 -q -F -b 4096 /dev/pmem0 || exit 30
mount -o dax /dev/pmem0 /mnt/v || exit 31
echo "VDP-L2-UP"
nd=/sys/bus/nd/devices
i=0; while ! [ -e $nd/namespace1.0/driver ] || ! [ -e $nd/pfn1.0 ]; do
  i=$((i + 1)); [ $i -gt 3000 ] && exit 32; sleep 0.1
done
echo "VDP-L2-NVDIMM $(cat $nd/region1/size 2>/dev/null) bytes"
{fsdax}
/usr/bin/mkfs.ext4 -q -F -b 4096 /dev/pmem1 || exit 33
mount -o dax /dev/pmem1 /mnt/n || exit 34
echo "VDP-L2-MOUNTS $(grep -c ' dax\|,dax' /proc/mounts)"
VDP_L2_RECORDS={records} VDP_L2_NONCE={nonce} /vdp/nested --exact in_l2 --ignored --nocapture \
  --test-threads=1 || exit 35
# A bad range of the NVDIMM's file, injected by L1 on the export's control socket,
# reaches this guest's badblocks of the fsdax device through the agent.
n=1200; found=
while [ $n -gt 0 ] && [ -z "$found" ]; do
  c=$(cat /sys/block/pmem1/badblocks); [ -n "$c" ] && found="pmem1 $c"
  sleep 0.1; n=$((n - 1))
done
echo "VDP-BB $found"
umount /mnt/v
umount /mnt/n
"#
    )
}

/// The number after `prefix` on the console.
fn console_u64(guest: &Guest, prefix: &str) -> u64 {
    let line = guest
        .console
        .iter()
        .find_map(|l| l.split_once(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} on the console"))
        .1;
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{prefix}{line}: {e}"))
}

/// The JSON after `prefix` on the console.
fn console_json(guest: &Guest, prefix: &str) -> Value {
    let Some((_, rest)) = guest.console.iter().find_map(|l| l.split_once(prefix)) else {
        guest.dump();
        panic!("no {prefix:?} on the console");
    };
    serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{prefix}{rest}: {e}"))
}

/// Per export: records acknowledged, and how those read back.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Tally {
    acked: u64,
    intact: u64,
    zero: u64,
    other: u64,
}

/// What L2 printed: the MAP_SYNC probes, where its record files lie, the NVDIMM's
/// fsdax data offset and the acknowledgements.
#[derive(Default)]
struct L2Report {
    mapsync: Value,
    extents_v: Vec<Extent>,
    extents_n: Vec<Extent>,
    dataoff_n: u64,
    acks_v: Vec<u64>,
    acks_n: Vec<u64>,
}

impl L2Report {
    fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Self {
        let mut r = Self::default();
        for line in lines {
            let line = line.trim();
            let extents = |s: &str| -> Vec<Extent> {
                let v: Vec<[u64; 3]> = serde_json::from_str(s).unwrap();
                v.iter()
                    .map(|e| Extent {
                        logical: e[0],
                        physical: e[1],
                        length: e[2],
                        flags: 0,
                    })
                    .collect()
            };
            if let Some(s) = line.strip_prefix("VDP-MAPSYNC ") {
                r.mapsync = serde_json::from_str(s).unwrap();
            } else if let Some(s) = line.strip_prefix("VDP-EXTENTS v ") {
                r.extents_v = extents(s);
            } else if let Some(s) = line.strip_prefix("VDP-EXTENTS n ") {
                r.extents_n = extents(s);
            } else if let Some(s) = line.strip_prefix("VDP-DATAOFF1 ") {
                r.dataoff_n = s.parse().unwrap();
            } else if let Some(s) = line.strip_prefix("VDP-ACK v ") {
                r.acks_v.push(s.parse().unwrap());
            } else if let Some(s) = line.strip_prefix("VDP-ACK n ") {
                r.acks_n.push(s.parse().unwrap());
            }
        }
        r
    }

    /// Reads each acknowledged record back from the exported files as `virtio` and
    /// `nvdimm` hold them: the virtio-pmem file is L2's /dev/pmem0 byte for byte;
    /// the NVDIMM's file holds L2's fsdax /dev/pmem1 from the data offset on.
    fn tally(&self, nonce: u64, virtio: &[u8], nvdimm: &[u8]) -> BTreeMap<String, Tally> {
        let count = |extents: &[Extent], base: u64, file: &[u8], acks: &[u64], nonce: u64| {
            let mut t = Tally::default();
            for &i in acks {
                t.acked += 1;
                let at = blockmap::physical_offset(extents, i * RECORD as u64)
                    .unwrap_or_else(|| panic!("record {i} outside {extents:?}"))
                    + base;
                let at = at as usize;
                match classify(&file[at..at + RECORD], &record(nonce, i)) {
                    Found::Intact => t.intact += 1,
                    Found::Zero => t.zero += 1,
                    Found::Other => t.other += 1,
                }
            }
            t
        };
        BTreeMap::from([
            (
                "virtio-pmem".to_string(),
                count(&self.extents_v, 0, virtio, &self.acks_v, nonce_v(nonce)),
            ),
            (
                "nvdimm".to_string(),
                count(
                    &self.extents_n,
                    self.dataoff_n,
                    nvdimm,
                    &self.acks_n,
                    nonce_n(nonce),
                ),
            ),
        ])
    }
}

/// The two exports' records differ, so one can never pass for the other.
fn nonce_v(nonce: u64) -> u64 {
    splitmix(nonce ^ 0x7669_7274)
}

fn nonce_n(nonce: u64) -> u64 {
    splitmix(nonce ^ 0x6e76_646d)
}

// ---- inside L1 -------------------------------------------------------------------

fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: in_l1 runs only inside the nested lab VM (the nested_* \
             tests boot it and run it there)"
        )
    })
}

/// Says `line` on the console (L1's serial port) at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Runs in L1: makes the two files, serves one with the daemon, boots L2, hot-plugs
/// the other as an NVDIMM with `vhost-device-pmem nvdimm`, relays L2's console and
/// counts the daemon's sync syscalls through L2's records; then cuts the power or
/// checks the records itself.
#[test]
#[ignore = "runs only inside the nested lab VM (the nested_* tests run it there)"]
fn in_l1() {
    let fs_name = env_var("VDP_NESTED_FS");
    let case = Case::parse(&env_var("VDP_NESTED_CASE"));
    let cut = env_var("VDP_NESTED_CUT") == "1";
    let daemon_bin = PathBuf::from(env_var("VDP_NESTED_DAEMON"));
    let strace = PathBuf::from(env_var("VDP_NESTED_STRACE"));
    let records: u64 = env_var("VDP_NESTED_RECORDS").parse().unwrap();
    let nonce: u64 = env_var("VDP_NESTED_NONCE").parse().unwrap();
    let env = GuestEnv::load("in_l1").expect("the L2 environment in /l2");
    let lab = Path::new(L1_MOUNT);
    let (vfile, nfile) = (lab.join(VIRTIO_FILE), lab.join(NVDIMM_FILE));
    for f in [&vfile, &nfile] {
        match case {
            Case::Durable => {
                let out = Command::new(&daemon_bin)
                    .arg("prepare")
                    .arg(f)
                    .arg("--size")
                    .arg(EXPORT_SIZE.to_string())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "prepare {}: {}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Case::Volatile => {
                // Sparse and durable as such: the file and its size survive a cut,
                // its blocks are allocated only when a guest writes.
                let file = File::create(f).unwrap();
                file.set_len(EXPORT_SIZE).unwrap();
                file.sync_all().unwrap();
            }
        }
    }
    File::open(lab).unwrap().sync_all().unwrap();

    let scratch = tempfile::tempdir().unwrap();
    let mode = match case {
        Case::Durable => "direct",
        Case::Volatile => "volatile",
    };
    let daemon = Daemon::in_vm(&daemon_bin, &vfile, scratch.path(), "v", &["--mode", mode]);
    let status = daemon.status();
    assert_eq!(status["policy"], mode, "{status:#}");

    let qmp_path = scratch.path().join("l2-qmp.sock");
    let args: Vec<String> = [
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-m",
        "512M,slots=2,maxmem=2G",
        "-chardev",
        &format!("socket,id=vu0,path={}", daemon.socket.display()),
        "-device",
        "vhost-user-test-device-pci,chardev=vu0,virtio-id=27,num_vqs=1,config_size=16",
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_path.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(agent_qemu_args(&scratch.path().join("agent.sock")))
    .collect();

    let mut l2_guest: Option<Guest> = None;
    let mut exporter: Option<Exporter> = None;
    let mut nvdimm_status = Value::Null;
    let t0 = Instant::now();
    let counts = strace_window(&strace, daemon.pid(), &["write"], || {
        let mut l2 = env.boot_initrd(
            scratch.path(),
            &env.initramfs,
            "memory-backend=mem,nvdimm=on",
            &args,
        );
        relay_until(&mut l2, "VDP-L2-UP", t0 + L2_TIMEOUT);
        let ex = Exporter::start(&daemon_bin, &nfile, &qmp_path, case, scratch.path());
        let st = ex.status();
        say(&format!("VDP-L1-EXPORTER {}", st["nvdimm"]));
        nvdimm_status = json!({
            "exporter": "vhost-device-pmem nvdimm",
            "mode": st["nvdimm"]["mode"], "attached": st["nvdimm"]["attached"],
            "mapping_verified": st["nvdimm"]["mapping_verified"],
            "exporter_sf": st["nvdimm"]["sf"], "health": st["health"],
        });
        exporter = Some(ex);
        // Independently of what the exporter says: QEMU's mapping of the file.
        let canonical = fs::canonicalize(&nfile).unwrap();
        let flags = vm_flags(l2.pid(), |_, perms, path| {
            perms.starts_with("rw") && Path::new(path) == canonical
        });
        assert!(
            !flags.is_empty(),
            "QEMU has no mapping of {}",
            nfile.display()
        );
        let sf = flags
            .iter()
            .all(|f| f.split_whitespace().any(|x| x == "sf"));
        nvdimm_status["qemu_mapping_sf"] = json!(sf);
        say(&format!("VDP-L1-QEMU-MAPPING {flags:?}"));
        relay_until(&mut l2, "VDP-RECORDS-DONE", t0 + L2_TIMEOUT);
        l2_guest = Some(l2);
    });
    let stats = daemon.stats();
    let ex = exporter.expect("the exporter ran");
    let ex_status = ex.status();
    nvdimm_status["health_after"] = ex_status["health"].clone();
    nvdimm_status["interval_syncs_after"] = ex_status["nvdimm"]["interval_syncs"].clone();
    let mut result = json!({
        "case": case.name(),
        "fs": fs_name,
        "daemon": {"policy": status["policy"], "flush_requests": stats["flush_requests"],
                   "syncs": stats["syncs"]},
        "strace": counts,
        "nvdimm": nvdimm_status,
        "secs_to_records_done": t0.elapsed().as_secs_f64(),
    });
    if case == Case::Durable {
        for call in SYNC_CALLS {
            assert_eq!(counts[call], 0, "{call} during L2's records: {result:#}");
        }
        assert_eq!(stats["syncs"], 0, "{result:#}");
    }
    if cut {
        say(&format!("VDP-L1-RESULT {result}"));
        say("VDP-CUT");
        // The console lines must leave the UART before the machine goes.
        // SAFETY: tcdrain on our own stdout.
        unsafe { libc::tcdrain(1) };
        fs::write("/proc/sysrq-trigger", "b").unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let mut l2 = l2_guest.unwrap();
    // Media errors: a bad range inside the NVDIMM's fsdax data reaches L2's
    // badblocks of /dev/pmem1 at the sector the data offset says.
    let dataoff = L2Report::parse(
        l2.console
            .iter()
            .filter_map(|l| l.find("VDP-").map(|i| &l[i..])),
    )
    .dataoff_n;
    assert!(dataoff > 0, "L2 printed no fsdax data offset");
    let bad = dataoff + (1 << 20) + 3 * 512;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ex.status()["agent"]["device"] != "/dev/pmem1" {
        assert!(
            Instant::now() < deadline,
            "the agent never attached to /dev/pmem1: {:#}\n{}",
            ex.status(),
            ex.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let agent = ex.status()["agent"].clone();
    let answer = control::call(
        &ex.control,
        &control::Request::BadblocksInject {
            offset: bad,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let relayed = l2.console.len();
    let rc = l2.finish(L2_TIMEOUT);
    relay_lines(&l2.console[relayed..]);
    assert_eq!(rc, 0, "L2's script failed with {rc}");
    // The export ends with its VM, cleanly.
    let mut ex = ex;
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = ex.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "the export outlived its VM:\n{}",
            ex.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        code,
        Some(0),
        "the export's exit after its VM:\n{}",
        ex.log()
    );
    result["nvdimm"]["exit_after_vm"] = json!(code);
    let bb = l2
        .console
        .iter()
        .find_map(|l| l.split_once("VDP-BB "))
        .map(|(_, r)| r.trim().to_string())
        .unwrap_or_default();
    let sector = (bad - dataoff) / 512;
    assert_eq!(bb, format!("pmem1 {sector} 1"), "{agent}");
    result["media_error"] = json!({"file_offset": bad, "data_offset": dataoff,
        "guest_badblocks": bb, "agent": agent});
    let report = L2Report::parse(
        l2.console
            .iter()
            .filter_map(|l| l.find("VDP-").map(|i| &l[i..])),
    );
    let read = |p: &Path| {
        let f = File::open(p).unwrap();
        let mut data = vec![0u8; EXPORT_SIZE as usize];
        f.read_exact_at(&mut data, 0).unwrap();
        data
    };
    assert_eq!(report.acks_v.len() as u64, records, "{:?}", report.acks_v);
    assert_eq!(report.acks_n.len() as u64, records, "{:?}", report.acks_n);
    let tally = report.tally(nonce, &read(&vfile), &read(&nfile));
    result["verify"] = serde_json::to_value(&tally).unwrap();
    say(&format!("VDP-L1-RESULT {result}"));
}

/// Relays L2's console to L1's (each `VDP-` line as `VDP-L2 ...`) until a line with
/// `marker`; panics if L2 ends or `deadline` passes first.
fn relay_until(l2: &mut Guest, marker: &str, deadline: Instant) {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = l2.next_line(left) else {
            l2.dump();
            panic!("L2 never printed {marker:?}");
        };
        relay_lines(std::slice::from_ref(&line));
        if line.contains(marker) {
            return;
        }
    }
}

fn relay_lines(lines: &[String]) {
    for line in lines {
        if let Some(i) = line.find("VDP-") {
            if !line[i..].starts_with("VDP-L2 ") {
                say(&format!("VDP-L2 {}", &line[i..]));
            }
        }
    }
}

/// `vhost-device-pmem nvdimm` run by L1: hot-plugs the NVDIMM into L2 and guards
/// its file while L2 runs (killed on drop).
struct Exporter {
    child: std::process::Child,
    control: PathBuf,
    log: PathBuf,
}

impl Exporter {
    /// Starts the export of `nfile` into the L2 QEMU behind `qmp_path` (`direct`, or
    /// `--mode volatile`) and waits until it says QEMU's mapping is verified.
    fn start(daemon: &Path, nfile: &Path, qmp_path: &Path, case: Case, dir: &Path) -> Self {
        let (control, log) = (dir.join("nvdimm.ctl"), dir.join("nvdimm.log"));
        let mode = match case {
            Case::Durable => "direct",
            Case::Volatile => "volatile",
        };
        let child = Command::new(daemon)
            .arg("nvdimm")
            .arg("--file")
            .arg(nfile)
            .arg("--qmp-socket")
            .arg(qmp_path)
            .args(["--id", NVDIMM_ID, "--mode", mode, "--control-socket"])
            .arg(&control)
            .arg("--agent-socket")
            .arg(dir.join("agent.sock"))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut ex = Self {
            child,
            control,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(v) = control::call(&ex.control, &control::Request::Status) {
                if v["status"]["nvdimm"]["mapping_verified"] == true {
                    break;
                }
            }
            if let Some(st) = ex.child.try_wait().unwrap() {
                panic!("the NVDIMM export exited with {st}:\n{}", ex.log());
            }
            assert!(
                Instant::now() < deadline,
                "the NVDIMM export never verified QEMU's mapping:\n{}",
                ex.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ex
    }

    fn status(&self) -> Value {
        let v = control::call(&self.control, &control::Request::Status).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        v["status"].clone()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- inside L2 -------------------------------------------------------------------

/// What a MAP_SYNC mapping of a new file in `dir` gives: "ok" or the errno's name.
fn probe_map_sync(dir: &Path) -> String {
    let path = dir.join("map-sync-probe");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&[1u8; 4096], 0).unwrap();
    file.sync_all().unwrap();
    match SyncMapping::new(&file, 4096) {
        Ok(_) => "ok".into(),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        Err(e) => format!("{e}"),
    }
}

/// A prepared record file of `records` pages in `dir`, its extents printed as
/// `VDP-EXTENTS <tag> [[logical, physical, length], ...]`.
fn record_file(dir: &Path, tag: &str, records: u64) -> (File, Vec<Extent>) {
    let path = dir.join("records");
    prepare::prepare(&path, Some(records * RECORD as u64), Progress::Quiet)
        .unwrap_or_else(|e| panic!("prepare {}: {e}", path.display()));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let extents = blockmap::read_extents(&file, records * RECORD as u64).unwrap();
    let list: Vec<[u64; 3]> = extents
        .iter()
        .map(|e| [e.logical, e.physical, e.length])
        .collect();
    say(&format!("VDP-EXTENTS {tag} {}", json!(list)));
    (file, extents)
}

/// Runs in L2: the MAP_SYNC difference, then the records of both exports.
#[test]
#[ignore = "runs only inside the nested lab's guest (the nested_* tests run it there)"]
fn in_l2() {
    let records: u64 = std::env::var("VDP_L2_RECORDS")
        .expect("in_l2 runs only inside the nested lab's guest")
        .parse()
        .unwrap();
    let nonce: u64 = std::env::var("VDP_L2_NONCE").unwrap().parse().unwrap();
    let (v, n) = (Path::new("/mnt/v"), Path::new("/mnt/n"));

    let mapsync = json!({"virtio_pmem": probe_map_sync(v), "nvdimm": probe_map_sync(n)});
    say(&format!("VDP-MAPSYNC {mapsync}"));

    // virtio-pmem: each record written, then fsync: the guest's flush request.
    let (file, _) = record_file(v, "v", records);
    for i in 0..records {
        file.write_all_at(&record(nonce_v(nonce), i), i * RECORD as u64)
            .unwrap();
        file.sync_all().unwrap();
        say(&format!("VDP-ACK v {i}"));
    }

    // NVDIMM: stores through a MAP_SYNC mapping, each cache line written back and a
    // fence; no msync, no fsync.
    let (file, _) = record_file(n, "n", records);
    let len = (records * RECORD as u64) as usize;
    let map = SyncMapping::new(&file, len).expect("MAP_SYNC on the NVDIMM's DAX mount");
    for i in 0..records {
        let at = i as usize * RECORD;
        map.write(at, &record(nonce_n(nonce), i));
        for line in (0..RECORD).step_by(64) {
            // SAFETY: a cache-line write-back of an address inside our live mapping.
            unsafe { core::arch::x86_64::_mm_clflush((map.addr() + at + line) as *const u8) };
        }
        // SAFETY: a store fence; no memory is touched.
        unsafe { core::arch::x86_64::_mm_sfence() };
        say(&format!("VDP-ACK n {i}"));
    }
    say("VDP-RECORDS-DONE");
}

// ---- the benchmark: host work per guest flush ------------------------------------

/// The benchmark's backends, each a file of its own size on L1's DAX filesystem
/// (L2 tells its devices apart by size).
const BENCH_BACKENDS: [(&str, u64); 4] = [
    // QEMU's own virtio-pmem-pci: an fsync of the file per flush request.
    ("builtin", 48 << 20),
    // This daemon, --mode direct: flushes answered without a syscall. (The daemon's
    // sizes are powers of two: QEMU makes them a PCI BAR.)
    ("direct", 32 << 20),
    // This daemon, --mode fsync: the control, one fsync per batch of flushes.
    ("fsync", 16 << 20),
    // An NVDIMM (pmem=on, MAP_SYNC): the guest flushes cache lines itself.
    ("nvdimm", 64 << 20),
];
/// Pages each backend's bench file has (ops cycle over them).
const BENCH_PAGES: u64 = 256;

/// Guest fsync loop of 4 KiB writes (cache-line write-backs and a fence on the
/// NVDIMM) against the four backends of [`BENCH_BACKENDS`] in one L2 boot, rounds
/// alternating the order; L1 counts the host work of each phase. `benches/dax-host.sh`
/// runs it and documents the knobs (VDP_BENCH_ROUNDS, VDP_BENCH_OPS).
#[test]
#[ignore = "a benchmark (one nested boot of several minutes): benches/dax-host.sh runs it"]
fn bench_dax_host() {
    let Some(env) = GuestEnv::load("bench_dax_host") else {
        return;
    };
    let num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|e| panic!("{k}: {e}")))
            .unwrap_or(d)
    };
    let (rounds, ops) = (num("VDP_BENCH_ROUNDS", 3), num("VDP_BENCH_OPS", 200));
    let dir = tempfile::tempdir().unwrap();
    let env_line = format!("VDP_BENCH_ROUNDS={rounds} VDP_BENCH_OPS={ops}");
    let (nvdimm, script, boot) = l1_rig(
        &env,
        dir.path(),
        "ext4",
        &bench_l2_script(rounds, ops),
        "in_l1_bench",
        &env_line,
    );
    let started = Instant::now();
    let mut guest = env.boot_lab_with(dir.path(), &nvdimm, &script, &boot, "2G");
    let rc = guest.finish(L1_TIMEOUT + Duration::from_secs(60 * rounds * ops / 100));
    if rc != 0 {
        guest.dump();
        panic!("the benchmark's L1 failed with {rc}");
    }
    let result = console_json(&guest, "VDP-BENCH-RESULT ");
    let phases: Vec<Phase> = serde_json::from_value(result["phases"].clone()).unwrap();
    let table = bench_table(&phases);
    let _ = writeln!(
        std::io::stderr(),
        "\nDAX host benchmark: nested TCG (L1 ext4 -o dax on an emulated NVDIMM, L2 \
         guest fsync loop, 4 KiB), {rounds} rounds x {ops} ops, {:.0} s\n\n{table}\n\
         VDP-BENCH-RAW {result}",
        started.elapsed().as_secs_f64()
    );
}

/// L2's /test.sh for the benchmark: finds each backend's region by its size,
/// turns the NVDIMM's into fsdax, DAX-mounts all four on /mnt/NAME, runs
/// [`in_l2_bench`].
fn bench_l2_script(rounds: u64, ops: u64) -> String {
    let (_, nv_size) = BENCH_BACKENDS[3];
    let fsdax = fsdax_convert("$nv");
    let mounts: String = BENCH_BACKENDS
        .iter()
        .map(|(name, size)| format!("mnt {name} {size}\n"))
        .collect();
    format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
nd=/sys/bus/nd/devices
region_of() {{ for r in $nd/region*; do [ "$(cat $r/size)" = "$1" ] && echo ${{r##*region}}; done; }}
i=0; while [ "$(ls -d $nd/region* 2>/dev/null | wc -l)" -lt 4 ]; do
  i=$((i + 1)); [ $i -gt 1200 ] && exit 30; sleep 0.1
done
nv=$(region_of {nv_size})
[ -n "$nv" ] || exit 31
{fsdax}
mnt() {{
  n=$(region_of $2); [ -n "$n" ] || exit 31
  mkdir -p /mnt/$1
  /usr/bin/mkfs.ext4 -q -F -b 4096 /dev/pmem$n || exit 32
  mount -o dax /dev/pmem$n /mnt/$1 || exit 33
  echo "VDP-BENCH-DEV $1 pmem$n"
}}
{mounts}
VDP_BENCH_ROUNDS={rounds} VDP_BENCH_OPS={ops} /vdp/nested --exact in_l2_bench --ignored \
  --nocapture --test-threads=1 || exit 34
"#
    )
}

/// Runs in L2: per round, each backend in turn (the order rotated every round):
/// `ops` writes of 4 KiB, each followed by fsync (the NVDIMM: by cache-line
/// write-backs and a fence through a MAP_SYNC mapping).
#[test]
#[ignore = "runs only inside the nested lab's guest (bench_dax_host runs it there)"]
fn in_l2_bench() {
    let num = |k: &str| -> u64 {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k}: in_l2_bench runs only in the nested lab's guest"))
            .parse()
            .unwrap()
    };
    let (rounds, ops) = (num("VDP_BENCH_ROUNDS"), num("VDP_BENCH_OPS"));
    let page = vec![0x5au8; RECORD];
    let files: Vec<(&str, File)> = BENCH_BACKENDS
        .iter()
        .map(|(name, _)| {
            let path = Path::new("/mnt").join(name).join("bench");
            prepare::prepare(&path, Some(BENCH_PAGES * RECORD as u64), Progress::Quiet)
                .unwrap_or_else(|e| panic!("prepare {}: {e}", path.display()));
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            (*name, f)
        })
        .collect();
    let len = (BENCH_PAGES * RECORD as u64) as usize;
    let nv_map = SyncMapping::new(&files[3].1, len).expect("MAP_SYNC on the NVDIMM");
    for round in 0..rounds {
        for k in 0..files.len() {
            let (name, file) = &files[(k + round as usize) % files.len()];
            say(&format!("VDP-BENCH-START {name} {round}"));
            // L1 samples its counters when it reads the line above.
            std::thread::sleep(Duration::from_millis(1500));
            let t = Instant::now();
            for op in 0..ops {
                let at = (op % BENCH_PAGES) as usize * RECORD;
                if *name == "nvdimm" {
                    nv_map.write(at, &page);
                    for line in (0..RECORD).step_by(64) {
                        // SAFETY: a cache-line write-back inside our live mapping.
                        unsafe {
                            core::arch::x86_64::_mm_clflush(
                                (nv_map.addr() + at + line) as *const u8,
                            )
                        };
                    }
                    // SAFETY: a store fence; no memory is touched.
                    unsafe { core::arch::x86_64::_mm_sfence() };
                } else {
                    file.write_all_at(&page, at as u64).unwrap();
                    file.sync_all().unwrap();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            say(&format!("VDP-BENCH-END {name} {round} {ops} {secs:.6}"));
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    say("VDP-BENCH-DONE");
}

/// One benchmark phase: a backend's ops in one round, with L1's counters.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Phase {
    backend: String,
    round: u64,
    ops: u64,
    /// As L2 timed them.
    secs: f64,
    /// L1's wall clock at the phase's start and end markers.
    start: f64,
    end: f64,
    /// Sync syscalls (fsync, fdatasync, msync, sync_file_range, syncfs) in L1 during
    /// the phase: by QEMU, by the daemons.
    syncs_qemu: u64,
    syncs_daemons: u64,
    /// Time spent inside those syscalls (strace -T), seconds.
    sync_secs: f64,
    /// ext4 journal commits of L1's DAX filesystem during the phase.
    commits: u64,
    /// CPU time of the two daemons during the phase, seconds.
    daemon_cpu_secs: f64,
}

/// L1's wall clock, seconds (strace -ttt's clock).
fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// ext4 journal transactions so far on L1's /dev/pmem0.
fn jbd2_commits() -> u64 {
    let text = fs::read_to_string("/proc/fs/jbd2/pmem0-8/info").unwrap_or_default();
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of process `pid`, seconds (100 Hz ticks).
fn cpu_secs(pid: u32) -> f64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 14th
    // and 15th of the whole line.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Sync syscalls in an `strace -f -ttt -T` output: (time, seconds inside).
fn strace_syncs(path: &Path) -> Vec<(f64, f64)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        // "1700000000.123456 fsync(12) = 0 <0.000123>", with "[pid N] " in front
        // on a terminal and "N " in a file (-o) once several processes are traced.
        let line = line
            .strip_prefix("[pid")
            .map_or(line, |r| r.split_once(']').map_or(r, |(_, rest)| rest));
        let mut words = line.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.parse::<u32>().is_ok()) {
            words.next();
        }
        let (Some(t), Some(call)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        let name = call.split('(').next().unwrap_or("");
        if !SYNC_CALLS.contains(&name) {
            continue;
        }
        let secs = line
            .rsplit_once('<')
            .and_then(|(_, d)| d.trim_end_matches('>').parse().ok())
            .unwrap_or(0.0);
        out.push((t, secs));
    }
    out
}

#[test]
fn strace_lines_with_and_without_pids_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.strace");
    fs::write(
        &path,
        "812 1795745178.700001 fsync(12) = 0 <0.000250>\n\
         [pid   813] 1795745178.800002 fdatasync(9) = 0 <0.000100>\n\
         1795745178.900003 msync(0x7f00, 4096, MS_SYNC) = 0 <0.000050>\n\
         812 1795745179.000004 write(3, \"x\", 1) = 1 <0.000010>\n\
         812 1795745179.100005 +++ exited with 0 +++\n",
    )
    .unwrap();
    let got = strace_syncs(&path);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!((got[0].0 - 1_795_745_178.700_001).abs() < 1e-6 && (got[0].1 - 0.00025).abs() < 1e-9);
    assert!((got[2].1 - 0.00005).abs() < 1e-9);
}

/// Runs in L1 for the benchmark: prepares the four files, starts the two daemons
/// (strace attached), boots L2 under strace (its sync syscalls only, through a
/// seccomp filter: the vCPU threads run at full speed), samples the counters at
/// each phase marker and prints `VDP-BENCH-RESULT`.
#[test]
#[ignore = "runs only inside the nested lab VM (bench_dax_host runs it there)"]
fn in_l1_bench() {
    let daemon_bin = PathBuf::from(env_var("VDP_NESTED_DAEMON"));
    let strace = PathBuf::from(env_var("VDP_NESTED_STRACE"));
    let env = GuestEnv::load("in_l1_bench").expect("the L2 environment in /l2");
    let lab = Path::new(L1_MOUNT);
    let file = |name: &str| lab.join(format!("{name}.img"));
    for (name, size) in BENCH_BACKENDS {
        let out = Command::new(&daemon_bin)
            .arg("prepare")
            .arg(file(name))
            .arg("--size")
            .arg(size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "prepare {name}: {out:?}");
    }
    let scratch = tempfile::tempdir().unwrap();
    let direct = Daemon::in_vm(
        &daemon_bin,
        &file("direct"),
        scratch.path(),
        "direct",
        &["--mode", "direct"],
    );
    let fsync = Daemon::in_vm(
        &daemon_bin,
        &file("fsync"),
        scratch.path(),
        "fsync",
        &["--mode", "fsync"],
    );
    assert_eq!(direct.status()["policy"], "direct");
    assert_eq!(fsync.status()["policy"], "fsync");
    let trace = format!("trace={}", SYNC_CALLS.join(","));
    let d_trace = scratch.path().join("daemons.strace");
    let mut d_strace = Command::new(&strace)
        .args(["-f", "-ttt", "-T", "-e", &trace, "-o"])
        .arg(&d_trace)
        .args([
            "-p",
            &direct.pid().to_string(),
            "-p",
            &fsync.pid().to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let q_trace = scratch.path().join("qemu.strace");
    let (builtin_size, nv_size) = (BENCH_BACKENDS[0].1, BENCH_BACKENDS[3].1);
    let mut args: Vec<String> = vec![
        "-object".into(),
        "memory-backend-memfd,id=mem,size=512M,share=on".into(),
        "-m".into(),
        "512M,slots=4,maxmem=4G".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id=builtin,share=on,mem-path={},size={builtin_size}",
            file("builtin").display()
        ),
        "-device".into(),
        "virtio-pmem-pci,memdev=builtin,id=builtin0".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id=nv,share=on,pmem=on,align=2M,mem-path={},size={nv_size}",
            file("nvdimm").display()
        ),
        "-device".into(),
        "nvdimm,memdev=nv,id=nv0".into(),
    ];
    for (i, d) in [&direct, &fsync].iter().enumerate() {
        args.extend([
            "-chardev".into(),
            format!("socket,id=vu{i},path={}", d.socket.display()),
            "-device".into(),
            format!(
                "vhost-user-test-device-pci,chardev=vu{i},virtio-id=27,num_vqs=1,config_size=16"
            ),
        ]);
    }
    let wrapper: Vec<String> = vec![
        strace.display().to_string(),
        "-f".into(),
        "--seccomp-bpf".into(),
        "-ttt".into(),
        "-T".into(),
        "-e".into(),
        trace.clone(),
        "-o".into(),
        q_trace.display().to_string(),
    ];
    let mut l2 = env.boot_initrd_under(
        scratch.path(),
        &env.initramfs,
        "memory-backend=mem,nvdimm=on",
        &args,
        &wrapper,
    );
    let daemon_cpu = || cpu_secs(direct.pid()) + cpu_secs(fsync.pid());
    let mut phases: Vec<Phase> = Vec::new();
    let mut open: Option<(Phase, u64, f64)> = None;
    let deadline = Instant::now() + L2_TIMEOUT * 4;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = l2.next_line(left) else {
            l2.dump();
            panic!("L2 never finished the benchmark");
        };
        let Some(at) = line.find("VDP-") else {
            continue;
        };
        let marker = &line[at..];
        say(&format!("VDP-L2 {marker}"));
        let words: Vec<&str> = marker.split_whitespace().collect();
        match words.first().copied() {
            Some("VDP-BENCH-START") => {
                let phase = Phase {
                    backend: words[1].into(),
                    round: words[2].parse().unwrap(),
                    start: wall(),
                    ..Phase::default()
                };
                open = Some((phase, jbd2_commits(), daemon_cpu()));
            }
            Some("VDP-BENCH-END") => {
                let (mut phase, commits, cpu) = open.take().expect("END without START");
                phase.end = wall();
                phase.commits = jbd2_commits() - commits;
                phase.daemon_cpu_secs = daemon_cpu() - cpu;
                phase.ops = words[3].parse().unwrap();
                phase.secs = words[4].parse().unwrap();
                phases.push(phase);
            }
            Some("VDP-BENCH-DONE") => break,
            _ => {}
        }
    }
    let rc = l2.finish(L2_TIMEOUT);
    assert_eq!(rc, 0, "L2's benchmark script failed");
    // SAFETY: kill(2) on our own child: strace detaches and writes what it has.
    unsafe { libc::kill(d_strace.id() as i32, libc::SIGINT) };
    let _ = d_strace.wait();
    let (q, d) = (strace_syncs(&q_trace), strace_syncs(&d_trace));
    for p in &mut phases {
        let inside = |v: &[(f64, f64)]| -> (u64, f64) {
            v.iter()
                .filter(|(t, _)| *t >= p.start && *t <= p.end)
                .fold((0, 0.0), |(n, s), (_, d)| (n + 1, s + d))
        };
        let ((nq, sq), (nd, sd)) = (inside(&q), inside(&d));
        p.syncs_qemu = nq;
        p.syncs_daemons = nd;
        p.sync_secs = sq + sd;
    }
    say(&format!(
        "VDP-BENCH-RESULT {}",
        json!({"phases": phases, "qemu_syncs_total": q.len(), "daemon_syncs_total": d.len()})
    ));
}

/// The benchmark's table: per backend, the guest's rate (median of the rounds,
/// min-max), the median of the per-round ratios to the built-in device, and the
/// host work per guest fsync.
fn bench_table(phases: &[Phase]) -> String {
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let rate = |p: &Phase| p.ops as f64 / p.secs;
    let of = |b: &str| -> Vec<&Phase> { phases.iter().filter(|p| p.backend == b).collect() };
    let builtin: BTreeMap<u64, f64> = of("builtin").iter().map(|p| (p.round, rate(p))).collect();
    let mut t = String::from(
        "| backend | guest fsyncs/s median (min-max) | ratio to builtin (per-round median) | \
         sync syscalls per guest fsync (QEMU + daemon) | time in sync syscalls per guest fsync | \
         L1 journal commits per guest fsync | daemon CPU per guest fsync |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, _) in BENCH_BACKENDS {
        let ps = of(name);
        let rates: Vec<f64> = ps.iter().map(|p| rate(p)).collect();
        let ratios: Vec<f64> = ps
            .iter()
            .filter_map(|p| builtin.get(&p.round).map(|b| rate(p) / b))
            .collect();
        let ops: u64 = ps.iter().map(|p| p.ops).sum();
        let per = |x: f64| x / ops.max(1) as f64;
        let syncs_q: u64 = ps.iter().map(|p| p.syncs_qemu).sum();
        let syncs_d: u64 = ps.iter().map(|p| p.syncs_daemons).sum();
        let sync_secs: f64 = ps.iter().map(|p| p.sync_secs).sum();
        let commits: u64 = ps.iter().map(|p| p.commits).sum();
        let cpu: f64 = ps.iter().map(|p| p.daemon_cpu_secs).sum();
        let (lo, hi) = rates.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        t += &format!(
            "| {name} | {:.1} ({lo:.1}-{hi:.1}) | {:.2}x (rounds: {}) | {:.2} ({:.2} + {:.2}) | {:.3} ms | {:.2} | {:.3} ms |\n",
            median(rates.clone()),
            median(ratios.clone()),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
            per((syncs_q + syncs_d) as f64),
            per(syncs_q as f64),
            per(syncs_d as f64),
            per(sync_secs) * 1e3,
            per(commits as f64),
            per(cpu) * 1e3,
        );
    }
    t
}
