// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The service manager's two small protocols: inherited listening sockets
//! (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, as sd_listen_fds(3)) and readiness
//! and watchdog notifications (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, as sd_notify(3)).
//!
//! Owns: reading those variables (and unsetting the socket ones so no child inherits
//! them), sending notification datagrams, and the watchdog's decision whether the
//! daemon still makes progress. Never binds, unlinks or chmods a socket (`socket`
//! does that for the ones the daemon binds itself) and never decides policy.
//!
//! Written here rather than taken from a crate: both protocols are a few environment
//! variables and one datagram; std already speaks abstract unix addresses; and the
//! crates that cover them either pull in libsystemd or do not check the sockets'
//! names and types the way the daemon needs (a named fd we do not know is an error
//! here, not something to ignore).

use std::{
    env,
    ffi::OsString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram, UnixListener},
    },
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::Duration,
};

use crate::{events::Event, service::Services};

/// The first inherited descriptor (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// `FileDescriptorName=` of the vhost-user socket unit.
pub const FDNAME_VHOST_USER: &str = "vhost-user";
/// `FileDescriptorName=` of the control socket unit.
pub const FDNAME_CONTROL: &str = "control";

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    #[error("LISTEN_FDNAMES names {names} descriptors but LISTEN_FDS is {fds}")]
    NameCount { names: usize, fds: usize },
    #[error(
        "inherited socket named {0:?}: expected {FDNAME_VHOST_USER:?} or {FDNAME_CONTROL:?} \
         (FileDescriptorName= of the socket units)"
    )]
    UnknownName(String),
    #[error("two inherited sockets are named {0:?}")]
    Duplicate(String),
    #[error("{count} unnamed inherited sockets: name them {FDNAME_VHOST_USER:?} and {FDNAME_CONTROL:?} with FileDescriptorName=")]
    Unnamed { count: usize },
    #[error("inherited descriptor {fd} ({name}) is not a listening unix stream socket: {why}")]
    NotAListener {
        fd: RawFd,
        name: String,
        why: String,
    },
}

/// The listening sockets the service manager passed in, by role.
#[derive(Debug, Default)]
pub struct Inherited {
    pub vhost_user: Option<UnixListener>,
    pub control: Option<UnixListener>,
}

/// Takes the descriptors passed by the service manager (none when `LISTEN_PID` is
/// not this process), sets close-on-exec on them and unsets the variables.
/// A single socket not named [`FDNAME_CONTROL`] (unnamed, or named after its unit)
/// is the vhost-user one; otherwise each must be named
/// [`FDNAME_VHOST_USER`] or [`FDNAME_CONTROL`].
pub fn take_listen_fds() -> Result<Inherited, ActivationError> {
    let pid = env::var_os("LISTEN_PID");
    let fds = env::var_os("LISTEN_FDS");
    let names = env::var_os("LISTEN_FDNAMES");
    // Unset whatever happens: these describe this process only.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Inherited::default());
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(Inherited::default());
    }
    let count: usize = fds
        .to_str()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ActivationError::BadCount(fds.to_string_lossy().into_owned()))?;
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: sd_listen_fds(3) hands descriptors LISTEN_FDS_START.. to this pid;
        // nothing else in the process took them, and this runs once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
        sockets.push(owned);
    }
    classify(sockets, names)
}

