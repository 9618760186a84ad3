// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The serving daemon's guard on real filesystems: a hole punched into or a
//! reflink made onto a served file is reported (the policy stays), the seal is
//! cleared at exit, a sealed file is refused, and fdatasync commits the journal
//! only when the block map is not immutable.
//!
//! Owns: the served-daemon fixture. Never leaves a daemon, a mount or a loop device
//! behind.

use super::*;

/// A daemon child process, killed on drop if still running.
struct Served {
    child: Child,
    ctl: PathBuf,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, file: &Path, extra: &[&str]) -> Served {
        let ctl = dir.join("ctl.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--file",
                file.to_str().unwrap(),
                "--socket-path",
                dir.join("vhost.sock").to_str().unwrap(),
                "--control-socket",
                ctl.to_str().unwrap(),
                "--mode",
                "auto",
                "--verify-interval",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Served { child, ctl, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while s.status().is_none() {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                s.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn status(&self) -> Option<serde_json::Value> {
        let v = control::call(&self.ctl, &control::Request::Status).ok()?;
        (v["ok"] == true).then(|| v["status"].clone())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Subscribes to events; lines arrive on the channel.
    fn events(&self) -> mpsc::Receiver<serde_json::Value> {
        let (tx, rx) = mpsc::channel();
        let ctl = self.ctl.clone();
        thread::spawn(move || {
            let _ = control::subscribe(&ctl, true, |line| {
                serde_json::from_str(line).is_ok_and(|v| tx.send(v).is_ok())
            });
        });
        rx
    }

    fn wait_event(&self, rx: &mpsc::Receiver<serde_json::Value>, kind: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if v["event"] == kind => return v,
                Ok(_) => {}
                Err(_) => panic!("no {kind} event within 15 s; daemon log:\n{}", self.log()),
            }
        }
    }

    /// Waits until `status` shows the block-map change (guard.map_changed).
    fn wait_change_in_status(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.status().expect("status");
            if s["guard"]["map_changed"].is_string() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no block-map change in status within 15 s: {s}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "daemon exit {st}:\n{}", self.log());
                return self.log();
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn served_file(m: &Mounted) -> PathBuf {
    let path = m.path("served.img");
    let out = prepare(&path, Some("32M"));
    assert!(out.status.success(), "{}", stderr(&out));
    path
}

/// Under `datasync` a changed map is reported (event, status), never a downgrade:
/// fdatasync commits whatever allocation a later read needs, so flushes stay
/// correct; they only cost journal commits again.
fn assert_change_reported_not_downgraded(
    s: &Served,
    rx: &mpsc::Receiver<serde_json::Value>,
    what: &str,
) {
    let ev = s.wait_event(rx, "block-map-changed");
    assert!(
        ev["time"].is_string() && ev["reason"].as_str().unwrap().contains("changed"),
        "{ev}"
    );
    let st = s.wait_change_in_status();
    assert!(
        st["guard"]["map_changed"].as_str().unwrap().contains(what),
        "{st}"
    );
    assert_eq!(
        (st["policy"].as_str(), st["health"].as_str()),
        (Some("datasync"), Some("healthy")),
        "{st}"
    );
    assert!(st["downgraded"].is_null(), "{st}");
}

#[test]
fn ext4_hole_punched_into_a_served_file_is_reported_and_datasync_stays() {
    if !prerequisites("ext4_punch_while_serving", &["mkfs.ext4"]) {
        return;
    }
    let m = Mounted::new(Fs::Ext4);
    let path = served_file(&m);
    let s = Served::start(m.dir.path(), &path, &[]);
    let st = s.status().unwrap();
    assert_eq!(st["policy"], "datasync", "{st}");
    assert_eq!(st["guard"]["lease"], "write lease held", "{st}");
    let rx = s.events();
    s.wait_event(&rx, "lease-taken");

    // Our open breaks the lease; the daemon lets it through at once.
    let opened = Instant::now();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    assert!(
        opened.elapsed() < Duration::from_secs(10),
        "open waited {:?}",
        opened.elapsed()
    );
    sys::fallocate(
        &f,
        sys::FALLOC_FL_PUNCH_HOLE | sys::FALLOC_FL_KEEP_SIZE,
        4 * MIB,
        64 << 10,
    )
    .unwrap();
    s.wait_event(&rx, "lease-broken");
    assert_change_reported_not_downgraded(&s, &rx, "hole");
    drop(f);
    s.wait_event(&rx, "lease-taken");
    let log = s.stop();
    assert!(!log.contains("downgraded"), "{log}");
}

#[test]
fn xfs_reflink_into_a_served_file_is_reported_and_seal_is_cleared_at_exit() {
    if !prerequisites("xfs_reflink_while_serving", &["mkfs.xfs", "xfs_io"]) {
        return;
    }
    let m = Mounted::new(Fs::Xfs);
    let path = served_file(&m);
    let other = m.path("other.img");
    make_data(&other, 9);

    // --seal: other writers are refused while serving, the attribute goes at exit.
    let s = Served::start(m.dir.path(), &path, &["--seal"]);
    let st = s.status().unwrap();
    assert_eq!(
        (st["policy"].as_str(), st["guard"]["sealed"].as_bool()),
        (Some("datasync"), Some(true)),
        "{st}"
    );
    let e = OpenOptions::new().write(true).open(&path).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let flags = sys::get_flags(&File::open(&path).unwrap()).unwrap();
    assert_ne!(flags & sys::FS_IMMUTABLE_FL, 0);
    let log = s.stop();
    assert!(log.contains("cleared the immutable attribute"), "{log}");
    let flags = sys::get_flags(&File::open(&path).unwrap()).unwrap();
    assert_eq!(flags & sys::FS_IMMUTABLE_FL, 0, "seal left behind");

    // Unsealed: a reflink of another file's range into the served file.
    let s = Served::start(m.dir.path(), &path, &[]);
    let rx = s.events();
    s.wait_event(&rx, "lease-taken");
    sh(
        "xfs_io",
        &[
            "-c",
            &format!("reflink {} 0 {} {}", other.display(), 8 * MIB, MIB),
            path.to_str().unwrap(),
        ],
    );
    assert_change_reported_not_downgraded(&s, &rx, "shared");
    s.stop();
}

#[test]
fn a_served_file_with_a_seal_on_ext4_is_refused() {
    if !prerequisites("ext4_seal_refused", &["mkfs.ext4"]) {
        return;
    }
    let m = Mounted::new(Fs::Ext4);
    let path = served_file(&m);
    let out = Command::new(BIN)
        .args([
            "serve",
            "--file",
            path.to_str().unwrap(),
            "--socket-path",
            m.dir.path().join("v.sock").to_str().unwrap(),
            "--seal",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only safe on XFS"),
        "{}",
        stderr(&out)
    );
    let flags = sys::get_flags(&File::open(&path).unwrap()).unwrap();
    assert_eq!(flags & sys::FS_IMMUTABLE_FL, 0);
}

/// Journal transactions committed so far on the ext4 filesystem of `loopdev`.
fn jbd2_transactions(loopdev: &str) -> u64 {
    let name = Path::new(loopdev).file_name().unwrap().to_str().unwrap();
    let info = fs::read_to_string(format!("/proc/fs/jbd2/{name}-8/info"))
        .unwrap_or_else(|e| panic!("/proc/fs/jbd2/{name}-8/info: {e}"));
    info.split_whitespace().next().unwrap().parse().unwrap()
}

/// What `datasync`'s verdict promises, measured: on a journaling ext4, fdatasync
/// after a write into an unwritten (fallocated) range commits the journal (the
/// conversion must be durable before the data can be read back), and after a write
/// into a prepared file it does not. Both are correct; only the second is cheap.
#[test]
fn fdatasync_commits_the_journal_only_when_the_block_map_is_not_immutable() {
    use std::os::unix::fs::FileExt;
    if !prerequisites("datasync_journal_commits", &["mkfs.ext4"]) {
        return;
    }
    let m = Mounted::new(Fs::Ext4);
    let dev = m.loopdev.clone().unwrap();
    let prepared = served_file(&m);
    let unwritten = m.path("fallocated.img");
    let f = File::create(&unwritten).unwrap();
    sys::fallocate(&f, 0, 0, 32 * MIB).unwrap();
    f.sync_all().unwrap();
    let (check_prepared, check_unwritten) = (check(&prepared).1, check(&unwritten).1);
    assert!(
        check_prepared["auto_reason"]
            .as_str()
            .unwrap()
            .contains("no journal commit"),
        "{check_prepared}"
    );
    assert!(
        check_unwritten["auto_reason"]
            .as_str()
            .unwrap()
            .contains("commits the journal"),
        "{check_unwritten}"
    );
    let commits = |path: &Path| {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.sync_all().unwrap();
        let before = jbd2_transactions(&dev);
        for i in 0..8u64 {
            f.write_all_at(&[0x5a; 4096], (1 + i) * MIB).unwrap();
            f.sync_data().unwrap();
        }
        jbd2_transactions(&dev) - before
    };
    let (on_prepared, on_unwritten) = (commits(&prepared), commits(&unwritten));
    eprintln!(
        "fdatasync after 8 writes: {on_prepared} journal commits on a prepared file, \
         {on_unwritten} on a fallocated one"
    );
    assert_eq!(on_prepared, 0, "a prepared file needed journal commits");
    assert!(
        on_unwritten >= 8,
        "each write into an unwritten extent needs its conversion committed: {on_unwritten}"
    );
}
