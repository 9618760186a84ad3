// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `check`: the block-map verdict of a file, the problems, and the durability policy
//! `--mode auto` would choose, as text for people or JSON for orchestration.
//!
//! Owns: the `check` report and its stable JSON field names. Never writes, locks or
//! changes the file (it opens it read-only; on a served file that open breaks the
//! daemon's lease, which the daemon reports and then re-takes).

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use serde::Serialize;

use crate::{
    backing::REGION_ALIGN,
    blockmap::{self, Filesystem, ProblemKind, Verdict},
    durability::{choose_policy, Mode, Policy},
    sys,
};

/// Exit status of `check`: immutable, with a size `serve` and QEMU take.
pub const EXIT_IMMUTABLE: u8 = 0;
/// Exit status of `check`: readable, but not ready to serve (not immutable, or a
/// size `serve` refuses or QEMU aborts on).
pub const EXIT_NOT_IMMUTABLE: u8 = 1;
/// Exit status of `check`: the file could not be checked.
pub const EXIT_ERROR: u8 = 2;

/// One problem range in the JSON report.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProblemReport {
    pub offset: u64,
    pub length: u64,
    /// "hole", or the FIEMAP flag names: "unwritten", "delalloc", "shared", ...
    pub kinds: Vec<String>,
}

/// The `check` report. Field names are stable: orchestration parses them.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub file: String,
    pub immutable: bool,
    pub size: u64,
    /// The size is a positive multiple of 2 MiB (`serve` refuses others).
    pub size_ok: bool,
    /// The size is a power of two: QEMU (11.1) aborts creating a vhost-user
    /// device whose region has another size.
    pub qemu_size_ok: bool,
    /// Why QEMU cannot take the size, and the fix; null when it can.
    pub qemu_problem: Option<String>,
    pub filesystem: String,
    pub dax: bool,
    pub map_sync: bool,
    pub extents: usize,
    /// Hex string of the layout hash (compare two checks: equal means unchanged).
    pub fingerprint: String,
    /// btrfs: the file is No_COW (`chattr +C`); null elsewhere.
    pub nocow: Option<bool>,
    /// The immutable attribute (`chattr +i`, e.g. left by a crashed `--seal`).
    pub immutable_attr: Option<bool>,
    pub problem_bytes: u64,
    pub problems: Vec<ProblemReport>,
    /// What `serve --mode auto` would choose for this file now.
    pub auto_policy: Policy,
    pub auto_reason: String,
    /// What to do next, if anything.
    pub advice: Option<String>,
}

impl CheckReport {
    /// Ready to serve to QEMU: immutable, and a size `serve` and QEMU both take.
    pub fn ready(&self) -> bool {
        self.immutable && self.size_ok && self.qemu_size_ok
    }

    pub fn exit_code(&self) -> u8 {
        if self.ready() {
            EXIT_IMMUTABLE
        } else {
            EXIT_NOT_IMMUTABLE
        }
    }
}

/// The smallest size at least `size` that QEMU takes for the region: a power of
/// two (at least 2 MiB, so also a multiple of 2 MiB); `None` past 2^63.
pub fn qemu_size(size: u64) -> Option<u64> {
    size.max(REGION_ALIGN).checked_next_power_of_two()
}

/// Why QEMU cannot take a region of `size` bytes (and what to do), if it cannot.
/// The daemon announces the file's size as the device's shared-memory region;
/// QEMU (11.1, vhost-user-test-device-pci) makes it a PCI BAR and aborts on a size
/// that is not a power of two (an assertion in pci_register_bar).
pub fn qemu_size_problem(size: u64, path: &str) -> Option<String> {
    if size.is_power_of_two() {
        return None;
    }
    let fix = match qemu_size(size) {
        Some(to) => format!(
            "`vhost-device-pmem prepare {path} --power-of-two` extends it to {to} bytes ({} MiB) without changing its data",
            to >> 20
        ),
        None => "it is too large to round up".into(),
    };
    Some(format!(
        "{size} bytes is not a power of two: QEMU 11.1 aborts creating the device \
         (`pci_register_bar: Assertion is_power_of_2(size)`); {fix}"
    ))
}