/// Gives each descriptor its role from its name.
fn classify(sockets: Vec<OwnedFd>, names: Option<OsString>) -> Result<Inherited, ActivationError> {
    let names: Vec<String> = match names {
        Some(n) if !n.is_empty() => n.to_string_lossy().split(':').map(String::from).collect(),
        _ => vec!["unknown".into(); sockets.len()],
    };
    if names.len() != sockets.len() {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: sockets.len(),
        });
    }
    let unnamed = names.iter().filter(|n| n.as_str() == "unknown").count();
    let alone = sockets.len() == 1;
    let mut out = Inherited::default();
    for (fd, name) in sockets.into_iter().zip(names) {
        let slot = match name.as_str() {
            FDNAME_VHOST_USER => &mut out.vhost_user,
            FDNAME_CONTROL => &mut out.control,
            // A socket unit without FileDescriptorName= passes its own unit name
            // (systemd.socket(5)): a single such socket is the vhost-user one.
            _ if alone => &mut out.vhost_user,
            // What sd_listen_fds_with_names(3) reports for a socket without a name:
            // alone, it can only be the vhost-user one.
            "unknown" if unnamed == 1 => &mut out.vhost_user,
            "unknown" => return Err(ActivationError::Unnamed { count: unnamed }),
            other => return Err(ActivationError::UnknownName(other.into())),
        };
        if slot.is_some() {
            return Err(ActivationError::Duplicate(name));
        }
        *slot = Some(listener(fd, &name)?);
    }
    Ok(out)
}

/// Takes descriptor `fd`, named on the command line (`serve --fd=FDNUM`, the
/// backend convention of QEMU's vhost-user.rst), as the vhost-user listener: it must
/// be an open, listening unix stream socket. Sets close-on-exec on it.
pub fn take_fd(fd: RawFd) -> Result<UnixListener, ActivationError> {
    let name = "--fd";
    let bad = |why: String| ActivationError::NotAListener {
        fd,
        name: name.into(),
        why,
    };
    if fd < 0 {
        return Err(bad("a descriptor is not negative".into()));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; EBADF if it is not open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).map_err(|e| bad(format!("not an open descriptor ({e})")))?;
    // SAFETY: the descriptor is open and was handed to this process for this use;
    // nothing else in it owns it (main takes it once, before anything else runs).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
    listener(owned, name)
}

/// Checks that `fd` is a listening unix stream socket.
fn listener(fd: OwnedFd, name: &str) -> Result<UnixListener, ActivationError> {
    let bad = |why: String| ActivationError::NotAListener {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        name: name.into(),
        why,
    };
    let ty = rustix::net::sockopt::socket_type(&fd).map_err(|e| bad(e.to_string()))?;
    if ty != rustix::net::SocketType::STREAM {
        return Err(bad(format!("type {ty:?}")));
    }
    if !rustix::net::sockopt::socket_acceptconn(&fd).map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening".into()));
    }
    let domain = rustix::net::sockopt::socket_domain(&fd).map_err(|e| bad(e.to_string()))?;
    if domain != rustix::net::AddressFamily::UNIX {
        return Err(bad(format!("family {domain:?}")));
    }
    Ok(UnixListener::from(fd))
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service
/// manager. Returns false, having done nothing, when `NOTIFY_SOCKET` is not set.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(&path)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={path:?}: neither a path nor an abstract name"),
        ));
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Sends `state`, logging (not failing) when it cannot be sent.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("cannot notify the service manager ({state:?}): {e}");
    }
}

/// The watchdog interval the service manager asked for (`WATCHDOG_USEC`, for this
/// process when `WATCHDOG_PID` names one), if any.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Set once STOPPING=1 was sent: STATUS= is no longer refreshed after it.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Tells the service manager the daemon is stopping (at SIGTERM/SIGINT).
pub fn notify_stopping() {
    STOPPING.store(true, Ordering::Relaxed);
    notify_or_log("STOPPING=1\nSTATUS=stopping: making the data durable");
}

