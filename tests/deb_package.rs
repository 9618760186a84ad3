// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The Debian packages, installed for real (root): built by `packaging/build-deb.sh`,
//! installed with dpkg into a fresh Debian trixie tree, run there, then upgraded while
//! a daemon serves, which must keep running untouched. Never installs on the host.
//!
//! Every command in the tree runs in a private mount namespace (its /proc and /dev
//! vanish with it), so nothing is ever mounted in the host's namespace.

use vdp_testkit::frontend;
use vdp_testkit::root;

use vdp_testkit::frontend::TestFrontend;

use std::{
    fs,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the stand-ins for systemd's tools record how the maintainer scripts call them.
const SYSTEMD_CALLS: &str = "var/log/vdp-systemd-calls";

/// Mounts /proc and /dev in a private namespace, then runs the command in the tree with
/// a clean environment. `exec` all the way: the spawned pid is the command's.
const IN_ROOT: &str = r#"r=$1; shift
mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" || exit 97
exec chroot "$r" /usr/bin/env -i \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@""#;

fn in_root(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        IN_ROOT,
        "sh",
    ])
    .arg(root)
    .args(args);
    c
}

/// Runs `args` in the tree; its output, or a panic with what failed.
fn run_in(root: &Path, args: &[&str]) -> Output {
    let out = in_root(root, args).output().expect("unshare");
    assert!(
        out.status.success(),
        "in the tree: {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Builds both packages into `out` (at `version` when given); their paths.
fn build(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    let mut c = Command::new(Path::new(REPO).join("packaging/build-deb.sh"));
    c.arg("--output").arg(out);
    if let Some(v) = version {
        c.args(["--deb-version", v]);
    }
    let o = c.stderr(Stdio::inherit()).output().expect("build-deb.sh");
    assert!(o.status.success(), "build-deb.sh: {}", o.status);
    let paths: Vec<PathBuf> = stdout(&o).lines().map(PathBuf::from).collect();
    assert_eq!(
        paths.len(),
        2,
        "build-deb.sh prints two .deb paths: {paths:?}"
    );
    (paths[0].clone(), paths[1].clone())
}

/// Copies the packages into the tree's /tmp/NAME; their paths inside the tree.
fn stage(root: &Path, name: &str, debs: &[&Path]) -> Vec<String> {
    let dir = root.join("tmp").join(name);
    fs::create_dir_all(&dir).unwrap();
    debs.iter()
        .map(|d| {
            let file = d.file_name().unwrap();
            fs::copy(d, dir.join(file)).unwrap();
            format!("/tmp/{name}/{}", file.to_string_lossy())
        })
        .collect()
}

/// Lines of the maintainer scripts of `deb` that stop, start or restart a unit on
/// anything but removal (a `stop` right under an `= remove` test is allowed).
fn unit_actions_in_scripts(deb: &Path, scratch: &Path) -> Vec<String> {
    let dir = scratch.join(deb.file_name().unwrap());
    root::run(
        "dpkg-deb",
        &["-e", deb.to_str().unwrap(), dir.to_str().unwrap()],
    )
    .unwrap();
    let mut bad = Vec::new();
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let Ok(text) = fs::read_to_string(dir.join(script)) else {
            continue;
        };
        let mut previous = "";
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let acts = [
                "start",
                "stop",
                "restart",
                "try-restart",
                "reload-or-restart",
            ]
            .iter()
            .any(|verb| line.split_whitespace().any(|w| w == *verb))
                || line.contains("_dh_action");
            let calls = line.contains("deb-systemd-invoke")
                || line.contains("systemctl")
                || line.contains("_dh_action");
            let on_removal = line.contains(" stop ") && previous.contains("= remove");
            if acts && calls && !on_removal {
                bad.push(format!("{script}: {line}"));
            }
            previous = line;
        }
    }
    bad
}

