// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's metrics in the Prometheus text exposition format (version 0.0.4),
//! rendered from typed snapshots: the `status` document, the flush and queue
//! counters and the flush latency histogram.
//!
//! Owns: metric names, help texts, label escaping and the histogram's `le` bounds.
//! Never takes a snapshot, reads a clock or touches a file: the callers (the control
//! socket's `metrics` command, the `--metrics-file` writer) do that.

use std::fmt::Write;

use crate::{
    control::StatsReport,
    durability::{Health, LatencyBuckets, Policy, LATENCY_BUCKETS},
    report::StatusReport,
};

/// Every metric name starts with this.
pub const PREFIX: &str = "vhost_device_pmem_";

/// Everything one rendering shows, taken at one moment.
#[derive(Clone, Debug)]
pub struct MetricsSnapshot {
    /// The `instance` label of every series (default: the backing file's canonical
    /// path; `--metrics-instance` overrides it).
    pub instance: String,
    pub status: StatusReport,
    pub stats: StatsReport,
    pub latency: LatencyBuckets,
}

/// The policies a daemon can be under, in the order they are shown.
const POLICIES: [Policy; 5] = [
    Policy::Direct,
    Policy::Datasync,
    Policy::Fsync,
    Policy::Volatile,
    Policy::ReadOnly,
];

