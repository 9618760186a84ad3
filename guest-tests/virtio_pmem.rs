// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest tests: a real Linux guest under a real QEMU (>= 11.1) uses the daemon's
//! virtio-pmem device. Needs `guest-tests/setup.sh` to have run (CI does); without it
//! each test says loudly that it skipped, and fails when VDP_REQUIRE_GUEST=1.

use std::{collections::BTreeMap, fs, time::Duration};

use vdp_testkit::{
    daemon::Daemon,
    guest::{ext4_cat, make_ext4_image, md5_hex, GuestEnv},
};

const BOOT: Duration = Duration::from_secs(120);
const IMAGE_SIZE: u64 = 64 << 20;

fn seeded_image(dir: &std::path::Path) -> std::path::PathBuf {
    let seed = dir.join("seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(seed.join("hello.txt"), "hello from the host\n").unwrap();
    let img = dir.join("pmem.img");
    make_ext4_image(&img, IMAGE_SIZE, &seed);
    img
}

/// The guest mounts the daemon's region with DAX, reads what the host seeded, writes
/// and fsyncs a file; the host finds it in the image and the daemon counted flushes.
/// The guest's first buffered read of the device must already see the file's bytes:
/// the region is mapped before the guest's driver probes it.
#[test]
fn guest_mounts_with_dax_reads_seed_and_its_fsync_reaches_the_file() {
    let Some(env) =
        GuestEnv::load("guest_mounts_with_dax_reads_seed_and_its_fsync_reaches_the_file")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = seeded_image(dir.path());
    let head = md5_hex(&fs::read(&img).unwrap()[..8192]);
    let mut daemon = Daemon::for_guest(dir.path(), &img, &[]);
    let status = daemon.status();
    assert_eq!(
        status["policy"], "datasync",
        "a prepared image on this host: {status}"
    );

    let mut guest = env.boot(
        dir.path(),
        &daemon.socket,
        r#"
echo "VDP-HEAD $(dd if=/dev/pmem0 bs=4096 count=2 2>/dev/null | md5sum | cut -d' ' -f1)"
mkdir -p /mnt/p
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 10
echo "VDP-MOUNT $(grep ' /mnt/p ' /proc/mounts)"
sed 's/^/VDP-SEED /' /mnt/p/hello.txt
echo "written by the guest" > /mnt/p/guest.txt
sync /mnt/p/guest.txt || exit 11
echo VDP-FSYNCED
umount /mnt/p || exit 12
"#,
    );
    let rc = guest.finish(BOOT);
    if rc != 0 {
        guest.dump();
        panic!("guest script failed with {rc}\n{}", daemon.log_text());
    }
    let seen_head = guest.expect("VDP-HEAD", Duration::ZERO);
    assert_eq!(
        seen_head.trim_start_matches("VDP-HEAD ").trim(),
        head,
        "the guest's first read of the device did not see the file (probe raced the map?)"
    );
    let mount = guest.expect("VDP-MOUNT", Duration::ZERO);
    assert!(mount.contains("dax"), "not mounted with DAX: {mount}");
    guest.expect("VDP-SEED hello from the host", Duration::ZERO);

    assert_eq!(
        ext4_cat(&img, "/guest.txt", dir.path()),
        "written by the guest\n"
    );
    let stats = daemon.stats();
    assert!(
        stats["flush_requests"].as_u64().unwrap() > 0,
        "no flush reached the daemon: {stats}"
    );
    // At most one sync per flush request (group commit), plus the one that made the
    // data durable when the guest powered off and the VMM went away.
    assert!(
        stats["syncs"].as_u64().unwrap() <= stats["flush_requests"].as_u64().unwrap() + 1,
        "{stats}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("the region is live in the guest's address space"),
        "{log}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

const PATTERN: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The guest appends numbered records, fsyncing each and printing an ack; QEMU is
/// SIGKILLed mid-run. Every acknowledged record must be intact in the file.
#[test]
fn every_acknowledged_record_survives_a_killed_vmm() {
    let Some(env) = GuestEnv::load("every_acknowledged_record_survives_a_killed_vmm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = seeded_image(dir.path());
    let mut daemon = Daemon::for_guest(dir.path(), &img, &[]);

    let mut guest = env.boot(
        dir.path(),
        &daemon.socket,
        &format!(
            r#"
mkdir -p /mnt/p
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 10
i=0
while [ $i -lt 100000 ]; do
  i=$((i+1))
  printf 'rec %06d {PATTERN}\n' $i >> /mnt/p/records
  sync /mnt/p/records || exit 11
  echo "VDP-ACK $i"
done
"#
        ),
    );
    guest.expect("VDP-ACK 40", BOOT);
    guest.kill();
    let acked: u64 = guest
        .lines_with("VDP-ACK ")
        .iter()
        .filter_map(|l| l.trim_start_matches("VDP-ACK ").trim().parse().ok())
        .max()
        .unwrap();
    assert!(acked >= 40);

    let text = ext4_cat(&img, "/records", dir.path());
    let records: BTreeMap<u64, &str> = text
        .lines()
        .filter_map(|l| {
            let n = l.get(4..10)?.parse().ok()?;
            Some((n, l))
        })
        .collect();
    for n in 1..=acked {
        let line = records
            .get(&n)
            .unwrap_or_else(|| panic!("acknowledged record {n} of {acked} is missing"));
        assert_eq!(
            *line,
            format!("rec {n:06} {PATTERN}"),
            "record {n} is damaged"
        );
    }
    // The daemon noticed the VMM going away and is waiting for the next one.
    let status = daemon.status();
    assert_eq!(status["connected"], false, "{status}");
    assert!(status["last_disconnect"].is_string(), "{status}");
    assert_eq!(daemon.terminate(), Some(0));
}

/// The daemon outlives a VMM that is killed and serves the next boot on the same
/// socket with a freshly negotiated device.
#[test]
fn the_daemon_serves_a_second_boot_after_the_vmm_is_killed() {
    let Some(env) = GuestEnv::load("the_daemon_serves_a_second_boot_after_the_vmm_is_killed")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = seeded_image(dir.path());
    let mut daemon = Daemon::for_guest(dir.path(), &img, &[]);

    let mut first = env.boot(
        dir.path(),
        &daemon.socket,
        "mkdir -p /mnt/p; mount -t ext4 -o dax /dev/pmem0 /mnt/p && echo VDP-UP; sleep 600\n",
    );
    first.expect("VDP-UP", BOOT);
    first.kill();
    drop(first);

    let mut second = env.boot(
        dir.path(),
        &daemon.socket,
        r#"
mkdir -p /mnt/p
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 10
sed 's/^/VDP-SEED /' /mnt/p/hello.txt
echo second > /mnt/p/second.txt && sync /mnt/p/second.txt || exit 11
umount /mnt/p
"#,
    );
    let rc = second.finish(BOOT);
    if rc != 0 {
        second.dump();
        panic!("second guest failed with {rc}\n{}", daemon.log_text());
    }
    second.expect("VDP-SEED hello from the host", Duration::ZERO);
    assert_eq!(ext4_cat(&img, "/second.txt", dir.path()), "second\n");
    let status = daemon.status();
    assert_eq!(status["connections"], 2, "{status}");
    assert_eq!(daemon.terminate(), Some(0));
}
