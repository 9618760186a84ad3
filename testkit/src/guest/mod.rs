// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boots real guests against the real daemon: the environment made by
//! `guest-tests/setup.sh`, the daemon process, QEMU (>= 11.1, from the setup's trixie
//! tree) and host-side image tools. Owns process lifetimes (everything is killed on
//! drop) and timeouts; never decides what a test asserts.

mod boot;
pub mod env;
pub mod in_vm;
pub mod nested;
pub mod records;

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        mpsc::{channel, Receiver, RecvTimeoutError},
        Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

/// The QMP client of the tests is the library's (`nvdimm`'s): one client.
pub use vhost_device_pmem::app::nvdimm::qmp::{Qmp, QmpError};

pub use boot::{
    agent_qemu_args, fsdax_convert, lab_boot, static_binaries, static_test_binary, Boot,
};

use crate::BIN;

/// Guests are booted one at a time: the machine has two cores and TCG uses them.
static BOOT_LOCK: Mutex<()> = Mutex::new(());

/// What setup.sh installed.
pub struct GuestEnv {
    pub qemu_root: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: String,
    _serial: MutexGuard<'static, ()>,
}

impl GuestEnv {
    /// Loads the environment, or explains loudly why the test cannot run. With
    /// VDP_REQUIRE_GUEST=1 (set by CI) a missing environment fails the test.
    pub fn load(test: &str) -> Option<Self> {
        let cache = std::env::var("VDP_GUEST_CACHE")
            .unwrap_or_else(|_| "/var/tmp/vhost-device-pmem-guest".into());
        let env_file = Path::new(&cache).join("env.sh");
        let vars = match fs::read_to_string(&env_file) {
            Ok(text) => parse_env(&text),
            Err(e) => {
                let msg = format!(
                    "guest test {test} SKIPPED: {} missing ({e}); run `sudo guest-tests/setup.sh` first",
                    env_file.display()
                );
                if std::env::var("VDP_REQUIRE_GUEST").as_deref() == Ok("1") {
                    panic!("{msg} (VDP_REQUIRE_GUEST=1)");
                }
                // Past libtest's output capture (which takes eprintln!), so a skip
                // is seen without --nocapture.
                let _ = writeln!(std::io::stderr(), "\n*** {msg} ***\n");
                return None;
            }
        };
        let get = |k: &str| -> PathBuf {
            PathBuf::from(
                vars.get(k)
                    .unwrap_or_else(|| panic!("{k} missing in {}", env_file.display())),
            )
        };
        let serial = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        Some(Self {
            qemu_root: get("VDP_QEMU_ROOT"),
            kernel: get("VDP_KERNEL"),
            initramfs: get("VDP_INITRAMFS"),
            accel: std::env::var("VDP_ACCEL")
                .ok()
                .or_else(|| vars.get("VDP_ACCEL").cloned())
                .unwrap_or_else(|| "tcg".into()),
            _serial: serial,
        })
    }

    /// The initramfs for one boot: the base archive plus `/test.sh` (and any extra
    /// files), appended as a second cpio archive. An extra file's name may be a path
    /// (`usr/bin/strace`); its directories are made in the guest.
    pub fn initrd_with(&self, dir: &Path, script: &str, extra: &[(&str, &[u8])]) -> PathBuf {
        let stage = dir.join("initrd-extra");
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(&stage).unwrap();
        let mut names = vec!["test.sh".to_string()];
        fs::write(stage.join("test.sh"), format!("#!/bin/sh\n{script}")).unwrap();
        fs::set_permissions(stage.join("test.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        for (name, data) in extra {
            let name = name.trim_start_matches('/');
            // The kernel's unpacker makes no missing directories: list each parent
            // before what it holds.
            let mut parent = PathBuf::new();
            for part in Path::new(name).parent().into_iter().flat_map(Path::iter) {
                parent.push(part);
                let p = parent.to_string_lossy().into_owned();
                if !names.contains(&p) {
                    fs::create_dir_all(stage.join(&p)).unwrap();
                    names.push(p);
                }
            }
            fs::write(stage.join(name), data).unwrap();
            fs::set_permissions(stage.join(name), fs::Permissions::from_mode(0o755)).unwrap();
            names.push(name.to_string());
        }
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&stage)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio (installed by setup.sh)");
        cpio.stdin
            .take()
            .unwrap()
            .write_all(names.join("\n").as_bytes())
            .unwrap();
        let out = cpio.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio failed");
        let mut initrd = fs::read(&self.initramfs).unwrap();
        initrd.extend_from_slice(&out.stdout);
        let path = dir.join("initrd");
        fs::write(&path, initrd).unwrap();
        path
    }

