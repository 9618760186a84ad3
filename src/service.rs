// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's long-lived threads (guard, media sources, control server, guest
//! channel): one way to start them, so that none dies silently.
//!
//! Owns: the thread boundary and the one shutdown signal. A panic is caught there,
//! logged, recorded for `status` and handed to the service's own last word (the
//! guard's is "make the data durable and stop claiming an immutable map"). At exit
//! every service is asked to stop at once and joined. Never decides what a service
//! does.

use std::{
    any::Any,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    panic::{self, AssertUnwindSafe},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{error, warn};
use serde::{Deserialize, Serialize};

use crate::util::{lock, rfc3339_now};

/// A service thread that ended by panicking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFailure {
    pub service: String,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

/// The daemon's service threads: how they started, which died, and the signal that
/// stops them all.
pub struct Services {
    failed: Mutex<Vec<ServiceFailure>>,
    stopping: Mutex<bool>,
    stop_wake: Condvar,
    /// Readable once shutdown was asked for (never reset), for services that wait in
    /// poll(2).
    stop_fd: OwnedFd,
    threads: Mutex<Vec<(String, JoinHandle<()>)>>,
    /// Short-lived threads (one per control client): joined at exit like the
    /// services, and reaped as they finish so their number stays that of the live
    /// ones.
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Run once at shutdown, for services that wait in something neither a sleep
    /// nor a poll of `stop_fd` can interrupt (a connection's read).
    on_shutdown: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

impl Default for Services {
    fn default() -> Self {
        Self {
            failed: Mutex::default(),
            stopping: Mutex::new(false),
            stop_wake: Condvar::new(),
            stop_fd: rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
            )
            .expect("eventfd"),
            threads: Mutex::default(),
            workers: Mutex::default(),
            on_shutdown: Mutex::default(),
        }
    }
}

impl Services {
    /// Starts a service that runs until [`Self::shutdown`]; it is joined by
    /// [`Self::stop_all`]. See [`Self::spawn_owned`] for the panic handling.
    pub fn spawn<F, L>(self: &Arc<Self>, name: &str, last_word: L, body: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
        L: FnOnce(&str) + Send + 'static,
    {
        let handle = self.spawn_owned(name, last_word, body)?;
        lock(&self.threads).push((name.to_string(), handle));
        Ok(())
    }

    /// Starts a short-lived worker (one client's connection) with the same panic
    /// handling as a service; it is joined by [`Self::stop_all`] if still running.
    /// Workers that ended are reaped here, so the list holds only live ones.
    pub fn spawn_worker<F>(self: &Arc<Self>, name: &str, body: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let handle = self.spawn_owned(name, |_| {}, body)?;
        let mut workers = lock(&self.workers);
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *workers)
            .into_iter()
            .partition(JoinHandle::is_finished);
        *workers = live;
        workers.push(handle);
        drop(workers);
        for h in done {
            let _ = h.join();
        }
        Ok(())
    }

    /// Workers started by [`Self::spawn_worker`] that have not been reaped yet.
    pub fn workers(&self) -> usize {
        lock(&self.workers).len()
    }

    /// Whether shutdown was asked for.
    pub fn stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    /// Sleeps up to `d`, or less if shutdown is asked for; returns whether it was.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.stopping);
        let (guard, _) = self
            .stop_wake
            .wait_timeout_while(guard, d, |stopping| !*stopping)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// A descriptor that becomes readable when shutdown is asked for.
    pub fn stop_fd(&self) -> BorrowedFd<'_> {
        self.stop_fd.as_fd()
    }

    /// Runs `f` at shutdown (at once if shutdown was already asked for).
    pub fn on_shutdown(&self, f: Box<dyn FnOnce() + Send>) {
        if self.stopping() {
            f();
        } else {
            lock(&self.on_shutdown).push(f);
        }
    }

    /// The one shutdown signal: every service sees it at its next wait.
    pub fn shutdown(&self) {
        *lock(&self.stopping) = true;
        self.stop_wake.notify_all();
        let _ = rustix::io::write(&self.stop_fd, &1u64.to_ne_bytes());
        for f in std::mem::take(&mut *lock(&self.on_shutdown)) {
            f();
        }
    }

    /// Asks every service to stop and joins them, waiting at most `grace` in all; a
    /// service still busy then (a scrub in the middle of a read) is named and left
    /// to end with the process.
    pub fn stop_all(&self, grace: Duration) {
        self.shutdown();
        let deadline = Instant::now() + grace;
        let mut threads = std::mem::take(&mut *lock(&self.threads));
        threads.extend(
            std::mem::take(&mut *lock(&self.workers))
                .into_iter()
                .map(|h| (h.thread().name().unwrap_or("worker").to_string(), h)),
        );
        for (name, handle) in threads {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                warn!("service {name} did not stop within {grace:?}; it ends with the process");
            }
        }
    }

    /// Starts `body` on a thread called `name` and hands back its handle (the caller
    /// stops and joins it). If it panics, the panic is logged and recorded, then
    /// `last_word` runs with the reason (on the same thread).
    pub fn spawn_owned<F, L>(
        self: &Arc<Self>,
        name: &str,
        last_word: L,
        body: F,
    ) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
        L: FnOnce(&str) + Send + 'static,
    {
        let me = self.clone();
        let service = name.to_string();
        thread::Builder::new().name(name.into()).spawn(move || {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(body)) {
                let reason = panic_message(payload.as_ref());
                error!("service thread {service} died: {reason}");
                lock(&me.failed).push(ServiceFailure {
                    service,
                    reason: reason.clone(),
                    at: rfc3339_now(),
                });
                last_word(&reason);
            }
        })
    }

    /// Services that died, in order.
    pub fn failures(&self) -> Vec<ServiceFailure> {
        lock(&self.failed).clone()
    }
}

