// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An operator's stock Debian 13 host, end to end, in one VM that plays it: systemd
//! as PID 1, AppArmor enforcing, libvirt's system daemon (libvirt 11.3, QEMU 11.1
//! as `libvirt-qemu`), the project's `.deb` installed with `dpkg -i`, the instance
//! `vm0-pmem0` by the path convention and started by its socket units, the shipped
//! domain XML defined and started twice, the nested guest mounting /dev/pmem0 with
//! DAX. The VM's image is `guest-tests/operator-host.sh`'s (Debian's packages
//! only); the operator's steps are `guest-tests/operator-steps.sh`, which follows
//! docs/operations.md and only reports what it saw. This test builds the package,
//! the nested guest and the domain XML, boots the VM, and judges the report.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use vdp_testkit::{
    guest::{run, Guest, GuestEnv},
    repo_root,
};

/// The whole run: the VM's systemd boot, two nested boots under nested TCG.
const VM_TIMEOUT: Duration = Duration::from_secs(2700);
/// The seeded file the nested guest reads from /dev/pmem0.
const SEED: &str = "seeded by the operator test\n";
/// The exported file: a power of two (QEMU 11.1 takes no other size).
const IMAGE_SIZE: u64 = 64 << 20;

/// The nested guest (the domain's): mounts /dev/pmem0 with DAX, reads the seed,
/// writes and fsyncs a file on its first boot and finds it on its second, then
/// waits to be destroyed.
const L2_SCRIPT: &str = r#"
[ -b /dev/pmem0 ] || mdev -s
mkdir -p /mnt/p
if mount -t ext4 -o dax /dev/pmem0 /mnt/p; then
  echo "VDP-L2 mount $(grep ' /mnt/p ' /proc/mounts)"
  echo "VDP-L2 seed $(cat /mnt/p/seed.txt)"
  if [ -e /mnt/p/l2.txt ]; then
    echo "VDP-L2 found $(cat /mnt/p/l2.txt)"
  else
    echo "written by the first boot" | dd of=/mnt/p/l2.txt conv=fsync 2>/dev/null \
      && echo "VDP-L2 wrote"
  fi
  umount /mnt/p && echo "VDP-L2 unmounted"
else
  echo "VDP-L2 mount failed"
fi
echo VDP-L2-DONE
sleep 100000
"#;

/// The VM's image, or a loud skip (a failure when VDP_REQUIRE_GUEST=1).
fn operator_image(test: &str) -> Option<PathBuf> {
    let why = match std::env::var("VDP_OPERATOR_IMAGE") {
        Err(_) => "VDP_OPERATOR_IMAGE is not set".to_string(),
        Ok(p) if !Path::new(&p).is_file() => format!("{p} missing"),
        Ok(p) => return Some(PathBuf::from(p)),
    };
    let msg = format!(
        "operator host test {test} SKIPPED: {why}; as root run \
         `export VDP_OPERATOR_IMAGE=$(guest-tests/operator-host.sh)`"
    );
    if std::env::var("VDP_REQUIRE_GUEST").as_deref() == Ok("1") {
        panic!("{msg} (VDP_REQUIRE_GUEST=1)");
    }
    let _ = writeln!(std::io::stderr(), "\n*** {msg} ***\n");
    None
}

/// The daemon's package, built by packaging/build-deb.sh into `out`.
fn build_deb(out: &Path) -> PathBuf {
    let o = Command::new(repo_root().join("packaging/build-deb.sh"))
        .arg("--output")
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
        .expect("packaging/build-deb.sh");
    assert!(o.status.success(), "build-deb.sh: {}", o.status);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let deb = text
        .lines()
        .find(|l| l.contains("/vhost-device-pmem_"))
        .unwrap_or_else(|| panic!("build-deb.sh named no daemon package: {text}"));
    PathBuf::from(deb)
}

