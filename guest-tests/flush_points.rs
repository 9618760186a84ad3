// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every flush point of the VM that plays the host: its data disk sits under
//! dm-log-writes, and after the run every point where an acknowledgement was
//! marked is replayed and checked; and the checker itself, on synthetic logs,
//! without a VM. Part of the `power_cut` target (`/vdp/power-cut` in the VM runs
//! `inside_the_host_vm` of the crate root).
//!
//! Owns: the replay layout and its checks. Never calls a record safe unless it was
//! read back from the replayed device.

use super::*;

/// Where the records sit on the data device: the served file's extents as the VM
/// printed them.
struct Layout {
    /// Device byte offset of record i.
    offsets: Vec<u64>,
    /// Device block (offset / RECORD) to record index.
    by_block: HashMap<u64, usize>,
}

impl Layout {
    fn new(extents: &[Extent], records: u64) -> Result<Self, String> {
        let mut offsets = Vec::new();
        for i in 0..records {
            let logical = i * RECORD as u64;
            let e = extents
                .iter()
                .find(|e| e.logical <= logical && logical + RECORD as u64 <= e.logical + e.length)
                .ok_or_else(|| format!("no extent holds record {i} (file offset {logical})"))?;
            let physical = e.physical + (logical - e.logical);
            if physical % RECORD as u64 != 0 {
                return Err(format!("record {i} at unaligned device offset {physical}"));
            }
            offsets.push(physical);
        }
        let by_block = offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| (o / RECORD as u64, i))
            .collect();
        Ok(Self { offsets, by_block })
    }

    /// Records a written byte range touches.
    fn touched(&self, range: &Range<u64>) -> Vec<usize> {
        let first = range.start / RECORD as u64;
        let last = range.end.div_ceil(RECORD as u64);
        (first..last)
            .filter_map(|b| self.by_block.get(&b).copied())
            .collect()
    }
}

/// What the replay found.
#[derive(Debug, Default)]
struct ReplayReport {
    entries: u64,
    flush_points: u64,
    /// Flush points at which at least one record was acknowledged.
    flush_points_with_acks: u64,
    marks: u64,
    /// Crash points (flush points and marks) where an acknowledged record was not
    /// intact.
    failed_points: u64,
    first_failure: Option<String>,
    fs_checks: u64,
    fs_failures: u64,
    first_fs_failure: Option<String>,
    acked: u64,
}

/// Replays `log_bytes` onto `image` (the data device as it was before the log
/// started) and checks, at every flush point and mark, that every record
/// acknowledged so far (marks `ack-N`) is intact. `fs_check`, called at every
/// [`FS_SAMPLE_EVERY`]th flush point with acknowledged records and at the last flush
/// point, gets the replayed disk and the acknowledged count and says whether the
/// records read through the repaired filesystem.
fn check_log(
    log_bytes: &[u8],
    image: &mut [u8],
    layout: &Layout,
    nonce: u64,
    mut fs_check: impl FnMut(&[u8], u64) -> Result<(), String>,
) -> Result<ReplayReport, String> {
    let log = logwrites::parse(log_bytes)?;
    let expected: Vec<Vec<u8>> = (0..layout.offsets.len() as u64)
        .map(|i| record(nonce, i))
        .collect();
    let state = |img: &[u8], i: usize| {
        let at = layout.offsets[i] as usize;
        classify(&img[at..at + RECORD], &expected[i])
    };
    let mut intact: Vec<bool> = (0..expected.len())
        .map(|i| state(image, i) == Found::Intact)
        .collect();
    let last_flush = log
        .entries
        .iter()
        .rev()
        .find(|e| e.mark.is_none() && e.is_flush_point())
        .map(|e| e.index);
    let mut r = ReplayReport {
        entries: log.entries.len() as u64,
        ..Default::default()
    };
    let mut acked = 0u64;
    let outcome = logwrites::replay(log_bytes, &log, image, |point, img, changed| {
        for range in changed {
            for i in layout.touched(range) {
                intact[i] = state(img, i) == Found::Intact;
            }
        }
        let what = match &point {
            logwrites::Point::Mark(m) => {
                r.marks += 1;
                if let Some(n) = m.strip_prefix("ack-") {
                    let n: u64 = n.parse().map_err(|_| format!("bad mark {m:?}"))?;
                    if n != acked {
                        return Err(format!("mark {m:?} after {acked} acknowledgements"));
                    }
                    acked = n + 1;
                }
                format!("mark {m:?}")
            }
            logwrites::Point::Flush(e) => {
                r.flush_points += 1;
                if acked > 0 {
                    r.flush_points_with_acks += 1;
                }
                format!(
                    "flush point at log entry {} (flags {:#x})",
                    e.index, e.flags
                )
            }
        };
        if let Some(i) = (0..acked as usize).find(|&i| !intact[i]) {
            r.failed_points += 1;
            if r.first_failure.is_none() {
                let lost = (0..acked as usize).filter(|&i| !intact[i]).count();
                r.first_failure = Some(format!(
                    "at the {what}: {lost} of {acked} acknowledged records not on the disk, \
                     first record {i} ({:?})",
                    state(img, i)
                ));
            }
        }
        if let logwrites::Point::Flush(e) = point {
            let sample = acked > 0 && r.flush_points_with_acks % FS_SAMPLE_EVERY == 1;
            if sample || Some(e.index) == last_flush {
                r.fs_checks += 1;
                if let Err(msg) = fs_check(img, acked) {
                    r.fs_failures += 1;
                    if r.first_fs_failure.is_none() {
                        r.first_fs_failure = Some(format!("at the {what}: {msg}"));
                    }
                }
            }
        }
        Ok::<(), String>(())
    });
    match outcome {
        Ok(()) => {}
        Err(logwrites::ReplayError::Log(m)) | Err(logwrites::ReplayError::Check(m)) => {
            return Err(m)
        }
    }
    r.acked = acked;
    Ok(r)
}