/// Checks `path` (opened read-only; nothing is written).
pub fn check(path: &Path) -> io::Result<CheckReport> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let verdict = blockmap::inspect(&file).map_err(|e| {
        let fs = blockmap::filesystem_of(&file);
        let text = match fs {
            Ok(fs) if fs.memory_only() => format!(
                "{fs} keeps files in memory only: nothing on it survives a reboot or power cut, whatever the mode; it has no block map (FIEMAP: {e}); serve --mode auto would use datasync, whose syncs {fs} ignores, and say so"
            ),
            Ok(fs) => format!("cannot read the block map (FIEMAP) on {fs}: {e}; serve --mode auto would use datasync, whose flushes may then commit the journal"),
            Err(_) => format!("cannot read the block map (FIEMAP) on an unknown filesystem: {e}; serve --mode auto would use datasync, whose flushes may then commit the journal"),
        };
        io::Error::new(e.kind(), text)
    })?;
    Ok(report(path, &file, &verdict))
}

fn report(path: &Path, file: &File, v: &Verdict) -> CheckReport {
    let name = path.display().to_string();
    let (auto_policy, auto_reason) = match choose_policy(Mode::Auto, false, Some(v), &name) {
        Ok(x) => x,
        Err(e) => (Policy::Fsync, e.to_string()),
    };
    let flags = sys::get_flags(file).ok();
    let nocow = (v.filesystem == Filesystem::Btrfs)
        .then(|| flags.map(|f| f & sys::FS_NOCOW_FL != 0))
        .flatten();
    let immutable_attr = flags.map(|f| f & sys::FS_IMMUTABLE_FL != 0);
    let problems: Vec<ProblemReport> = v
        .problems
        .iter()
        .map(|p| ProblemReport {
            offset: p.offset,
            length: p.length,
            kinds: match &p.kind {
                ProblemKind::Hole => vec!["hole".into()],
                ProblemKind::Flags(names) => names.iter().map(|s| s.to_string()).collect(),
            },
        })
        .collect();
    let size_ok = v.size > 0 && v.size % REGION_ALIGN == 0;
    let qemu_problem = qemu_size_problem(v.size, &name);
    let advice = if nocow == Some(false) {
        Some(format!("{name} is copy-on-write on btrfs and can never be immutable: copy it into an empty file made No_COW first (`touch NEW && chattr +C NEW && cp --reflink=never {name} NEW`), then `vhost-device-pmem prepare NEW`"))
    } else if qemu_problem.is_some() {
        Some(format!(
            "run `vhost-device-pmem prepare {name} --power-of-two` (makes it immutable too)"
        ))
    } else if !v.immutable() || !size_ok {
        Some(format!("run `vhost-device-pmem prepare {name}`"))
    } else if immutable_attr == Some(true) {
        Some(format!("the immutable attribute is set (a `serve --seal` that did not exit cleanly?): if no daemon serves it, clear it with `chattr -i {name}`"))
    } else {
        None
    };
    CheckReport {
        file: name,
        immutable: v.immutable(),
        size: v.size,
        size_ok,
        qemu_size_ok: qemu_problem.is_none(),
        qemu_problem,
        filesystem: v.filesystem.to_string(),
        dax: v.dax,
        map_sync: v.map_sync,
        extents: v.extents,
        fingerprint: format!("{:016x}", v.fingerprint),
        nocow,
        immutable_attr,
        problem_bytes: v.problems.iter().map(|p| p.length).sum(),
        problems,
        auto_policy,
        auto_reason,
        advice,
    }
}

