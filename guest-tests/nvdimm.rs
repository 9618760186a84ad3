// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest test of `vhost-device-pmem nvdimm`, the guarded NVDIMM export, against a
//! real QEMU (q35, nvdimm=on) under TCG. Owns the export's refusals, its volatile
//! hot-plug, the mapping check, re-attachment and the cold-plug arguments; this host
//! has no DAX, so the direct path is only seen refusing here.

use std::{
    fs,
    io::Write,
    os::unix::{fs::FileExt, net::UnixStream},
    path::Path,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::procfs;
use vdp_testkit::{
    daemon::Export,
    guest::{self, GuestEnv, Qmp},
    BIN,
};
use vhost_device_pmem::{
    app::nvdimm::{
        self,
        mapping::{self, FileId},
    },
    config::NvdimmMode,
    control::Request,
};

const BOOT: Duration = Duration::from_secs(180);
const SEED: &[u8] = b"VDP-NVDIMM-SEED 0123456";
const GUEST_WROTE: &str = "written by the guest";

/// The guest waits for the hot-plugged (or cold-plugged) NVDIMM's raw namespace,
/// shows its region's guest-physical address, reads the seed, writes a line at 4 KiB
/// and waits to be killed.
const SCRIPT: &str = r#"
[ -x /agent ] && /agent 2>/dev/console &
echo VDP-WAIT
n=1800
while [ $n -gt 0 ] && [ ! -b /dev/pmem0 ]; do sleep 0.1; n=$((n - 1)); done
[ -b /dev/pmem0 ] || mdev -s
[ -b /dev/pmem0 ] || exit 10
echo "VDP-PLUGGED $(cat /sys/block/pmem0/size) sectors"
echo "VDP-RESOURCE $(cat /sys/bus/nd/devices/region0/resource)"
for p in /sys/block/pmem*; do echo "VDP-REGION ${p##*/} $(cat $p/device/../resource)"; done
echo "VDP-READBACK $(head -c 23 /dev/pmem0)"
echo "written by the guest" | dd of=/dev/pmem0 bs=4096 seek=1 conv=sync,notrunc 2>/dev/null || exit 11
sync
echo VDP-WROTE
if [ -x /agent ]; then
  n=600
  found=
  while [ $n -gt 0 ]; do
    for b in /sys/block/pmem*/badblocks; do c=$(cat $b); [ -n "$c" ] && found="${b#/sys/block/} $c"; done
    [ -n "$found" ] && break
    sleep 0.1
    n=$((n - 1))
  done
  echo "VDP-BB $found"
fi
sleep 3600
"#;

/// A file of `size` bytes (mode 0600) that starts with [`SEED`].
fn seeded(path: &Path, size: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(SEED, 0).unwrap();
    f.sync_all().unwrap();
}

/// `vhost-device-pmem nvdimm ARGS` run to its end.
fn nvdimm(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("nvdimm")
        .args(args)
        .output()
        .expect("run vhost-device-pmem nvdimm")
}

/// `--file FILE --qmp-socket QMP --id ID` and then `extra`: what every export of
/// these tests says.
fn export_args<'a>(file: &'a str, qmp: &'a str, id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--file", file, "--qmp-socket", qmp, "--id", id];
    args.extend_from_slice(extra);
    args
}

