// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Accepting connections without spinning: the control socket's and the guest
//! channel's accept loops, and the VMM accept loop's retry.
//!
//! Owns: the back-off after a failed accept or a failed connection set-up (10 ms,
//! doubling up to 1 s, reset by a success), the spare descriptor a listener gives
//! up when the process is out of descriptors (EMFILE/ENFILE) so that it can still
//! take the waiting connection, tell it why and close it, and the rate-limited log
//! of both. Never decides whom to serve or what a connection says.

use std::{
    fmt::Display,
    io,
    os::{
        fd::{AsFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    time::{Duration, Instant},
};

use log::warn;

use crate::util::GuestLog;

/// Waits between failed attempts: [`Self::FIRST`], doubling up to [`Self::MAX`];
/// a success starts over. Failures are logged at most [`GuestLog::BURST`] per
/// [`GuestLog::WINDOW`], then counted in one line.
#[derive(Debug)]
pub struct Backoff {
    what: &'static str,
    next: Duration,
    log: GuestLog,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// `what` names what fails, in the log ("control socket accept").
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            next: Self::FIRST,
            log: GuestLog::with_hint(what, ""),
        }
    }

    /// Records a failure (logged, rate-limited) and returns how long to wait
    /// before the next attempt.
    pub fn failed(&mut self, error: &dyn Display) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.log(format_args!("{error}; retrying in {} ms", wait.as_millis()));
        wait
    }

    /// Logs a failure that was dealt with (rate-limited), without backing off.
    pub fn log(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.log.allow(Instant::now()) {
            warn!("{} failed: {msg}", self.what);
        }
    }

    /// The next failure waits [`Self::FIRST`] again.
    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }

    /// [`Self::failed`], then waits that long or until `stop` is readable; true
    /// if `stop` is (the caller ends its loop).
    pub fn pause(&mut self, error: &dyn Display, stop: RawFd) -> bool {
        let wait = self.failed(error);
        stop_within(stop, wait)
    }
}

/// Whether `stop` becomes readable within `wait` (poll(2); a poll error counts as
/// not readable, the caller's next wait sees the descriptor again).
pub fn stop_within(stop: RawFd, wait: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: stop,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return rc > 0 && fd.revents != 0;
    }
}

/// What one [`Acceptor::accept`] gave.
#[derive(Debug)]
pub enum Accepted {
    /// A connection to serve.
    Stream(UnixStream),
    /// Nothing to serve: a connection that went away before it was taken.
    Nothing,
    /// The process was out of descriptors: the waiting connection was taken with
    /// the spare one, told so and closed. Wait [`Backoff::FIRST`] before the next
    /// accept (each waiting client gets its answer soon; a flood of them costs at
    /// most a hundred accepts a second).
    Shed,
    /// The accept failed; wait this long before the next one.
    Failed(Duration),
}

/// A listener with a spare descriptor held for the day the process runs out.
pub struct Acceptor {
    listener: UnixListener,
    /// A duplicate of the listener, closed to make room for one accept when the
    /// descriptor table is full, taken again afterwards.
    spare: Option<OwnedFd>,
    backoff: Backoff,
    /// Connections taken and closed for want of descriptors.
    pub shed: u64,
}

impl Acceptor {
    /// `what` names the listener in the log ("control socket accept").
    pub fn new(listener: UnixListener, what: &'static str) -> Self {
        let spare = duplicate(&listener);
        Self {
            listener,
            spare,
            backoff: Backoff::new(what),
            shed: 0,
        }
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts one connection. Out of descriptors, the spare one is given up for
    /// the accept, the connection is sent `refusal` (one line, never blocking) and
    /// closed, and the spare is taken back; without a spare (another thread took
    /// the slot) it backs off like any failed accept.
    pub fn accept(&mut self, refusal: &[u8]) -> Accepted {
        match self.listener.accept() {
            Ok((stream, _)) => {
                self.backoff.succeeded();
                if self.spare.is_none() {
                    self.spare = duplicate(&self.listener);
                }
                Accepted::Stream(stream)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                Accepted::Nothing
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Accepted::Nothing,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                let Some(spare) = self.spare.take() else {
                    return Accepted::Failed(self.backoff.failed(&e));
                };
                drop(spare);
                self.backoff.log(format_args!(
                    "{e}: the waiting connection is told so and closed"
                ));
                if let Ok((stream, _)) = self.listener.accept() {
                    refuse(&stream, refusal);
                    self.shed += 1;
                }
                self.spare = duplicate(&self.listener);
                Accepted::Shed
            }
            Err(e) => Accepted::Failed(self.backoff.failed(&e)),
        }
    }
}

/// A close-on-exec duplicate of `fd` (the spare descriptor), or none if the table
/// is full.
fn duplicate(fd: &impl AsFd) -> Option<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, 0).ok()
}

/// Sends `line` to `stream` without waiting: a peer whose buffer is full, or gone,
/// does not get it.
pub fn send_line(stream: &UnixStream, line: &[u8]) {
    let _ = rustix::net::send(
        stream,
        line,
        rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
    );
}

/// Sends `line` and ends our side so that the peer reads it, then the end: what
/// the peer already sent is read and dropped (closing a unix socket with unread
/// data makes the peer's next read fail with ECONNRESET, before our line). Never
/// waits. The caller then closes `stream`.
pub fn refuse(stream: &UnixStream, line: &[u8]) {
    send_line(stream, line);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    // At most a request line's worth: a peer that keeps sending is cut off.
    for _ in 0..(crate::jsonl::MAX_LINE / buf.len() + 1) {
        match rustix::net::recv(stream, &mut buf[..], rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::fd::AsRawFd};

    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_starts_over_after_a_success() {
        let mut b = Backoff::new("test accept");
        let waits: Vec<_> = (0..10).map(|_| b.failed(&"EMFILE")).collect();
        assert_eq!(waits[0], Backoff::FIRST);
        assert_eq!(waits[1], Backoff::FIRST * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), Backoff::MAX);
        b.succeeded();
        assert_eq!(b.failed(&"EMFILE"), Backoff::FIRST);
    }

    #[test]
    fn a_stop_signal_ends_the_pause() {
        let (r, mut w) = UnixStream::pair().unwrap();
        assert!(!stop_within(r.as_raw_fd(), Duration::from_millis(1)));
        std::io::Write::write_all(&mut w, b"x").unwrap();
        // A whole day's pause, ended at once by the signal.
        assert!(stop_within(r.as_raw_fd(), Duration::from_secs(86_400)));
    }

    #[test]
    fn a_connection_is_taken_and_closed_with_the_spare_when_descriptors_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut acceptor = Acceptor::new(UnixListener::bind(&path).unwrap(), "test accept");
        // A child with a descriptor table filled to its limit: the only way to
        // get EMFILE without starving the test process.
        let mut client = UnixStream::connect(&path).unwrap();
        // SAFETY: fork in a test; the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                if acceptor.spare.as_ref().is_none_or(|s| s.as_raw_fd() >= 256) {
                    return 3;
                }
                let lim = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: 256,
                };
                // SAFETY: valid rlimit.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                    return 2;
                }
                // SAFETY: dup of a valid descriptor until the table is full.
                while unsafe { libc::dup(0) } >= 0 {}
                match acceptor.accept(b"{\"ok\":false,\"error\":\"out of descriptors\"}\n") {
                    Accepted::Shed if acceptor.shed == 1 && acceptor.spare.is_some() => 0,
                    _ => 1,
                }
            })();
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child's accept did not shed"
        );
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "{\"ok\":false,\"error\":\"out of descriptors\"}\n");
    }
}