/// Waits until `fd` is readable (true) or shutdown is asked for (false).
pub fn wait_readable(services: &Services, fd: BorrowedFd<'_>) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [
            PollFd::new(&fd, PollFlags::IN),
            PollFd::new(&services.stop_fd, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if !fds[1].revents().is_empty() {
            return Ok(false);
        }
        if !fds[0].revents().is_empty() {
            return Ok(true);
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn a_panic_is_recorded_and_the_last_word_runs() {
        let services = Arc::new(Services::default());
        let (tx, rx) = mpsc::channel();
        services
            .spawn_owned(
                "doomed",
                move |why| tx.send(why.to_string()).unwrap(),
                || panic!("boom {}", 7),
            )
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(rx.recv().unwrap(), "boom 7");
        let f = services.failures();
        assert_eq!(
            (f[0].service.as_str(), f[0].reason.as_str()),
            ("doomed", "boom 7")
        );
        // A service that returns normally is no failure.
        services
            .spawn_owned("fine", |_| unreachable!(), || {})
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(services.failures().len(), 1);
    }

    #[test]
    fn finished_workers_are_reaped_and_live_ones_joined_at_exit() {
        let services = Arc::new(Services::default());
        for _ in 0..100 {
            services.spawn_worker("short", || {}).unwrap();
            // Each has ended (or will): the list never holds more than the live ones.
            while lock(&services.workers)[..]
                .iter()
                .filter(|h| !h.is_finished())
                .count()
                > 0
            {
                thread::yield_now();
            }
        }
        assert!(services.workers() <= 1, "{} kept", services.workers());
        let (tx, rx) = mpsc::channel();
        let svc = services.clone();
        services
            .spawn_worker("waits-for-stop", move || {
                while !svc.sleep(Duration::from_secs(60)) {}
                tx.send(()).unwrap();
            })
            .unwrap();
        services.stop_all(Duration::from_secs(30));
        rx.try_recv()
            .expect("joined: it had finished when stop_all returned");
        assert_eq!(services.workers(), 0);
        // A worker's panic is recorded like a service's.
        services
            .spawn_worker("bad", || panic!("client bug"))
            .unwrap();
        services.stop_all(Duration::from_secs(30));
        assert_eq!(services.failures()[0].service, "bad");
    }
}
