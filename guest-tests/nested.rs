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
//! Knob: VDP_NESTED_RECORDS (records per export, default 16). The lab's rig (the L1
//! boot, the console protocol) is the test kit's `guest::nested`; the benchmark on
//! the same lab is `guest-tests/nested_bench.rs`.

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
use vdp_testkit::daemon::{Daemon, Export};
use vdp_testkit::guest::{
    agent_qemu_args,
    env::num_or,
    fsdax_convert,
    in_vm::{strace_window, vm_flags, SyncMapping, SYNC_CALLS},
    nested::{console_json, console_u64, env_var, l1_rig, say, L1_MOUNT, L1_TIMEOUT, L2_TIMEOUT},
    records::{classify, record, recover_ext4_file, splitmix, Found, RECORD},
    Guest, GuestEnv,
};
use vhost_device_pmem::{
    blockmap::{
        self,
        prepare::{self, Progress},
        Extent,
    },
    control,
};

/// Each export's file on L1's DAX filesystem.
const EXPORT_SIZE: u64 = 64 << 20;
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
    num_or("VDP_NESTED_RECORDS", 16)
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
        "nested",
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
    let mut exporter: Option<Export> = None;
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
        let ex = export_nvdimm(&daemon_bin, &nfile, &qmp_path, case, scratch.path());
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
            ex.log_text()
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
        if let Some(st) = ex.exited() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "the export outlived its VM:\n{}",
            ex.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        code,
        Some(0),
        "the export's exit after its VM:\n{}",
        ex.log_text()
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

/// `vhost-device-pmem nvdimm` run by L1 (the kit's [`Export`]): hot-plugs the NVDIMM
/// `nfile` into the L2 QEMU behind `qmp_path` (`direct`, or `--mode volatile`) and
/// guards it while L2 runs (killed on drop); returns once it says QEMU's mapping is
/// verified.
fn export_nvdimm(daemon: &Path, nfile: &Path, qmp_path: &Path, case: Case, dir: &Path) -> Export {
    let mode = match case {
        Case::Durable => "direct",
        Case::Volatile => "volatile",
    };
    let agent = dir.join("agent.sock");
    let args = [
        "--file",
        nfile.to_str().unwrap(),
        "--qmp-socket",
        qmp_path.to_str().unwrap(),
        "--id",
        NVDIMM_ID,
        "--mode",
        mode,
        "--agent-socket",
        agent.to_str().unwrap(),
    ];
    let mut ex = Export::spawn(daemon, dir, "nvdimm", &args, "info");
    ex.wait_verified(Duration::from_secs(120));
    ex
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
