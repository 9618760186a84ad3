// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The nested lab's rig, shared by its proofs (`guest-tests/nested.rs`) and its
//! benchmark (`guest-tests/nested_bench.rs`): the L1 boot (an emulated NVDIMM turned
//! fsdax, a DAX filesystem on it, the setup's QEMU tree on a read-only disk, L2's
//! kernel and initramfs inside), and what runs in L1 says on its console.
//!
//! Owns: L1's NVDIMM file, its script and its extras, and the console protocol
//! (`say`, `console_json`). Never decides what a nested test asserts.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use super::{
    fsdax_convert, lab_boot, run, static_binaries, static_test_binary, Boot, Guest, GuestEnv,
};

/// Hard limit for one L1 boot, QEMU start to power-off or cut (nested TCG).
pub const L1_TIMEOUT: Duration = Duration::from_secs(900);
/// How long L2 may take from its QEMU's start to the end of its records.
pub const L2_TIMEOUT: Duration = Duration::from_secs(600);

/// L1's emulated NVDIMM (a sparse file here).
pub const L1_NVDIMM_SIZE: u64 = 1 << 30;

/// Where L1 mounts its DAX filesystem; the exported files are in its root.
pub const L1_MOUNT: &str = "/mnt/lab";

/// Everything for one L1 boot: its NVDIMM (a sparse file in `dir`), its script and
/// its extras. L1 makes `fs_name` on the fsdax NVDIMM, mounts it with DAX on
/// [`L1_MOUNT`] (ext4 with `commit=600`) with background writeback off, and runs
/// test `l1_test` of the `[[test]]` target `target` (its static build is
/// `/vdp/<target>` in L1 and in L2) with the `VDP_*` assignments in `env_line`; L2's
/// QEMU tree is the setup's trixie tree on a read-only disk, L2's kernel and
/// initramfs (with `l2_script` as its /test.sh, made here: L1 has no tools to make
/// one) are in L1's initramfs.
pub fn l1_rig(
    env: &GuestEnv,
    target: &str,
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
    let test_bin = static_test_binary(target);
    let mut l2boot = Boot::default()
        .with_host_tools(&["mkfs.ext4"])
        .with_host_files(&["/etc/mke2fs.conf"]);
    l2boot.add_file(&format!("vdp/{target}"), &test_bin);
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
    boot.add_file(&format!("vdp/{target}"), &test_bin);
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
{env_line} RUST_BACKTRACE=1 /vdp/{target} --exact {l1_test} --ignored --nocapture --test-threads=1
rc=$?
echo "VDP-NO-CUT $rc"
[ $rc = 0 ] || exit $rc
umount {L1_MOUNT} || exit 24
"#
    );
    (nvdimm, script, boot)
}

/// The number after `prefix` on the console.
pub fn console_u64(guest: &Guest, prefix: &str) -> u64 {
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
pub fn console_json(guest: &Guest, prefix: &str) -> Value {
    let Some((_, rest)) = guest.console.iter().find_map(|l| l.split_once(prefix)) else {
        guest.dump();
        panic!("no {prefix:?} on the console");
    };
    serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{prefix}{rest}: {e}"))
}

pub fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: in_l1 and in_l1_bench run only inside the nested lab VM \
             (the nested_* tests and bench_dax_host boot it and run them there)"
        )
    })
}

/// Says `line` on the console (L1's serial port) at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}
