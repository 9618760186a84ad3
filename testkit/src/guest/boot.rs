// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What goes into a guest besides its script: files and host tools in its
//! initramfs ([`Boot`]), the guest agent's port, the static daemon, agent and test
//! binaries, and the shell of the DAX lab (an fsdax namespace, its filesystem).
//!
//! Owns: the builds of the static binaries and the host tools' libraries. Never
//! boots anything: that is [`super::GuestEnv`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use super::run;

/// Shell that turns NVDIMM region `n`'s raw namespace (`namespaceN.0`) into an fsdax
/// one (struct pages kept on the NVDIMM, 4 KiB alignment) through sysfs, as `ndctl
/// create-namespace -m fsdax` would, so /dev/pmemN supports DAX mounts and MAP_SYNC;
/// then prints `VDP-FSDAX <sectors> sectors` and `VDP-DATAOFF<n> <bytes>`, the data
/// offset of the fsdax device in the NVDIMM (the pfn device's data start minus the
/// namespace's start). Exits 20 if the conversion fails. Region 0 is the lab's
/// NVDIMM ([`GuestEnv::boot_lab`]).
pub fn fsdax_convert(n: impl std::fmt::Display) -> String {
    format!(
        r#"
nd=/sys/bus/nd/devices
echo namespace{n}.0 > /sys/bus/nd/drivers/nd_pmem/unbind || exit 20
cat /proc/sys/kernel/random/uuid > $nd/pfn{n}.0/uuid || exit 20
echo pmem > $nd/pfn{n}.0/mode || exit 20
echo 4096 > $nd/pfn{n}.0/align || exit 20
echo namespace{n}.0 > $nd/pfn{n}.0/namespace || exit 20
echo pfn{n}.0 > /sys/bus/nd/drivers/nd_pmem/bind || exit 20
[ -b /dev/pmem{n} ] || mdev -s
[ -b /dev/pmem{n} ] || exit 20
echo "VDP-FSDAX $(cat /sys/block/pmem{n}/size) sectors"
echo "VDP-DATAOFF{n} $(( $(cat $nd/pfn{n}.0/resource) - $(cat $nd/namespace{n}.0/resource) ))"
"#
    )
}

/// The DAX lab's filesystem `fs_name` (`ext4` or `xfs`): a [`Boot`] with its mkfs,
/// strace and the static daemon as /vdp/vhost-device-pmem, and the shell command that
/// makes the filesystem (the device goes after it).
pub fn lab_boot(fs_name: &str) -> (Boot, String) {
    let (mkfs, args, configs): (&str, &str, &[&str]) = match fs_name {
        "ext4" => (
            "mkfs.ext4",
            "-q -F -b 4096 -E nodiscard",
            &["/etc/mke2fs.conf"],
        ),
        "xfs" => ("mkfs.xfs", "-q -f", &[]),
        other => panic!("the lab has no filesystem {other}"),
    };
    let mut boot = Boot::default()
        .with_host_tools(&[mkfs, "strace"])
        .with_host_files(configs);
    boot.add_file(
        "vdp/vhost-device-pmem",
        &static_binaries().join("vhost-device-pmem"),
    );
    (boot, format!("/usr/bin/{mkfs} {args}"))
}

/// Extras for one boot.
#[derive(Default)]
pub struct Boot {
    /// Files put in the guest (mode 0755), e.g. a static binary: a bare name in its
    /// root, a path (`usr/bin/strace`) at that path.
    pub files: Vec<(String, Vec<u8>)>,
    pub qemu_args: Vec<String>,
}

impl Boot {
    /// Adds the static guest agent as /agent and a virtio-serial port whose host side
    /// is the daemon's agent socket.
    pub fn with_agent(mut self, agent_socket: &Path) -> Self {
        let dir = static_binaries();
        self.files.push((
            "agent".into(),
            fs::read(dir.join("vhost-device-pmem-agent")).unwrap(),
        ));
        self.qemu_args.extend(agent_qemu_args(agent_socket));
        self
    }

