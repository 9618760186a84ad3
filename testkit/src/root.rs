// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the root-only tests share: whether root, loop devices and the tools are
//! there, the loud skip (or, with VDP_REQUIRE_ROOT_TESTS=1, the failure) when they
//! are not, running a host command, and attaching an image to a loop device.
//!
//! Owns: the prerequisite checks and the skip-or-fail rule. Never installs
//! anything.

use std::{
    io::Write,
    path::Path,
    process::{Command, Output},
    thread,
    time::Duration,
};

/// Whether `name` is a program in PATH or the sbin/bin directories.
pub fn have_tool(name: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/sbin", "/usr/sbin", "/bin", "/usr/bin"])
        .any(|d| Path::new(d).join(name).exists());
    found
}

/// Says why `test` cannot run: a panic with VDP_REQUIRE_ROOT_TESTS=1 (CI), so a
/// missing capability cannot pass silently; otherwise a loud skip.
pub fn unavailable(test: &str, why: &str) {
    let msg = format!("{test}: needs {why}");
    if std::env::var("VDP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("VDP_REQUIRE_ROOT_TESTS=1 but a prerequisite is missing: {msg}");
    }
    // Straight to fd 2: eprintln! would be captured (hidden) for a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n***************************************************************\n\
         *** SKIPPED (needs root): {msg}\n\
         *** (set VDP_REQUIRE_ROOT_TESTS=1 to make this a failure)\n\
         ***************************************************************\n"
    );
}

/// True if root, loop devices, losetup/mount/umount and `tools` are there;
/// otherwise [`unavailable`].
pub fn prerequisites(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (mkfs, losetup and mount)".to_string());
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("/dev/loop-control (loop devices)".to_string());
    }
    for t in tools.iter().chain(&["losetup", "mount", "umount"]) {
        if !have_tool(t) {
            missing.push(format!("the `{t}` tool"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    unavailable(test, &missing.join(", "));
    false
}

/// Runs a host command; its output, or what failed.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// Attaches `image` to the first free loop device and returns the device's path.
/// Parallel tests may race for the same free device, so a refusal is retried (ten
/// times, 200 ms apart); the last refusal is the error.
pub fn attach_loop(image: &Path) -> Result<String, String> {
    let image = image.to_str().ok_or("the image's path is not UTF-8")?;
    let mut last = String::new();
    for _ in 0..10 {
        match run("losetup", &["-f", "--show", image]) {
            Ok(out) => return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            Err(e) => {
                last = e;
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Err(format!("a loop device for {image} ({last})"))
}