/// Runs an export with `args` that must be refused at start (exit 1, its output
/// containing every one of `says`); returns the output.
fn refused(args: &[&str], says: &[&str]) -> String {
    let o = nvdimm(args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
    for needle in says {
        assert!(t.contains(needle), "{args:?} does not say {needle:?}: {t}");
    }
    t
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A long-running export of `args` (the kit's [`Export`], at `debug`).
fn export(dir: &Path, name: &str, args: &[&str]) -> Export {
    Export::spawn(BIN.path(), dir, name, args, "debug")
}

/// The export runs under `--seccomp enforce` (the default): `status` says so and
/// every thread has the filters (mode 2, the allow-list, the kill list and clone3's
/// ENOSYS filter), and no call was denied; returns the thread count.
fn assert_sandboxed(ex: &Export, status: &Value) -> usize {
    assert_eq!(status["seccomp"], "enforce", "{status}");
    assert_eq!(status["sandbox_denials"], 0, "{status}");
    assert!(
        ex.log_text().contains("seccomp sandbox on (enforce)"),
        "{}",
        ex.log_text()
    );
    let threads = procfs::thread_modes(ex.pid());
    for (name, mode, filters) in &threads {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            (
                "2",
                vhost_device_pmem::sandbox::FILTERS.to_string().as_str()
            ),
            "{name}: {threads:?}"
        );
    }
    threads.len()
}

fn memory_devices(qmp: &mut Qmp) -> Vec<Value> {
    qmp.execute("query-memory-devices", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// One boot: the refusals (a missing file, direct on this host's non-DAX ext4)
/// plug nothing; `--mode volatile` hot-plugs a seeded file, the guest reads the seed
/// on /dev/pmem0 and its write reaches the host file; `status` shows QEMU's pid, the
/// mapping verified, no `sf`; a second export of the file is refused; after SIGTERM
/// the VM keeps the NVDIMM and `--attach` guards it again, until QEMU exits. Every
/// export runs under the default `--seccomp enforce` (a call outside the `nvdimm`
/// allow-list would kill it with SIGSYS: no clean exit 0), every thread filtered.
#[test]
fn nvdimm_export_refuses_non_dax_hot_plugs_volatile_and_re_attaches() {
    let Some(env) =
        GuestEnv::load("nvdimm_export_refuses_non_dax_hot_plugs_volatile_and_re_attaches")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("nvdimm.img");
    seeded(&img, 64 << 20);
    let img_s = img.to_str().unwrap();
    let agent_sock = d.join("agent.sock");
    let started = Instant::now();
    let (mut guest, mut qmp) =
        env.boot_for_nvdimm(d, SCRIPT, &guest::Boot::default().with_agent(&agent_sock));
    guest.expect("VDP-WAIT", BOOT);
    let booted = started.elapsed();
    let export_qmp = d.join("qmp-export.sock");
    let qmp_s = export_qmp.to_str().unwrap();

    // (b) A missing file is refused, and not created (QEMU would create it).
    // (a) Direct mode on a page-cache file is refused naming DAX; nothing plugged.
    let missing = d.join("missing.img");
    let missing_s = missing.to_str().unwrap();
    let refusals: [(Vec<&str>, &[&str]); 2] = [
        (
            export_args(missing_s, qmp_s, "nv0", &["--mode", "volatile"]),
            &["no such file"],
        ),
        (
            export_args(img_s, qmp_s, "nv0", &[]),
            &["needs DAX", "never durable"],
        ),
    ];
    for (args, says) in &refusals {
        refused(args, says);
    }
    assert!(!missing.exists());
    assert!(
        memory_devices(&mut qmp).is_empty(),
        "a refusal plugged something"
    );

    // (c) Volatile: hot-plugged, mapped, verified.
    let plug_started = Instant::now();
    let mut ex = export(
        d,
        "export1",
        &export_args(
            img_s,
            qmp_s,
            "nv0",
            &[
                "--mode",
                "volatile",
                "--agent-socket",
                agent_sock.to_str().unwrap(),
            ],
        ),
    );
    let s = ex.wait_verified(Duration::from_secs(60));
    let verified_after = plug_started.elapsed();
    let nv = &s["nvdimm"];
    assert_eq!(nv["qemu_pid"], guest.pid(), "{s}");
    assert_eq!(nv["mode"], "volatile");
    assert_eq!(nv["attached"], "hot-plugged");
    assert_eq!(nv["sf"], false, "a page-cache file has no MAP_SYNC: {s}");
    assert!(
        nv["maps_line"].as_str().unwrap().contains("nvdimm.img"),
        "{s}"
    );
    assert_eq!(s["policy"], "volatile");
    assert_eq!(s["health"], "healthy");
    let devs = memory_devices(&mut qmp);
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!(devs[0]["type"], "nvdimm");
    assert_eq!(devs[0]["data"]["id"], "nv0");
    assert_eq!(devs[0]["data"]["size"], 64u64 << 20);
    let addr = devs[0]["data"]["addr"].as_u64().unwrap();
    assert_eq!(nv["guest_address"], addr);
    assert_eq!(addr % (2 << 20), 0, "align=2M must place it on 2 MiB");
    let ev = ex.events();
    let mapped = ev
        .iter()
        .find(|e| e["event"] == "nvdimm-mapped")
        .unwrap_or_else(|| panic!("no nvdimm-mapped event: {ev:?}"));
    assert_eq!(mapped["qemu_pid"], guest.pid());
    assert_eq!(mapped["sf"], false);
    let stats = ex.call(&Request::Stats).unwrap();
    assert_eq!(stats["ok"], true, "{stats}");
    assert_eq!(
        stats["stats"]["syncs"], 0,
        "volatile makes no sync: {stats}"
    );

    let plugged = guest.expect("VDP-PLUGGED", BOOT);
    let seen_after = plug_started.elapsed();
    assert!(
        plugged.contains(&format!("{} sectors", (64u64 << 20) / 512)),
        "{plugged}"
    );
    let res = guest.expect("VDP-RESOURCE", BOOT);
    let guest_addr = u64::from_str_radix(res.rsplit("0x").next().unwrap().trim(), 16).unwrap();
    assert_eq!(
        guest_addr, addr,
        "the guest's region0/resource is QEMU's addr"
    );
    let rb = guest.expect("VDP-READBACK", BOOT);
    assert!(rb.contains(std::str::from_utf8(SEED).unwrap()), "{rb}");
    guest.expect("VDP-WROTE", BOOT);
    let mut buf = vec![0u8; GUEST_WROTE.len()];
    fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert_eq!(
        buf,
        GUEST_WROTE.as_bytes(),
        "the guest's write is in the host file"
    );

    // Media errors: a bad range of the file reaches the guest's badblocks through
    // the agent, which found the NVDIMM by its guest-physical address.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = ex.status();
        if s["agent"]["device"] == "/dev/pmem0" {
            assert_eq!(s["agent"]["data_offset"], 0, "a raw namespace: {s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never attached: {s}\n{}",
            ex.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The QMP session, the plug, the mapping check, the guard, the media-error
    // sources and the agent channel all ran under the filter, on every thread.
    let threads = assert_sandboxed(&ex, &ex.status());
    assert!(threads >= 5, "{:?}", procfs::thread_modes(ex.pid()));
    let inject = Instant::now();
    let c = UnixStream::connect(&ex.control).unwrap();
    writeln!(
        &c,
        "{}",
        json!({"command": "badblocks-inject", "offset": 8192, "length": 512})
    )
    .unwrap();
    let bb = guest.expect("VDP-BB", BOOT);
    let bb_after = inject.elapsed();
    assert!(bb.ends_with("VDP-BB pmem0/badblocks 16 1"), "{bb}");

    // (d) A second export of the same file is refused (serve's lock, exit 75), at
    // once: one that got past the lock would hot-plug and run on.
    let mut second = export(
        d,
        "second",
        &export_args(img_s, qmp_s, "nv1", &["--mode", "volatile"]),
    );
    assert_eq!(
        second.wait(Duration::from_secs(20)),
        75,
        "{}",
        second.log_text()
    );
    assert!(
        second.log_text().contains("locked"),
        "{}",
        second.log_text()
    );
    assert_eq!(memory_devices(&mut qmp).len(), 1);

    // SIGTERM: the export ends, the VM keeps the NVDIMM.
    assert_eq!(ex.terminate(), 0, "{}", ex.log_text());
    assert!(
        ex.log_text().contains("keeps NVDIMM nv0"),
        "{}",
        ex.log_text()
    );
    assert_eq!(memory_devices(&mut qmp).len(), 1);

    // Without --attach the id is taken: refused.
    refused(
        &export_args(img_s, qmp_s, "nv0", &["--mode", "volatile"]),
        &["--attach"],
    );

    // --attach guards it again, and ends by itself when QEMU exits.
    let mut ex2 = export(
        d,
        "export2",
        &export_args(img_s, qmp_s, "nv0", &["--mode", "volatile", "--attach"]),
    );
    let s = ex2.wait_verified(Duration::from_secs(60));
    assert_eq!(s["nvdimm"]["attached"], "re-attached", "{s}");
    assert_sandboxed(&ex2, &s);
    assert_eq!(s["nvdimm"]["qemu_pid"], guest.pid());
    assert!(
        s["guard"]["lease"]
            .as_str()
            .unwrap()
            .contains("impossible while QEMU holds the file open"),
        "{s}"
    );
    guest.kill();
    assert_eq!(ex2.wait(Duration::from_secs(20)), 0, "{}", ex2.log_text());
    assert!(ex2.log_text().contains("exited"), "{}", ex2.log_text());

    eprintln!(
        "FIGURES: boot to VDP-WAIT {:.1}s; hot-plug to mapping verified {:.2}s (under seccomp enforce); hot-plug to /dev/pmem0 in the guest {:.1}s; bad range to guest badblocks {:.2}s (TCG); {threads} exporter threads, all Seccomp: 2",
        booted.as_secs_f64(),
        verified_after.as_secs_f64(),
        seen_after.as_secs_f64(),
        bb_after.as_secs_f64()
    );
}

/// `--print-qemu-args` judges the file and prints arguments QEMU accepts: a guest
/// booted with them cold-plugged reads the seed on /dev/pmem0, and `--attach`
/// verifies QEMU's mapping of it.
#[test]
fn printed_qemu_args_cold_plug_the_nvdimm() {
    let Some(env) = GuestEnv::load("printed_qemu_args_cold_plug_the_nvdimm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("cold.img");
    seeded(&img, 32 << 20);
    let img_s = img.to_str().unwrap();
    // Direct refuses here too (no DAX), before printing anything.
    let o = nvdimm(&["--file", img_s, "--id", "nv0", "--print-qemu-args"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(o.stdout.is_empty());
    let o = nvdimm(&[
        "--file",
        img_s,
        "--id",
        "nv0",
        "--mode",
        "volatile",
        "--print-qemu-args",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let args: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(args.len(), 6, "{args:?}");
    assert!(
        args[3].contains("pmem=off") && args[3].contains("align=2097152"),
        "{args:?}"
    );
    // A second NVDIMM, pmem=on on this non-DAX file, as an operator might write
    // it by hand: QEMU only warns and maps it without MAP_SYNC. The sf check on
    // its real mapping is what catches that silent fallback.
    let fallback = d.join("fallback.img");
    seeded(&fallback, 32 << 20);
    let mut qemu_args = args;
    qemu_args.extend([
        "-object".to_string(),
        format!(
            "memory-backend-file,id=mem-nv1,mem-path={},size={},share=on,pmem=on,align=2097152",
            fallback.display(),
            32 << 20
        ),
        "-device".to_string(),
        "nvdimm,id=nv1,memdev=mem-nv1".to_string(),
    ]);
    let opts = guest::Boot {
        qemu_args,
        ..Default::default()
    };
    let agent_sock = d.join("agent.sock");
    let opts = opts.with_agent(&agent_sock);
    let (mut guest, mut qmp) = env.boot_for_nvdimm(d, SCRIPT, &opts);
    guest.expect("VDP-PLUGGED", BOOT);
    let rb = guest.expect("VDP-READBACK", BOOT);
    assert!(rb.contains(std::str::from_utf8(SEED).unwrap()), "{rb}");
    let devs = memory_devices(&mut qmp);
    assert_eq!(devs.len(), 2, "{devs:?}");
    assert!(
        devs.iter().all(|d| d["data"]["hotplugged"] == false),
        "{devs:?}"
    );
    let fid = FileId::of(&fs::File::open(&fallback).unwrap()).unwrap();
    let maps = mapping::mappings_of(guest.pid(), fid).unwrap();
    let why = nvdimm::check_mapping(NvdimmMode::Direct, &maps)
        .unwrap_err()
        .to_string();
    assert!(why.contains("without MAP_SYNC"), "{why}");
    eprintln!(
        "QEMU's pmem=on mapping of a non-DAX file: {} | VmFlags: {}",
        maps[0].line,
        maps[0].vm_flags.join(" ")
    );
    if let Some(w) = guest.console.iter().find(|l| l.contains("persistence")) {
        eprintln!("QEMU said: {w}");
    }
    let mut ex = export(
        d,
        "attach",
        &export_args(
            img_s,
            d.join("qmp-export.sock").to_str().unwrap(),
            "nv0",
            &[
                "--mode",
                "volatile",
                "--attach",
                "--agent-socket",
                agent_sock.to_str().unwrap(),
            ],
        ),
    );
    let s = ex.wait_verified(Duration::from_secs(60));
    assert_eq!(s["nvdimm"]["attached"], "re-attached", "{s}");
    assert_sandboxed(&ex, &s);
    // Two NVDIMMs of the same size: only the guest-physical address tells the
    // agent which one is this export's (by size alone it refuses to guess).
    let nv0_addr = devs.iter().find(|d| d["data"]["id"] == "nv0").unwrap()["data"]["addr"]
        .as_u64()
        .unwrap();
    assert_eq!(s["nvdimm"]["guest_address"], nv0_addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let device = loop {
        let s = ex.status();
        if let Some(d) = s["agent"]["device"].as_str() {
            break d.trim_start_matches("/dev/").to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never attached: {s}\n{}",
            ex.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let region = guest
        .lines_with("VDP-REGION")
        .into_iter()
        .find(|l| l.starts_with(&format!("VDP-REGION {device} ")))
        .unwrap_or_else(|| panic!("no region line for {device}: {:?}", guest.console));
    let region_addr = u64::from_str_radix(region.rsplit("0x").next().unwrap().trim(), 16).unwrap();
    assert_eq!(
        region_addr, nv0_addr,
        "the agent took the other NVDIMM: {region}"
    );
    let c = UnixStream::connect(&ex.control).unwrap();
    writeln!(
        &c,
        "{}",
        json!({"command": "badblocks-inject", "offset": 4096, "length": 1024})
    )
    .unwrap();
    let bb = guest.expect("VDP-BB", BOOT);
    assert!(
        bb.ends_with(&format!("VDP-BB {device}/badblocks 8 2")),
        "{bb}"
    );
    assert_eq!(ex.terminate(), 0, "{}", ex.log_text());
}

/// In the DAX host lab (an fsdax NVDIMM with a DAX-mounted ext4, the static
/// binary inside), `direct` judges a real DAX file: a sparse one is refused as not
/// immutable (DAX itself is fine there), and `--prepare` makes it so and the
/// cold-plug arguments say `pmem=on`. (Plugging it into a nested QEMU is the
/// lab's power-cut proof, not this test.)
#[test]
fn direct_takes_a_prepared_dax_file_in_the_lab() {
    let Some(env) = GuestEnv::load("direct_takes_a_prepared_dax_file_in_the_lab") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nvdimm_img = dir.path().join("lab-nvdimm.img");
    fs::File::create(&nvdimm_img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let mut boot = guest::Boot::default()
        .with_host_tools(&["mkfs.ext4"])
        .with_host_files(&["/etc/mke2fs.conf"]);
    boot.add_file(
        "vdp/vhost-device-pmem",
        &guest::static_binaries().join("vhost-device-pmem"),
    );
    let script = format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
{}
mkdir -p /mnt/lab
/usr/bin/mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/pmem0 || exit 21
mount -o dax /dev/pmem0 /mnt/lab || exit 22
f=/mnt/lab/nv.img
dd if=/dev/zero of=$f bs=1048576 count=0 seek=64 2>/dev/null || exit 23
/vdp/vhost-device-pmem nvdimm --file $f --id nv0 --print-qemu-args >/tmp/a1 2>/tmp/e1
echo "VDP-HOLEY rc=$?"
grep -h refused /tmp/e1 | sed 's/^/VDP-E1 /'
/vdp/vhost-device-pmem nvdimm --file $f --id nv0 --print-qemu-args --prepare >/tmp/a2 2>/tmp/e2
echo "VDP-PREPARED rc=$?"
sed 's/^/VDP-ARG /' /tmp/a2
grep -h verdict /tmp/e2 | sed 's/^/VDP-LOG /'
umount /mnt/lab
"#,
        guest::fsdax_convert(0)
    );
    let mut guest = env.boot_lab(dir.path(), &nvdimm_img, &script, &boot);
    let rc = guest.finish(Duration::from_secs(300));
    let holey = guest.expect("VDP-HOLEY", BOOT);
    assert!(holey.ends_with("rc=1"), "{holey}");
    let e1 = guest.expect("VDP-E1", BOOT);
    assert!(
        e1.contains("needs an immutable block map") && !e1.contains("needs DAX"),
        "{e1}"
    );
    let prepared = guest.expect("VDP-PREPARED", BOOT);
    assert!(
        prepared.ends_with("rc=0"),
        "{prepared}\n{:#?}",
        guest.console
    );
    let verdict = guest.lines_with("VDP-LOG").join("\n");
    assert!(
        verdict.contains("dax=true, map_sync=true, immutable=true"),
        "{verdict}"
    );
    let args = guest.lines_with("VDP-ARG").join("\n");
    assert!(
        args.contains("mem-path=/mnt/lab/nv.img,size=67108864,share=on,pmem=on,align=2097152"),
        "{args}"
    );
    assert_eq!(rc, 0);
}
