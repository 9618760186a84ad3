// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One path convention for every instance NAME, in every file the project ships or
//! tests with: sockets `/run/vhost-device-pmem/NAME/{vhost-user,control,agent}.sock`,
//! the backing file and its state under `/var/lib/vhost-device-pmem/NAME/`.
//!
//! Owns: the scan of configs/, docs/, packaging/, README.md, CHANGELOG.md, Cargo.toml,
//! src/, tests/, guest-tests/ and benches/ for every path under those two
//! directories, and the rule each must follow. Never edits a file.

use std::{
    fs,
    path::{Path, PathBuf},
};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// This file names wrong paths on purpose (the rule's own tests).
const SELF: &str = "tests/path_convention.rs";

const RUN: &str = "/run/vhost-device-pmem";
const STATE: &str = "/var/lib/vhost-device-pmem";
/// Prefixes that are never right: the convention is /run, not its old alias.
const WRONG_PREFIXES: [&str; 1] = ["/var/run/vhost-device-pmem"];
/// The sockets an instance has.
const SOCKETS: [&str; 3] = ["vhost-user.sock", "control.sock", "agent.sock"];

/// An instance name as the shipped files spell it: `vm0-pmem0`, `%i`, `NAME`,
/// `INSTANCE`, `*` (AppArmor, shell globs). No dot: a dot is how a flat file name
/// (`vm0-pmem0.sock`, `vm0-pmem0.img`) gives itself away.
fn instance_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '%' | '*' | '@'))
}

/// A socket's file name: one of [`SOCKETS`], or a `{a,b}.sock` brace list of them.
fn socket_ok(name: &str) -> bool {
    if SOCKETS.contains(&name) {
        return true;
    }
    let Some(list) = name
        .strip_prefix('{')
        .and_then(|n| n.strip_suffix("}.sock"))
    else {
        return false;
    };
    list.split(',')
        .all(|s| SOCKETS.contains(&format!("{s}.sock").as_str()))
}

/// Whether `path` (starting with [`RUN`] or [`STATE`]) follows the convention; the
/// reason if not.
fn follows(path: &str) -> Result<(), String> {
    let (base, rest) = if let Some(r) = path.strip_prefix(RUN) {
        (RUN, r)
    } else if let Some(r) = path.strip_prefix(STATE) {
        (STATE, r)
    } else {
        return Err("not under /run/vhost-device-pmem or /var/lib/vhost-device-pmem".into());
    };
    if rest.is_empty() || rest == "/" {
        return Ok(()); // the base directory itself
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(format!("{base} followed by {rest:?}"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if !instance_ok(parts[0]) {
        return Err(format!(
            "{:?} is no instance directory (NAME, no dot): a flat name under {base}",
            parts[0]
        ));
    }
    if base == STATE {
        return Ok(()); // anything in the instance's state directory
    }
    match parts[1..] {
        [] | [""] => Ok(()),
        [sock] if socket_ok(sock) => Ok(()),
        _ => Err(format!(
            "under {RUN}/NAME/ only {} are named",
            SOCKETS.join(", ")
        )),
    }
}

/// Characters a path in a config, a shell line or a doc is made of. A comma counts
/// only inside braces (`{vhost-user,agent}.sock`); elsewhere it ends the path
/// (`path=...sock,reconnect-ms=1000`).
fn paths_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in [RUN, STATE].iter().chain(WRONG_PREFIXES.iter()) {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            from = start + prefix.len();
            // `/var/run/...` contains `/run/...`: that one is reported as itself.
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_')) {
                continue;
            }
            let mut depth = 0;
            let mut end = start;
            for (j, c) in text[start..].char_indices() {
                let ok = match c {
                    '{' => {
                        depth += 1;
                        true
                    }
                    '}' if depth > 0 => {
                        depth -= 1;
                        true
                    }
                    ',' => depth > 0,
                    c => c.is_ascii_alphanumeric() || "._-%*@/?".contains(c),
                };
                if !ok {
                    break;
                }
                end = start + j + c.len_utf8();
            }
            let p = text[start..end].trim_end_matches(['.', ':', ';']);
            out.push(p.to_string());
        }
    }
    out
}

/// Every text file under the shipped and tested places.
fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let repo = Path::new(REPO);
    let mut out = Vec::new();
    for d in [
        "configs",
        "docs",
        "packaging",
        "src",
        "tests",
        "guest-tests",
        "benches",
    ] {
        if repo.join(d).is_dir() {
            walk(&repo.join(d), &mut out);
        }
    }
    for f in ["README.md", "CHANGELOG.md", "Cargo.toml"] {
        out.push(repo.join(f));
    }
    out.retain(|p| p.strip_prefix(repo).unwrap() != Path::new(SELF));
    out.sort();
    out
}

