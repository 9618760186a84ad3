// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Daemon events: a small broadcast hub that the control socket's `events` command
//! streams to subscribers as JSON lines.
//!
//! Owns: the event kinds and their wire form, and the fan-out. Never blocks the
//! publisher: a subscriber that does not keep up loses events (and is told so), it
//! never slows the watcher or the data path.

use std::{
    collections::VecDeque,
    sync::{
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Mutex,
    },
};

use serde::Serialize;

use crate::util::{lock, rfc3339_now};

/// Events kept for subscribers that ask for the backlog.
const BACKLOG: usize = 64;
/// Events queued per subscriber before it starts losing them.
const SUBSCRIBER_QUEUE: usize = 256;

/// What happened. Serialized with an `"event"` tag in kebab-case; new kinds (e.g.
/// media errors) are new variants, and existing field names never change.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// The durability policy was weakened while serving (one way).
    PolicyDowngraded {
        from: String,
        to: String,
        reason: String,
    },
    /// The block map differs from the one the policy was chosen for.
    BlockMapChanged {
        reason: String,
        problems: Vec<String>,
    },
    /// The write lease on the backing file was broken: another process opened or
    /// truncated the file.
    LeaseBroken {
        reason: String,
        /// Other processes seen holding the file open, as "pid N (comm)".
        openers: Vec<String>,
    },
    /// The lease is held (again): no other process has the file open.
    LeaseTaken { lease: String },
    /// The filesystem or the situation does not allow a lease.
    LeaseUnavailable { reason: String },
    /// The immutable attribute was set (`--seal`) or cleared.
    Sealed { sealed: bool },
    /// Re-reading the block map failed.
    VerifyFailed { error: String },
    /// The served file itself changed under the daemon: deleted, renamed over,
    /// moved away, truncated or resized (`change`), as the guard saw it.
    BackingFileChanged { change: String, reason: String },
    /// A sync of the backing file failed; every later flush is answered EIO.
    SyncFailed {
        errno: i32,
        error: String,
        /// flush, downgrade, disconnect or shutdown.
        context: String,
    },
    /// The request queue cannot be processed (health `queue-broken`).
    QueueBroken { reason: String },
    /// The request queue is processed again (the ring is sane, or the device was
    /// reset).
    QueueRecovered { after: String },
    /// An NVDIMM export found QEMU mapping the file it judged (`nvdimm`).
    NvdimmMapped {
        id: String,
        qemu_pid: u32,
        /// The mapping's line of /proc/PID/smaps.
        maps_line: String,
        /// MAP_SYNC is in effect for the mapping (VmFlags `sf`).
        sf: bool,
    },
    /// An NVDIMM export refused QEMU's mapping (missing, or without `sf` in
    /// `direct`), or QEMU went away.
    NvdimmRefused { id: String, reason: String },
    /// The set of bad ranges of the backing file changed (media errors).
    BadRangesChanged {
        /// host-device, memory-failure, scrub or operator.
        source: String,
        added: Vec<crate::media::ranges::BadRange>,
        cleared: Vec<crate::media::ranges::BadRange>,
        /// Ranges in the set now.
        total: usize,
    },
    /// A VMM negotiated the device's features over the vhost-user socket (a
    /// client that connects and leaves without negotiating is no VMM).
    VmmConnected {
        pid: Option<u32>,
        comm: Option<String>,
    },
    /// The VMM's connection ended; the device was reset.
    VmmDisconnected { reason: String },
    /// The daemon is stopping (a signal, QEMU's exit, or an error).
    Stopping,
    /// The seccomp filter answered a call outside the allow-list ENOSYS (sent
    /// once per call number; `status.sandbox_denials` counts every one).
    SandboxDenied {
        /// The call's number on this architecture.
        syscall: u32,
        name: String,
        /// The thread that made it first.
        thread: String,
    },
}

/// One event as sent: its kind and fields, a sequence number and the time.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    /// 1, 2, 3... in publication order; a gap tells a subscriber it lost events.
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
}