/// Stand-ins for systemd's tools in the tree (first in PATH), and /run/systemd/system,
/// so the maintainer scripts act as if systemd were running and every call is logged.
fn fake_systemd(root: &Path) {
    fs::create_dir_all(root.join("run/systemd/system")).unwrap();
    for (dir, tool) in [
        ("usr/local/sbin", "deb-systemd-invoke"),
        ("usr/local/bin", "systemctl"),
    ] {
        let path = root.join(dir).join(tool);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(
            &path,
            format!("#!/bin/sh\necho \"{tool} $*\" >>/{SYSTEMD_CALLS}\nexit 0\n"),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The calls of systemd's tools that start, stop or restart something.
fn unit_actions_logged(root: &Path) -> Vec<String> {
    fs::read_to_string(root.join(SYSTEMD_CALLS))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            [
                "start",
                "stop",
                "restart",
                "try-restart",
                "reload-or-restart",
            ]
            .iter()
            .any(|v| l.split_whitespace().any(|w| w == *v))
        })
        .map(str::to_string)
        .collect()
}

/// The daemon serving in the tree; killed if the test fails before it is stopped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Start time of `pid` in clock ticks since boot (a restart or a reused pid changes it).
fn start_time(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    after_comm
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn status(root: &Path) -> serde_json::Value {
    let o = run_in(
        root,
        &[
            "vhost-device-pmem",
            "status",
            "--control-socket",
            "/run/pmem0.ctl",
        ],
    );
    serde_json::from_slice(&o.stdout).expect("status answers JSON")
}

#[test]
fn package_installs_runs_and_upgrades_without_touching_a_serving_daemon() {
    const NAME: &str = "deb_package";
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (dpkg in a chroot, mounts)".to_string());
    }
    for t in ["unshare", "chroot", "mount", "dpkg-deb", "tar", "gzip"] {
        if !root::have_tool(t) {
            missing.push(format!("the `{t}` tool"));
        }
    }
    if !missing.is_empty() {
        return root::unavailable(NAME, &missing.join(", "));
    }

    let work = tempfile::Builder::new()
        .prefix("vdp-deb-test.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tree = work.path().join("root");
    let t0 = Instant::now();
    let (daemon_v1, agent_v1) = build(&work.path().join("v1"), None);
    let (daemon_v2, agent_v2) = build(&work.path().join("v2"), Some(&format!("{VERSION}-2")));
    let built = t0.elapsed();

    // The packages' own maintainer scripts never stop, start or restart a unit on
    // install or upgrade.
    for deb in [&daemon_v1, &agent_v1, &daemon_v2, &agent_v2] {
        let bad = unit_actions_in_scripts(deb, work.path());
        assert!(bad.is_empty(), "{}: {bad:#?}", deb.display());
    }

    let t1 = Instant::now();
    let o = Command::new(Path::new(REPO).join("packaging/fresh-debian-root.sh"))
        .arg(&tree)
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(o.success(), "fresh-debian-root.sh: {o}");
    let extracted = t1.elapsed();
    fake_systemd(&tree);

    // Install.
    let v1 = stage(&tree, "v1", &[&daemon_v1, &agent_v1]);
    let mut dpkg = vec!["dpkg", "-i"];
    dpkg.extend(v1.iter().map(String::as_str));
    run_in(&tree, &dpkg);
    let o = run_in(&tree, &["vhost-device-pmem", "--version"]);
    assert_eq!(stdout(&o).trim(), format!("vhost-device-pmem {VERSION}"));
    let o = run_in(&tree, &["vhost-device-pmem-agent", "--version"]);
    assert_eq!(
        stdout(&o).trim(),
        format!("vhost-device-pmem-agent {VERSION}")
    );

    // What the packages hold, as dpkg recorded it.
    let listed = stdout(&run_in(&tree, &["dpkg", "-L", "vhost-device-pmem"]));
    let files: Vec<&str> = listed.lines().collect();
    for want in [
        "/usr/bin/vhost-device-pmem",
        "/usr/share/man/man1/vhost-device-pmem.1.gz",
        "/usr/share/man/man1/vhost-device-pmem-serve.1.gz",
        "/usr/share/man/man1/vhost-device-pmem-check.1.gz",
        "/usr/share/man/man1/vhost-device-pmem-badblocks-inject.1.gz",
        "/usr/share/bash-completion/completions/vhost-device-pmem",
        "/usr/share/zsh/vendor-completions/_vhost-device-pmem",
        "/usr/share/fish/vendor_completions.d/vhost-device-pmem.fish",
        "/usr/lib/systemd/system/vhost-device-pmem@.service",
        "/usr/lib/systemd/system/vhost-device-pmem@.socket",
        "/usr/lib/systemd/system/vhost-device-pmem-control@.socket",
        "/usr/share/doc/vhost-device-pmem/examples/pmem.toml",
        "/usr/share/doc/vhost-device-pmem/examples/instance.toml",
        "/usr/share/doc/vhost-device-pmem/examples/metrics.conf",
        "/usr/share/doc/vhost-device-pmem/examples/prometheus/vhost-device-pmem.rules.yml",
        "/usr/share/doc/vhost-device-pmem/examples/libvirt-domain.xml",
        "/etc/apparmor.d/abstractions/libvirt-qemu.d/vhost-device-pmem",
        "/usr/share/doc/vhost-device-pmem/README.md",
        "/usr/share/doc/vhost-device-pmem/copyright",
    ] {
        assert!(
            files.contains(&want),
            "{want} not in the package: {files:#?}"
        );
    }
    assert!(
        !files.iter().any(|f| f.contains("generate-docs")),
        "the hidden subcommand has no page"
    );
    let agent_files = stdout(&run_in(&tree, &["dpkg", "-L", "vhost-device-pmem-agent"]));
    assert!(agent_files
        .lines()
        .any(|l| l == "/usr/bin/vhost-device-pmem-agent"));
    for want in [
        "/usr/lib/systemd/system/vhost-device-pmem-agent@.service",
        "/usr/lib/udev/rules.d/60-vhost-device-pmem-agent.rules",
    ] {
        assert!(
            agent_files.lines().any(|l| l == want),
            "{want} not in the agent's package: {agent_files}"
        );
    }
    assert!(
        !agent_files.contains("vhost-device-pmem@")
            && !agent_files.contains("/usr/bin/vhost-device-pmem\n"),
        "the agent's package holds the agent and its unit only: {agent_files}"
    );
    // The AppArmor rules are a conffile (an operator's edit survives upgrades).
    let conffiles = fs::read_to_string(tree.join("var/lib/dpkg/info/vhost-device-pmem.conffiles"))
        .unwrap_or_default();
    assert!(
        conffiles.contains("/etc/apparmor.d/abstractions/libvirt-qemu.d/vhost-device-pmem"),
        "not a conffile: {conffiles}"
    );
    // The man page describes `serve`'s options (generated from clap), the completions
    // know the subcommands.
    let mut page = String::new();
    flate_read(
        &tree.join("usr/share/man/man1/vhost-device-pmem-serve.1.gz"),
        &mut page,
    );
    assert!(
        page.contains(".TH") && page.contains("socket\\-path"),
        "{page}"
    );
    let bash =
        fs::read_to_string(tree.join("usr/share/bash-completion/completions/vhost-device-pmem"))
            .unwrap();
    assert!(
        bash.contains("serve") && bash.contains("badblocks") && !bash.contains("generate-docs")
    );

    // The installed binary works in the tree: prepare and check a file, then serve it.
    run_in(
        &tree,
        &[
            "vhost-device-pmem",
            "prepare",
            "/var/lib/pmem0.img",
            "--size",
            "4M",
        ],
    );
    let o = run_in(
        &tree,
        &["vhost-device-pmem", "check", "/var/lib/pmem0.img", "--json"],
    );
    let check: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(check["immutable"], true, "{check}");

    let child = in_root(
        &tree,
        &[
            "vhost-device-pmem",
            "serve",
            "--socket-path",
            "/run/pmem0.sock",
            "--file",
            "/var/lib/pmem0.img",
            "--control-socket",
            "/run/pmem0.ctl",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tree.join("run/pmem0.ctl").exists() {
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "the daemon exited at start-up"
        );
        assert!(Instant::now() < deadline, "no control socket after 30s");
        thread::sleep(Duration::from_millis(50));
    }
    // A VMM: connected, the region mapped, a store and a flush answered.
    let mut vmm = TestFrontend::connect(&tree.join("run/pmem0.sock")).unwrap();
    vmm.start().unwrap();
    assert_eq!(vmm.maps.wait_for(1, frontend::TIMEOUT), 1, "no SHMEM_MAP");
    vmm.map_region(0).unwrap();
    vmm.write_pmem(0, b"before the upgrade").unwrap();
    assert_eq!(vmm.flush(1).unwrap(), vec![0], "flush before the upgrade");
    let before = status(&tree);
    assert_eq!(before["ok"], true, "{before}");
    assert_eq!(before["status"]["connected"], true, "{before}");
    assert_eq!(before["status"]["pid"], pid, "{before}");
    let started = start_time(pid);
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, tree.join("usr/bin/vhost-device-pmem"));

    // Upgrade while it serves.
    let v2 = stage(&tree, "v2", &[&daemon_v2, &agent_v2]);
    let mut dpkg = vec!["dpkg", "-i"];
    dpkg.extend(v2.iter().map(String::as_str));
    let t2 = Instant::now();
    run_in(&tree, &dpkg);
    let upgraded = t2.elapsed();
    let o = run_in(
        &tree,
        &["dpkg-query", "-W", "-f", "${Version}", "vhost-device-pmem"],
    );
    assert_eq!(stdout(&o), format!("{VERSION}-2"));

    // The same process, never restarted: same pid and start time, still running the
    // old binary (now deleted from disk), still answering on its control socket.
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the upgrade stopped the daemon"
    );
    assert_eq!(start_time(pid), started, "pid {pid} is another process now");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().ends_with("(deleted)"),
        "the daemon runs the old binary, replaced on disk: {}",
        exe.display()
    );
    let after = status(&tree);
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["status"]["pid"], pid, "{after}");
    assert_eq!(after["status"]["file"], "/var/lib/pmem0.img", "{after}");
    // The VMM's connection went through the upgrade: the same one, still flushing.
    assert_eq!(after["status"]["connected"], true, "{after}");
    assert_eq!(after["status"]["connections"], 1, "{after}");
    // Under the sandbox (another glibc than the build host's): nothing denied.
    assert_eq!(after["status"]["seccomp"], "enforce", "{after}");
    assert_eq!(after["status"]["sandbox_denials"], 0, "{after}");
    vmm.write_pmem(4096, b"after the upgrade").unwrap();
    assert_eq!(
        vmm.flush(2).unwrap(),
        vec![0, 0],
        "flushes after the upgrade"
    );
    drop(vmm);
    let actions = unit_actions_logged(&tree);
    assert!(
        actions.is_empty(),
        "maintainer scripts started, stopped or restarted units: {actions:#?}"
    );

    // SIGTERM: a clean exit.
    // SAFETY: pid is our child, still running (checked above).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let code = daemon.0.wait().unwrap();
    let mut err = String::new();
    daemon
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(code.success(), "daemon exit {code}: {err}");

    eprintln!(
        "deb_package: two builds {:.1}s, fresh tree {:.1}s, upgrade while serving {:.1}s",
        built.as_secs_f64(),
        extracted.as_secs_f64(),
        upgraded.as_secs_f64()
    );
}

