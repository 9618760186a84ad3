// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest test: the daemon's device is hot-plugged into a running guest over QMP,
//! used, unplugged and plugged again, in one boot per test: `-machine pc` (ACPI PCI
//! hot-plug) and q35 (native PCIe hot-plug into a root port). Owns the plug/unplug
//! sequence and its assertions; never cold-plugs the device.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vdp_testkit::{
    daemon::Daemon,
    guest::{ext4_cat, make_ext4_image, Boot, GuestEnv, Qmp},
};

const BOOT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(90);

/// The guest waits for /dev/pmem0 (ACPI hot-plug alone must bring it; a PCI rescan
/// is the fallback and is reported), uses it, lets it go, and uses it again.
const SCRIPT: &str = r#"
# wait_dev present|absent SECONDS
wait_dev() {
  n=$(($2 * 10))
  while [ $n -gt 0 ]; do
    if [ "$1" = present ]; then [ -b /dev/pmem0 ] && return 0
    else [ -e /dev/pmem0 ] || return 0; fi
    sleep 0.1
    n=$((n - 1))
  done
  return 1
}
plugged() {
  if ! wait_dev present 40; then
    echo VDP-RESCAN
    echo 1 > /sys/bus/pci/rescan
    wait_dev present 20 || return 1
  fi
  echo "VDP-PLUGGED $1 $(cat /sys/block/pmem0/size) sectors"
}
mkdir -p /mnt/p
echo VDP-WAIT-1
plugged 1 || exit 10
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 11
echo "VDP-MOUNT-1 $(grep ' /mnt/p ' /proc/mounts)"
echo "written before the unplug" > /mnt/p/hotplug.txt
dd if=/dev/urandom of=/mnt/p/blob bs=64k count=16 2>/dev/null || exit 12
sync /mnt/p/hotplug.txt /mnt/p/blob || exit 12
echo "VDP-MD5-1 $(md5sum < /mnt/p/blob | cut -d' ' -f1)"
umount /mnt/p || exit 13
echo VDP-UNPLUG-ME
wait_dev absent 60 || exit 14
echo VDP-GONE
plugged 2 || exit 15
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 16
echo "VDP-MOUNT-2 $(grep ' /mnt/p ' /proc/mounts)"
sed 's/^/VDP-DATA /' /mnt/p/hotplug.txt
echo "VDP-MD5-2 $(md5sum < /mnt/p/blob | cut -d' ' -f1)"
umount /mnt/p || exit 17
"#;

/// `chardev-add` (a unix socket client to the daemon) then `device_add`: the QMP
/// sequence configs/qemu-hotplug.md documents.
fn plug(qmp: &mut Qmp, socket: &Path, n: u32, bus: Option<&str>) {
    qmp.execute(
        "chardev-add",
        json!({
            "id": format!("vu{n}"),
            "backend": { "type": "socket", "data": {
                "addr": { "type": "unix", "data": { "path": socket.to_str().unwrap() } },
                "server": false
            }}
        }),
    )
    .unwrap_or_else(|e| panic!("chardev-add vu{n}: {e}"));
    let mut dev = json!({
        "driver": "vhost-user-test-device-pci",
        "id": format!("pmem{n}"),
        "chardev": format!("vu{n}"),
        "virtio-id": 27,
        "num_vqs": 1,
        "config_size": 16
    });
    if let Some(bus) = bus {
        dev["bus"] = bus.into();
    }
    qmp.execute("device_add", dev)
        .unwrap_or_else(|e| panic!("device_add pmem{n}: {e}"));
}

/// `device_del`, the guest's eject (DEVICE_DELETED), then `chardev-remove`, which
/// closes the vhost-user connection.
fn unplug(qmp: &mut Qmp, n: u32) -> Value {
    qmp.execute("device_del", json!({ "id": format!("pmem{n}") }))
        .unwrap_or_else(|e| panic!("device_del pmem{n}: {e}"));
    // The virtio backend child goes first (an event with only a path), then the
    // device itself, named by its id.
    let deadline = Instant::now() + STEP;
    let ev = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = qmp
            .wait_event("DEVICE_DELETED", left)
            .unwrap_or_else(|e| panic!("QMP, waiting for DEVICE_DELETED: {e}"))
            .unwrap_or_else(|| panic!("no DEVICE_DELETED for pmem{n}: the guest kept the device"));
        if ev["data"]["device"] == format!("pmem{n}").as_str() {
            break ev;
        }
    };
    qmp.execute("chardev-remove", json!({ "id": format!("vu{n}") }))
        .unwrap_or_else(|e| panic!("chardev-remove vu{n}: {e}"));
    ev
}

/// One boot on `-machine pc` without the device: plug it, the guest mounts it with
/// DAX and writes; unplug it (the guest lets it go, the daemon makes the data
/// durable as the connection ends); plug it again on a new chardev (the daemon's
/// second connection) and the guest finds the data intact. ACPI PCI hot-plug on the
/// root bus.
#[test]
fn the_device_is_hot_plugged_unplugged_and_plugged_again_into_a_running_guest() {
    let Some(env) = GuestEnv::load(
        "the_device_is_hot_plugged_unplugged_and_plugged_again_into_a_running_guest",
    ) else {
        return;
    };
    plug_unplug_plug(&env, "pc", &[], None);
}

