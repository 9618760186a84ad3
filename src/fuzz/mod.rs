// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property-based fuzzing on stable Rust (proptest): the one case budget, seed and
//! per-case hang watchdog every fuzz target here runs under, and the targets.
//!
//! Owns: `VDP_FUZZ_CASES` (default 10 000), `VDP_FUZZ_SEED` and the watchdog that
//! aborts the test binary when one case runs longer than `VDP_FUZZ_CASE_SECS`.
//! Never part of the daemon: compiled only for `cargo test`.

mod badblocks;
mod config;
mod lines;
mod queue;

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner},
};

/// Cases per target when `VDP_FUZZ_CASES` is not set (what CI runs).
pub const DEFAULT_CASES: u32 = 10_000;

/// Longest one case may take before it counts as a hang, when
/// `VDP_FUZZ_CASE_SECS` is not set.
pub const DEFAULT_CASE_SECS: u64 = 20;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// The case budget of every target: `VDP_FUZZ_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    env_u64("VDP_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n.min(u64::from(u32::MAX)) as u32)
}

/// The seed: `VDP_FUZZ_SEED` reproduces a run; otherwise a fresh one each run.
pub fn seed() -> u64 {
    env_u64("VDP_FUZZ_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

/// Aborts the process when a case runs longer than the limit: a hang fails the test
/// binary instead of stalling it. One thread per target run.
struct Watchdog {
    /// Milliseconds since `epoch` at which the running case started; 0: idle.
    started: Arc<AtomicU64>,
    case: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicU64>,
}

impl Watchdog {
    fn start(name: &'static str, seed: u64, limit: Duration) -> Self {
        let started = Arc::new(AtomicU64::new(0));
        let case = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let (s, c, st) = (started.clone(), case.clone(), stop.clone());
        std::thread::spawn(move || {
            while st.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(50));
                let t = s.load(Ordering::Relaxed);
                if t != 0 && epoch.elapsed().as_millis() as u64 > t + limit.as_millis() as u64 {
                    eprintln!(
                        "fuzz {name}: case {} ran longer than {limit:?}: a hang; reproduce with VDP_FUZZ_SEED={seed}",
                        c.load(Ordering::Relaxed)
                    );
                    std::process::abort();
                }
            }
        });
        Self {
            started,
            case,
            epoch,
            stop,
        }
    }

    fn enter(&self) {
        self.case.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        self.started.store(now.max(1), Ordering::Relaxed);
    }

    fn leave(&self) {
        self.started.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::Relaxed);
    }
}

/// What one target run measured (printed; `--nocapture` shows it).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct Report {
    pub cases: u32,
    pub elapsed: Duration,
    pub slowest_case: Duration,
}

/// Runs `test` on `cases()` values of `strategy` with the shared seed and the hang
/// watchdog; panics (failing the test) with the minimal failing value and the seed.
pub fn run<S>(name: &'static str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let (cases, seed) = (cases(), seed());
    let limit = Duration::from_secs(env_u64("VDP_FUZZ_CASE_SECS").unwrap_or(DEFAULT_CASE_SECS));
    eprintln!("fuzz {name}: {cases} cases, VDP_FUZZ_SEED={seed}");
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // Reproduction is by seed; nothing is written into the source tree.
        failure_persistence: None,
        max_shrink_iters: 10_000,
        // Targets that discard unlikely combinations must not abort on long runs.
        max_global_rejects: cases.max(1024),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let dog = Watchdog::start(name, seed, limit);
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let t0 = Instant::now();
    let result = runner.run(&strategy, |value| {
        dog.enter();
        let t = Instant::now();
        let r = test(value);
        slowest.set(slowest.get().max(t.elapsed()));
        dog.leave();
        r
    });
    let report = Report {
        cases,
        elapsed: t0.elapsed(),
        slowest_case: slowest.get(),
    };
    match result {
        Ok(()) => eprintln!("fuzz {name}: {report:?}"),
        Err(TestError::Fail(why, value)) => panic!(
            "fuzz {name}: property failed: {why}\nminimal input: {value:#?}\nreproduce with VDP_FUZZ_SEED={seed}"
        ),
        Err(TestError::Abort(why)) => panic!("fuzz {name}: aborted: {why} (VDP_FUZZ_SEED={seed})"),
    }
}

/// A small deterministic generator for bulk bytes (guest memory, line noise): a
/// proptest value per byte would make a case cost milliseconds in a debug build.
pub struct Fill(u64);

impl Fill {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn the_budget_and_seed_come_from_the_environment_or_the_defaults() {
    // Only reads: the variables may be set by whoever runs the tests.
    match std::env::var("VDP_FUZZ_CASES") {
        Ok(v) => assert_eq!(cases().to_string(), v.trim()),
        Err(_) => assert_eq!(cases(), DEFAULT_CASES),
    }
    if let Ok(v) = std::env::var("VDP_FUZZ_SEED") {
        assert_eq!(seed().to_string(), v.trim());
    }
}
