// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The environment a test run *inside* a VM is started with (the DAX lab, the VM
//! that plays a host, the failing-disk VM): a set of variables its host side sets
//! together, read once.
//!
//! Owns: the all-or-nothing rule (none set: the test was run outside its VM and
//! must fail, not pass; some set: half an environment) and the parsing of each
//! value. Never decides what a test does with them.

use std::path::PathBuf;

/// The variables of one in-VM test, all of them set.
pub struct VmEnv {
    vars: Vec<(&'static str, String)>,
}

impl VmEnv {
    /// Reads `names`; panics with `outside` (which VM the test runs in, and which
    /// tests boot it) if none is set, and names the first missing one if only some
    /// are. The in-VM tests are `#[ignore]`d, so they run only when asked for, and
    /// asked for outside their VM they must not pass.
    pub fn load(names: &[&'static str], outside: &str) -> Self {
        let vars: Vec<(&'static str, Option<String>)> =
            names.iter().map(|&n| (n, std::env::var(n).ok())).collect();
        assert!(
            vars.iter().any(|(_, v)| v.is_some()),
            "{outside}; {} are not set",
            names.join(", ")
        );
        let vars = vars
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    v.unwrap_or_else(|| panic!("{n} is not set (half an environment)")),
                )
            })
            .collect();
        Self { vars }
    }

    /// The value of `name` (one of those loaded).
    pub fn get(&self, name: &str) -> String {
        self.vars
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} is not one of the variables loaded"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.get(name).into()
    }

    pub fn num(&self, name: &str) -> u64 {
        self.get(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

/// An optional number: `None` if `name` is not set, a panic if it does not parse.
pub fn optional_num(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}: {e}")))
}

/// [`optional_num`] with a default.
pub fn num_or(name: &str, default: u64) -> u64 {
    optional_num(name).unwrap_or(default)
}
