// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the daemon and `health` do with state records and directories they must not
//! trust: a corrupt health record (and the way out, `health --clear --force`), a
//! FIFO named like a record, a planted record without a file identity, records of
//! another uid, and state or socket directories others can write. Owns these cases
//! against the real binary; never touches anything outside its temporary
//! directories. The other-uid case needs root (skipped loudly without it).

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Output},
};

use serde_json::Value;
use vdp_testkit::daemon::{serve_fails, serve_fails_on, Daemon, Scratch, BIN, MIB2};
use vdp_testkit::root;

fn health(file: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args([
            "health",
            "--file",
            file.to_str().unwrap(),
            "--no-health-copy",
        ])
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `serve` of `file` with its records next to it; refused, with its log.
fn refused(s: &Scratch, file: &Path, extra: &[&str]) -> String {
    let sock = s.path("refused.sock");
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--mode",
        "fsync",
        "--no-health-copy",
    ];
    args.extend_from_slice(extra);
    let (status, log) = serve_fails(s, &args);
    assert!(!status.success(), "{status}\n{log}");
    assert_eq!(status.code(), Some(1), "{log}");
    log
}

fn serve(s: &Scratch, name: &str, file: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--mode", "fsync", "--no-health-copy"];
    args.extend_from_slice(extra);
    Daemon::start(s, name, file, &args)
}

#[test]
fn a_corrupt_health_record_says_what_to_do_and_clear_force_sets_it_aside() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let record = s.path("pmem.img.health.json");
    // Half a record, as a torn write or a bad sector leaves it.
    fs::write(&record, "{\"file\":\"/x\",\"errno\":5,\"err").unwrap();

    let log = refused(&s, &file, &[]);
    assert!(
        log.contains("is corrupt") && log.contains("--clear --force"),
        "{log}"
    );
    let h = health(&file, &[]);
    assert_eq!(h.status.code(), Some(2), "{}", text(&h));
    assert!(
        String::from_utf8_lossy(&h.stderr).contains("--clear --force"),
        "{}",
        text(&h)
    );
    // --clear alone changes nothing and says so.
    let h = health(&file, &["--clear"]);
    assert_eq!(h.status.code(), Some(2), "{}", text(&h));
    assert!(
        String::from_utf8_lossy(&h.stderr).contains("nothing was changed"),
        "{}",
        text(&h)
    );
    assert!(fs::read_to_string(&record).unwrap().ends_with("\"err"));
    // --force without --clear is a usage error.
    assert_eq!(health(&file, &["--force"]).status.code(), Some(2));
    // --clear --force renames it aside, says where, and the file is healthy.
    let h = health(&file, &["--clear", "--force"]);
    assert_eq!(h.status.code(), Some(0), "{}", text(&h));
    let out = String::from_utf8_lossy(&h.stdout);
    let aside = fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pmem.img.health.json.corrupt-")
        })
        .unwrap_or_else(|| panic!("not renamed aside: {}", text(&h)));
    assert!(
        out.contains("renamed to") && out.contains(&*aside.to_string_lossy()),
        "{}",
        text(&h)
    );
    assert!(fs::read_to_string(&aside).unwrap().ends_with("\"err"));
    assert!(!record.exists());
    assert_eq!(health(&file, &[]).status.code(), Some(0));
    let d = serve(&s, "after", &file, &[]);
    assert_eq!(d.status()["health"], "healthy");
}

#[test]
fn a_fifo_named_like_a_record_is_refused_at_once_not_waited_on() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    for name in ["pmem.img.health.json", "pmem.img.badblocks.json"] {
        let fifo = s.path(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // serve_fails gives the daemon 10 s to exit (and fails the test if it hangs).
        let log = refused(&s, &file, &[]);
        assert!(
            log.contains(name) && log.contains("it is a FIFO, not a regular file"),
            "{log}"
        );
        if name.contains("health") {
            let h = health(&file, &[]);
            assert_eq!(h.status.code(), Some(2), "{}", text(&h));
            assert!(String::from_utf8_lossy(&h.stderr).contains("FIFO"));
        }
        fs::remove_file(&fifo).unwrap();
    }
    let d = serve(&s, "after", &file, &[]);
    assert_eq!(d.status()["health"], "healthy");
}

