// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The nested lab as a benchmark: host work per guest flush on a DAX host. One L1
//! boot (the test kit's `guest::nested` rig, ext4 `-o dax` on an emulated NVDIMM)
//! runs one L2 with four backends (QEMU's own virtio-pmem, this daemon `direct` and
//! `fsync`, an NVDIMM); L2 runs a fsync loop of 4 KiB writes against each in turn,
//! and L1 counts each phase's host work (sync syscalls under strace, jbd2 commits,
//! CPU time). `benches/dax-host.sh` runs it and documents the knobs.
//!
//! Owns: the benchmark's boots, phases and table. Never asserts a figure: it
//! measures. `in_l1_bench` and `in_l2_bench` are `#[ignore]`d: they run only inside
//! the VMs that run them.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;
use vdp_testkit::daemon::Daemon;
use vdp_testkit::guest::{
    env::num_or,
    fsdax_convert,
    in_vm::{SyncMapping, SYNC_CALLS},
    nested::{console_json, env_var, l1_rig, say, L1_MOUNT, L1_TIMEOUT, L2_TIMEOUT},
    records::RECORD,
    GuestEnv,
};
use vhost_device_pmem::blockmap::prepare::{self, Progress};

/// The benchmark's backends, each a file of its own size on L1's DAX filesystem
/// (L2 tells its devices apart by size).
const BENCH_BACKENDS: [(&str, u64); 4] = [
    // QEMU's own virtio-pmem-pci: an fsync of the file per flush request.
    ("builtin", 48 << 20),
    // This daemon, --mode direct: flushes answered without a syscall. (The daemon's
    // sizes are powers of two: QEMU makes them a PCI BAR.)
    ("direct", 32 << 20),
    // This daemon, --mode fsync: the control, one fsync per batch of flushes.
    ("fsync", 16 << 20),
    // An NVDIMM (pmem=on, MAP_SYNC): the guest flushes cache lines itself.
    ("nvdimm", 64 << 20),
];
/// Pages each backend's bench file has (ops cycle over them).
const BENCH_PAGES: u64 = 256;

/// Guest fsync loop of 4 KiB writes (cache-line write-backs and a fence on the
/// NVDIMM) against the four backends of [`BENCH_BACKENDS`] in one L2 boot, rounds
/// alternating the order; L1 counts the host work of each phase. `benches/dax-host.sh`
/// runs it and documents the knobs (VDP_BENCH_ROUNDS, VDP_BENCH_OPS).
#[test]
#[ignore = "a benchmark (one nested boot of several minutes): benches/dax-host.sh runs it"]
fn bench_dax_host() {
    let Some(env) = GuestEnv::load("bench_dax_host") else {
        return;
    };
    let (rounds, ops) = (num_or("VDP_BENCH_ROUNDS", 3), num_or("VDP_BENCH_OPS", 200));
    let dir = tempfile::tempdir().unwrap();
    let env_line = format!("VDP_BENCH_ROUNDS={rounds} VDP_BENCH_OPS={ops}");
    let (nvdimm, script, boot) = l1_rig(
        &env,
        "nested_bench",
        dir.path(),
        "ext4",
        &bench_l2_script(rounds, ops),
        "in_l1_bench",
        &env_line,
    );
    let started = Instant::now();
    let mut guest = env.boot_lab_with(dir.path(), &nvdimm, &script, &boot, "2G");
    let rc = guest.finish(L1_TIMEOUT + Duration::from_secs(60 * rounds * ops / 100));
    if rc != 0 {
        guest.dump();
        panic!("the benchmark's L1 failed with {rc}");
    }
    let result = console_json(&guest, "VDP-BENCH-RESULT ");
    let phases: Vec<Phase> = serde_json::from_value(result["phases"].clone()).unwrap();
    let table = bench_table(&phases);
    let _ = writeln!(
        std::io::stderr(),
        "\nDAX host benchmark: nested TCG (L1 ext4 -o dax on an emulated NVDIMM, L2 \
         guest fsync loop, 4 KiB), {rounds} rounds x {ops} ops, {:.0} s\n\n{table}\n\
         VDP-BENCH-RAW {result}",
        started.elapsed().as_secs_f64()
    );
}

