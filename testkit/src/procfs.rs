// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the sandbox tests read of a process in /proc: the seccomp state of each of
//! its threads. Reads only; never decides what a test asserts.
//!
//!
//! Owns: the parsing of /proc/PID/task/*/status. Never writes to /proc.

/// `(Name:, Seccomp:, Seccomp_filters:)` of every thread of `pid`, from
/// /proc/PID/task/*/status (a thread that ended meanwhile is left out).
pub fn thread_modes(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}
