// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest test through libvirt: libvirt's own QEMU driver (the embedded one, run by
//! `virt-qemu-run`, no daemon) starts configs/libvirt-guest.xml against the real
//! daemon, and the guest finds the seeded bytes on /dev/pmem0. Owns only that path;
//! it never installs libvirt (guest-tests/libvirt-root.sh prepares the root).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::{daemon::Daemon, guest::GuestEnv};

const MARKER: &[u8; 16] = b"VDP-LIBVIRT-OK!!";
const IMAGE_SIZE: u64 = 64 << 20;
const RUN: Duration = Duration::from_secs(120);

/// The libvirt root from VDP_LIBVIRT_ROOT, or a loud skip (a failure when
/// VDP_REQUIRE_LIBVIRT=1).
fn libvirt_root(test: &str) -> Option<PathBuf> {
    let why = match std::env::var("VDP_LIBVIRT_ROOT") {
        Err(_) => "VDP_LIBVIRT_ROOT is not set".to_string(),
        Ok(root) if !Path::new(&root).join("usr/bin/virt-qemu-run").exists() => {
            format!("{root}/usr/bin/virt-qemu-run missing")
        }
        Ok(_) if !nix_is_root() => "needs root (chroot)".to_string(),
        Ok(root) => return Some(PathBuf::from(root)),
    };
    let msg = format!(
        "libvirt guest test {test} SKIPPED: {why}; as root run \
         `export VDP_LIBVIRT_ROOT=$(guest-tests/libvirt-root.sh)`"
    );
    if std::env::var("VDP_REQUIRE_LIBVIRT").as_deref() == Ok("1") {
        panic!("{msg} (VDP_REQUIRE_LIBVIRT=1)");
    }
    let _ = writeln!(std::io::stderr(), "\n*** {msg} ***\n");
    None
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                == Some("0")
        })
        .unwrap_or(false)
}

fn chroot(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root).args(args);
    cmd
}

