// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The flush rate limit (`serve --flush-rate-limit OPS[,BURST]`) on the daemon
//! binary, over its real vhost-user socket: a burst larger than the limit's is
//! delayed, never failed, and `status`, `stats` and the metrics count it; without
//! the limit nothing is. The counts are asserted, not durations (only a lower
//! bound the configured rate implies).
//!
//! Owns: the end-to-end checks of the limit. Never needs root.

use vdp_testkit::daemon;
use vdp_testkit::frontend;
use vdp_testkit::prom;

use std::time::{Duration, Instant};

use daemon::{serve_fails_on, Daemon, Scratch, MIB2};
use frontend::{TestFrontend, VIRTIO_PMEM_REQ_TYPE_FLUSH};
use serde_json::Value;
use vhost_device_pmem::control::{self, Request};

/// VIRTIO_PMEM_RESP_TYPE_OK.
const OK: u32 = 0;

fn daemon(s: &Scratch, extra: &[&str]) -> Daemon {
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let mut args = vec!["--mode", "fsync"];
    args.extend_from_slice(extra);
    Daemon::start(s, "d", &file, &args)
}

fn started(d: &Daemon, event_idx: bool) -> TestFrontend {
    let mut fe = TestFrontend::connect(&d.socket).unwrap_or_else(|e| panic!("{e}"));
    fe.event_idx = event_idx;
    fe.start()
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(
        fe.maps.wait_for(1, frontend::TIMEOUT),
        1,
        "{}",
        d.log_text()
    );
    fe
}

/// The daemon's metrics (the control socket's `metrics`), parsed strictly.
fn metrics(d: &Daemon) -> prom::Exposition {
    let v = control::call(&d.control, &Request::Metrics).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    prom::parse(v["metrics"].as_str().unwrap())
}

fn metric(m: &prom::Exposition, name: &str) -> f64 {
    m.value(&format!("vhost_device_pmem_{name}"), &[])
}

#[test]
fn a_burst_over_the_limit_is_delayed_and_every_flush_answered_ok() {
    // 20 per second in bursts of 4: 16 flushes at once are 4 now and 12 held back,
    // the last one due 12/20 s = 600 ms after the first.
    const OPS: u32 = 20;
    const BURST: usize = 4;
    const N: usize = 16;
    for event_idx in [true, false] {
        let s = Scratch::new();
        let d = daemon(&s, &["--flush-rate-limit", &format!("{OPS},{BURST}")]);
        let st = d.status();
        assert_eq!(st["flush_rate_limit"]["ops_per_sec"], OPS, "{st:#}");
        assert_eq!(st["flush_rate_limit"]["burst"], BURST, "{st:#}");
        assert_eq!(st["flush_rate_limit"]["throttled"], 0, "{st:#}");
        let mut fe = started(&d, event_idx);
        let t0 = Instant::now();
        let statuses = fe
            .flush(N)
            .unwrap_or_else(|e| panic!("event_idx {event_idx}: {e}\n{}", d.log_text()));
        let took = t0.elapsed();
        assert_eq!(statuses, vec![OK; N], "event_idx {event_idx}");
        // A generous lower bound from the rate: the held ones cannot all be
        // answered before (N - BURST - 1) token intervals.
        let floor = Duration::from_millis(1000 * (N - BURST - 1) as u64 / u64::from(OPS));
        assert!(took >= floor, "event_idx {event_idx}: {took:?} < {floor:?}");

        let st = d.status();
        let limit = &st["flush_rate_limit"];
        assert_eq!(limit["throttled"], (N - BURST) as u64, "{st:#}");
        assert!(limit["throttled_seconds"].as_f64().unwrap() > 0.0, "{st:#}");
        assert_eq!(limit["holding"], false, "{st:#}");
        assert_eq!(st["health"], "healthy", "{st:#}");
        let stats = d.stats();
        assert_eq!(stats["flush_requests"], N as u64, "{stats:#}");
        assert_eq!(stats["errors"], 0, "{stats:#}");
        assert_eq!(stats["flush_throttled"], (N - BURST) as u64, "{stats:#}");
        let m = metrics(&d);
        assert_eq!(metric(&m, "flush_throttled_total"), (N - BURST) as f64);
        assert!(metric(&m, "flush_throttled_seconds_total") > 0.0);
        assert_eq!(
            metric(&m, "flush_rate_limit_ops_per_second"),
            f64::from(OPS)
        );
        assert_eq!(metric(&m, "flush_rate_limit_burst"), BURST as f64);
        assert_eq!(metric(&m, "flush_errors_total"), 0.0);
    }
}