/// The report for people.
pub fn render_text(r: &CheckReport) -> String {
    let mut s = String::new();
    let yn = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(
        s,
        "{}: {} bytes on {}, {} extent(s), dax={}, map_sync={}",
        r.file,
        r.size,
        r.filesystem,
        r.extents,
        yn(r.dax),
        yn(r.map_sync)
    );
    if r.immutable {
        let _ = writeln!(
            s,
            "verdict: IMMUTABLE (every byte is in an allocated, written, unshared extent)"
        );
    } else {
        let _ = writeln!(
            s,
            "verdict: NOT IMMUTABLE ({} problem range(s), {} bytes)",
            r.problems.len(),
            r.problem_bytes
        );
        for p in r.problems.iter().take(20) {
            let _ = writeln!(
                s,
                "  [{:#x}, {:#x}) {}",
                p.offset,
                p.offset + p.length,
                p.kinds.join("+")
            );
        }
        if r.problems.len() > 20 {
            let _ = writeln!(s, "  ... and {} more", r.problems.len() - 20);
        }
    }
    if !r.size_ok {
        let _ = writeln!(
            s,
            "size: not a positive multiple of 2 MiB; serve refuses it"
        );
    }
    if let Some(p) = &r.qemu_problem {
        let _ = writeln!(s, "problem for QEMU: {p}");
    }
    let _ = writeln!(
        s,
        "mode auto would choose: {} ({})",
        r.auto_policy, r.auto_reason
    );
    if let Some(a) = &r.advice {
        let _ = writeln!(s, "next: {a}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_is_not_immutable_and_says_what_to_do() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(2 << 20).unwrap();
        let r = check(f.path()).unwrap();
        assert!(!r.immutable);
        assert_eq!(r.exit_code(), EXIT_NOT_IMMUTABLE);
        assert_eq!(r.problems[0].kinds, vec!["hole".to_string()]);
        assert_eq!(r.auto_policy, Policy::Datasync);
        assert!(
            r.auto_reason.contains("commits the journal"),
            "{}",
            r.auto_reason
        );
        let text = render_text(&r);
        assert!(text.contains("NOT IMMUTABLE"), "{text}");
        assert!(text.contains("prepare"), "{text}");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in [
            "file",
            "immutable",
            "size",
            "size_ok",
            "filesystem",
            "extents",
            "fingerprint",
            "problems",
            "problem_bytes",
            "auto_policy",
            "auto_reason",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        assert_eq!(v["auto_policy"], "datasync");
    }

    fn immutable_verdict(size: u64) -> Verdict {
        Verdict {
            size,
            filesystem: Filesystem::Ext4,
            dax: false,
            map_sync: false,
            extents: 1,
            problems: Vec::new(),
            fingerprint: 7,
        }
    }

    #[test]
    fn a_size_qemu_aborts_on_is_a_problem_with_its_fix() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let r = report(
            Path::new("/v/a.img"),
            f.as_file(),
            &immutable_verdict(96 << 20),
        );
        assert!(r.immutable && r.size_ok, "{r:?}");
        assert!(!r.qemu_size_ok);
        assert_eq!(r.exit_code(), EXIT_NOT_IMMUTABLE);
        let p = r.qemu_problem.as_deref().unwrap();
        assert!(
            p.contains("not a power of two") && p.contains("QEMU 11.1 aborts"),
            "{p}"
        );
        assert!(
            p.contains("--power-of-two") && p.contains("134217728 bytes (128 MiB)"),
            "{p}"
        );
        assert!(r
            .advice
            .as_deref()
            .unwrap()
            .contains("prepare /v/a.img --power-of-two"));
        let text = render_text(&r);
        assert!(
            text.contains("problem for QEMU: 100663296 bytes is not a power of two"),
            "{text}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["qemu_size_ok"], false);
        assert!(v["qemu_problem"]
            .as_str()
            .unwrap()
            .contains("pci_register_bar"));

        let r = report(
            Path::new("/v/a.img"),
            f.as_file(),
            &immutable_verdict(128 << 20),
        );
        assert!(r.qemu_size_ok && r.qemu_problem.is_none() && r.advice.is_none());
        assert_eq!(r.exit_code(), EXIT_IMMUTABLE);
        assert!(!render_text(&r).contains("QEMU"));
        // A size serve refuses is not ready either (it exited 0 before).
        let r = report(
            Path::new("/v/a.img"),
            f.as_file(),
            &immutable_verdict(3 << 20),
        );
        assert_eq!(r.exit_code(), EXIT_NOT_IMMUTABLE);
    }

    #[test]
    fn the_size_for_qemu_is_the_next_power_of_two_of_at_least_2_mib() {
        assert_eq!(qemu_size(96 << 20), Some(128 << 20));
        assert_eq!(qemu_size(128 << 20), Some(128 << 20));
        assert_eq!(qemu_size(1), Some(2 << 20));
        assert_eq!(qemu_size((1 << 63) + 1), None);
        assert_eq!(qemu_size_problem(64 << 20, "f"), None);
    }

    #[test]
    fn missing_files_are_errors() {
        assert!(check(Path::new("/nonexistent/vdp-check")).is_err());
    }
}
