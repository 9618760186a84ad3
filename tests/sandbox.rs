// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seccomp sandbox bites: a child process (this test binary run again) enters
//! the real `serve` or `nvdimm` sandbox through `sandbox::enter` (the SIGSYS record
//! and the filters) and then makes one call; and the real daemon serves with every
//! one of its threads under the filter.
//!
//! Never reaches into the daemon for the bite: the child is a plain process.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, Output},
};

use vdp_testkit::daemon;
use vdp_testkit::daemon::{Daemon, Scratch, MIB2};
use vdp_testkit::frontend::TestFrontend;
use vdp_testkit::procfs;
use vhost_device_pmem::sandbox::{self, Profile, SeccompMode};

/// The child's environment variable: `MODE:CALL`, MODE `enforce`, `log` or `off`
/// (the `serve` profile) or `nvdimm` (the `nvdimm` profile, enforced).
const CHILD: &str = "VDP_SANDBOX_CHILD";

/// Runs [`sandbox_child`] in a new process of this binary with `mode` and `call`.
fn child(mode: &str, call: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sandbox_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{mode}:{call}"))
        .output()
        .unwrap()
}

fn say(s: &str) {
    // write(2) straight away: nothing buffered is lost when the filter kills us.
    // SAFETY: writing a valid buffer to stdout.
    unsafe { libc::write(1, s.as_ptr().cast(), s.len()) };
}

/// Not a test of its own: the body of the child process. Installs the filter of
/// `MODE`, says `installed`, makes `CALL`, says what it returned and exits at once
/// (the test harness's own calls after it are none of this test's business).
#[test]
fn sandbox_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (mode, call) = spec.split_once(':').unwrap();
    let (mode, profile) = match mode {
        "enforce" => (SeccompMode::Enforce, Profile::Serve),
        "nvdimm" => (SeccompMode::Enforce, Profile::Nvdimm),
        "log" => (SeccompMode::Log, Profile::Serve),
        _ => (SeccompMode::Off, Profile::Serve),
    };
    // Opened before the filter, as the export opens its file at start-up.
    let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    let exe_path = std::ffi::CString::new(
        std::env::current_exe()
            .unwrap()
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    let events = std::sync::Arc::new(vhost_device_pmem::events::EventHub::default());
    let services = std::sync::Arc::new(vhost_device_pmem::service::Services::default());
    sandbox::enter(mode, profile, &events, &services).unwrap();
    say("installed\n");
    // SAFETY: plain system calls with valid arguments; the fork child exits at once.
    let ret: i64 = unsafe {
        match call {
            "socket-inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into(),
            "socket-unix" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).into(),
            "fork" => match libc::fork() {
                0 => libc::_exit(0),
                pid => pid.into(),
            },
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            // Through syscall(3): glibc's getppid() returns the raw answer, never -1.
            "getppid" => libc::syscall(libc::SYS_getppid),
            "execve" => {
                let argv = [exe_path.as_ptr(), std::ptr::null()];
                libc::execve(exe_path.as_ptr(), argv.as_ptr(), std::ptr::null()).into()
            }
            "mmap-exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            }
            "mmap-plain" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            }
            "sleep" => {
                // The parent stops and continues us meanwhile: the kernel resumes
                // the sleep with restart_syscall.
                std::thread::sleep(std::time::Duration::from_millis(1500));
                0
            }
            // The nvdimm export's own calls. The guard's change notices:
            "inotify" => {
                let fd = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
                let wd = libc::inotify_add_watch(fd, exe_path.as_ptr(), libc::IN_MODIFY);
                libc::inotify_rm_watch(fd, wd).into()
            }
            // The guard's block map (FIEMAP; an error answer is no kill).
            "fiemap" => {
                let v = vhost_device_pmem::blockmap::inspect(&exe);
                say(&format!("inspect: {}\n", v.is_ok()));
                0
            }
            // The QMP session's peer credentials.
            "peercred" => {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                let mut cred: libc::ucred = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    (&mut cred as *mut libc::ucred).cast(),
                    &mut len,
                )
                .into()
            }
            // The wait for QEMU's exit: a pidfd of a live process (this one).
            "pidfd" => {
                let fd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0);
                say(&format!("pidfd {fd}\n"));
                fd
            }
            // The mapping check reads /proc/PID/smaps.
            "smaps" => {
                use vhost_device_pmem::app::nvdimm::mapping::{mappings_of, FileId};
                let id = FileId::of(&exe).unwrap();
                mappings_of(std::process::id(), id).unwrap().len() as i64
            }
            // A new listening socket: none after start-up.
            "bind" => {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                addr.sun_path[1] = b'v' as libc::c_char; // abstract
                libc::bind(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    (std::mem::size_of::<libc::sa_family_t>() + 2) as libc::socklen_t,
                )
                .into()
            }
            "ioctl-tcgets" => {
                let mut t: libc::termios = std::mem::zeroed();
                libc::ioctl(1, libc::TCGETS, &mut t).into()
            }
            "clone3" => {
                let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize);
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap();
                // The C library falls back to clone: threads still start.
                let t = std::thread::spawn(|| 42).join().unwrap();
                say(&format!("errno {errno} thread {t}\n"));
                r
            }
            other => panic!("unknown call {other}"),
        }
    };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    say(&format!(
        "returned {ret} errno {errno} denials {}\n",
        sandbox::denials()
    ));
    // SAFETY: ending the process without running anything else.
    unsafe { libc::_exit(0) };
}

