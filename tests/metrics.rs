// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's Prometheus metrics, from the real binary over its real sockets: the
//! `metrics` command counts what a QEMU-like frontend did, and `--metrics-file` is
//! replaced atomically and parses. Never needs root or promtool (a strict parser of
//! the format is in testkit/src/prom.rs).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{serve_fails, Daemon, Scratch, MIB2};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::prom;
use vhost_device_pmem::control::{self, Request};

const P: &str = "vhost_device_pmem_";

fn metric(name: &str) -> String {
    format!("{P}{name}")
}

/// `vhost-device-pmem metrics --control-socket CTL`, its output parsed strictly.
fn cli_metrics(d: &Daemon) -> (String, prom::Exposition) {
    let out = Command::new(daemon::BIN)
        .args(["metrics", "--control-socket", d.control.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let e = prom::parse(&text);
    (text, e)
}

fn started(d: &Daemon) -> TestFrontend {
    TestFrontend::connect_started(&d.socket).unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()))
}

#[test]
fn metrics_count_the_flushes_and_the_histogram_holds_every_one() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(&s, "d", &file, &["--mode", "fsync"]);
    let mut fe = started(&d);
    assert_eq!(cli_metrics(&d).1.value(&metric("region_mapped"), &[]), 0.0);
    fe.map_region(0).unwrap();
    for _ in 0..3 {
        assert_eq!(fe.flush(1).unwrap(), vec![0]);
    }
    assert_eq!(fe.flush(4).unwrap(), vec![0; 4]);
    let stats = d.stats();
    let (text, m) = cli_metrics(&d);
    let instance = fs::canonicalize(&file).unwrap().display().to_string();
    for sample in &m.samples {
        assert_eq!(sample.labels["instance"], instance, "{sample:?}");
    }
    let v = |name: &str| m.value(&metric(name), &[]);
    assert_eq!(v("flush_requests_total"), 7.0, "{text}");
    assert_eq!(v("flush_batches_total"), stats["batches"].as_f64().unwrap());
    assert_eq!(v("syncs_total"), stats["syncs"].as_f64().unwrap());
    assert_eq!(v("flush_errors_total"), 0.0);
    assert_eq!(v("malformed_chains_total"), 0.0);
    assert_eq!(v("unsupported_requests_total"), 0.0);
    assert_eq!(v("flush_latency_seconds_count"), 7.0, "{text}");
    let buckets = m.buckets(&metric("flush_latency_seconds"));
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 7.0));
    // Flushes under fsync take microseconds to milliseconds, not nothing: some
    // finite bucket below 1 s holds them all.
    assert!(
        buckets.iter().any(|&(le, n)| le < 1.0 && n == 7.0),
        "{buckets:?}"
    );
    assert!(v("flush_latency_seconds_sum") > 0.0, "{text}");
    assert_eq!(v("connections_total"), 1.0);
    assert_eq!(v("connected"), 1.0);
    assert_eq!(v("region_mapped"), 1.0);
    assert_eq!(v("bad_ranges"), 0.0);
    assert_eq!(v("sync_failed"), 0.0);
    let policy = |p| m.value(&metric("policy"), &[("policy", p)]);
    assert_eq!(
        (policy("fsync"), policy("datasync"), policy("direct")),
        (1.0, 0.0, 0.0)
    );
    let health = |h| m.value(&metric("health"), &[("health", h)]);
    assert_eq!(
        [
            health("healthy"),
            health("downgraded"),
            health("queue-broken"),
            health("failed")
        ],
        [1.0, 0.0, 0.0, 0.0]
    );
    // The control command answers the same text in a field.
    let a = control::request(&d.control, &Request::Metrics).unwrap();
    assert!(a.ok);
    assert_eq!(
        prom::parse(&a.metrics.unwrap()).samples.len(),
        m.samples.len()
    );
    // A bad range injected by an operator is counted.
    let a = control::request(
        &d.control,
        &Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert!(a.ok);
    assert_eq!(cli_metrics(&d).1.value(&metric("bad_ranges"), &[]), 1.0);
}