#[test]
fn a_planted_record_without_identity_is_refused_unless_adopted() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let record = s.path("pmem.img.badblocks.json");
    // The whole file bad, "trusted by its name" before: as 0.1 wrote records.
    let planted = format!(
        r#"{{"file":"{}","ranges":[{{"offset":0,"length":{}}}]}}"#,
        file.display(),
        2 * MIB2
    );
    fs::write(&record, &planted).unwrap();
    let log = refused(&s, &file, &[]);
    assert!(
        log.contains("carries no file identity") && log.contains("--adopt-legacy-records"),
        "{log}"
    );
    assert_eq!(fs::read_to_string(&record).unwrap(), planted, "changed");

    // Adopted once: applied, and rewritten with the file's identity.
    let d = serve(&s, "adopt", &file, &["--adopt-legacy-records"]);
    let st = d.status();
    assert_eq!(
        st["bad_ranges"],
        serde_json::json!([{"offset": 0, "length": 2 * MIB2}]),
        "{st:#}"
    );
    // The next change writes the record (with identity).
    let v = vhost_device_pmem::control::call(
        &d.control,
        &vhost_device_pmem::control::Request::BadblocksClear {
            offset: 0,
            length: 2 * MIB2,
        },
    )
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    drop(d);
    let rewritten: Value = serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    assert!(rewritten["identity"]["inode"].is_u64(), "{rewritten:#}");
    let d = serve(&s, "trusted", &file, &[]);
    assert_eq!(d.status()["bad_ranges"], serde_json::json!([]));
    drop(d);

    // A planted health record without identity: refused too (neither applied nor
    // ignored), and `health` says how to adopt or set it aside.
    let h = s.path("pmem.img.health.json");
    fs::write(
        &h,
        format!(
            r#"{{"file":"{}","errno":5,"error":"EIO","at":1,"context":"flush","requests":1}}"#,
            file.display()
        ),
    )
    .unwrap();
    let log = refused(&s, &file, &[]);
    assert!(log.contains("carries no file identity"), "{log}");
    let out = health(&file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = health(&file, &["--adopt-legacy-records"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let d = serve(&s, "adopt-health", &file, &["--adopt-legacy-records"]);
    let st = d.status();
    assert_eq!(st["health"], "failed", "{st:#}");
    assert_eq!(st["health_record"]["persisted"], true, "{st:#}");
}

#[test]
fn state_and_socket_directories_others_can_write_are_refused() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let shared = s.path("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    // A state directory.
    let log = refused(&s, &file, &["--state-dir", shared.to_str().unwrap()]);
    assert!(
        log.contains("state directory") && log.contains("writable by group and others"),
        "{log}"
    );
    // Sticky is not enough for records (a name planted there keeps ours out).
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let log = refused(&s, &file, &["--state-dir", shared.to_str().unwrap()]);
    assert!(log.contains("sticky"), "{log}");
    // The file's own directory, when it holds the records.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o775)).unwrap();
    let inside = shared.join("pmem.img");
    fs::rename(&file, &inside).unwrap();
    let log = refused(&s, &inside, &[]);
    assert!(log.contains("writable by its group"), "{log}");
    fs::rename(&inside, &file).unwrap();
    // A socket directory: refused, nothing bound there.
    let sock = shared.join("vu.sock");
    let (status, log) = serve_fails_on(&s, &sock, &file, &["--mode", "fsync"]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("socket directory") && log.contains("--allow-shared-socket-dir"),
        "{log}"
    );
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0);
    // Accepted when asked for; the socket keeps its 0600.
    let d = Daemon::start_on(
        &s,
        &sock,
        "shared",
        &file,
        &["--mode", "fsync", "--allow-shared-socket-dir"],
    );
    assert_eq!(fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
    drop(d);
}

#[test]
fn a_record_of_another_uid_is_not_trusted() {
    let test = "state_records_other_uid";
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return root::unavailable(test, "root (to give a record to another uid)");
    }
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    // A real record, written by a daemon (a bad range injected), then given away.
    let d = serve(&s, "first", &file, &[]);
    let v = vhost_device_pmem::control::call(
        &d.control,
        &vhost_device_pmem::control::Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    drop(d);
    let record = s.path("pmem.img.badblocks.json");
    std::os::unix::fs::chown(&record, Some(4242), None).unwrap();
    let log = refused(&s, &file, &[]);
    assert!(
        log.contains("belongs to uid 4242, not to this daemon's uid 0"),
        "{log}"
    );
    std::os::unix::fs::chown(&record, Some(0), None).unwrap();
    let d = serve(&s, "back", &file, &[]);
    assert_eq!(
        d.status()["bad_ranges"],
        serde_json::json!([{"offset": 4096, "length": 512}])
    );
}
