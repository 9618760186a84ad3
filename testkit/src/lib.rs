// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The test kit of vhost-device-pmem: what the integration tests (`tests/`) and the
//! guest tests (`guest-tests/`) share, written once.
//!
//! Owns: running the real binary ([`daemon`]: one daemon wrapper, one status wait),
//! a vhost-user frontend that plays QEMU ([`frontend`]), the root fixtures ([`root`],
//! [`loopfs`], [`remountable`], [`failing_disk`]), what tests read of a process
//! ([`procfs`]) and of the metrics ([`prom`]), and the guest harness ([`guest`]:
//! QEMU boots, the daemon in a VM, durability records, the in-VM environment).
//! Never decides what a test asserts, and is never part of the daemon: the main
//! crate has it as a dev-dependency only.
//!
//! A test file says `use vdp_testkit::{daemon::{Daemon, Scratch}, ...};` — no
//! `#[path]` includes. The kit links the library; it cannot see the binary at
//! compile time (cargo gives `CARGO_BIN_EXE_*` to integration tests only), so
//! [`BIN`] finds it when first used.

pub mod daemon;
pub mod failing_disk;
pub mod frontend;
pub mod guest;
pub mod loopfs;
pub mod procfs;
pub mod prom;
pub mod remountable;
pub mod root;

use std::{
    ffi::OsStr,
    fmt,
    ops::Deref,
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The repository (the main crate's directory): the kit is its `testkit/`.
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The daemon's binary, `vhost-device-pmem`, as cargo built it for the tests: use
/// it wherever a path or a string goes (`Command::new(BIN)`, `format!("{BIN}")`,
/// `&*BIN` for a `&str`).
pub const BIN: Bin = Bin;

/// The name of the binary target (and of its file).
const BIN_NAME: &str = "vhost-device-pmem";

/// See [`BIN`]: `CARGO_BIN_EXE_vhost-device-pmem` when cargo sets it at run time,
/// else the binary next to the test executable's `deps/` directory (where cargo
/// puts the binaries an integration test needs, built before it).
#[derive(Clone, Copy, Debug)]
pub struct Bin;

impl Bin {
    pub fn path(self) -> &'static Path {
        Path::new(self.as_str())
    }

    pub fn as_str(self) -> &'static str {
        static PATH: OnceLock<String> = OnceLock::new();
        PATH.get_or_init(|| {
            let path = std::env::var_os(format!("CARGO_BIN_EXE_{BIN_NAME}"))
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let exe = std::env::current_exe().expect("the test executable's path");
                    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<bin>
                    let profile = exe
                        .parent()
                        .and_then(Path::parent)
                        .expect("a test executable in target/<profile>/deps");
                    profile.join(BIN_NAME)
                });
            assert!(
                path.is_file(),
                "{} is not the daemon's binary (cargo test builds it; run tests with cargo)",
                path.display()
            );
            path.into_os_string()
                .into_string()
                .expect("a UTF-8 target directory")
        })
    }
}

impl Deref for Bin {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<OsStr> for Bin {
    fn as_ref(&self) -> &OsStr {
        OsStr::new(self.as_str())
    }
}

impl AsRef<Path> for Bin {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl fmt::Display for Bin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
