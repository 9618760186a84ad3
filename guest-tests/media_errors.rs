// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest tests of the media-error path: a bad range known to the daemon reaches the
//! guest's badblocks through the guest agent, a read of it fails cleanly while its
//! neighbours read fine, and the range outlives a daemon restart and a guest reboot.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use vdp_testkit::{
    daemon::Daemon,
    guest::{make_ext4_image, run, Boot, GuestEnv},
};
use vhost_device_pmem::control::Request;

const BOOT: Duration = Duration::from_secs(120);

/// A 16-block file whose block i is filled with the byte b'A' + i.
fn image_with_data_file(dir: &Path) -> std::path::PathBuf {
    let seed = dir.join("seed");
    fs::create_dir_all(&seed).unwrap();
    let data: Vec<u8> = (0..16u8).flat_map(|i| vec![b'A' + i; 4096]).collect();
    fs::write(seed.join("data.bin"), data).unwrap();
    let img = dir.join("pmem.img");
    make_ext4_image(&img, 64 << 20, &seed);
    img
}

/// Byte offset in the image of block `n` of `/data.bin` (ext4, 4 KiB blocks).
fn offset_of_block(img: &Path, n: u64) -> u64 {
    let out = run(Command::new("debugfs")
        .args(["-R", &format!("bmap /data.bin {n}")])
        .arg(img));
    out.trim().parse::<u64>().expect("debugfs bmap") * 4096
}

const WATCH_BADBLOCKS: &str = r#"
/agent 2>/dev/console &
mkdir -p /mnt/p
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 10
echo VDP-MOUNTED
n=0
while [ -z "$(cat /sys/block/pmem0/badblocks)" ]; do
  sleep 0.05; n=$((n+1)); [ $n -gt 1200 ] && exit 11
done
echo "VDP-BB $(tr '\n' ';' </sys/block/pmem0/badblocks)"
for i in 4 5 6; do
  if dd if=/mnt/p/data.bin of=/tmp/blk bs=4096 skip=$i count=1 2>/dev/null; then
    echo "VDP-READ $i ok $(head -c 1 /tmp/blk)"
  else
    echo "VDP-READ $i eio"
  fi
done
"#;

#[test]
fn a_bad_range_reaches_the_guest_and_survives_restarts() {
    let Some(env) = GuestEnv::load("a_bad_range_reaches_the_guest_and_survives_restarts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_data_file(dir.path());
    let bad = offset_of_block(&img, 5);
    let agent_sock = dir.path().join("agent.sock");
    let agent_arg = agent_sock.display().to_string();
    let mut daemon = Daemon::for_guest(dir.path(), &img, &["--agent-socket", &agent_arg]);

    let mut guest = env.boot_with(
        dir.path(),
        &daemon.socket,
        WATCH_BADBLOCKS,
        &Boot::default().with_agent(&agent_sock),
    );
    guest.expect("VDP-MOUNTED", BOOT);
    let injected = Instant::now();
    let answer = daemon.call(&Request::BadblocksInject {
        offset: bad,
        length: 512,
    });
    assert_eq!(answer["ok"], true, "{answer}");
    let seen = guest.expect("VDP-BB", Duration::from_secs(30));
    eprintln!(
        "bad range visible in the guest's badblocks {:?} after injection",
        injected.elapsed()
    );
    assert_eq!(
        seen.trim(),
        format!("VDP-BB {} 1;", bad / 512),
        "wrong sector"
    );
    let rc = guest.finish(BOOT);
    assert_eq!(rc, 0, "guest script failed");
    guest.expect("VDP-READ 4 ok E", Duration::ZERO);
    guest.expect("VDP-READ 5 eio", Duration::ZERO);
    guest.expect("VDP-READ 6 ok G", Duration::ZERO);
    let status = daemon.status();
    assert_eq!(status["agent"]["device"], "/dev/pmem0", "{status}");
    assert_eq!(daemon.terminate(), Some(0));

    // A new daemon on the same file still knows the range, and a new guest gets it.
    let mut daemon = Daemon::for_guest(dir.path(), &img, &["--agent-socket", &agent_arg]);
    let list = daemon.call(&Request::BadblocksList);
    assert_eq!(
        list["ranges"],
        serde_json::json!([{"offset": bad, "length": 512}]),
        "{list}"
    );
    let mut guest = env.boot_with(
        dir.path(),
        &daemon.socket,
        WATCH_BADBLOCKS,
        &Boot::default().with_agent(&agent_sock),
    );
    let seen = guest.expect("VDP-BB", BOOT);
    assert_eq!(seen.trim(), format!("VDP-BB {} 1;", bad / 512));
    assert_eq!(guest.finish(BOOT), 0);
    guest.expect("VDP-READ 5 eio", Duration::ZERO);
    assert_eq!(daemon.terminate(), Some(0));
}