impl Event {
    /// The wire form: one JSON object, no newline.
    pub fn to_line(&self) -> String {
        crate::jsonl::encode(self)
            .unwrap_or_else(|e| format!(r#"{{"v":1,"event":"error","error":"{e}"}}"#))
    }
}

#[derive(Default)]
struct Inner {
    seq: u64,
    backlog: VecDeque<Event>,
    subscribers: Vec<SyncSender<Event>>,
}

/// Fan-out of events to any number of subscribers.
#[derive(Default)]
pub struct EventHub {
    inner: Mutex<Inner>,
}

impl EventHub {
    /// Publishes an event to every subscriber (dropping those that left) and keeps
    /// it in the backlog. Returns the event as published.
    pub fn publish(&self, kind: EventKind) -> Event {
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        let event = Event {
            kind,
            seq: inner.seq,
            time: rfc3339_now(),
        };
        if inner.backlog.len() == BACKLOG {
            inner.backlog.pop_front();
        }
        inner.backlog.push_back(event.clone());
        inner
            .subscribers
            .retain(|tx| match tx.try_send(event.clone()) {
                Ok(()) | Err(TrySendError::Full(_)) => true,
                Err(TrySendError::Disconnected(_)) => false,
            });
        event
    }

    /// A new subscription; with `backlog`, the recent events come first.
    pub fn subscribe(&self, backlog: bool) -> Receiver<Event> {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_QUEUE);
        let mut inner = lock(&self.inner);
        if backlog {
            for e in &inner.backlog {
                let _ = tx.try_send(e.clone());
            }
        }
        inner.subscribers.push(tx);
        rx
    }

    /// Events published so far that are still in the backlog.
    pub fn recent(&self) -> Vec<Event> {
        lock(&self.inner).backlog.iter().cloned().collect()
    }

    /// Live subscriptions (those that left are noticed at the next publish).
    pub fn subscribers(&self) -> usize {
        lock(&self.inner).subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_wire_form() {
        let hub = EventHub::default();
        let e = hub.publish(EventKind::PolicyDowngraded {
            from: "datasync".into(),
            to: "fsync".into(),
            reason: "map changed".into(),
        });
        let v: serde_json::Value = serde_json::from_str(&e.to_line()).unwrap();
        assert_eq!(v["event"], "policy-downgraded");
        assert_eq!(v["reason"], "map changed");
        assert_eq!(v["from"], "datasync");
        assert_eq!(v["seq"], 1);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        let e = hub.publish(EventKind::LeaseBroken {
            reason: "r".into(),
            openers: vec!["pid 1 (init)".into()],
        });
        assert!(
            e.to_line().starts_with(r#"{"v":1,"event":"lease-broken","#),
            "{}",
            e.to_line()
        );
    }

    #[test]
    fn subscribers_get_what_is_published_after_they_join_and_leavers_are_dropped() {
        let hub = EventHub::default();
        hub.publish(EventKind::Sealed { sealed: true });
        let late = hub.subscribe(false);
        let replay = hub.subscribe(true);
        hub.publish(EventKind::Sealed { sealed: false });
        assert_eq!(late.try_recv().unwrap().seq, 2);
        assert!(late.try_recv().is_err());
        assert_eq!(replay.try_recv().unwrap().seq, 1);
        assert_eq!(replay.try_recv().unwrap().seq, 2);
        drop(late);
        hub.publish(EventKind::Sealed { sealed: true });
        assert_eq!(hub.subscribers(), 1);
        assert_eq!(hub.recent().len(), 3);
    }

    #[test]
    fn a_slow_subscriber_never_blocks_the_publisher() {
        let hub = EventHub::default();
        let rx = hub.subscribe(false);
        for _ in 0..(SUBSCRIBER_QUEUE + 10) {
            hub.publish(EventKind::Sealed { sealed: true });
        }
        assert_eq!(rx.try_iter().count(), SUBSCRIBER_QUEUE);
        assert_eq!(hub.recent().len(), BACKLOG);
    }
}
