// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The signals a daemon is sent on purpose or by accident, and who is connected,
//! against the real binary under `--seccomp enforce` and a real vhost-user frontend.
//!
//! Owns: the signal and peer checks. Never uses a guest.

use std::os::unix::net::UnixStream;

use vdp_testkit::frontend;

use vdp_testkit::daemon::{Daemon, Scratch, MIB2};
use vdp_testkit::frontend::TestFrontend;

#[test]
fn hup_usr1_usr2_alrm_and_pipe_never_end_the_daemon_and_term_still_does() {
    let scratch = Scratch::new();
    let file = scratch.backing_file("img", MIB2);
    let mut d = Daemon::start(&scratch, "d", &file, &["--mode", "fsync"]);
    for sig in [
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPIPE,
    ] {
        d.signal(sig);
        // Still serving: the control socket answers and a VMM can connect.
        assert_eq!(d.status()["health"], "healthy", "after signal {sig}");
    }
    let mut fe = TestFrontend::connect_started(&d.socket).unwrap();
    fe.submit(&[frontend::VIRTIO_PMEM_REQ_TYPE_FLUSH]).unwrap();
    fe.wait(1).unwrap();
    let log = d.log_text();
    for name in ["SIGHUP: ignored", "SIGUSR2: ignored", "SIGALRM: ignored"] {
        assert!(log.contains(name), "{name} not logged:\n{log}");
    }
    assert!(
        log.contains("SIGUSR1: policy fsync, health healthy"),
        "SIGUSR1 logs the status line:\n{log}"
    );
    drop(fe);
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "{status}\n{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("SIGTERM: finishing in-flight requests")
            && log.contains("data is durable per policy fsync"),
        "{log}"
    );
    assert!(!d.socket.exists() && !d.control.exists(), "sockets removed");
}

#[test]
fn status_names_the_connected_vmm_and_a_probe_is_not_counted() {
    let scratch = Scratch::new();
    let file = scratch.backing_file("img", MIB2);
    let d = Daemon::start(&scratch, "d", &file, &["--mode", "fsync"]);
    // A probe: connects and leaves without a word.
    drop(UnixStream::connect(&d.socket).unwrap());
    // Then a frontend that negotiates (this process, so its pid and comm are known).
    let fe = TestFrontend::connect_started(&d.socket).unwrap();
    let s = d.wait_status("a VMM", |s| s["vmm"].is_object());
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(s["vmm"]["pid"], std::process::id(), "{s:#}");
    assert_eq!(s["vmm"]["comm"], comm.trim_end(), "{s:#}");
    assert!(s["vmm"]["since"].as_str().unwrap().ends_with('Z'), "{s:#}");
    assert_eq!(s["connections"], 1, "the probe is not a connection: {s:#}");
    drop(fe);
    let s = d.wait_status("the VMM gone", |s| s["connected"] == false);
    assert!(s["vmm"].is_null(), "{s:#}");
    assert_eq!(s["last_disconnect"], "the VMM disconnected", "{s:#}");
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "VMM connected: pid {} ({})",
            std::process::id(),
            comm.trim_end()
        )),
        "{log}"
    );
    assert_eq!(
        log.matches("VMM connected").count(),
        1,
        "the probe is not logged at info:\n{log}"
    );
}
