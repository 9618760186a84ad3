// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Flush requests through the real vhost-user socket, against the real daemon binary.
//!
//! One daemon per flush policy (`fsync`, `datasync`, `volatile`), each serving its own
//! fully written, fsynced, 0600 backing file, driven by the QEMU-like frontend of the
//! integration tests (memfd guest RAM, a real split ring, EVENT_IDX). A *round* is: the
//! frontend stores `VDP_BENCH_DIRTY` bytes (default one 4 KiB page) into the mapped
//! region, like a guest writing a record, then puts N flush requests on the ring at
//! once, kicks, and waits until all N are used. Only the flush part is timed.
//!
//! Criterion times rounds (one iteration = one round, `Throughput::Elements(N)`). After
//! it, a plain timing pass of `VDP_BENCH_ROUNDS` rounds (default 2000; 0 skips it) per
//! configuration, the policies taking turns of 50 rounds so they share whatever else
//! the machine is doing, prints a table with requests/s, per-request p50/p99 and the
//! daemon's `stats` (flush requests vs syncs) for that pass. `VDP_BENCH_GAP_US` adds
//! idle time before each timed round of that pass (a guest that does not flush back
//! to back: a file's timestamps then change between flushes, which `fsync` must write).
//!
//! The daemon binary is the one cargo builds for this bench (the test kit's `BIN`: the
//! binary next to the bench's `deps/`; the bench profile puts it in `target/release`).
//! Backing files go under `VDP_BENCH_DIR` (default: cargo's `target/tmp`), so the
//! filesystem measured is the one holding the build tree unless told otherwise.