/// The health names, in order of severity.
const HEALTHS: [Health; 5] = [
    Health::Healthy,
    Health::Downgraded,
    Health::QueueBroken,
    Health::FileChanged,
    Health::Failed,
];

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A whole number of microseconds as seconds, in decimal (exact: no float
/// rounding, no exponent), e.g. 1 → "0.000001", 2097152 → "2.097152".
fn seconds(us: u64) -> String {
    let mut s = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// Writes the exposition text of one snapshot.
struct Out {
    text: String,
    /// `instance="..."`, escaped once.
    instance: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Help texts here are constants without backslashes or line feeds.
        let _ = writeln!(self.text, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.text, "# TYPE {PREFIX}{name} {kind}");
    }

    /// One sample; `labels` are name and already escaped value pairs after
    /// `instance`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        let _ = write!(self.text, "{PREFIX}{name}{{{}", self.instance);
        for (k, v) in labels {
            let _ = write!(self.text, ",{k}=\"{v}\"");
        }
        let _ = writeln!(self.text, "}} {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], &value.to_string());
    }
}

/// Renders `m` in the text exposition format 0.0.4 (ends with a line feed).
pub fn render(m: &MetricsSnapshot) -> String {
    let mut o = Out {
        text: String::with_capacity(8 << 10),
        instance: format!("instance=\"{}\"", escape_label(&m.instance)),
    };
    let flush = &m.stats.flush;
    let queue = &m.stats.queue;
    let st = &m.status;
    o.single(
        "flush_requests_total",
        "counter",
        "Flush requests answered (successfully or not).",
        flush.flush_requests,
    );
    o.single(
        "flush_batches_total",
        "counter",
        "Batches of flush requests (one sync per batch at most).",
        flush.batches,
    );
    o.single(
        "syncs_total",
        "counter",
        "fsync or fdatasync calls on the backing file (flushes, downgrades, disconnects).",
        flush.syncs,
    );
    o.single(
        "flush_errors_total",
        "counter",
        "Flush requests answered with an error.",
        flush.errors,
    );
    o.single(
        "malformed_chains_total",
        "counter",
        "Descriptor chains on the request queue that were not a valid request.",
        queue.malformed_chains,
    );
    o.single(
        "unsupported_requests_total",
        "counter",
        "Requests of a type other than flush (answered with an error).",
        queue.unsupported_requests,
    );
    flush_rate_limit(&mut o, m);
    histogram(
        &mut o,
        "flush_latency_seconds",
        "Service time of a flush request, from taking its batch off the ring to its completion.",
        &m.latency,
    );
    o.single(
        "bad_ranges",
        "gauge",
        "Known bad ranges of the backing file.",
        st.bad_ranges.len() as u64,
    );
    o.single(
        "connections_total",
        "counter",
        "VMM connections accepted.",
        st.connections,
    );
    o.single(
        "connected",
        "gauge",
        "1 while a VMM is connected.",
        u64::from(st.connected),
    );
    o.single(
        "region_mapped",
        "gauge",
        "1 while the VMM has the region mapped.",
        u64::from(st.region_mapped),
    );
    o.family(
        "policy",
        "gauge",
        "The flush policy in force: 1 for it, 0 for the others.",
    );
    for p in POLICIES {
        let name = p.to_string();
        let v = if p == st.policy { "1" } else { "0" };
        o.sample("policy", &[("policy", &name)], v);
    }
    o.family(
        "health",
        "gauge",
        "The daemon's health: 1 for the one that holds, 0 for the others.",
    );
    for h in HEALTHS {
        let name = h.to_string();
        let v = if h == st.health { "1" } else { "0" };
        o.sample("health", &[("health", &name)], v);
    }
    o.single(
        "sync_failed",
        "gauge",
        "1 once a sync failed (latched: every flush is answered EIO until the record is cleared).",
        u64::from(st.sync_failure.is_some()),
    );
    o.single(
        "sandbox_denials_total",
        "counter",
        "System calls outside the seccomp allow-list answered ENOSYS (each call is logged once).",
        st.sandbox_denials,
    );
    o.single(
        "health_record_unwritten",
        "gauge",
        "1 while a sync failure is not yet recorded in every location of its health record \
         (retried; a daemon started now could serve the file as healthy).",
        u64::from(st.health_record.as_ref().is_some_and(|r| !r.persisted)),
    );
    backing_file(&mut o, st);
    o.text
}

/// The flush rate limit: what it is (0 without one) and what it held back.
fn flush_rate_limit(o: &mut Out, m: &MetricsSnapshot) {
    let queue = &m.stats.queue;
    let (ops, burst) = m
        .status
        .flush_rate_limit
        .as_ref()
        .map_or((0, 0), |l| (l.ops_per_sec, l.burst));
    o.single(
        "flush_throttled_total",
        "counter",
        "Flush requests the flush rate limit held back before answering them (each answered with success once its token was due).",
        queue.flush_throttled,
    );
    o.family(
        "flush_throttled_seconds_total",
        "counter",
        "Time flush requests waited for the flush rate limit, added up.",
    );
    o.sample(
        "flush_throttled_seconds_total",
        &[],
        &seconds(queue.flush_throttled_us),
    );
    o.single(
        "flush_rate_limit_ops_per_second",
        "gauge",
        "The flush rate limit: flush requests per second on average (0: no limit).",
        u64::from(ops),
    );
    o.single(
        "flush_rate_limit_burst",
        "gauge",
        "The flush rate limit's burst: flush requests served at once after a quiet spell (0: no limit).",
        u64::from(burst),
    );
}

/// The served file itself, as the guard last saw it: whether it was deleted,
/// renamed over, moved away or resized (latched), and how many such changes.
fn backing_file(o: &mut Out, st: &StatusReport) {
    let (problem, problems) = st
        .guard
        .as_ref()
        .map_or((false, 0), |g| (g.file_problem.is_some(), g.file_problems));
    o.single(
        "backing_file_changed",
        "gauge",
        "1 once the served file was seen deleted, renamed over, moved away, truncated or resized (latched).",
        u64::from(problem),
    );
    o.single(
        "backing_file_changes_total",
        "counter",
        "Changes of the served file itself seen by the guard (each new kind of change counts).",
        problems,
    );
}

/// A histogram of log2 microsecond buckets: cumulative `_bucket` series with `le`
/// in seconds (bucket i's bound is 2^i µs; the last bucket is open, so it is only in
/// `+Inf`), then `_sum` and `_count`.
fn histogram(o: &mut Out, name: &str, help: &str, h: &LatencyBuckets) {
    o.family(name, "histogram", help);
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (i, n) in h.buckets.iter().enumerate().take(LATENCY_BUCKETS - 1) {
        cumulative += n;
        o.sample(
            &bucket,
            &[("le", &seconds(1u64 << i))],
            &cumulative.to_string(),
        );
    }
    o.sample(&bucket, &[("le", "+Inf")], &h.count.to_string());
    o.sample(&format!("{name}_sum"), &[], &seconds(h.sum_us));
    o.sample(&format!("{name}_count"), &[], &h.count.to_string());
}

/// The tests' strict parser of the format, from the test kit (shared with the
/// binary tests).
#[cfg(test)]
use vdp_testkit::prom;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        device::queue::QueueCounters,
        durability::{LatencySummary, Mode, StatsSnapshot, SyncContext, SyncFailure},
        media::ranges::BadRange,
    };

    fn status() -> StatusReport {
        StatusReport {
            health: Health::Downgraded,
            sync_failure: None,
            queue_broken: None,
            version: "0.1.0".into(),
            pid: 1,
            file: "/img".into(),
            size: 2 << 20,
            readonly: false,
            mode_requested: Mode::Auto,
            policy: Policy::Datasync,
            policy_reason: "test".into(),
            promise: String::new(),
            downgraded: Some("map changed".into()),
            socket: "/s".into(),
            connected: true,
            vmm: None,
            connections: 3,
            last_disconnect: None,
            features_acked: "0x0".into(),
            shmem_region_feature: true,
            region_mapped: true,
            guard: None,
            bad_ranges: vec![
                BadRange {
                    offset: 0,
                    length: 512,
                },
                BadRange {
                    offset: 4096,
                    length: 512,
                },
            ],
            bad_ranges_persist_error: None,
            agent: None,
            services_failed: vec![],
            seccomp: crate::sandbox::SeccompMode::Enforce,
            sandbox_denials: 4,
            health_record: None,
            flush_rate_limit: Some(crate::report::FlushRateLimitStatus {
                ops_per_sec: 100,
                burst: 10,
                throttled: 9,
                throttled_seconds: 2.5,
                holding: false,
            }),
            nvdimm: None,
        }
    }

    fn snapshot(instance: &str) -> MetricsSnapshot {
        let mut buckets = [0; LATENCY_BUCKETS];
        buckets[0] = 1; // < 1 µs
        buckets[5] = 4; // [16, 32) µs
        buckets[11] = 2; // [1024, 2048) µs
        buckets[LATENCY_BUCKETS - 1] = 1; // more than 2^30 µs
        MetricsSnapshot {
            instance: instance.into(),
            status: status(),
            stats: StatsReport {
                flush: StatsSnapshot {
                    flush_requests: 8,
                    batches: 5,
                    syncs: 6,
                    errors: 1,
                    latency_us: LatencySummary {
                        count: 8,
                        mean: 0,
                        p50: 0,
                        p99: 0,
                        max: 0,
                    },
                },
                clients: None,
                queue: QueueCounters {
                    malformed_chains: 2,
                    unsupported_requests: 7,
                    flush_throttled: 9,
                    flush_throttled_us: 2_500_000,
                },
            },
            latency: LatencyBuckets {
                buckets,
                count: 8,
                sum_us: 1_073_745_000,
            },
        }
    }

    use super::prom::{self, Sample};

    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        let e = prom::parse(text);
        (e.samples, e.types)
    }

    fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
        let full = format!("{PREFIX}{name}");
        let found: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == full
                    && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {label:?}: {found:?}");
        found[0].value
    }

    #[test]
    fn every_line_is_valid_and_every_series_has_the_instance() {
        let text = render(&snapshot("/srv/vm 1/pmem.img"));
        let (samples, types) = parse(&text);
        for s in &samples {
            assert_eq!(s.labels["instance"], "/srv/vm 1/pmem.img", "{s:?}");
            let family = types
                .keys()
                .filter(|t| s.name.starts_with(t.as_str()))
                .max_by_key(|t| t.len())
                .unwrap_or_else(|| panic!("no TYPE for {}", s.name));
            if types[family] == "counter" {
                assert!(family.ends_with("_total"), "{family}");
            }
        }
        assert_eq!(value(&samples, "flush_requests_total", None), 8.0);
        assert_eq!(value(&samples, "flush_batches_total", None), 5.0);
        assert_eq!(value(&samples, "syncs_total", None), 6.0);
        assert_eq!(value(&samples, "flush_errors_total", None), 1.0);
        assert_eq!(value(&samples, "malformed_chains_total", None), 2.0);
        assert_eq!(value(&samples, "unsupported_requests_total", None), 7.0);
        assert_eq!(value(&samples, "bad_ranges", None), 2.0);
        assert_eq!(value(&samples, "connections_total", None), 3.0);
        assert_eq!(value(&samples, "connected", None), 1.0);
        assert_eq!(value(&samples, "region_mapped", None), 1.0);
        assert_eq!(value(&samples, "sync_failed", None), 0.0);
        assert_eq!(value(&samples, "sandbox_denials_total", None), 4.0);
        for p in ["direct", "datasync", "fsync", "volatile", "readonly"] {
            let want = if p == "datasync" { 1.0 } else { 0.0 };
            assert_eq!(value(&samples, "policy", Some(("policy", p))), want, "{p}");
        }
        for h in ["healthy", "downgraded", "queue-broken", "failed"] {
            let want = if h == "downgraded" { 1.0 } else { 0.0 };
            assert_eq!(value(&samples, "health", Some(("health", h))), want, "{h}");
        }
        assert_eq!(value(&samples, "backing_file_changed", None), 0.0);
        assert_eq!(value(&samples, "backing_file_changes_total", None), 0.0);
        assert_eq!(value(&samples, "flush_throttled_total", None), 9.0);
        assert_eq!(value(&samples, "flush_throttled_seconds_total", None), 2.5);
        assert_eq!(
            value(&samples, "flush_rate_limit_ops_per_second", None),
            100.0
        );
        assert_eq!(value(&samples, "flush_rate_limit_burst", None), 10.0);
        assert_eq!(types.len(), 22, "{types:?}");
    }

    #[test]
    fn without_a_flush_rate_limit_its_series_are_zero() {
        let mut m = snapshot("i");
        m.status.flush_rate_limit = None;
        m.stats.queue.flush_throttled = 0;
        m.stats.queue.flush_throttled_us = 0;
        let (samples, _) = parse(&render(&m));
        for name in [
            "flush_throttled_total",
            "flush_throttled_seconds_total",
            "flush_rate_limit_ops_per_second",
            "flush_rate_limit_burst",
        ] {
            assert_eq!(value(&samples, name, None), 0.0, "{name}");
        }
    }

    #[test]
    fn a_served_file_changed_under_the_daemon_shows() {
        let mut m = snapshot("i");
        m.status.guard = Some(crate::report::GuardStatus {
            file_problem: Some("the served file was deleted".into()),
            file_change: Some("deleted".into()),
            file_problems: 2,
            ..Default::default()
        });
        let (samples, types) = parse(&render(&m));
        assert_eq!(value(&samples, "backing_file_changed", None), 1.0);
        assert_eq!(value(&samples, "backing_file_changes_total", None), 2.0);
        assert_eq!(
            types[&format!("{PREFIX}backing_file_changes_total")],
            "counter"
        );
    }

    #[test]
    fn the_latency_histogram_is_cumulative_in_seconds_and_ends_in_inf_equal_to_count() {
        let text = render(&snapshot("i"));
        let (samples, types) = parse(&text);
        assert_eq!(
            types[&format!("{PREFIX}flush_latency_seconds")],
            "histogram"
        );
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == format!("{PREFIX}flush_latency_seconds_bucket"))
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, s.value)
            })
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS);
        for w in buckets.windows(2) {
            assert!(w[0].0 < w[1].0, "le increases: {w:?}");
            assert!(w[0].1 <= w[1].1, "cumulative: {w:?}");
        }
        let count = value(&samples, "flush_latency_seconds_count", None);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
        assert_eq!(count, 8.0);
        // The bounds: 2^i µs, in seconds, exactly.
        assert!(
            text.contains("_bucket{instance=\"i\",le=\"0.000001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("le=\"0.000016\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.000032\"} 5\n"), "{text}");
        assert!(text.contains("le=\"0.002048\"} 7\n"), "{text}");
        assert!(text.contains("le=\"1073.741824\"} 7\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 8\n"), "{text}");
        assert_eq!(value(&samples, "flush_latency_seconds_sum", None), 1073.745);
    }

    #[test]
    fn label_values_are_escaped() {
        let nasty = "/a\\b\"c\nd";
        assert_eq!(escape_label(nasty), "/a\\\\b\\\"c\\nd");
        let text = render(&snapshot(nasty));
        let (samples, _) = parse(&text);
        assert!(samples.iter().all(|s| s.labels["instance"] == nasty));
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            samples.len()
        );
    }

    #[test]
    fn a_latched_failure_and_the_health_show() {
        let mut m = snapshot("i");
        m.status.health = Health::Failed;
        m.status.policy = Policy::Direct;
        m.status.sync_failure = Some(SyncFailure {
            errno: 5,
            error: "EIO".into(),
            at: 0,
            context: SyncContext::Flush,
            requests: 1,
        });
        let (samples, _) = parse(&render(&m));
        assert_eq!(value(&samples, "sync_failed", None), 1.0);
        assert_eq!(value(&samples, "health_record_unwritten", None), 0.0);
        m.status.health_record = Some(crate::state::health::HealthRecordStatus {
            persisted: false,
            locations: vec![],
            pending_since: None,
            attempts: 1,
        });
        let (samples, _) = parse(&render(&m));
        assert_eq!(value(&samples, "health_record_unwritten", None), 1.0);
        assert_eq!(value(&samples, "health", Some(("health", "failed"))), 1.0);
        assert_eq!(
            value(&samples, "health", Some(("health", "downgraded"))),
            0.0
        );
        assert_eq!(value(&samples, "policy", Some(("policy", "direct"))), 1.0);
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(1), "0.000001");
        assert_eq!(seconds(1 << 20), "1.048576");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(3_000_000), "3");
    }
}