/// Runs anywhere (no root): the hidden `generate-docs` writes one page per visible
/// subcommand, each from clap's definitions, and completions for three shells, and
/// appears in none of them.
#[test]
fn generate_docs_writes_a_page_per_subcommand_and_completions() {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(vdp_testkit::BIN)
        .arg("generate-docs")
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut pages: Vec<String> = fs::read_dir(out.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    let mut want: Vec<String> = [
        "",
        "-badblocks",
        "-badblocks-clear",
        "-badblocks-inject",
        "-badblocks-list",
        "-check",
        "-completions",
        "-events",
        "-health",
        "-metrics",
        "-nvdimm",
        "-prepare",
        "-serve",
        "-stats",
        "-status",
    ]
    .iter()
    .map(|s| format!("vhost-device-pmem{s}.1"))
    .collect();
    want.sort();
    assert_eq!(pages, want);
    let main = fs::read_to_string(out.path().join("man/vhost-device-pmem.1")).unwrap();
    assert!(
        main.contains("Exit status"),
        "the exit statuses are not in the man page"
    );
    let serve = fs::read_to_string(out.path().join("man/vhost-device-pmem-serve.1")).unwrap();
    for opt in ["socket\\-path", "control\\-socket", "state\\-dir"] {
        assert!(serve.contains(opt), "serve page lacks {opt}");
    }
    for f in [
        "vhost-device-pmem.bash",
        "_vhost-device-pmem",
        "vhost-device-pmem.fish",
    ] {
        let text = fs::read_to_string(out.path().join("completions").join(f)).unwrap();
        assert!(text.contains("badblocks") && text.contains("serve"), "{f}");
        assert!(
            !text.contains("generate-docs"),
            "{f} offers the hidden subcommand"
        );
    }
    let help = Command::new(vdp_testkit::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("generate-docs"));
}

/// Reads a gzip file through the host's gzip.
fn flate_read(path: &Path, out: &mut String) {
    let o = root::run("gzip", &["-dc", path.to_str().unwrap()]).unwrap();
    out.push_str(&String::from_utf8_lossy(&o.stdout));
}