/// The child was killed by SIGSYS after installing the filter, before its call
/// returned.
fn assert_killed(out: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("installed"), "{what}: {stdout}");
    assert!(!stdout.contains("returned"), "{what}: {stdout}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{what}: {:?}\n{stdout}",
        out.status
    );
}

/// The child survived; its call's return value, errno and the denial count.
fn survived(out: &Output, what: &str) -> (i64, i32, u64) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {:?}\n{stdout}", out.status);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("returned "))
        .unwrap_or_else(|| panic!("{what}: {stdout}"));
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!((f[1], f[3]), ("errno", "denials"), "{what}: {stdout}");
    (
        f[0].parse().unwrap(),
        f[2].parse().unwrap(),
        f[4].parse().unwrap(),
    )
}

/// The child survived and its call returned `ret >= 0` with no denial.
fn assert_survived(out: &Output, what: &str) {
    let (ret, _, denials) = survived(out, what);
    assert!(ret >= 0, "{what}: returned {ret}");
    assert_eq!(denials, 0, "{what}");
}

/// The child survived, its call failed with ENOSYS and was counted once.
fn assert_denied(out: &Output, what: &str) {
    assert_eq!(survived(out, what), (-1, libc::ENOSYS, 1), "{what}");
}

#[test]
fn enforce_kills_the_process_on_a_call_on_the_kill_list() {
    for call in ["socket-inet", "fork", "ptrace", "execve", "mmap-exec"] {
        assert_killed(&child("enforce", call), call);
    }
}

/// Any other unlisted call (here getppid, and ioctl TCGETS, which no profile lists)
/// fails with ENOSYS, is counted, and the process goes on.
#[test]
fn enforce_answers_any_other_unlisted_call_enosys_and_counts_it() {
    for call in ["getppid", "ioctl-tcgets"] {
        assert_denied(&child("enforce", call), call);
    }
    // The same call number with arguments the list allows: no denial.
    assert_survived(&child("enforce", "mmap-plain"), "mmap-plain");
}

/// The `nvdimm` profile lets the export's own calls through (change notices, the
/// block map, SO_PEERCRED, /proc/PID/smaps, a unix socket), kills on a foreign
/// socket, a fork, ptrace, exec, and denies a new listening socket; `serve`'s has
/// no inotify.
#[test]
fn the_nvdimm_profile_allows_the_exports_calls_and_kills_the_rest() {
    for call in [
        "inotify",
        "fiemap",
        "peercred",
        "smaps",
        "socket-unix",
        "pidfd",
    ] {
        assert_survived(&child("nvdimm", call), call);
    }
    for call in ["socket-inet", "fork", "ptrace", "execve"] {
        assert_killed(&child("nvdimm", call), call);
    }
    for call in ["bind", "ioctl-tcgets"] {
        assert_denied(&child("nvdimm", call), call);
    }
    // init, add and rm: three calls serve's profile does not list, each denied.
    let out = child("enforce", "inotify");
    assert_eq!(survived(&out, "serve: inotify"), (-1, libc::ENOSYS, 3));
}

#[test]
fn a_stopped_and_continued_process_resumes_its_sleep_under_enforce() {
    use std::io::BufRead;
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sandbox_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "enforce:sleep")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("installed") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "no `installed`");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = c.id() as libc::pid_t;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = c.wait().unwrap();
    assert!(status.success(), "{status:?}\n{rest}");
    assert!(rest.contains("returned 0"), "{rest}");
}

#[test]
fn enforce_checks_arguments_not_only_call_numbers() {
    // socket(2) is listed for AF_UNIX only: the same call with AF_UNIX is allowed.
    assert_survived(&child("enforce", "socket-unix"), "socket-unix");
}

#[test]
fn log_lets_the_call_through() {
    // (Not ptrace: a thread traced by its parent could not be reaped by a plain wait.)
    for call in ["socket-inet", "getppid"] {
        assert_survived(&child("log", call), call);
    }
}

#[test]
fn off_installs_nothing() {
    for call in ["socket-inet", "getppid"] {
        assert_survived(&child("off", call), call);
    }
}