    /// Adds a virtio-blk disk backed by the raw image `image` (the first one added
    /// is /dev/vda in the guest, the next /dev/vdb, ...). `cache=writeback`: what the
    /// guest wrote reaches the image file on the host as it writes, so killing the VM
    /// keeps its disk and loses only its own page cache, like a power cut.
    pub fn with_disk(mut self, image: &Path) -> Self {
        let n = self
            .qemu_args
            .iter()
            .filter(|a| a.starts_with("virtio-blk-pci,"))
            .count();
        self.qemu_args.extend([
            "-drive".into(),
            format!(
                "file={},if=none,id=disk{n},format=raw,cache=writeback",
                image.display()
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive=disk{n}"),
        ]);
        self
    }

    /// Adds host programs, each as `/usr/bin/NAME` in the guest, with the shared
    /// libraries `ldd` lists for it (at their host paths) and the dynamic loader. The
    /// guest's shell is busybox, whose applets win over PATH: call them by full path.
    pub fn with_host_tools(mut self, tools: &[&str]) -> Self {
        for tool in tools {
            let path = find_host_tool(tool);
            self.add_file(&format!("usr/bin/{tool}"), &path);
            for lib in shared_libraries(&path) {
                self.add_file(&lib.display().to_string(), &lib);
            }
        }
        self
    }

    /// Adds host files (e.g. a tool's configuration) at their host paths.
    pub fn with_host_files(mut self, paths: &[&str]) -> Self {
        for p in paths {
            self.add_file(p, Path::new(p));
        }
        self
    }

    /// Adds a file to the guest at `guest` (a path in the guest's root), read from
    /// `host`; a path already added is kept.
    pub fn add_file(&mut self, guest: &str, host: &Path) {
        let guest = guest.trim_start_matches('/').to_string();
        if self.files.iter().any(|(n, _)| *n == guest) {
            return;
        }
        let data = fs::read(host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        self.files.push((guest, data));
    }
}

/// QEMU arguments for the guest agent's virtio-serial port, its host side the
/// daemon's (or export's) agent socket, reconnecting until that socket exists.
pub fn agent_qemu_args(agent_socket: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial-pci".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent0,path={},reconnect-ms=500",
            agent_socket.display()
        ),
        "-device".into(),
        "virtserialport,chardev=agent0,name=org.vhost-device-pmem.0".into(),
    ]
}

/// The dynamic loader every dynamically linked x86_64 program names.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// A program on the host by name: PATH first, then the sbin directories (tests may
/// run without them in PATH).
fn find_host_tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("host tool {name} not found (setup.sh installs it)"))
}

/// The shared libraries of a host program as `ldd` resolves them, and the loader.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(program));
    let mut libs = vec![PathBuf::from(LOADER)];
    for line in out.lines() {
        let line = line.trim();
        assert!(!line.contains("not found"), "{}: {line}", program.display());
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let file = line.split(" => ").last().unwrap_or(line);
        if let Some(path) = file
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            let path = PathBuf::from(path);
            if !libs.contains(&path) {
                libs.push(path);
            }
        }
    }
    libs
}

/// Builds (if needed) and returns the directory of the static daemon and agent.
pub fn static_binaries() -> PathBuf {
    let script = crate::repo_root().join("guest-tests/build-static.sh");
    let out = run(&mut Command::new(script));
    PathBuf::from(out.trim())
}

/// The target the static binaries are built for.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds (if needed) a statically linked executable of the integration test
/// `test` (a `[[test]]` name) and returns its path, so the test itself can run in a
/// guest, e.g. next to the static daemon in the DAX host lab. Release build in
/// target/static, like guest-tests/build-static.sh; cargo's JSON messages name the
/// executable.
pub fn static_test_binary(test: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(Command::new(cargo)
        .current_dir(crate::repo_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["test", "--locked", "--no-run", "--release", "--target"])
        .arg(STATIC_TARGET)
        .args(["--target-dir", "target/static", "--test", test])
        .arg("--message-format=json"));
    let exe = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == test)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no executable for test {test}"));
    let kind = run(Command::new("file").arg("-L").arg(&exe));
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{} is not static: {kind}",
        exe.display()
    );
    exe
}