/// The shipped domain XML with only what this VM needs changed, each change made
/// exactly once: no KVM in the VM (TCG), less memory, and the <os> (the nested
/// guest's kernel and initramfs) and serial console in place of the XML's
/// placeholder for "os, disks, network". Its sockets, memory backing and device
/// lines are the shipped ones.
fn adapt_domain_xml(shipped: &str) -> String {
    let edits = [
        ("<domain type='kvm'", "<domain type='qemu'".to_string()),
        (
            "<memory unit='GiB'>4</memory>",
            "<memory unit='MiB'>512</memory>".to_string(),
        ),
        (
            "<!-- ... os, disks, network as usual ... -->",
            "<os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    \
             <kernel>/var/lib/libvirt/boot/l2-vmlinuz</kernel>\n    \
             <initrd>/var/lib/libvirt/boot/l2-initrd</initrd>\n    \
             <cmdline>console=ttyS0 quiet panic=-1 loglevel=4</cmdline>\n  </os>\n  \
             <on_poweroff>destroy</on_poweroff>"
                .to_string(),
        ),
        (
            "  <devices>\n",
            "  <devices>\n    <serial type='file'>\n      \
             <source path='/var/log/libvirt/qemu/vm0-serial.log'/>\n      \
             <target port='0'/>\n    </serial>\n"
                .to_string(),
        ),
    ];
    let mut xml = shipped.to_string();
    for (from, to) in edits {
        assert_eq!(
            xml.matches(from).count(),
            1,
            "configs/libvirt-domain.xml should hold {from:?} once"
        );
        xml = xml.replace(from, &to);
    }
    xml
}

/// The report of operator-steps.sh: the evidence lines by key, in order.
struct Report {
    evidence: Vec<(String, String)>,
}

impl Report {
    fn from(guest: &Guest) -> Self {
        let evidence = guest
            .console
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find("VDP-E2E ")? + "VDP-E2E ".len()..];
                let (k, v) = rest.split_once(": ").or_else(|| {
                    // "KEY:" with nothing after it.
                    rest.strip_suffix(':').map(|k| (k, ""))
                })?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        Self { evidence }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.evidence
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key).as_slice() {
            [v] => v,
            other => panic!("evidence {key:?}: expected one line, got {other:?}"),
        }
    }

    fn json(&self, key: &str) -> Value {
        let v = self.one(key);
        serde_json::from_str(v).unwrap_or_else(|e| panic!("{key}: {e}: {v}"))
    }
}

/// `ps -o pid=,user=,comm=`: pid, user, command name.
fn ps_line(line: &str) -> (u32, String, String) {
    let mut f = line.split_whitespace();
    let pid = f.next().and_then(|p| p.parse().ok());
    let (Some(pid), Some(user), Some(comm)) = (pid, f.next(), f.next()) else {
        panic!("not a ps line: {line:?}");
    };
    (pid, user.to_string(), comm.to_string())
}