/// configs/libvirt-domain.xml and the test's domain validate against libvirt's
/// schemas; virt-qemu-run starts the domain; the guest reads the seeded marker from
/// /dev/pmem0 (64 MiB = 131072 sectors) and the daemon mapped its region.
#[test]
fn libvirt_starts_the_domain_and_the_guest_reads_pmem0() {
    let test = "libvirt_starts_the_domain_and_the_guest_reads_pmem0";
    let Some(env) = GuestEnv::load(test) else {
        return;
    };
    let Some(root) = libvirt_root(test) else {
        return;
    };
    // The test's directory lives inside the root, so the daemon (on the host) and
    // libvirt (in the chroot) see the same socket and files.
    fs::create_dir_all(root.join("var/tmp")).unwrap();
    let dir = tempfile::tempdir_in(root.join("var/tmp")).unwrap();
    let inside = Path::new("/").join(dir.path().strip_prefix(&root).unwrap());
    let inside = inside.to_str().unwrap();

    let shipped = dir.path().join("libvirt-domain.xml");
    fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/configs/libvirt-domain.xml"),
        &shipped,
    )
    .unwrap();
    let xml = include_str!("../configs/libvirt-guest.xml").replace("@DIR@", inside);
    fs::write(dir.path().join("dom.xml"), xml).unwrap();
    for name in ["libvirt-domain.xml", "dom.xml"] {
        let out = chroot(&root, &["virt-xml-validate", &format!("{inside}/{name}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virt-xml-validate {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let img = dir.path().join("pmem.img");
    let mut f = fs::File::create(&img).unwrap();
    f.write_all(MARKER).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    drop(f);
    let script = "[ -b /dev/pmem0 ] || mdev -s\n\
                  [ -b /dev/pmem0 ] || { echo VDP-NO-PMEM; exit 3; }\n\
                  echo \"VDP-PMEM $(cat /sys/block/pmem0/size) $(head -c 16 /dev/pmem0)\"\n";
    let initrd = env.initrd_with(dir.path(), script, &[]);
    assert_eq!(initrd, dir.path().join("initrd"));
    fs::copy(&env.kernel, dir.path().join("vmlinuz")).unwrap();

    let mut daemon = Daemon::for_guest(dir.path(), &img, &[]);

    // The embedded driver's state (capability cache included) stays in the root
    // between runs; its qemu.conf logs QEMU's stdio to a file (no virtlogd) and runs
    // QEMU as root.
    let state = "/var/lib/vdp-libvirt-embed";
    fs::create_dir_all(root.join(&state[1..]).join("etc")).unwrap();
    fs::write(
        root.join(&state[1..]).join("etc/qemu.conf"),
        "stdio_handler = \"file\"\nuser = \"root\"\ngroup = \"root\"\n",
    )
    .unwrap();
    let log = fs::File::create(dir.path().join("virt-qemu-run.log")).unwrap();
    let started = Instant::now();
    let mut run = chroot(
        &root,
        &[
            "virt-qemu-run",
            "--root",
            state,
            &format!("{inside}/dom.xml"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .expect("chroot virt-qemu-run");

    // virt-qemu-run does not return when the guest powers off (measured with
    // libvirt 11.3), so the console's result marker ends the wait.
    let console = dir.path().join("console.log");
    let text = loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        if text.contains("VDP-RESULT") {
            break text;
        }
        if let Ok(Some(status)) = run.try_wait() {
            panic!(
                "virt-qemu-run exited ({status}) before the guest's result:\n{}\nconsole:\n{text}",
                fs::read_to_string(dir.path().join("virt-qemu-run.log")).unwrap_or_default()
            );
        }
        if started.elapsed() > RUN {
            let _ = run.kill();
            panic!(
                "no result from the guest within {RUN:?}:\n{}\nconsole:\n{text}",
                fs::read_to_string(dir.path().join("virt-qemu-run.log")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    // SIGTERM: virt-qemu-run tears the domain (and its QEMU) down.
    let _ = Command::new("kill").arg(run.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while run.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = run.kill();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("libvirt guest: result after {took:?}");

    let want = format!(
        "VDP-PMEM {} {}",
        IMAGE_SIZE / 512,
        std::str::from_utf8(MARKER).unwrap()
    );
    assert!(
        text.contains(&want),
        "guest console lacks {want:?}:\n{text}"
    );
    assert!(
        text.contains("VDP-RESULT 0"),
        "guest script failed:\n{text}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("the region is live in the guest's address space"),
        "daemon never mapped the region:\n{log}"
    );
    daemon.terminate();

    // The price of `<qemu:commandline>`, as configs/libvirt.md says: libvirt marks
    // the domain tainted `custom-argv` (a warning in the domain's log, nothing more).
    let domain_log = fs::read_to_string(root.join(&state[1..]).join("log/qemu/vdp-guest.log"))
        .unwrap_or_default();
    assert!(
        domain_log.contains("is tainted: custom-argv"),
        "the domain's log does not say it is tainted custom-argv:\n{domain_log}"
    );
}

/// libvirt 11.3 (the root's, as Debian 13 ships it) has no native element for a
/// generic vhost-user device: `vhostuser` is a source only of a disk (vhost-user-blk),
/// an interface (net) and a video device's driver (gpu). If a libvirt adds one, this
/// fails, and the shipped XML should use it instead of `<qemu:commandline>`.
#[test]
fn libvirt_has_no_native_element_for_a_generic_vhost_user_device() {
    let Some(root) = libvirt_root("libvirt_has_no_native_element_for_a_generic_vhost_user_device")
    else {
        return;
    };
    let schema = fs::read_to_string(root.join("usr/share/libvirt/schemas/domaincommon.rng"))
        .expect("the libvirt root has no domain schema");
    // Which <define>s name `vhostuser` as a value.
    let mut owners = Vec::new();
    let mut define = "";
    for line in schema.lines() {
        if let Some(rest) = line.trim().strip_prefix("<define name=\"") {
            define = rest.split('"').next().unwrap_or("");
        }
        if line.contains("<value>vhostuser</value>") {
            owners.push(define.to_string());
        }
    }
    assert_eq!(
        owners,
        ["diskSourceVhostUser", "interface", "video"],
        "libvirt's schema takes vhostuser somewhere new: check for a generic vhost-user device element"
    );
}