use std::{
    ffi::CString,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use vdp_testkit::{
    daemon::{Daemon, Scratch},
    frontend::{self, TestFrontend},
};

const POLICIES: [&str; 3] = ["fsync", "datasync", "volatile"];
const IN_FLIGHT: [usize; 3] = [1, 4, 16];
/// Size of each backing file.
const FILE_SIZE: u64 = 8 << 20;
const PAGE: usize = 4096;
/// Rounds run (and not counted) before each configuration of the summary pass.
const WARM_UP_ROUNDS: usize = 50;
/// Rounds one device runs before the next takes its turn, in the summary pass.
const TURN: usize = 50;
/// Untimed rounds at the start of each turn.
const TURN_WARM_UP: usize = 2;

/// A daemon with a started frontend whose region is mapped.
struct Device {
    policy: &'static str,
    reason: String,
    daemon: Daemon,
    fe: TestFrontend,
    /// Bytes stored into the region before each round.
    dirty: Vec<u8>,
    rounds: u64,
}

impl Device {
    fn start(
        sockets: &Scratch,
        files: &Scratch,
        policy: &'static str,
        dirty: usize,
    ) -> Result<Self, String> {
        let file = files.backing_file(&format!("{policy}.img"), FILE_SIZE);
        let daemon = Daemon::try_start(sockets, policy, &file, &["--mode", policy])?;
        let st = daemon.status();
        if st["policy"] != policy {
            return Err(format!("asked for {policy}, the daemon chose {st:#}"));
        }
        let reason = st["policy_reason"].as_str().unwrap_or_default().to_string();
        let fail = |e: std::io::Error| format!("{e}\n{}", daemon.log_text());
        let mut fe = TestFrontend::connect(&daemon.socket).map_err(fail)?;
        fe.start().map_err(fail)?;
        if fe.maps.wait_for(1, frontend::TIMEOUT) != 1 {
            return Err(format!("no SHMEM_MAP request\n{}", daemon.log_text()));
        }
        fe.map_region(0).map_err(fail)?;
        Ok(Self {
            policy,
            reason,
            daemon,
            fe,
            dirty: vec![0; dirty],
            rounds: 0,
        })
    }

    /// One round of `n` flushes in flight; returns its round-trip time.
    fn round(&mut self, n: usize) -> Duration {
        if !self.dirty.is_empty() {
            let stride = self.dirty.len().next_multiple_of(PAGE) as u64;
            let offset = (self.rounds % (FILE_SIZE / stride)) * stride;
            self.dirty.fill(self.rounds as u8 | 1);
            self.fe.write_pmem(offset, &self.dirty).unwrap();
        }
        self.rounds += 1;
        let start = Instant::now();
        let statuses = self
            .fe
            .flush(n)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon.log_text()));
        let rtt = start.elapsed();
        assert!(
            statuses.iter().all(|&s| s == 0),
            "{}: flush failed: {statuses:?}\n{}",
            self.policy,
            self.daemon.log_text()
        );
        rtt
    }

    /// (flush_requests, batches, syncs) from the daemon's `stats`.
    fn counters(&self) -> [u64; 3] {
        let st = self.daemon.stats();
        ["flush_requests", "batches", "syncs"].map(|k| st[k].as_u64().unwrap())
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn bench_dir() -> PathBuf {
    std::env::var_os("VDP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

fn criterion_flush(c: &mut Criterion, devices: &mut [Device]) {
    let mut group = c.benchmark_group("flush");
    // A round is slow enough (up to milliseconds) that every sample should have the
    // same number of rounds rather than criterion's default linear ramp.
    group.sampling_mode(SamplingMode::Flat);
    for dev in devices.iter_mut() {
        for n in IN_FLIGHT {
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(dev.policy, n), &n, |b, &n| {
                b.iter_custom(|iters| (0..iters).map(|_| dev.round(n)).sum())
            });
        }
    }
    group.finish();
}

/// One row of the summary table.
struct Row {
    policy: &'static str,
    n: usize,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Daemon counters during the pass: flush requests, batches, syncs.
    counters: [u64; 3],
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = ((v.len() as f64) * q).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// `rounds` rounds of `n` flushes on every device, the devices taking turns of
/// [`TURN`] rounds, so every policy sees the same background load (the machine may be
/// shared, and a neighbour's I/O moves sync latency tenfold within minutes). Each turn
/// starts with [`TURN_WARM_UP`] untimed rounds: alternating device by device every
/// round left the daemons' threads cold and doubled the volatile round trip.
fn timing_pass(devices: &mut [Device], n: usize, rounds: usize, gap: Duration) -> Vec<Row> {
    for _ in 0..WARM_UP_ROUNDS {
        for dev in devices.iter_mut() {
            dev.round(n);
        }
    }
    let mut rtts = vec![Vec::with_capacity(rounds); devices.len()];
    // The daemon's counters over the timed rounds only.
    let mut counters = vec![[0u64; 3]; devices.len()];
    let mut done = 0;
    while done < rounds {
        let turn = TURN.min(rounds - done);
        for ((dev, rtts), counters) in devices.iter_mut().zip(&mut rtts).zip(&mut counters) {
            for _ in 0..TURN_WARM_UP {
                dev.round(n);
            }
            let before = dev.counters();
            rtts.extend((0..turn).map(|_| {
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                dev.round(n)
            }));
            let after = dev.counters();
            for i in 0..3 {
                counters[i] += after[i] - before[i];
            }
        }
        done += turn;
    }
    devices
        .iter()
        .zip(rtts)
        .zip(counters)
        .map(|((dev, mut rtts), counters)| {
            let total: Duration = rtts.iter().sum();
            rtts.sort_unstable();
            // Every request of a round is completed in the same pass and seen on the
            // same notification, so each request's latency is its round's round trip.
            Row {
                policy: dev.policy,
                n,
                requests_per_s: (n * rounds) as f64 / total.as_secs_f64(),
                p50_us: quantile(&rtts, 0.50).as_secs_f64() * 1e6,
                p99_us: quantile(&rtts, 0.99).as_secs_f64() * 1e6,
                counters,
            }
        })
        .collect()
}

fn table(rows: &[Row], refused: &[(&str, String)]) -> String {
    let mut out = String::new();
    out.push_str(
        "| policy | in flight | requests/s | p50 µs | p99 µs | × fsync | flush requests | batches | syncs | requests/sync |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let ratio = rows
            .iter()
            .find(|f| f.policy == "fsync" && f.n == r.n)
            .map_or("n/a".to_string(), |f| {
                format!("{:.2}", r.requests_per_s / f.requests_per_s)
            });
        let [requests, batches, syncs] = r.counters;
        let per_sync = if syncs == 0 {
            "no syncs".to_string()
        } else {
            format!("{:.1}", requests as f64 / syncs as f64)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} | {:.1} | {ratio} | {requests} | {batches} | {syncs} | {per_sync} |",
            r.policy, r.n, r.requests_per_s, r.p50_us, r.p99_us
        );
    }
    for (policy, why) in refused {
        let why = why.lines().next().unwrap_or_default();
        let _ = writeln!(
            out,
            "| {policy} | – | refused by the daemon: {why} | | | | | | | |"
        );
    }
    out
}

fn first_line_of(path: &str, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or("unknown".to_string(), |v| {
            v.trim_start_matches([' ', '\t', ':']).to_string()
        })
}

/// The filesystem holding `path`: type by statfs magic, and the mount it is on.
fn filesystem(path: &Path) -> String {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs is plain data; valid path and out-pointer for the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    let kind = match st.f_type as u64 {
        0xEF53 => "ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683E => "btrfs".to_string(),
        0x0102_1994 => "tmpfs".to_string(),
        other => format!("statfs magic {other:#x}"),
    };
    // The longest mount point that is a prefix of the path.
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mount = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && canon.starts_with(f[1])).then(|| (f[1].len(), f[0], f[1], f[3]))
        })
        .max_by_key(|m| m.0)
        .map_or(String::new(), |(_, dev, at, opts)| {
            format!(" ({dev} on {at}, {opts})")
        });
    format!("{kind}{mount}")
}