#[test]
fn without_a_limit_no_flush_is_throttled() {
    let s = Scratch::new();
    let d = daemon(&s, &[]);
    let mut fe = started(&d, true);
    assert_eq!(fe.flush(16).unwrap(), vec![OK; 16]);
    let st = d.status();
    assert!(st.get("flush_rate_limit").is_none(), "{st:#}");
    assert_eq!(d.stats()["flush_throttled"], 0);
    let m = metrics(&d);
    assert_eq!(metric(&m, "flush_throttled_total"), 0.0);
    assert_eq!(metric(&m, "flush_throttled_seconds_total"), 0.0);
    assert_eq!(metric(&m, "flush_rate_limit_ops_per_second"), 0.0);
}

/// A VMM that stops the ring while flushes are held back gets a base in front of
/// them (they are still the driver's, for the next start), and the daemon serves
/// the next VMM: the limit never wedges the device.
#[test]
fn a_ring_stopped_while_flushes_are_held_gets_a_base_in_front_of_them() {
    let s = Scratch::new();
    // One per second: after the burst of 2 nothing more within the test's time.
    let d = daemon(&s, &["--flush-rate-limit", "1,2"]);
    let mut fe = started(&d, true);
    fe.submit(&[VIRTIO_PMEM_REQ_TYPE_FLUSH; 8]).unwrap();
    let done = fe.wait(2).unwrap();
    assert!(done.iter().all(|c| c.status == OK), "{done:?}");
    let st = d.wait_status("a flush held back", |s| {
        s["flush_rate_limit"]["holding"] == true
    });
    assert_eq!(st["flush_rate_limit"]["throttled"], 0, "{st:#}");
    let base = fe.stop().unwrap();
    // Two taken, or three if a token came in between (a slow machine).
    assert!((2..=3).contains(&base), "base {base}\n{}", d.log_text());
    let st = d.wait_status("nothing held after the stop", |s| {
        s["flush_rate_limit"]["holding"] == false
    });
    assert_eq!(st["health"], "healthy", "{st:#}");
    drop(fe);
    // The next VMM: its flush waits for a token (at most a second), then is OK.
    let mut fe = started(&d, true);
    assert_eq!(fe.flush(1).unwrap(), vec![OK]);
    assert!(!d.log_text().contains("queue-broken"), "{}", d.log_text());
}

#[test]
fn zero_or_nonsense_is_refused_with_exit_status_2() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let sock = s.path("r.sock");
    for bad in ["0", "10,0", "-5", "fast", "10,5,1", "1.5", "2000000"] {
        let (status, log) =
            serve_fails_on(&s, &sock, &file, &[&format!("--flush-rate-limit={bad}")]);
        assert_eq!(status.code(), Some(2), "{bad}: {log}");
        assert!(log.contains("flush rate limit"), "{bad}: {log}");
        assert!(!sock.exists(), "{bad}: bound before refusing");
    }
    for bad in ["0", "\"10,0\"", "\"fast\""] {
        let toml = s.path("bad.toml");
        std::fs::write(&toml, format!("flush-rate-limit = {bad}\n")).unwrap();
        let (status, log) = serve_fails_on(&s, &sock, &file, &["--config", toml.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{bad}: {log}");
        assert!(log.contains("bad.toml"), "{bad}: {log}");
        assert!(log.contains("flush rate limit"), "{bad}: {log}");
    }
}

/// The setting as the daemon took it, for a config file's value.
#[test]
fn the_config_file_key_sets_the_limit() {
    let s = Scratch::new();
    let toml = s.path("limit.toml");
    std::fs::write(&toml, "flush-rate-limit = 50\n").unwrap();
    let d = daemon(&s, &["--config", toml.to_str().unwrap()]);
    let st: Value = d.status();
    assert_eq!(st["flush_rate_limit"]["ops_per_sec"], 50, "{st:#}");
    assert_eq!(st["flush_rate_limit"]["burst"], 50, "{st:#}");
}