/// The notifier's loop, until shutdown. It wakes on every event of the daemon
/// (`changes`: a policy downgrade, a sync failure, a VMM connecting or leaving, ...)
/// and, only when the service manager asked for a `watchdog`, every `tick` as well:
/// an idle daemon without a watchdog makes no wake-ups. Each time it sends STATUS=
/// when `status()` changed, and with a watchdog WATCHDOG=1 only if [`progress`]
/// holds for what `busy()` reports (sync, queue pass); otherwise STATUS= says what
/// is stuck and no ping goes out. `send` delivers a message (normally [`notify`]).
pub fn run_notifier(
    services: &Services,
    changes: &Receiver<Event>,
    tick: Option<Duration>,
    watchdog: Option<Duration>,
    status: impl Fn() -> String,
    busy: impl Fn() -> (Option<Duration>, Option<Duration>),
    send: impl Fn(&str),
) {
    let mut last = String::new();
    loop {
        let woke = match tick {
            Some(t) => !matches!(changes.recv_timeout(t), Err(RecvTimeoutError::Disconnected)),
            None => changes.recv().is_ok(),
        };
        if !woke || services.stopping() {
            return;
        }
        let mut line = status();
        let mut msg = String::new();
        if let Some(limit) = watchdog {
            let (sync, pass) = busy();
            match progress(sync, pass, limit) {
                Ok(()) => msg.push_str("WATCHDOG=1\n"),
                Err(why) => {
                    if !last.contains("STUCK") {
                        log::error!("{why}: no more watchdog pings until it ends");
                    }
                    line = format!("{line}; STUCK: {why}");
                }
            }
        }
        if line != last && !STOPPING.load(Ordering::Relaxed) {
            msg.push_str(&format!("STATUS={line}\n"));
            last = line;
        }
        if !msg.is_empty() {
            send(msg.trim_end());
        }
    }
}