    /// Starts QEMU with the daemon's socket as a virtio-pmem device. The guest runs
    /// `script` as /test.sh after the modules are loaded.
    pub fn boot(&self, dir: &Path, socket: &Path, script: &str) -> Guest {
        self.boot_with(dir, socket, script, &Boot::default())
    }

    /// [`Self::boot`] with extra files in the initramfs and extra QEMU arguments.
    pub fn boot_with(&self, dir: &Path, socket: &Path, script: &str, opts: &Boot) -> Guest {
        let initrd = self.initrd_for(dir, script, opts);
        let mut cmd = self.qemu(&initrd, "memory-backend=mem");
        cmd.args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-m",
            "512M",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=vu0,path={}", socket.display()))
        .args([
            "-device",
            "vhost-user-test-device-pci,chardev=vu0,virtio-id=27,num_vqs=1,config_size=16",
        ])
        .args(&opts.qemu_args);
        Guest::spawn(cmd, dir.join("console.log"))
    }

    /// Boots the DAX host lab: a guest that plays a host with persistent memory. An
    /// emulated NVDIMM backed by `nvdimm` (a file, usually sparse, of the NVDIMM's
    /// size) shows up as /dev/pmem0 in a raw namespace; [`fsdax_convert`]`(0)` turns it into
    /// an fsdax one. 1 GiB of RAM, no virtio-pmem device.
    pub fn boot_lab(&self, dir: &Path, nvdimm: &Path, script: &str, opts: &Boot) -> Guest {
        self.boot_lab_with(dir, nvdimm, script, opts, "1G")
    }

    /// [`Self::boot_lab`] with `memory` of RAM (`2G` for a lab that boots guests of
    /// its own).
    pub fn boot_lab_with(
        &self,
        dir: &Path,
        nvdimm: &Path,
        script: &str,
        opts: &Boot,
        memory: &str,
    ) -> Guest {
        let size = fs::metadata(nvdimm).expect("NVDIMM backing file").len();
        let initrd = self.initrd_for(dir, script, opts);
        let mut cmd = self.qemu(&initrd, "nvdimm=on");
        cmd.args(["-m", &format!("{memory},slots=2,maxmem=4G"), "-object"])
            .arg(format!(
                "memory-backend-file,id=nv0,share=on,mem-path={},size={size}",
                nvdimm.display()
            ))
            .args(["-device", "nvdimm,memdev=nv0,id=nvdimm0"])
            .args(&opts.qemu_args);
        Guest::spawn(cmd, dir.join("console.log"))
    }

    /// Boots a plain VM (1 GiB of RAM, no pmem device of its own) with `opts`: the
    /// guest that plays a host in the power-cut and failing-disk tests, its disks
    /// added with [`Boot::with_disk`].
    pub fn boot_vm(&self, dir: &Path, script: &str, opts: &Boot) -> Guest {
        let initrd = self.initrd_for(dir, script, opts);
        let mut cmd = self.qemu(&initrd, "memory-backend=mem");
        cmd.args(["-object", "memory-backend-ram,id=mem,size=1G", "-m", "1G"])
            .args(&opts.qemu_args);
        Guest::spawn(cmd, dir.join("console.log"))
    }

    /// Boots a guest WITHOUT the pmem device, for hot-plug: machine type `machine`
    /// (`pc`: ACPI PCI hot-plug on the root bus), shareable guest RAM (512 MiB, as
    /// [`Self::boot`]) and a QMP socket, `qmp.sock` in `dir`, to plug it through.
    pub fn boot_for_hotplug(
        &self,
        dir: &Path,
        machine: &str,
        script: &str,
        opts: &Boot,
    ) -> (Guest, Qmp) {
        let initrd = self.initrd_for(dir, script, opts);
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = self.qemu_machine(&initrd, machine, "memory-backend=mem");
        cmd.args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-m",
            "512M",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(&opts.qemu_args);
        let guest = Guest::spawn(cmd, dir.join("console.log"));
        let qmp = connect_qmp(&qmp_path);
        (guest, qmp)
    }

    /// Starts QEMU (machine q35 with `machine_opts`) on a complete initramfs made
    /// beforehand ([`Self::initrd_for`]), with `args`: a guest booted by a guest (the
    /// DAX lab's own guests), whose initramfs the host built.
    pub fn boot_initrd(
        &self,
        dir: &Path,
        initrd: &Path,
        machine_opts: &str,
        args: &[String],
    ) -> Guest {
        self.boot_initrd_under(dir, initrd, machine_opts, args, &[])
    }