#[test]
fn every_shipped_file_names_instance_paths_by_the_one_convention() {
    let mut bad = Vec::new();
    let mut seen = 0;
    let mut files_seen = Vec::new();
    for f in files() {
        let Ok(text) = fs::read_to_string(&f) else {
            continue; // not text
        };
        let rel = f.strip_prefix(REPO).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            for p in paths_in(line) {
                seen += 1;
                files_seen.push(rel.clone());
                let verdict = if WRONG_PREFIXES.iter().any(|w| p.starts_with(w)) {
                    Err(format!("use {RUN}, not /var/run"))
                } else {
                    follows(&p)
                };
                if let Err(why) = verdict {
                    bad.push(format!("{rel}:{}: {p}: {why}", n + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "paths that do not follow {RUN}/NAME/{{vhost-user,control,agent}}.sock and \
         {STATE}/NAME/:\n{}",
        bad.join("\n")
    );
    // The scan found the places it is about (a broken scan finds nothing).
    for want in [
        "configs/libvirt-domain.xml",
        "configs/qemu.sh",
        "configs/pmem.toml",
        "configs/systemd/instance.toml",
        "configs/systemd/vhost-device-pmem@.socket",
        "configs/systemd/vhost-device-pmem-control@.socket",
        "docs/operations.md",
    ] {
        assert!(
            files_seen.iter().any(|f| f == want),
            "no path of the convention found in {want}"
        );
    }
    assert!(seen > 20, "only {seen} paths found");
}

/// The units and the instance example name exactly the convention's sockets.
#[test]
fn the_units_and_the_instance_example_name_the_three_sockets() {
    let read = |p: &str| fs::read_to_string(Path::new(REPO).join(p)).unwrap();
    let listen = |unit: &str| -> Vec<String> {
        read(unit)
            .lines()
            .filter_map(|l| l.strip_prefix("ListenStream="))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        listen("configs/systemd/vhost-device-pmem@.socket"),
        [format!("{RUN}/%i/vhost-user.sock")]
    );
    assert_eq!(
        listen("configs/systemd/vhost-device-pmem-control@.socket"),
        [format!("{RUN}/%i/control.sock")]
    );
    let instance: toml::Table = read("configs/systemd/instance.toml").parse().unwrap();
    assert_eq!(
        instance["agent-socket"].as_str(),
        Some(format!("{RUN}/vm0-pmem0/agent.sock").as_str())
    );
    assert_eq!(
        instance["state-dir"].as_str(),
        Some(format!("{STATE}/vm0-pmem0").as_str())
    );
    let service = read("configs/systemd/vhost-device-pmem@.service");
    assert!(
        service.contains("StateDirectory=vhost-device-pmem/%i\n"),
        "{service}"
    );
    assert!(service.contains(&format!("ReadWritePaths={RUN}/%i ")));
}

/// The rule itself, on the spellings the old files used.
#[test]
fn the_rule_refuses_flat_names_and_other_sockets() {
    for good in [
        "/run/vhost-device-pmem",
        "/run/vhost-device-pmem/",
        "/run/vhost-device-pmem/%i",
        "/run/vhost-device-pmem/%i/",
        "/run/vhost-device-pmem/vm0-pmem0/vhost-user.sock",
        "/run/vhost-device-pmem/*/agent.sock",
        "/run/vhost-device-pmem/NAME/{vhost-user,control,agent}.sock",
        "/var/lib/vhost-device-pmem",
        "/var/lib/vhost-device-pmem/vm0-pmem0/pmem.img",
        "/var/lib/vhost-device-pmem/INSTANCE/",
    ] {
        assert_eq!(follows(good), Ok(()), "{good}");
    }
    for bad in [
        "/run/vhost-device-pmem/vm0-pmem0.sock",
        "/run/vhost-device-pmem/vm0-pmem0-agent.sock",
        "/run/vhost-device-pmem/vm0-pmem0.ctl",
        "/run/vhost-device-pmem/vm0-pmem0/ctl.sock",
        "/run/vhost-device-pmem/vm0-pmem0/sub/vhost-user.sock",
        "/run/vhost-device-pmem/NAME/{vhost-user,qmp}.sock",
        "/var/lib/vhost-device-pmem/vm0-pmem0.img",
        "/run/vhost-device-pmemX",
    ] {
        assert!(follows(bad).is_err(), "{bad} passed");
    }
    assert_eq!(
        paths_in("path=/run/vhost-device-pmem/vm0/agent.sock,reconnect-ms=1000 `/run/vhost-device-pmem/%i/`."),
        ["/run/vhost-device-pmem/vm0/agent.sock", "/run/vhost-device-pmem/%i/"]
    );
    assert_eq!(
        paths_in("x /var/run/vhost-device-pmem/a.sock"),
        ["/var/run/vhost-device-pmem/a.sock"]
    );
    assert_eq!(
        paths_in("<source path='/run/vhost-device-pmem/{vhost-user,agent}.sock'>"),
        ["/run/vhost-device-pmem/{vhost-user,agent}.sock"]
    );
}