/// The 1, 5 and 15 minute load averages: how busy the machine was besides us.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine(dir: &Path) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "nproc {nproc}; CPU {}; kernel {}; bench files in {} on {}",
        first_line_of("/proc/cpuinfo", "model name"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        dir.display(),
        filesystem(dir)
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; without it (cargo test --benches) criterion runs
    // each benchmark once as a test, and the summary pass only checks that it works.
    let measuring = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let listing = args.iter().any(|a| a == "--list");
    let rounds = if measuring {
        env_or("VDP_BENCH_ROUNDS", 2000usize)
    } else {
        5
    };
    let dirty = env_or("VDP_BENCH_DIRTY", PAGE);
    let gap = Duration::from_micros(env_or("VDP_BENCH_GAP_US", 0));
    assert!(
        dirty as u64 <= FILE_SIZE,
        "VDP_BENCH_DIRTY exceeds the file"
    );

    let dir = bench_dir();
    std::fs::create_dir_all(&dir).unwrap();
    // Sockets under the system temporary directory (short paths), files under `dir`.
    let sockets = Scratch::new();
    let files = Scratch::new_in(&dir);
    let mut devices = Vec::new();
    let mut refused = Vec::new();
    for policy in POLICIES {
        match Device::start(&sockets, &files, policy, dirty) {
            Ok(d) => devices.push(d),
            Err(why) => {
                eprintln!("\n******** SKIPPED policy {policy}: {why} ********\n");
                refused.push((policy, why));
            }
        }
    }

    // Defaults sized for a 2-core machine; command-line flags (after `--`) win.
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
        .configure_from_args();
    criterion_flush(&mut c, &mut devices);
    c.final_summary();
    if listing || rounds == 0 {
        return;
    }

    let load_before = load_average();
    let mut rows: Vec<Row> = IN_FLIGHT
        .into_iter()
        .flat_map(|n| timing_pass(&mut devices, n, rounds, gap))
        .collect();
    rows.sort_by_key(|r| (POLICIES.iter().position(|&p| p == r.policy), r.n));
    println!("\n## Flush through the vhost-user socket: summary pass\n");
    println!("{}", machine(&dir));
    println!(
        "{rounds} timed rounds per configuration (after {WARM_UP_ROUNDS} warm-up rounds), \
         the policies taking turns of {TURN} rounds, each turn after {TURN_WARM_UP} \
         untimed ones; {dirty} byte(s) stored into the region before each round (not \
         timed)"
    );
    if !gap.is_zero() {
        println!("{gap:?} of idle time before each timed round (VDP_BENCH_GAP_US)");
    }
    println!(
        "load average before the pass {load_before}, after {}",
        load_average()
    );
    for dev in &devices {
        println!("{}: {}", dev.policy, dev.reason);
    }
    println!();
    print!("{}", table(&rows, &refused));
}