    /// [`Self::boot_initrd`] with QEMU started by `wrapper` (a program and its
    /// arguments, e.g. strace), which then owns the console.
    pub fn boot_initrd_under(
        &self,
        dir: &Path,
        initrd: &Path,
        machine_opts: &str,
        args: &[String],
        wrapper: &[String],
    ) -> Guest {
        let mut qemu = self.qemu(initrd, machine_opts);
        qemu.args(args);
        let cmd = match wrapper.split_first() {
            None => qemu,
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args)
                    .arg(qemu.get_program())
                    .args(qemu.get_args());
                cmd
            }
        };
        Guest::spawn(cmd, dir.join("console.log"))
    }

    /// Boots a q35 guest ready for NVDIMMs (`nvdimm=on`, `-m 512M,slots=2,maxmem=2G`,
    /// no pmem device of its own) with two QMP sockets in `dir`: `qmp.sock` for the
    /// test (returned connected) and `qmp-export.sock` for `vhost-device-pmem nvdimm`
    /// (QEMU serves one client per monitor). `opts.qemu_args` may cold-plug one.
    pub fn boot_for_nvdimm(&self, dir: &Path, script: &str, opts: &Boot) -> (Guest, Qmp) {
        let initrd = self.initrd_for(dir, script, opts);
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = self.qemu(&initrd, "nvdimm=on,memory-backend=mem");
        cmd.args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-m",
            "512M,slots=2,maxmem=2G",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp-export.sock").display()
        ))
        .args(&opts.qemu_args);
        let guest = Guest::spawn(cmd, dir.join("console.log"));
        let qmp = connect_qmp(&qmp_path);
        (guest, qmp)
    }

    /// The initramfs for one boot with `script` as /test.sh and `opts`' files, in
    /// `dir` (its file `initrd`).
    pub fn initrd_for(&self, dir: &Path, script: &str, opts: &Boot) -> PathBuf {
        let files: Vec<(&str, &[u8])> = opts
            .files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        self.initrd_with(dir, script, &files)
    }

    /// QEMU from the setup's tree with the guest kernel, `initrd`, a serial console
    /// on stdio and `machine_opts` added to `-machine q35,accel=...`.
    fn qemu(&self, initrd: &Path, machine_opts: &str) -> Command {
        self.qemu_machine(initrd, "q35", machine_opts)
    }

    /// [`Self::qemu`] on machine type `machine` (`q35`, `pc`).
    fn qemu_machine(&self, initrd: &Path, machine: &str, machine_opts: &str) -> Command {
        self.qemu_booting(
            initrd,
            machine,
            machine_opts,
            "console=ttyS0 quiet panic=-1 loglevel=4",
        )
    }

    /// Boots a whole system: the guest kernel with `memory` of RAM, the raw image
    /// `root` as /dev/vda (`snapshot=on`: what the guest writes goes to a temporary
    /// file, the image stays as it is, so one cached image serves every run), then
    /// `args` (more disks: /dev/vdb, ...). Its initramfs is the base one with
    /// `/boot-root.sh` as its init (`rdinit=`): it loads the base modules, mounts
    /// /dev/vda and hands over to the image's systemd, which reads `cmdline` (its
    /// `systemd.*` settings) from the kernel command line.
    pub fn boot_system(
        &self,
        dir: &Path,
        root: &Path,
        memory: &str,
        cmdline: &str,
        args: &[String],
    ) -> Guest {
        let initrd = self.initrd_with(dir, "", &[("boot-root.sh", BOOT_ROOT.as_bytes())]);
        let append = format!(
            "console=ttyS0 panic=-1 loglevel=4 rdinit=/boot-root.sh systemd.show_status=error {cmdline}"
        );
        let mut cmd = self.qemu_booting(&initrd, "q35", "memory-backend=mem", &append);
        cmd.args(["-object"])
            .arg(format!("memory-backend-ram,id=mem,size={memory}"))
            .args(["-m", memory, "-drive"])
            .arg(format!(
                "file={},if=none,id=root,format=raw,snapshot=on",
                root.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root"])
            .args(args);
        Guest::spawn(cmd, dir.join("console.log"))
    }

    /// [`Self::qemu_machine`] with the kernel command line `append`.
    fn qemu_booting(
        &self,
        initrd: &Path,
        machine: &str,
        machine_opts: &str,
        append: &str,
    ) -> Command {
        let root = &self.qemu_root;
        let mut cmd = Command::new(root.join("lib64/ld-linux-x86-64.so.2"));
        cmd.arg("--library-path")
            .arg(format!(
                "{}:{}",
                root.join("lib/x86_64-linux-gnu").display(),
                root.join("usr/lib/x86_64-linux-gnu").display()
            ))
            .arg(root.join("usr/bin/qemu-system-x86_64"))
            .arg("-L")
            .arg(root.join("usr/share/qemu"))
            .arg("-L")
            .arg(root.join("usr/share/seabios"))
            .args([
                "-machine",
                &format!("{machine},accel={},{machine_opts}", self.accel),
                "-smp",
                "2",
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
            ])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append]);
        if self.accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd
    }
}