/// Whether the daemon may tell the watchdog it is alive: only if neither the sync in
/// progress (`sync`) nor the queue pass in progress (`pass`) has been running for
/// `limit` or longer. Idle (`None`) is progress. The error says what is stuck.
pub fn progress(
    sync: Option<Duration>,
    pass: Option<Duration>,
    limit: Duration,
) -> Result<(), String> {
    if let Some(d) = sync.filter(|d| *d >= limit) {
        return Err(format!(
            "a sync of the backing file has been in progress for {}s",
            d.as_secs()
        ));
    }
    if let Some(d) = pass.filter(|d| *d >= limit) {
        return Err(format!(
            "a request-queue pass has been in progress for {}s",
            d.as_secs()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn listening(dir: &std::path::Path, name: &str) -> OwnedFd {
        OwnedFd::from(UnixListener::bind(dir.join(name)).unwrap())
    }

    #[test]
    fn names_give_the_roles_and_one_unnamed_socket_is_the_vhost_user_one() {
        let d = tempfile::tempdir().unwrap();
        let got = classify(
            vec![listening(d.path(), "a"), listening(d.path(), "b")],
            Some("control:vhost-user".into()),
        )
        .unwrap();
        let path = |l: &Option<UnixListener>| {
            l.as_ref()
                .unwrap()
                .local_addr()
                .unwrap()
                .as_pathname()
                .unwrap()
                .to_owned()
        };
        assert_eq!(path(&got.control), d.path().join("a"));
        assert_eq!(path(&got.vhost_user), d.path().join("b"));

        let one = classify(vec![listening(d.path(), "c")], None).unwrap();
        assert_eq!(path(&one.vhost_user), d.path().join("c"));
        assert!(one.control.is_none());
        let unit = classify(
            vec![listening(d.path(), "u")],
            Some("vhost-device-pmem@vm0.socket".into()),
        )
        .unwrap();
        assert_eq!(path(&unit.vhost_user), d.path().join("u"));
    }

    #[test]
    fn unknown_duplicate_unnamed_and_miscounted_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let n = std::cell::Cell::new(0);
        let two = || {
            n.set(n.get() + 2);
            vec![
                listening(d.path(), &format!("s{}", n.get())),
                listening(d.path(), &format!("s{}", n.get() + 1)),
            ]
        };
        assert!(matches!(
            classify(two(), Some("vhost-user:metrics".into())),
            Err(ActivationError::UnknownName(n)) if n == "metrics"
        ));
        assert!(matches!(
            classify(two(), Some("control:control".into())),
            Err(ActivationError::Duplicate(_))
        ));
        assert!(matches!(
            classify(two(), None),
            Err(ActivationError::Unnamed { count: 2 })
        ));
        assert!(matches!(
            classify(two(), Some("vhost-user".into())),
            Err(ActivationError::NameCount { names: 1, fds: 2 })
        ));
    }

    #[test]
    fn a_socket_that_does_not_listen_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = OwnedFd::from(a);
        let raw = fd.as_raw_fd();
        match classify(vec![fd], Some("vhost-user".into())) {
            Err(ActivationError::NotAListener { fd, .. }) => assert_eq!(fd, raw),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn notify_sends_one_datagram_to_a_path_or_an_abstract_name() {
        // One test touches NOTIFY_SOCKET, so no other test races the variable.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\nSTATUS=x").unwrap());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let name = format!("vdp-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(notify("WATCHDOG=1").unwrap());
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").unwrap());
    }

    #[test]
    fn a_sync_held_longer_than_the_interval_stops_the_pings() {
        use std::{
            sync::{mpsc, Arc},
            time::Instant,
        };

        use crate::durability::{Flusher, Policy};

        let limit = Duration::from_millis(200);
        let file = tempfile::tempfile().unwrap();
        let flusher = Arc::new(Flusher::new(file, Policy::Datasync));
        let check = |f: &Flusher| progress(f.busy.running_for(), None, limit);
        // Idle: progress.
        assert_eq!(check(&flusher), Ok(()));
        // A real flush whose sync is held in the test hook, as a hung fdatasync.
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        flusher.set_sync_hook(Box::new(move || {
            entered_tx.send(()).unwrap();
            let _ = release_rx.lock().unwrap().recv();
        }));
        let worker = {
            let f = flusher.clone();
            std::thread::spawn(move || f.flush_batch(1, Instant::now()))
        };
        entered.recv().unwrap();
        // Shorter than the interval: still progress.
        assert_eq!(check(&flusher), Ok(()));
        std::thread::sleep(limit + Duration::from_millis(50));
        let err = check(&flusher).unwrap_err();
        assert!(err.contains("sync"), "{err}");
        release.send(()).unwrap();
        worker.join().unwrap().unwrap();
        // The sync ended: progress again.
        assert_eq!(check(&flusher), Ok(()));
        // A stuck queue pass stops the pings too.
        assert!(progress(None, Some(limit), limit)
            .unwrap_err()
            .contains("queue"));
    }

    #[test]
    fn the_notifier_stops_pinging_while_a_sync_is_held_and_resumes_after() {
        use std::{
            sync::{mpsc, Arc},
            time::Instant,
        };

        use crate::durability::{Flusher, Policy};

        let interval = Duration::from_millis(300);
        let tick = interval / 2;
        let flusher = Arc::new(Flusher::new(
            tempfile::tempfile().unwrap(),
            Policy::Datasync,
        ));
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        flusher.set_sync_hook(Box::new(move || {
            entered_tx.send(()).unwrap();
            let _ = release_rx.lock().unwrap().recv();
        }));
        // The messages go over a real datagram socket pair, as to the manager.
        let (tx, rx) = UnixDatagram::pair().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let services = Arc::new(Services::default());
        let hub = crate::events::EventHub::default();
        let changes = hub.subscribe(false);
        let notifier = {
            let (services, flusher) = (services.clone(), flusher.clone());
            std::thread::spawn(move || {
                run_notifier(
                    &services,
                    &changes,
                    Some(tick),
                    Some(interval),
                    || "policy datasync, health healthy".into(),
                    || (flusher.busy.running_for(), None),
                    |m| {
                        tx.send(m.as_bytes()).unwrap();
                    },
                )
            })
        };
        // Messages received over `d`: (pings, statuses).
        let collect = |d: Duration| {
            let (mut pings, mut statuses) = (0, Vec::new());
            let end = Instant::now() + d;
            let mut buf = [0u8; 512];
            while Instant::now() < end {
                if let Ok(n) = rx.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
                    statuses.extend(
                        m.lines()
                            .filter_map(|l| l.strip_prefix("STATUS="))
                            .map(String::from),
                    );
                }
            }
            (pings, statuses)
        };
        let (pings, statuses) = collect(interval * 2);
        assert!(pings >= 3, "{pings} pings while idle");
        assert_eq!(statuses, ["policy datasync, health healthy"]);

        // A real flush whose sync is held: a hung fdatasync.
        let worker = {
            let f = flusher.clone();
            std::thread::spawn(move || f.flush_batch(1, Instant::now()))
        };
        entered.recv().unwrap();
        // Within one interval (plus a tick) the pings stop, and stay stopped.
        let (_, first) = collect(interval + tick);
        let (pings, statuses) = collect(interval * 3);
        assert_eq!(pings, 0, "pings while a sync is held: {statuses:?}");
        assert!(
            first
                .iter()
                .chain(&statuses)
                .any(|s| s.contains("; STUCK: a sync of the backing file")),
            "{first:?} {statuses:?}"
        );
        release.send(()).unwrap();
        worker.join().unwrap().unwrap();
        let (pings, statuses) = collect(interval * 2);
        assert!(pings >= 3, "{pings} pings after the sync ended");
        assert_eq!(statuses, ["policy datasync, health healthy"]);
        services.shutdown();
        notifier.join().unwrap();
    }

    #[test]
    fn a_stuck_sync_is_named_in_the_status() {
        let services = Services::default();
        let sent = std::sync::Mutex::new(Vec::<String>::new());
        let ticks = std::sync::atomic::AtomicU32::new(0);
        let hub = crate::events::EventHub::default();
        run_notifier(
            &services,
            &hub.subscribe(false),
            Some(Duration::from_millis(1)),
            Some(Duration::from_secs(1)),
            || "policy fsync, health healthy".into(),
            || {
                if ticks.fetch_add(1, Ordering::Relaxed) == 2 {
                    services.shutdown();
                }
                (Some(Duration::from_secs(2)), None)
            },
            |m| sent.lock().unwrap().push(m.to_string()),
        );
        let sent = sent.into_inner().unwrap();
        assert!(sent.iter().all(|m| !m.contains("WATCHDOG=1")), "{sent:?}");
        assert!(
            sent[0].starts_with(
                "STATUS=policy fsync, health healthy; STUCK: a sync of the backing file"
            ),
            "{sent:?}"
        );
    }

    #[test]
    fn without_a_watchdog_the_notifier_wakes_only_on_events() {
        use std::sync::{atomic::AtomicU32, Arc};

        let services = Arc::new(Services::default());
        let hub = Arc::new(crate::events::EventHub::default());
        let changes = hub.subscribe(false);
        let wakes = Arc::new(AtomicU32::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let notifier = {
            let (services, wakes) = (services.clone(), wakes.clone());
            std::thread::spawn(move || {
                run_notifier(
                    &services,
                    &changes,
                    None,
                    None,
                    || format!("status {}", wakes.fetch_add(1, Ordering::Relaxed)),
                    || (None, None),
                    |m| tx.send(m.to_string()).unwrap(),
                )
            })
        };
        // Each event wakes it once, and each wake reads the status once.
        for i in 0..3 {
            hub.publish(crate::events::EventKind::Sealed { sealed: true });
            assert_eq!(rx.recv().unwrap(), format!("STATUS=status {i}"));
        }
        // Shutdown ends it at the next event (the host publishes one at exit).
        services.shutdown();
        hub.publish(crate::events::EventKind::Stopping);
        notifier.join().unwrap();
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            3,
            "no wake-up without an event"
        );
    }
}
