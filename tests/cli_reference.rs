// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! docs/cli.md is the command reference generated from the clap definitions: this
//! test generates it again with the real binary and fails when the committed copy
//! differs (an option added, renamed or re-documented without regenerating it).

use std::{fs, process::Command};

#[test]
fn the_committed_command_reference_is_current() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_vhost-device-pmem"))
        .args(["generate-docs", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "generate-docs failed: {status}");
    let fresh = fs::read_to_string(out.path().join("cli.md")).unwrap();
    let committed =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    if fresh != committed {
        let first = fresh
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the length".to_string(), |n| format!("line {}", n + 1));
        panic!(
            "docs/cli.md is not what the binary's --help says (first difference at {first}); \
             regenerate it: cargo run -- generate-docs --out target/docs && \
             cp target/docs/cli.md docs/cli.md"
        );
    }
    // Every visible subcommand has its section; the hidden one has none.
    for sub in [
        "prepare",
        "check",
        "serve",
        "nvdimm",
        "status",
        "health",
        "badblocks",
    ] {
        assert!(
            committed.contains(&format!("## `vhost-device-pmem {sub}`")),
            "no section for {sub}"
        );
    }
    assert!(
        !committed.contains("generate-docs`"),
        "the hidden subcommand is documented"
    );
}