/// The same on q35: native PCIe hot-plug into an empty `pcie-root-port` whose
/// 64-bit prefetchable window is reserved big enough for the region's BAR
/// (`pref64-reserve`; without it the firmware gives the port 2 MiB and the guest
/// cannot assign the 64 MiB BAR).
#[test]
fn the_device_is_hot_plugged_into_a_q35_root_port_with_a_reserved_window() {
    let Some(env) =
        GuestEnv::load("the_device_is_hot_plugged_into_a_q35_root_port_with_a_reserved_window")
    else {
        return;
    };
    plug_unplug_plug(
        &env,
        "q35",
        &[
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,pref64-reserve=256M",
        ],
        Some("rp1"),
    );
}

fn plug_unplug_plug(env: &GuestEnv, machine: &str, qemu_args: &[&str], bus: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(seed.join("hello.txt"), "hello from the host\n").unwrap();
    let img = dir.path().join("pmem.img");
    make_ext4_image(&img, 64 << 20, &seed);
    let mut daemon = Daemon::for_guest(dir.path(), &img, &[]);

    let opts = Boot {
        qemu_args: qemu_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let started = Instant::now();
    let (mut guest, mut qmp) = env.boot_for_hotplug(dir.path(), machine, SCRIPT, &opts);
    guest.expect("VDP-WAIT-1", BOOT);
    let booted = started.elapsed();

    // First plug.
    plug(&mut qmp, &daemon.socket, 1, bus);
    guest.expect("VDP-PLUGGED 1", STEP);
    let plugged = started.elapsed();
    let mount = guest.expect("VDP-MOUNT-1", STEP);
    assert!(mount.contains("dax"), "not mounted with DAX: {mount}");
    guest.expect("VDP-UNPLUG-ME", STEP);
    let s = daemon.status();
    assert_eq!(s["connected"], true, "{s}");
    assert_eq!(s["connections"], 1, "{s}");
    // Syncs beyond one per flush batch: the disconnect's (the guest's driver may
    // itself flush as it lets the device go, which is a batch of its own).
    let extra_syncs = |st: &Value| st["syncs"].as_u64().unwrap() - st["batches"].as_u64().unwrap();
    let before = daemon.stats();

    // Unplug: the guest must eject the device and the daemon see the VMM go.
    let t = Instant::now();
    let ev = unplug(&mut qmp, 1);
    assert_eq!(ev["data"]["device"], "pmem1", "{ev}");
    guest.expect("VDP-GONE", STEP);
    // The daemon logs this line after the sync it makes when the VMM goes away.
    daemon.wait_log("the VMM disconnected; device reset, waiting for the next connection");
    let unplugged = t.elapsed();
    let s = daemon.status();
    assert_eq!(s["connected"], false, "{s}");
    assert!(s["last_disconnect"].is_string(), "{s}");
    // The sync made when the device went away.
    let after = daemon.stats();
    assert!(
        extra_syncs(&after) > extra_syncs(&before),
        "no sync of its own when the device went away (stats {before} -> {after})\n{}",
        daemon.log_text()
    );
    assert_eq!(
        ext4_cat(&img, "/hotplug.txt", dir.path()),
        "written before the unplug\n"
    );

    // Second plug on a new chardev: the daemon's second connection.
    plug(&mut qmp, &daemon.socket, 2, bus);
    guest.expect("VDP-PLUGGED 2", STEP);
    let rc = guest.finish(STEP);
    if rc != 0 {
        guest.dump();
        panic!("guest script failed with {rc}\n{}", daemon.log_text());
    }
    guest.expect("VDP-DATA written before the unplug", Duration::ZERO);
    let md5_1 = guest.expect("VDP-MD5-1 ", Duration::ZERO);
    let md5_2 = guest.expect("VDP-MD5-2 ", Duration::ZERO);
    assert_eq!(
        md5_1.trim_start_matches("VDP-MD5-1 ").trim(),
        md5_2.trim_start_matches("VDP-MD5-2 ").trim(),
        "the blob changed across the unplug"
    );
    let mount = guest.expect("VDP-MOUNT-2", Duration::ZERO);
    assert!(mount.contains("dax"), "not mounted with DAX: {mount}");
    assert!(
        guest.lines_with("VDP-RESCAN").is_empty(),
        "ACPI hot-plug did not bring the device by itself: the guest needed a PCI rescan"
    );
    let s = daemon.wait_status("the second connection ending", |s| {
        s["connections"] == 2 && s["connected"] == false
    });
    eprintln!(
        "hotplug figures ({machine}): boot to /test.sh {booted:?}, first plug to /dev/pmem0 {:?}, unplug to disconnect {unplugged:?}; status {s}",
        plugged - booted
    );
    assert_eq!(daemon.terminate(), Some(0));
}