/// Waits until `pred` holds for the metrics file, returning its text and inode.
fn wait_file(
    path: &std::path::Path,
    what: &str,
    pred: impl Fn(&prom::Exposition, u64) -> bool,
) -> (prom::Exposition, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            let ino = fs::metadata(path).unwrap().ino();
            let e = prom::parse(&text);
            if pred(&e, ino) {
                return (e, ino);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the metrics file never showed {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_metrics_file_is_replaced_atomically_every_interval_and_once_more_at_exit() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let prom_dir = s.path("textfile");
    fs::create_dir(&prom_dir).unwrap();
    let path = prom_dir.join("vm-1.prom");
    let name = "vm \"1\"\\pmem";
    let mut d = Daemon::start(
        &s,
        "d",
        &file,
        &[
            "--mode",
            "fsync",
            "--metrics-file",
            path.to_str().unwrap(),
            "--metrics-interval",
            "1",
            "--metrics-instance",
            name,
        ],
    );
    // Written before the daemon answers on its control socket.
    let first = fs::read_to_string(&path).expect("the first write is made at start-up");
    let m = prom::parse(&first);
    assert!(
        m.samples.iter().all(|s| s.labels["instance"] == name),
        "{first}"
    );
    assert_eq!(m.value(&metric("connected"), &[]), 0.0);
    assert_eq!(
        fs::metadata(&path).unwrap().mode() & 0o777,
        0o644,
        "readable by the collector's user"
    );
    let ino0 = fs::metadata(&path).unwrap().ino();
    // A later interval replaces the file (a new inode: renamed over, not rewritten).
    let (_, ino1) = wait_file(&path, "a new inode", |_, ino| ino != ino0);
    let mut fe = started(&d);
    assert_eq!(fe.flush(3).unwrap(), vec![0; 3]);
    let (m, ino2) = wait_file(&path, "3 flushes", |m, _| {
        m.value(&metric("flush_requests_total"), &[]) == 3.0
    });
    assert_ne!(ino2, ino1);
    assert_eq!(m.value(&metric("flush_latency_seconds_count"), &[]), 3.0);
    assert_eq!(m.value(&metric("connected"), &[]), 1.0);
    let syncs = m.value(&metric("syncs_total"), &[]);
    // Only the .prom file (and no temporary) is left in the collector's directory.
    let names: Vec<_> = fs::read_dir(&prom_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".tmp"))
        .collect();
    assert_eq!(names, vec!["vm-1.prom".to_string()]);

    drop(fe);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success(), "{}", d.log_text());
    // The write at exit: after the disconnect and final syncs.
    let m = prom::parse(&fs::read_to_string(&path).unwrap());
    assert_eq!(m.value(&metric("connected"), &[]), 0.0);
    assert!(m.value(&metric("syncs_total"), &[]) > syncs);
    let left: Vec<_> = fs::read_dir(&prom_dir).unwrap().collect();
    assert_eq!(left.len(), 1, "a temporary file was left behind");
}

#[test]
fn a_metrics_file_not_named_prom_or_not_writable_is_refused() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let sock = s.path("x.sock");
    let args = |m: &str| {
        vec![
            "--socket-path".to_string(),
            sock.to_str().unwrap().to_string(),
            "--file".into(),
            file.to_str().unwrap().into(),
            "--mode".into(),
            "fsync".into(),
            "--metrics-file".into(),
            m.into(),
        ]
    };
    let txt = s.path("pmem.txt");
    let a = args(txt.to_str().unwrap());
    let (status, log) = serve_fails(&s, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!status.success());
    assert!(log.contains("must end in .prom"), "{log}");
    assert!(!txt.exists());
    let nowhere = s.path("no-such-dir/pmem.prom");
    let a = args(nowhere.to_str().unwrap());
    let (status, log) = serve_fails(&s, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!status.success());
    assert!(
        log.contains("metrics file") && log.contains("no-such-dir/pmem.prom"),
        "{log}"
    );
}

/// docs/reference.md's metrics example is what the daemon prints: every line of it
/// (but the one standing for the histogram's middle) is in the real output, in the
/// same order, every metric the daemon prints is in the example and in the table,
/// and the figures above the example (lines, bytes, series) are the real ones.
#[test]
fn the_reference_shows_the_metrics_the_daemon_prints() {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md")).unwrap();
    let intro = "Example (`--mode fsync --metrics-instance vm0-pmem0`, no VMM connected yet; ";
    let at = doc
        .find(intro)
        .expect("the metrics example in docs/reference.md");
    let rest = &doc[at + intro.len()..];
    let head = rest[..rest.find(';').unwrap()].replace('\n', " ");
    let figures: Vec<&str> = head.split(", ").collect();
    let block = &rest[rest.find("```\n").unwrap() + 4..];
    let example: Vec<&str> = block[..block.find("```").unwrap()].lines().collect();
    // The names in the first column: `vhost_device_pmem_NAME{label=…}`, and
    // `..._NAME` for a second one in the same row.
    let table: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `vhost_device_pmem_"))
        .flat_map(|l| l.split('|').nth(1).unwrap().split('`').skip(1).step_by(2))
        .filter_map(|n| {
            n.strip_prefix("vhost_device_pmem_")
                .or_else(|| n.strip_prefix("..._"))
        })
        .map(|n| n.split('{').next().unwrap())
        .collect();

    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--metrics-instance", "vm0-pmem0"],
    );
    let (text, m) = cli_metrics(&d);
    let real: Vec<&str> = text.lines().collect();

    let mut from = 0;
    for line in example.iter().filter(|l| !l.starts_with('…')) {
        let found = real[from..].iter().position(|r| r == line);
        let Some(i) = found else {
            panic!("docs/reference.md's example line {line:?} is not (in this order) in what the daemon prints:\n{text}");
        };
        from += i + 1;
    }
    for line in real.iter().filter(|l| l.starts_with("# HELP ")) {
        assert!(
            example.contains(line),
            "docs/reference.md's example lacks {line:?}"
        );
        let family = line["# HELP vhost_device_pmem_".len()..]
            .split(' ')
            .next()
            .unwrap();
        assert!(
            table.contains(&family),
            "docs/reference.md's metrics table lacks vhost_device_pmem_{family}"
        );
    }
    let kb = format!("{:.1} KB", text.len() as f64 / 1000.0);
    assert_eq!(
        figures,
        [
            format!("{} lines", real.len()).as_str(),
            kb.as_str(),
            format!("{} series per daemon", m.samples.len()).as_str(),
        ],
        "the figures above docs/reference.md's metrics example"
    );
}