/// L2's /test.sh for the benchmark: finds each backend's region by its size,
/// turns the NVDIMM's into fsdax, DAX-mounts all four on /mnt/NAME, runs
/// [`in_l2_bench`].
fn bench_l2_script(rounds: u64, ops: u64) -> String {
    let (_, nv_size) = BENCH_BACKENDS[3];
    let fsdax = fsdax_convert("$nv");
    let mounts: String = BENCH_BACKENDS
        .iter()
        .map(|(name, size)| format!("mnt {name} {size}\n"))
        .collect();
    format!(
        r#"
export PATH=/usr/bin:/bin:/sbin
nd=/sys/bus/nd/devices
region_of() {{ for r in $nd/region*; do [ "$(cat $r/size)" = "$1" ] && echo ${{r##*region}}; done; }}
i=0; while [ "$(ls -d $nd/region* 2>/dev/null | wc -l)" -lt 4 ]; do
  i=$((i + 1)); [ $i -gt 1200 ] && exit 30; sleep 0.1
done
nv=$(region_of {nv_size})
[ -n "$nv" ] || exit 31
{fsdax}
mnt() {{
  n=$(region_of $2); [ -n "$n" ] || exit 31
  mkdir -p /mnt/$1
  /usr/bin/mkfs.ext4 -q -F -b 4096 /dev/pmem$n || exit 32
  mount -o dax /dev/pmem$n /mnt/$1 || exit 33
  echo "VDP-BENCH-DEV $1 pmem$n"
}}
{mounts}
VDP_BENCH_ROUNDS={rounds} VDP_BENCH_OPS={ops} /vdp/nested_bench --exact in_l2_bench --ignored \
  --nocapture --test-threads=1 || exit 34
"#
    )
}

/// Runs in L2: per round, each backend in turn (the order rotated every round):
/// `ops` writes of 4 KiB, each followed by fsync (the NVDIMM: by cache-line
/// write-backs and a fence through a MAP_SYNC mapping).
#[test]
#[ignore = "runs only inside the nested lab's guest (bench_dax_host runs it there)"]
fn in_l2_bench() {
    let num = |k: &str| -> u64 {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k}: in_l2_bench runs only in the nested lab's guest"))
            .parse()
            .unwrap()
    };
    let (rounds, ops) = (num("VDP_BENCH_ROUNDS"), num("VDP_BENCH_OPS"));
    let page = vec![0x5au8; RECORD];
    let files: Vec<(&str, File)> = BENCH_BACKENDS
        .iter()
        .map(|(name, _)| {
            let path = Path::new("/mnt").join(name).join("bench");
            prepare::prepare(&path, Some(BENCH_PAGES * RECORD as u64), Progress::Quiet)
                .unwrap_or_else(|e| panic!("prepare {}: {e}", path.display()));
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            (*name, f)
        })
        .collect();
    let len = (BENCH_PAGES * RECORD as u64) as usize;
    let nv_map = SyncMapping::new(&files[3].1, len).expect("MAP_SYNC on the NVDIMM");
    for round in 0..rounds {
        for k in 0..files.len() {
            let (name, file) = &files[(k + round as usize) % files.len()];
            say(&format!("VDP-BENCH-START {name} {round}"));
            // L1 samples its counters when it reads the line above.
            std::thread::sleep(Duration::from_millis(1500));
            let t = Instant::now();
            for op in 0..ops {
                let at = (op % BENCH_PAGES) as usize * RECORD;
                if *name == "nvdimm" {
                    nv_map.write(at, &page);
                    for line in (0..RECORD).step_by(64) {
                        // SAFETY: a cache-line write-back inside our live mapping.
                        unsafe {
                            core::arch::x86_64::_mm_clflush(
                                (nv_map.addr() + at + line) as *const u8,
                            )
                        };
                    }
                    // SAFETY: a store fence; no memory is touched.
                    unsafe { core::arch::x86_64::_mm_sfence() };
                } else {
                    file.write_all_at(&page, at as u64).unwrap();
                    file.sync_all().unwrap();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            say(&format!("VDP-BENCH-END {name} {round} {ops} {secs:.6}"));
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    say("VDP-BENCH-DONE");
}

/// One benchmark phase: a backend's ops in one round, with L1's counters.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Phase {
    backend: String,
    round: u64,
    ops: u64,
    /// As L2 timed them.
    secs: f64,
    /// L1's wall clock at the phase's start and end markers.
    start: f64,
    end: f64,
    /// Sync syscalls (fsync, fdatasync, msync, sync_file_range, syncfs) in L1 during
    /// the phase: by QEMU, by the daemons.
    syncs_qemu: u64,
    syncs_daemons: u64,
    /// Time spent inside those syscalls (strace -T), seconds.
    sync_secs: f64,
    /// ext4 journal commits of L1's DAX filesystem during the phase.
    commits: u64,
    /// CPU time of the two daemons during the phase, seconds.
    daemon_cpu_secs: f64,
}

/// L1's wall clock, seconds (strace -ttt's clock).
fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// ext4 journal transactions so far on L1's /dev/pmem0.
fn jbd2_commits() -> u64 {
    let text = fs::read_to_string("/proc/fs/jbd2/pmem0-8/info").unwrap_or_default();
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of process `pid`, seconds (100 Hz ticks).
fn cpu_secs(pid: u32) -> f64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 14th
    // and 15th of the whole line.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Sync syscalls in an `strace -f -ttt -T` output: (time, seconds inside).
fn strace_syncs(path: &Path) -> Vec<(f64, f64)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        // "1700000000.123456 fsync(12) = 0 <0.000123>", with "[pid N] " in front
        // on a terminal and "N " in a file (-o) once several processes are traced.
        let line = line
            .strip_prefix("[pid")
            .map_or(line, |r| r.split_once(']').map_or(r, |(_, rest)| rest));
        let mut words = line.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.parse::<u32>().is_ok()) {
            words.next();
        }
        let (Some(t), Some(call)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        let name = call.split('(').next().unwrap_or("");
        if !SYNC_CALLS.contains(&name) {
            continue;
        }
        let secs = line
            .rsplit_once('<')
            .and_then(|(_, d)| d.trim_end_matches('>').parse().ok())
            .unwrap_or(0.0);
        out.push((t, secs));
    }
    out
}

#[test]
fn strace_lines_with_and_without_pids_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.strace");
    fs::write(
        &path,
        "812 1795745178.700001 fsync(12) = 0 <0.000250>\n\
         [pid   813] 1795745178.800002 fdatasync(9) = 0 <0.000100>\n\
         1795745178.900003 msync(0x7f00, 4096, MS_SYNC) = 0 <0.000050>\n\
         812 1795745179.000004 write(3, \"x\", 1) = 1 <0.000010>\n\
         812 1795745179.100005 +++ exited with 0 +++\n",
    )
    .unwrap();
    let got = strace_syncs(&path);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!((got[0].0 - 1_795_745_178.700_001).abs() < 1e-6 && (got[0].1 - 0.00025).abs() < 1e-9);
    assert!((got[2].1 - 0.00005).abs() < 1e-9);
}

/// Runs in L1 for the benchmark: prepares the four files, starts the two daemons
/// (strace attached), boots L2 under strace (its sync syscalls only, through a
/// seccomp filter: the vCPU threads run at full speed), samples the counters at
/// each phase marker and prints `VDP-BENCH-RESULT`.
#[test]
#[ignore = "runs only inside the nested lab VM (bench_dax_host runs it there)"]
fn in_l1_bench() {
    let daemon_bin = PathBuf::from(env_var("VDP_NESTED_DAEMON"));
    let strace = PathBuf::from(env_var("VDP_NESTED_STRACE"));
    let env = GuestEnv::load("in_l1_bench").expect("the L2 environment in /l2");
    let lab = Path::new(L1_MOUNT);
    let file = |name: &str| lab.join(format!("{name}.img"));
    for (name, size) in BENCH_BACKENDS {
        let out = Command::new(&daemon_bin)
            .arg("prepare")
            .arg(file(name))
            .arg("--size")
            .arg(size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "prepare {name}: {out:?}");
    }
    let scratch = tempfile::tempdir().unwrap();
    let direct = Daemon::in_vm(
        &daemon_bin,
        &file("direct"),
        scratch.path(),
        "direct",
        &["--mode", "direct"],
    );
    let fsync = Daemon::in_vm(
        &daemon_bin,
        &file("fsync"),
        scratch.path(),
        "fsync",
        &["--mode", "fsync"],
    );
    assert_eq!(direct.status()["policy"], "direct");
    assert_eq!(fsync.status()["policy"], "fsync");
    let trace = format!("trace={}", SYNC_CALLS.join(","));
    let d_trace = scratch.path().join("daemons.strace");
    let mut d_strace = Command::new(&strace)
        .args(["-f", "-ttt", "-T", "-e", &trace, "-o"])
        .arg(&d_trace)
        .args([
            "-p",
            &direct.pid().to_string(),
            "-p",
            &fsync.pid().to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let q_trace = scratch.path().join("qemu.strace");
    let (builtin_size, nv_size) = (BENCH_BACKENDS[0].1, BENCH_BACKENDS[3].1);
    let mut args: Vec<String> = vec![
        "-object".into(),
        "memory-backend-memfd,id=mem,size=512M,share=on".into(),
        "-m".into(),
        "512M,slots=4,maxmem=4G".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id=builtin,share=on,mem-path={},size={builtin_size}",
            file("builtin").display()
        ),
        "-device".into(),
        "virtio-pmem-pci,memdev=builtin,id=builtin0".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id=nv,share=on,pmem=on,align=2M,mem-path={},size={nv_size}",
            file("nvdimm").display()
        ),
        "-device".into(),
        "nvdimm,memdev=nv,id=nv0".into(),
    ];
    for (i, d) in [&direct, &fsync].iter().enumerate() {
        args.extend([
            "-chardev".into(),
            format!("socket,id=vu{i},path={}", d.socket.display()),
            "-device".into(),
            format!(
                "vhost-user-test-device-pci,chardev=vu{i},virtio-id=27,num_vqs=1,config_size=16"
            ),
        ]);
    }
    let wrapper: Vec<String> = vec![
        strace.display().to_string(),
        "-f".into(),
        "--seccomp-bpf".into(),
        "-ttt".into(),
        "-T".into(),
        "-e".into(),
        trace.clone(),
        "-o".into(),
        q_trace.display().to_string(),
    ];
    let mut l2 = env.boot_initrd_under(
        scratch.path(),
        &env.initramfs,
        "memory-backend=mem,nvdimm=on",
        &args,
        &wrapper,
    );
    let daemon_cpu = || cpu_secs(direct.pid()) + cpu_secs(fsync.pid());
    let mut phases: Vec<Phase> = Vec::new();
    let mut open: Option<(Phase, u64, f64)> = None;
    let deadline = Instant::now() + L2_TIMEOUT * 4;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = l2.next_line(left) else {
            l2.dump();
            panic!("L2 never finished the benchmark");
        };
        let Some(at) = line.find("VDP-") else {
            // Every other line of L2's console too, so that a boot that stalls
            // leaves what L2 last said in the run's log.
            say(&format!("L2: {line}"));
            continue;
        };
        let marker = &line[at..];
        say(&format!("VDP-L2 {marker}"));
        let words: Vec<&str> = marker.split_whitespace().collect();
        match words.first().copied() {
            Some("VDP-BENCH-START") => {
                let phase = Phase {
                    backend: words[1].into(),
                    round: words[2].parse().unwrap(),
                    start: wall(),
                    ..Phase::default()
                };
                open = Some((phase, jbd2_commits(), daemon_cpu()));
            }
            Some("VDP-BENCH-END") => {
                let (mut phase, commits, cpu) = open.take().expect("END without START");
                phase.end = wall();
                phase.commits = jbd2_commits() - commits;
                phase.daemon_cpu_secs = daemon_cpu() - cpu;
                phase.ops = words[3].parse().unwrap();
                phase.secs = words[4].parse().unwrap();
                phases.push(phase);
            }
            Some("VDP-BENCH-DONE") => break,
            _ => {}
        }
    }
    let rc = l2.finish(L2_TIMEOUT);
    assert_eq!(rc, 0, "L2's benchmark script failed");
    // SAFETY: kill(2) on our own child: strace detaches and writes what it has.
    unsafe { libc::kill(d_strace.id() as i32, libc::SIGINT) };
    let _ = d_strace.wait();
    let (q, d) = (strace_syncs(&q_trace), strace_syncs(&d_trace));
    for p in &mut phases {
        let inside = |v: &[(f64, f64)]| -> (u64, f64) {
            v.iter()
                .filter(|(t, _)| *t >= p.start && *t <= p.end)
                .fold((0, 0.0), |(n, s), (_, d)| (n + 1, s + d))
        };
        let ((nq, sq), (nd, sd)) = (inside(&q), inside(&d));
        p.syncs_qemu = nq;
        p.syncs_daemons = nd;
        p.sync_secs = sq + sd;
    }
    say(&format!(
        "VDP-BENCH-RESULT {}",
        json!({"phases": phases, "qemu_syncs_total": q.len(), "daemon_syncs_total": d.len()})
    ));
}

/// The benchmark's table: per backend, the guest's rate (median of the rounds,
/// min-max), the median of the per-round ratios to the built-in device, and the
/// host work per guest fsync.
fn bench_table(phases: &[Phase]) -> String {
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let rate = |p: &Phase| p.ops as f64 / p.secs;
    let of = |b: &str| -> Vec<&Phase> { phases.iter().filter(|p| p.backend == b).collect() };
    let builtin: BTreeMap<u64, f64> = of("builtin").iter().map(|p| (p.round, rate(p))).collect();
    let mut t = String::from(
        "| backend | guest fsyncs/s median (min-max) | ratio to builtin (per-round median) | \
         sync syscalls per guest fsync (QEMU + daemon) | time in sync syscalls per guest fsync | \
         L1 journal commits per guest fsync | daemon CPU per guest fsync |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, _) in BENCH_BACKENDS {
        let ps = of(name);
        let rates: Vec<f64> = ps.iter().map(|p| rate(p)).collect();
        let ratios: Vec<f64> = ps
            .iter()
            .filter_map(|p| builtin.get(&p.round).map(|b| rate(p) / b))
            .collect();
        let ops: u64 = ps.iter().map(|p| p.ops).sum();
        let per = |x: f64| x / ops.max(1) as f64;
        let syncs_q: u64 = ps.iter().map(|p| p.syncs_qemu).sum();
        let syncs_d: u64 = ps.iter().map(|p| p.syncs_daemons).sum();
        let sync_secs: f64 = ps.iter().map(|p| p.sync_secs).sum();
        let commits: u64 = ps.iter().map(|p| p.commits).sum();
        let cpu: f64 = ps.iter().map(|p| p.daemon_cpu_secs).sum();
        let (lo, hi) = rates.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        t += &format!(
            "| {name} | {:.1} ({lo:.1}-{hi:.1}) | {:.2}x (rounds: {}) | {:.2} ({:.2} + {:.2}) | {:.3} ms | {:.2} | {:.3} ms |\n",
            median(rates.clone()),
            median(ratios.clone()),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
            per((syncs_q + syncs_d) as f64),
            per(syncs_q as f64),
            per(syncs_d as f64),
            per(sync_secs) * 1e3,
            per(commits as f64),
            per(cpu) * 1e3,
        );
    }
    t
}