#[test]
fn clone3_is_answered_enosys_and_threads_still_start() {
    for mode in ["enforce", "log"] {
        let out = child(mode, "clone3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: {:?}\n{stdout}", out.status);
        assert!(
            stdout.contains(&format!("errno {} thread 42", libc::ENOSYS)),
            "{mode}: {stdout}"
        );
        assert!(stdout.contains("returned -1"), "{mode}: {stdout}");
    }
}

#[test]
fn the_daemon_serves_with_every_thread_under_the_filter_by_default() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(&s, "d", &file, &["--mode", "fsync"]);
    // A connection with its vring worker started and a flush answered under it.
    let mut fe = TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(fe.flush(3).unwrap(), vec![0; 3], "{}", d.log_text());
    let threads = procfs::thread_modes(d.pid());
    assert!(threads.len() >= 4, "{threads:?}");
    for (name, mode, filters) in &threads {
        // 2: filter mode; the allow-list, the kill list and clone3's ENOSYS.
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", sandbox::FILTERS.to_string().as_str()),
            "{name}: {threads:?}"
        );
    }
    assert_eq!(d.status()["seccomp"], "enforce");
    assert!(
        d.log_text().contains("seccomp sandbox on (enforce)"),
        "{}",
        d.log_text()
    );
}

#[test]
fn seccomp_off_serves_without_a_filter() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(&s, "d", &file, &["--mode", "fsync", "--seccomp", "off"]);
    for (name, mode, _) in procfs::thread_modes(d.pid()) {
        assert_eq!(mode, "0", "{name}");
    }
    assert_eq!(d.status()["seccomp"], "off");
}

// The rare paths below have no other daemon-level test; they run here under the
// default `enforce`, so a call they need that the allow-list lacks kills the daemon
// and fails the test.

#[test]
fn a_scrub_runs_under_enforce() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(
        &s,
        "d",
        &file,
        &["--mode", "fsync", "--scrub-interval", "1"],
    );
    let deadline = std::time::Instant::now() + daemon::TIMEOUT;
    while d.log_text().matches("found no read errors").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no two scrubs: {}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(d.status()["seccomp"], "enforce");
}

#[test]
fn a_failed_state_save_and_its_retry_run_under_enforce() {
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let d = Daemon::start(&s, "d", &file, &["--mode", "fsync"]);
    // A directory where the bad-range record goes (made after the start-up, which
    // reads it): the save's rename fails (EISDIR), also for root.
    let record = s.path("pmem.img.badblocks.json");
    std::fs::create_dir(&record).unwrap();
    let v = vhost_device_pmem::control::call(
        &d.control,
        &vhost_device_pmem::control::Request::BadblocksInject {
            offset: 4096,
            length: 512,
        },
    )
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    d.wait_status("a persist error", |st| {
        st["bad_ranges_persist_error"].is_string()
    });
    // The retry thread, started under the filter, writes it once it can.
    std::fs::remove_dir(&record).unwrap();
    d.wait_status("the retry's success", |st| {
        st["bad_ranges_persist_error"].is_null()
    });
    assert!(std::fs::read_to_string(&record).unwrap().contains("4096"));
    assert_eq!(d.status()["seccomp"], "enforce");
}

/// The daemon started under a service manager's filter that answers seccomp(2) EPERM
/// (systemd's `SystemCallFilter=` without `seccomp`): `enforce` refuses to start and
/// says what to allow; `--seccomp off` serves.
#[test]
fn a_service_manager_filter_without_seccomp_is_named_at_start_up() {
    use std::os::unix::process::CommandExt;
    let s = Scratch::new();
    let file = s.backing_file("pmem.img", 2 * MIB2);
    let deny: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        [(libc::SYS_seccomp, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap()
    .try_into()
    .unwrap();
    let run = |extra: &[&str], name: &str| {
        let sock = s.path(&format!("{name}.sock"));
        let ctl = s.path(&format!("{name}.ctl"));
        let mut cmd = Command::new(daemon::BIN);
        cmd.args(["serve", "--mode", "fsync", "--file"])
            .arg(&file)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let deny = deny.clone();
        // SAFETY: between fork and exec only prctl(2) and seccomp(2) are made, on a
        // program built before the fork.
        unsafe {
            cmd.pre_exec(move || seccompiler::apply_filter(&deny).map_err(std::io::Error::other));
        }
        (cmd.spawn().unwrap(), ctl)
    };
    let (child, _) = run(&[], "enforce");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("SystemCallFilter=seccomp"), "{log}");
    assert!(log.contains("--seccomp off"), "{log}");
    let (mut served, ctl) = run(&["--seccomp", "off"], "off");
    let deadline = std::time::Instant::now() + daemon::TIMEOUT;
    let st = loop {
        if let Ok(v) =
            vhost_device_pmem::control::call(&ctl, &vhost_device_pmem::control::Request::Status)
        {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(st["status"]["seccomp"], "off", "{st}");
    let _ = served.kill();
    let _ = served.wait();
}