#[test]
fn operator_host_debian13_libvirt_apparmor_deb_units_and_a_dax_guest() {
    let test = "operator_host_debian13_libvirt_apparmor_deb_units_and_a_dax_guest";
    let Some(env) = GuestEnv::load(test) else {
        return;
    };
    let Some(image) = operator_image(test) else {
        return;
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let e2e = dir.path().join("e2e");
    fs::create_dir_all(&e2e).unwrap();

    // The package, as an operator gets it.
    let deb = build_deb(&dir.path().join("debs"));
    fs::copy(&deb, e2e.join(deb.file_name().unwrap())).unwrap();

    // The operator's file, seeded (an ext4 file system with one file).
    let seed_dir = dir.path().join("seed");
    fs::create_dir_all(&seed_dir).unwrap();
    fs::write(seed_dir.join("seed.txt"), SEED).unwrap();
    vdp_testkit::guest::make_ext4_image(&e2e.join("seed.img"), IMAGE_SIZE, &seed_dir);

    // The nested guest: the base initramfs with its script, the guest kernel.
    let l2dir = dir.path().join("l2");
    fs::create_dir_all(&l2dir).unwrap();
    let l2_initrd = env.initrd_with(&l2dir, L2_SCRIPT, &[]);
    fs::copy(&l2_initrd, e2e.join("l2-initrd")).unwrap();
    fs::copy(&env.kernel, e2e.join("l2-vmlinuz")).unwrap();

    // The shipped domain XML, adapted to this VM only where it must be.
    let shipped = fs::read_to_string(repo_root().join("configs/libvirt-domain.xml")).unwrap();
    fs::write(e2e.join("vm0.xml"), adapt_domain_xml(&shipped)).unwrap();

    let steps = e2e.join("steps.sh");
    fs::copy(repo_root().join("guest-tests/operator-steps.sh"), &steps).unwrap();
    fs::set_permissions(&steps, fs::Permissions::from_mode(0o755)).unwrap();

    // The test's disk, /dev/vdb in the VM, mounted read-only on /e2e.
    let disk = dir.path().join("e2e.img");
    fs::File::create(&disk).unwrap().set_len(512 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vdp-e2e", "-d"])
        .arg(&e2e)
        .arg(&disk));

    let cmdline = "systemd.mount-extra=/dev/vdb:/e2e:ext4:ro \
                   systemd.run=/e2e/steps.sh \
                   systemd.run_success_action=poweroff systemd.run_failure_action=poweroff \
                   systemd.mask=serial-getty@ttyS0.service";
    let args = [
        "-drive".to_string(),
        format!(
            "file={},if=none,id=e2e,format=raw,readonly=on",
            disk.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=e2e".to_string(),
    ];
    let mut vm = env.boot_system(dir.path(), &image, "3G", cmdline, &args);
    let rc = vm.finish(VM_TIMEOUT);
    if rc != 0 {
        vm.dump();
    }
    for l in vm.lines_with("VDP-E2E-FAIL") {
        eprintln!("{l}");
    }
    assert_eq!(rc, 0, "the operator's steps failed (console above)");
    // What the steps saw, shown when an assertion below fails (libtest keeps a
    // passing test's output).
    for l in vm
        .console
        .iter()
        .filter(|l| l.contains("VDP-E2E") || l.contains("L2: "))
    {
        println!("{l}");
    }
    judge(&Report::from(&vm), &vm);
}

/// What the report must show.
fn judge(r: &Report, vm: &Guest) {
    // The host: systemd as PID 1, AppArmor on, Debian 13, libvirt 11.3, QEMU 11.1.
    assert_eq!(r.one("pid1"), "systemd");
    assert_eq!(r.one("apparmor-enabled"), "Y");
    assert!(
        r.one("os-release").contains("Debian GNU/Linux 13"),
        "{}",
        r.one("os-release")
    );
    assert!(
        r.one("libvirt-version").starts_with("11.3"),
        "{}",
        r.one("libvirt-version")
    );
    assert!(
        r.one("qemu-version").contains(":11.1"),
        "{}",
        r.one("qemu-version")
    );
    assert!(
        r.one("id-libvirt-qemu").contains("(kvm)"),
        "{}",
        r.one("id-libvirt-qemu")
    );
    let qemu_uid: u32 = r
        .one("id-libvirt-qemu")
        .strip_prefix("uid=")
        .and_then(|s| s.split('(').next())
        .and_then(|s| s.parse().ok())
        .expect("libvirt-qemu's uid");

    // The package's units, the instance's sockets and their modes.
    assert_eq!(r.one("dpkg-rc"), "0");
    let units = r.one("units");
    for u in [
        "vhost-device-pmem@.service",
        "vhost-device-pmem@.socket",
        "vhost-device-pmem-control@.socket",
    ] {
        assert!(units.contains(u), "{u} not installed: {units}");
    }
    let check = r.json("check");
    assert_eq!(check["immutable"], true, "check: {check}");
    assert_eq!(check["qemu_size_ok"], true, "check: {check}");
    assert_eq!(check["auto_policy"], "datasync", "check: {check}");
    let modes = r.one("stat-dirs");
    for want in [
        "/run/vhost-device-pmem 755 root:root",
        "/run/vhost-device-pmem/vm0-pmem0 755 root:root",
        "/run/vhost-device-pmem/vm0-pmem0/vhost-user.sock 660 root:kvm",
        "/run/vhost-device-pmem/vm0-pmem0/control.sock 600 root:root",
        "/run/vhost-device-pmem/vm0-pmem0/agent.sock 660 root:kvm",
    ] {
        assert!(modes.contains(want), "{want:?} not in {modes}");
    }

    // QEMU started by libvirt's system daemon, as libvirt-qemu, confined.
    assert_eq!(r.one("start1-rc"), "0", "virsh start");
    let (q1, user, comm) = ps_line(r.one("vmm1"));
    assert_eq!(user, "libvirt-qemu");
    assert!(comm.starts_with("qemu-system-x86"), "{comm}");
    let label = r.one("vmm1-label");
    assert!(
        label.starts_with("libvirt-") && label.ends_with(" (enforce)"),
        "QEMU's AppArmor label: {label}"
    );
    let profile = label.trim_end_matches(" (enforce)");
    let aa = r.all("aa-status").join("\n");
    assert!(
        aa.contains(&format!("/usr/bin/qemu-system-x86_64 ({q1}) {profile}")),
        "aa-status does not list QEMU ({q1}) confined by {profile}:\n{aa}"
    );
    // The package's rules are in the profile libvirt compiled for this domain (the
    // include chain TEMPLATE -> abstractions/libvirt-qemu -> libvirt-qemu.d), and
    // nothing of it reaches control.sock.
    let rules: Vec<&str> = r.all("aa-domain").iter().map(|l| l.trim()).collect();
    for want in [
        "/run/vhost-device-pmem/*/vhost-user.sock rw,",
        "/run/vhost-device-pmem/*/agent.sock rw,",
    ] {
        assert!(
            rules.contains(&want),
            "{want:?} not in {profile}'s compiled profile: {rules:?}"
        );
    }
    assert!(
        !rules
            .iter()
            .any(|l| l.contains("control.sock") && !l.starts_with('#')),
        "a rule of {profile} reaches control.sock: {rules:?}"
    );
    // Whether the kernel itself checked QEMU's connect against them.
    let af_unix = r.one("aa-af-unix");
    if af_unix == "none" {
        eprintln!(
            "operator host: NOTE: this kernel's AppArmor does not mediate unix sockets \
             (no features/network*/af_unix: Linux before 6.17, no Ubuntu patches), \
             so QEMU's connect was not checked against the rules; they are checked \
             in the compiled profile only"
        );
    } else {
        eprintln!("operator host: the kernel mediates unix sockets ({af_unix}): QEMU's connect was checked against the rules");
    }
    assert!(
        r.one("taint").parse::<u32>().unwrap() >= 1,
        "no custom-argv taint in the domain log"
    );

    // The nested guest, both boots: DAX, the seed, its write found again.
    let l2: Vec<&str> = vm
        .console
        .iter()
        .map(|l| l.trim_end())
        .filter(|l| l.contains("L2: VDP-L2 "))
        .collect();
    let mounts: Vec<_> = l2.iter().filter(|l| l.contains("VDP-L2 mount ")).collect();
    assert_eq!(mounts.len(), 2, "two DAX mounts: {l2:?}");
    for m in &mounts {
        assert!(
            m.contains("/dev/pmem0 /mnt/p ext4") && m.contains("dax"),
            "{m}"
        );
    }
    let seeds = l2
        .iter()
        .filter(|l| l.ends_with(&format!("VDP-L2 seed {}", SEED.trim())))
        .count();
    assert_eq!(seeds, 2, "the seed read on both boots: {l2:?}");
    assert_eq!(
        l2.iter().filter(|l| l.ends_with("VDP-L2 wrote")).count(),
        1,
        "{l2:?}"
    );
    assert_eq!(
        l2.iter()
            .filter(|l| l.ends_with("VDP-L2 found written by the first boot"))
            .count(),
        1,
        "the second boot finds the first one's file: {l2:?}"
    );

    // The daemon saw who connected: QEMU's pid, libvirt-qemu's uid, QEMU's name.
    let s1 = r.json("status1");
    assert_eq!(s1["ok"], true, "{s1}");
    let s1 = &s1["status"];
    assert_eq!(s1["connected"], true, "{s1}");
    assert_eq!(s1["vmm"]["pid"], q1, "status names the VMM's pid: {s1}");
    assert_eq!(s1["vmm"]["uid"], qemu_uid, "{s1}");
    assert!(
        s1["vmm"]["comm"]
            .as_str()
            .unwrap_or("")
            .starts_with("qemu-system"),
        "{s1}"
    );
    assert_eq!(s1["health"], "healthy", "{s1}");
    assert_eq!(s1["policy"], "datasync", "{s1}");
    assert_eq!(s1["seccomp"], "enforce", "{s1}");
    assert_eq!(s1["region_mapped"], true, "{s1}");
    // The domain's agent channel (libvirt's own element) reached agent.sock too.
    assert_eq!(s1["agent"]["connected"], true, "{s1}");
    let between = r.json("status-between")["status"].clone();
    assert_eq!(
        between["connected"], false,
        "after virsh destroy: {between}"
    );
    assert_eq!(r.one("start2-rc"), "0", "virsh start after virsh destroy");
    let (q2, user2, _) = ps_line(r.one("vmm2"));
    assert_eq!(user2, "libvirt-qemu");
    assert_ne!(q2, q1);
    let s2 = r.json("status2")["status"].clone();
    assert_eq!(s2["vmm"]["pid"], q2, "{s2}");
    assert_eq!(s2["connections"], 2, "{s2}");

    // Metrics where node_exporter's textfile collector reads them, and read by it.
    let prom = r.all("prom").join("\n");
    assert!(
        prom.lines()
            .any(|l| l.starts_with("vhost_device_pmem_connections_total") && l.ends_with(" 2")),
        "{prom}"
    );
    assert_eq!(r.one("node-exporter"), "active");
    let scrape = r.all("scrape").join("\n");
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("vhost_device_pmem_connections_total")),
        "node_exporter did not serve the daemon's metrics:\n{scrape}"
    );
    assert!(scrape.contains("node_textfile_scrape_error 0"), "{scrape}");

    // A clean stop, and the journal: every line with its priority, no timestamps
    // or colours of the daemon's own, nothing at err or worse.
    assert_eq!(
        r.one("service-result"),
        "Result=success ExecMainStatus=0",
        "stop"
    );
    let journal: Vec<HashMap<String, Value>> = r
        .all("journal")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l}: {e}")))
        .collect();
    let daemon: Vec<_> = journal
        .iter()
        .filter(|j| j.get("SYSLOG_IDENTIFIER").and_then(Value::as_str) == Some("vhost-device-pmem"))
        .collect();
    assert!(
        daemon.len() >= 3,
        "the daemon's lines in the journal: {journal:?}"
    );
    let text = |j: &HashMap<String, Value>| j["MESSAGE"].as_str().unwrap_or("").to_string();
    for j in &daemon {
        let m = text(j);
        assert!(!m.contains('\u{1b}'), "colours in the journal: {m:?}");
        assert!(
            !m.starts_with('['),
            "a timestamp of the daemon's own: {m:?}"
        );
        assert!(
            !m.starts_with('<'),
            "a priority prefix the journal did not take: {m:?}"
        );
    }
    assert!(
        daemon
            .iter()
            .any(|j| j["PRIORITY"] == "6" && text(j).contains(&format!("pid {q1}"))),
        "no info line naming the VMM's pid {q1}: {daemon:?}"
    );
    assert!(
        r.all("journal-err").is_empty(),
        "errors in the journal: {:?}",
        r.all("journal-err")
    );
}
