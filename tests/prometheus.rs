// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The monitoring operators load as is, checked by Prometheus's own `promtool`: the
//! alert rules in configs/prometheus/ (`check rules`, and their unit tests with
//! `test rules`), the real daemon's metrics file (`check metrics`), and the rules
//! evaluated over that file's own samples, so each metric a rule names is one the
//! daemon writes.
//!
//! Owns: those checks. Never runs a Prometheus server. A missing `promtool` is a
//! loud skip (a failure under VDP_REQUIRE_ROOT_TESTS=1).

use vdp_testkit::daemon;
use vdp_testkit::frontend;
use vdp_testkit::prom;
use vdp_testkit::root;

use std::{
    fs,
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

use daemon::{Daemon, Scratch, BIN};
use frontend::TestFrontend;
use serde_json::json;
use vhost_device_pmem::control::{self, Request};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "configs/prometheus/vhost-device-pmem.rules.yml";
const RULE_TESTS: &str = "configs/prometheus/vhost-device-pmem.test.yml";

fn have_promtool(test: &str) -> bool {
    if root::have_tool("promtool") {
        return true;
    }
    root::unavailable(test, "the `promtool` tool (Debian package prometheus)");
    false
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new("promtool");
    c.args(args)
        .current_dir(REPO)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ok(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !have_promtool("promtool_rules") {
        return;
    }
    ok(
        "promtool check rules",
        &promtool(&["check", "rules", RULES], None),
    );
    ok(
        "promtool test rules",
        &promtool(&["test", "rules", RULE_TESTS], None),
    );
}

/// The `description` annotation of alert `name` in the rules file (the rules are
/// written one key a line).
fn description_of(rules: &str, name: &str) -> String {
    let mut lines = rules
        .lines()
        .skip_while(|l| l.trim() != format!("- alert: {name}"));
    lines.next().unwrap_or_else(|| panic!("no alert {name}"));
    let line = lines
        .find_map(|l| l.trim().strip_prefix("description: "))
        .unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn the_daemons_metrics_file_passes_promtool_and_feeds_the_rules() {
    if !have_promtool("promtool_metrics") {
        return;
    }
    let s = Scratch::new();
    // A real prepared file, as an operator makes one.
    let file = s.path("pmem.img");
    let o = Command::new(BIN)
        .args(["prepare", file.to_str().unwrap(), "--size", "4M"])
        .output()
        .unwrap();
    ok("prepare", &o);
    let textfile = s.path("node-exporter");
    fs::create_dir(&textfile).unwrap();
    let metrics_file = textfile.join("vhost-device-pmem-vm0-pmem0.prom");
    let mut d = Daemon::start(
        &s,
        "d",
        &file,
        &[
            "--metrics-file",
            metrics_file.to_str().unwrap(),
            "--metrics-interval",
            "1",
            "--metrics-instance",
            "vm0-pmem0",
        ],
    );
    // Flushes (the histogram holds them) and a bad range (a rule fires on it).
    let mut fe = TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    fe.map_region(0).unwrap();
    assert_eq!(fe.flush(3).unwrap(), vec![0; 3]);
    let a = control::request(
        &d.control,
        &Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert!(a.ok, "{a:?}");
    drop(fe);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success(), "{}", d.log_text());
    // The last write, at exit: every family, the flushes and the bad range in it.
    let text = fs::read_to_string(&metrics_file).unwrap();
    let m = prom::parse(&text);
    assert_eq!(m.value("vhost_device_pmem_bad_ranges", &[]), 1.0, "{text}");
    assert!(m.value("vhost_device_pmem_flush_latency_seconds_count", &[]) >= 3.0);

    let o = promtool(&["check", "metrics"], Some(&text));
    ok("promtool check metrics", &o);
    let lint = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(lint.trim().is_empty(), "promtool's lint: {lint}\n{text}");

    // Every metric a rule names is one the daemon writes.
    let rules = fs::read_to_string(Path::new(REPO).join(RULES)).unwrap();
    let mut named: Vec<&str> = rules
        .match_indices("vhost_device_pmem_")
        .map(|(i, _)| {
            let rest = &rules[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 7, "{named:?}");
    for n in &named {
        assert!(
            m.samples.iter().any(|s| s.name == *n),
            "a rule names {n}, which the daemon does not write"
        );
    }

    // The rules over the file's own samples, held for 10 minutes: the bad range
    // alerts, nothing else of the daemon's does (it is healthy).
    let series: Vec<_> = m
        .samples
        .iter()
        .map(|s| {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap()))
                .collect();
            json!({
                "series": format!("{}{{{}}}", s.name, labels.join(",")),
                "values": format!("{}x40", s.value),
            })
        })
        .collect();
    let quiet = [
        "VhostDevicePmemSyncFailed",
        "VhostDevicePmemHealthRecordUnwritten",
        "VhostDevicePmemBackingFileChanged",
        "VhostDevicePmemDowngraded",
        "VhostDevicePmemQueueBroken",
        "VhostDevicePmemFlushErrors",
        "VhostDevicePmemSandboxDenials",
    ];
    let mut checks: Vec<_> = quiet
        .iter()
        .map(|a| json!({"eval_time": "5m", "alertname": a, "exp_alerts": []}))
        .collect();
    checks.push(json!({
        "eval_time": "5m",
        "alertname": "VhostDevicePmemBadRanges",
        "exp_alerts": [{
            "exp_labels": {"severity": "warning", "instance": "vm0-pmem0"},
            "exp_annotations": {
                "summary": "pmem vm0-pmem0: 1 bad range(s) in the backing file",
                "description": description_of(&rules, "VhostDevicePmemBadRanges"),
            },
        }],
    }));
    // JSON is YAML: promtool reads it as a test file.
    let test = json!({
        "rule_files": [Path::new(REPO).join(RULES)],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": checks}],
    });
    let test_file = s.path("from-the-daemon.test.yml");
    fs::write(&test_file, serde_json::to_string_pretty(&test).unwrap()).unwrap();
    ok(
        "promtool test rules (the daemon's samples)",
        &promtool(&["test", "rules", test_file.to_str().unwrap()], None),
    );
}