/// The init of [`GuestEnv::boot_system`]'s initramfs: the base modules (virtio_blk
/// among them), then the root disk, then the image's own init.
const BOOT_ROOT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null
done </etc/modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "VDP-NO-ROOT: no file system to mount on /dev/vda"
  echo "VDP-RESULT 90"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /usr/lib/systemd/systemd
"#;

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// A running QEMU whose console lines are collected as they come.
pub struct Guest {
    child: Child,
    lines: Receiver<String>,
    pub console: Vec<String>,
    log_path: PathBuf,
}

impl Guest {
    fn spawn(mut cmd: Command, log_path: PathBuf) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start QEMU");
        let (tx, rx) = channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("[qemu stderr] {line}"));
            }
        });
        Self {
            child,
            lines: rx,
            console: Vec::new(),
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle`; panics with the console so far
    /// if it does not come within `timeout`.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.console.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.console.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.dump();
                    panic!("no console line with {needle:?} within {timeout:?}");
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.dump();
                    panic!("QEMU exited before printing {needle:?}");
                }
            }
        }
    }

    /// The next console line (also kept in [`Self::console`]), or `None` when none
    /// came within `timeout` or QEMU has exited and its output is drained.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.console.push(line.clone());
        Some(line)
    }

    /// Waits for the guest's /test.sh to finish and QEMU to exit; returns the
    /// script's exit status.
    pub fn finish(&mut self, timeout: Duration) -> i32 {
        let line = self.expect("VDP-RESULT ", timeout);
        let rc = line
            .rsplit(' ')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // Drain what is left.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.console.push(l);
        }
        self.save_log();
        rc
    }

    /// Waits for QEMU to exit on its own (a guest that reset itself: QEMU runs with
    /// -no-reboot), collecting the console; returns its exit code, or `None` if it
    /// still ran after `timeout` (it is then killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break Some(st.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.console.push(l);
            }
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.console.push(l);
        }
        self.save_log();
        status
    }

    /// SIGKILL, as a crashing VMM would die.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.console.push(l);
        }
        self.save_log();
    }

    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.console
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn save_log(&self) {
        let _ = fs::write(&self.log_path, self.console.join("\n"));
    }

    pub fn dump(&self) {
        self.save_log();
        eprintln!("---- guest console ({}) ----", self.log_path.display());
        for l in &self.console {
            eprintln!("{l}");
        }
        eprintln!("---- end of console ----");
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a host command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes an ext4 image of `size` bytes seeded with `seed_dir` (4 KiB blocks, which
/// DAX needs), writable by the owner only, and makes its block map immutable with
/// `vhost-device-pmem prepare` (mkfs leaves unwritten extents), so `auto` serves it
/// in `datasync` mode on this page-cache host.
pub fn make_ext4_image(path: &Path, size: u64, seed_dir: &Path) {
    let f = fs::File::create(path).unwrap();
    // Write every byte so the block map starts out allocated and written.
    let chunk = vec![0u8; 1 << 20];
    let mut w = std::io::BufWriter::new(&f);
    for _ in 0..size / chunk.len() as u64 {
        w.write_all(&chunk).unwrap();
    }
    drop(w);
    f.sync_all().unwrap();
    drop(f);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"])
        .arg(seed_dir)
        .arg(path));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    run(Command::new(BIN).arg("prepare").arg(path));
}

/// Reads a file out of an ext4 image after replaying its journal on a copy (the
/// image itself is left as it is).
pub fn ext4_cat(image: &Path, file: &str, scratch: &Path) -> String {
    let copy = scratch.join("fsck-copy.img");
    fs::copy(image, &copy).unwrap();
    let st = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .unwrap();
    // 0: clean, 1: errors corrected (journal replayed); anything else is a failure.
    let code = st.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "e2fsck failed ({code}): {}",
        String::from_utf8_lossy(&st.stdout)
    );
    let out = run(Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(&copy));
    let _ = fs::remove_file(&copy);
    out
}

/// Hex MD5 of bytes, via md5sum (the guest computes its side with busybox md5sum).
pub fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Connects to QEMU's monitor at `path` with the library's client, retrying for
/// 20 s while QEMU creates the socket; every command then has 30 s.
pub fn connect_qmp(path: &Path) -> Qmp {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Qmp::connect(path, Duration::from_secs(30)) {
            Ok(qmp) => return qmp,
            Err(e @ QmpError::Connect { .. }) => {
                assert!(Instant::now() < deadline, "{e}");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
}
