// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The AppArmor rules the package adds to libvirt's QEMU profiles: compiled by the
//! real `apparmor_parser` (no kernel load, no cache) inside a profile that includes
//! the directory the way libvirt's `abstractions/libvirt-qemu` does, so a syntax
//! error fails; the rules name exactly the two sockets QEMU connects to; the package
//! installs the file where libvirt reads it.
//!
//! Owns: those checks. Never loads a profile into the kernel. A missing
//! `apparmor_parser` is a loud skip (a failure under VDP_REQUIRE_ROOT_TESTS=1).

use vdp_testkit::root;

use std::{fs, path::Path, process::Command};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SNIPPET: &str = "packaging/apparmor/libvirt-qemu.d-vhost-device-pmem";
/// Where libvirt 11.3's abstraction includes local additions from (`include if
/// exists <abstractions/libvirt-qemu.d>`), and the name the package gives the file.
const INSTALLED: &str = "etc/apparmor.d/abstractions/libvirt-qemu.d/vhost-device-pmem";

fn rules() -> Vec<String> {
    fs::read_to_string(Path::new(REPO).join(SNIPPET))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_rules_allow_exactly_the_vhost_user_and_agent_sockets() {
    assert_eq!(
        rules(),
        [
            "/run/vhost-device-pmem/*/vhost-user.sock rw,",
            "/run/vhost-device-pmem/*/agent.sock rw,"
        ]
    );
    let cargo = fs::read_to_string(Path::new(REPO).join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains(&format!("[\"{SNIPPET}\", \"{INSTALLED}\", \"644\"]")),
        "Cargo.toml's assets do not install {SNIPPET} as /{INSTALLED}"
    );
}

#[test]
fn apparmor_parser_compiles_the_rules_inside_a_libvirt_like_profile() {
    if !root::have_tool("apparmor_parser") {
        return root::unavailable(
            "apparmor_parser",
            "the `apparmor_parser` tool (Debian package apparmor)",
        );
    }
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("abstractions/libvirt-qemu.d");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(Path::new(REPO).join(SNIPPET), dir.join("vhost-device-pmem")).unwrap();
    // A domain profile as libvirt's TEMPLATE.qemu makes one, reduced to the
    // directory include (without `if exists`: a missing directory is an error).
    let profile = base.path().join("libvirt-test");
    fs::write(
        &profile,
        "profile libvirt-test flags=(attach_disconnected) {\n  \
         include <abstractions/libvirt-qemu.d>\n}\n",
    )
    .unwrap();
    let parse = |extra: &[&str]| {
        Command::new("apparmor_parser")
            .args(["--skip-kernel-load", "--skip-cache", "-I"])
            .arg(base.path())
            .args(extra)
            .arg(&profile)
            .output()
            .unwrap()
    };
    let out = parse(&[]);
    assert!(
        out.status.success(),
        "apparmor_parser: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The rules were in what it compiled (the preprocessed profile).
    let pre = parse(&["--preprocess"]);
    let text = String::from_utf8_lossy(&pre.stdout);
    for r in rules() {
        assert!(text.contains(&r), "{r} not in the profile:\n{text}");
    }
}