/// Every flush point of a real run: the VM's disk under dm-log-writes, a mark after
/// each acknowledgement, the log replayed and checked here.
#[test]
fn log_writes_every_flush_point() {
    let Some(env) = GuestEnv::load("log_writes_every_flush_point") else {
        return;
    };
    let records = num_or("VDP_LOG_WRITES_RECORDS", 2000);
    assert!(records >= 1, "VDP_LOG_WRITES_RECORDS must be at least 1");
    let mode = std::env::var("VDP_LOG_WRITES_MODE").unwrap_or_else(|_| "datasync".into());
    let negative = mode == "volatile";
    let nonce = splitmix(seed());
    let bins = Binaries::build();
    let dir = tempfile::tempdir().unwrap();
    let (data, logdev) = (dir.path().join("data.img"), dir.path().join("log.img"));
    File::create(&data).unwrap().set_len(DISK_SIZE).unwrap();
    File::create(&logdev)
        .unwrap()
        .set_len(LOG_DISK_SIZE)
        .unwrap();
    let boot = bins.boot(&["mkfs.ext4", "dmsetup"], &[&data, &logdev]);
    let script = format!(
        r#"export PATH=/usr/bin:/bin:/sbin
export DM_DISABLE_UDEV=1
{}sectors=$(cat /sys/block/vda/size)
/usr/bin/dmsetup --noudevsync create lw --table "0 $sectors log-writes /dev/vda /dev/vdb" || exit 30
[ -b /dev/mapper/lw ] || exit 30
{}
{}
rc=$?
umount /mnt/host || exit 24
/usr/bin/dmsetup --noudevsync remove lw || exit 31
sync
exit $rc
"#,
        wait_for_disks(&["/dev/vda", "/dev/vdb"]),
        host_setup("/dev/mapper/lw"),
        inside_cmd(
            &mode,
            records,
            nonce,
            "VDP_PC_MARK_DEVICE=lw VDP_PC_DMSETUP=/usr/bin/dmsetup"
        )
    );
    let started = Instant::now();
    let mut guest = env.boot_vm(dir.path(), &script, &boot);
    let rc = guest.finish(BOOT_TIMEOUT);
    let boot_time = started.elapsed();
    if rc != 0 {
        guest.dump();
        panic!("the VM's script failed with {rc} (20 no disk, 21 mkfs, 22 mount, 23 prepare, 24 umount, 30 dmsetup create, 31 dmsetup remove, else the test inside)");
    }
    let acks = console_numbers(&guest, "VDP-ACK ");
    assert_eq!(acks, (0..records).collect::<Vec<_>>(), "acknowledgements");
    let inside = console_value(&guest, "VDP-INSIDE-DONE ").unwrap_or_default();
    let extents: Vec<[u64; 3]> = serde_json::from_str(
        &console_value(&guest, "VDP-EXTENTS ").expect("the VM printed no extents"),
    )
    .unwrap();
    let extents: Vec<Extent> = extents
        .iter()
        .map(|&[logical, physical, length]| Extent {
            logical,
            physical,
            length,
            flags: 0,
        })
        .collect();
    let layout = Layout::new(&extents, records).unwrap();

    let t0 = Instant::now();
    let log_bytes = fs::read(&logdev).unwrap();
    let mut image = vec![0u8; DISK_SIZE as usize]; // the data disk started out zero
    let scratch = dir.path().join("sample.img");
    let mut fs_time = Duration::ZERO;
    let report = check_log(&log_bytes, &mut image, &layout, nonce, |img, acked| {
        let t = Instant::now();
        fs::write(&scratch, img).map_err(|e| e.to_string())?;
        let file = recover_in_place(&scratch, dir.path());
        let _ = fs::remove_file(&scratch);
        fs_time += t.elapsed();
        let file = file?;
        for i in 0..acked {
            let at = i as usize * RECORD;
            let found = classify(&file[at..at + RECORD], &record(nonce, i));
            if found != Found::Intact {
                return Err(format!(
                    "record {i} of {acked} acknowledged is {found:?} in the repaired filesystem"
                ));
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("the log does not replay: {e}"));
    let replay_time = t0.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "VDP-LOG-WRITES mode={mode} records_acked={} log_entries={} flush_points={} \
         flush_points_with_acks={} marks={} crash_points_checked={} failed_points={} \
         fs_checks={} fs_failures={} boot_secs={:.1} replay_secs={:.1} fs_check_secs={:.1} \
         accel={} inside: {inside}",
        report.acked,
        report.entries,
        report.flush_points,
        report.flush_points_with_acks,
        report.marks,
        report.flush_points + report.marks,
        report.failed_points,
        report.fs_checks,
        report.fs_failures,
        boot_time.as_secs_f64(),
        replay_time.as_secs_f64(),
        fs_time.as_secs_f64(),
        env.accel
    );
    assert_eq!(report.acked, records, "marks in the log: {report:?}");
    if negative {
        assert!(
            report.failed_points > 0,
            "--mode volatile lost nothing at any flush point: the replay check cannot see lost \
             data ({report:?})"
        );
        return;
    }
    if let Some(f) = &report.first_failure {
        panic!(
            "--mode {mode}: acknowledged records missing at {} of {} crash points; first {f}",
            report.failed_points,
            report.flush_points + report.marks
        );
    }
    if let Some(f) = &report.first_fs_failure {
        panic!(
            "--mode {mode}: {} of {} filesystem checks failed; first {f}",
            report.fs_failures, report.fs_checks
        );
    }
    // Every acknowledgement came after at least one flush that reached the device.
    assert!(
        report.flush_points_with_acks >= records - 1,
        "only {} flush points after the first acknowledgement for {records} records",
        report.flush_points_with_acks
    );
    // The replay ends where the VM's disk ended: the replayer applied every write.
    let disk = fs::read(&data).unwrap();
    if let Some(at) = disk.iter().zip(&image).position(|(a, b)| a != b) {
        panic!("the replayed log differs from the VM's data disk at byte {at}");
    }
}

// ---- the checker without a VM -----------------------------------------------------------

/// A synthetic log, as the kernel would lay it out with 512-byte sectors.
#[cfg(test)]
fn synthetic_log(entries: &[(u64, u64, Vec<u8>, &str)]) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    for (sector, flags, data, mark) in entries {
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(&sector.to_le_bytes());
        h[8..16].copy_from_slice(&(data.len() as u64 / 512).to_le_bytes());
        h[16..24].copy_from_slice(&flags.to_le_bytes());
        h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
        h[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
        buf.extend_from_slice(&h);
        buf.extend_from_slice(data);
    }
    buf[0..8].copy_from_slice(&logwrites::MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&logwrites::VERSION.to_le_bytes());
    buf[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    buf[24..28].copy_from_slice(&512u32.to_le_bytes());
    buf
}

/// The checker passes a log where each record is flushed before its mark, and
/// fails one where a record reaches the disk only after its acknowledgement (what a
/// daemon that does not sync leaves), or is torn.
#[test]
fn log_check_finds_records_written_after_their_acknowledgement() {
    use logwrites::{FLUSH, FUA, MARK};
    let nonce = 7;
    // The file: two extents, records 0 and 1 at device blocks 10 and 3.
    let extents = [
        Extent {
            logical: 0,
            physical: 10 * 4096,
            length: 4096,
            flags: 0,
        },
        Extent {
            logical: 4096,
            physical: 3 * 4096,
            length: 4096,
            flags: 0,
        },
    ];
    let layout = Layout::new(&extents, 2).unwrap();
    let sector = |block: u64| block * 8;
    let rec = |i| record(nonce, i);
    let good = synthetic_log(&[
        (sector(10), 0, rec(0), ""),
        (0, FLUSH, vec![], ""),
        (0, MARK, vec![], "ack-0"),
        (sector(3), 0, rec(1), ""),
        (sector(20), FLUSH | FUA, vec![1u8; 512], ""),
        (0, MARK, vec![], "ack-1"),
        (0, FLUSH, vec![], ""),
    ]);
    let mut image = vec![0u8; 64 * 4096];
    let mut fs_calls = Vec::new();
    let r = check_log(&good, &mut image, &layout, nonce, |_, acked| {
        fs_calls.push(acked);
        Ok(())
    })
    .unwrap();
    assert_eq!(r.failed_points, 0, "{r:?}");
    assert_eq!((r.flush_points, r.marks, r.acked), (3, 2, 2), "{r:?}");
    assert_eq!(r.flush_points_with_acks, 2, "{r:?}");
    // The first flush point with an acknowledged record, and the last one.
    assert_eq!(fs_calls, vec![1, 2]);

    // No sync: the writes come with the flush of unmount, after the marks.
    let unsynced = synthetic_log(&[
        (0, MARK, vec![], "ack-0"),
        (0, MARK, vec![], "ack-1"),
        (sector(10), 0, rec(0), ""),
        (sector(3), 0, rec(1), ""),
        (0, FLUSH, vec![], ""),
    ]);
    let mut image = vec![0u8; 64 * 4096];
    let r = check_log(&unsynced, &mut image, &layout, nonce, |_, _| Ok(())).unwrap();
    assert_eq!(r.failed_points, 2, "{r:?}");
    let first = r.first_failure.unwrap();
    assert!(
        first.contains("mark \"ack-0\"") && first.contains("Zero"),
        "{first}"
    );

    // A torn record: half of it flushed before its mark.
    let mut half = rec(1);
    half[2048..].fill(0);
    let torn = synthetic_log(&[
        (sector(10), 0, rec(0), ""),
        (sector(3), 0, half, ""),
        (0, FLUSH, vec![], ""),
        (0, MARK, vec![], "ack-0"),
        (0, MARK, vec![], "ack-1"),
    ]);
    let mut image = vec![0u8; 64 * 4096];
    let r = check_log(&torn, &mut image, &layout, nonce, |_, _| Ok(())).unwrap();
    assert_eq!(r.failed_points, 1, "{r:?}");
    assert!(r.first_failure.unwrap().contains("record 1 (Other)"));

    // Marks out of order are a broken run, not a pass.
    let skipped = synthetic_log(&[(0, MARK, vec![], "ack-1")]);
    let mut image = vec![0u8; 64 * 4096];
    let e = check_log(&skipped, &mut image, &layout, nonce, |_, _| Ok(())).unwrap_err();
    assert!(e.contains("after 0 acknowledgements"), "{e}");
}

#[test]
fn records_differ_per_index_and_run_and_classify() {
    let a = record(1, 0);
    assert_eq!(a.len(), RECORD);
    assert_eq!(&a[..8], RECORD_MAGIC);
    assert_ne!(a, record(1, 1));
    assert_ne!(a, record(2, 0));
    assert_eq!(a, record(1, 0));
    assert_eq!(classify(&a, &record(1, 0)), Found::Intact);
    assert_eq!(classify(&[0u8; RECORD], &a), Found::Zero);
    assert_eq!(classify(&record(1, 1), &a), Found::Other);
}
