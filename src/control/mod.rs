// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: newline-delimited JSON requests and answers for operators and
//! orchestration (`{"command":"status"}` → `{"ok":true,"status":{…}}`), and the
//! `events` stream (`{"command":"events"}` → an acknowledgement, then one JSON line
//! per event until the subscriber disconnects).
//!
//! Owns: the wire format of control requests and the server thread, and which
//! commands change state (see [`clients`] for who may send them). Never changes
//! the device or the durability policy; the only commands that act are
//! `badblocks-inject` and `badblocks-clear` (operators recording media errors).

pub mod clients;
pub mod metrics;
pub mod metrics_file;

use std::{
    io,
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{atomic::Ordering, mpsc::RecvTimeoutError, Arc},
    time::Duration,
};

use log::debug;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    control::clients::{
        Access, ClientCounters, ClientPolicy, Clients, DeadlineReader, Peer, Ticket,
    },
    device::queue::{QueueCounters, QueueStats},
    durability::{FlushStats, StatsSnapshot},
    events::EventHub,
    jsonl::{self, Line, LineReader},
    media::{ranges::BadRange, MediaErrors, Source},
    report::StatusReport,
    service::{self, Services},
    util::accept::{self, Accepted, Acceptor},
};

/// A control request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Mode and why, file, size, negotiated features, connection and region state.
    Status,
    /// Flush counters and latency summary.
    Stats,
    /// Everything `stats` and `status` count, in the Prometheus text format.
    Metrics,
    /// Streams events (JSON lines) until the client disconnects; with `backlog`,
    /// the recent events (up to 64) come first.
    Events {
        #[serde(default)]
        backlog: bool,
    },
    /// The known bad ranges of the backing file (file offsets, bytes).
    BadblocksList,
    /// Records a bad range, as a media-error source would (sector-aligned outward).
    BadblocksInject { offset: u64, length: u64 },
    /// Forgets a bad range (sector-aligned inward).
    BadblocksClear { offset: u64, length: u64 },
}

impl Request {
    /// Whether the request changes the daemon's state: only operators may send
    /// it (root, the daemon's uid, `--operator-group`). Every new command is
    /// classified here.
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Status
            | Request::Stats
            | Request::Metrics
            | Request::Events { .. }
            | Request::BadblocksList => false,
            Request::BadblocksInject { .. } | Request::BadblocksClear { .. } => true,
        }
    }

    /// The command as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Stats => "stats",
            Request::Metrics => "metrics",
            Request::Events { .. } => "events",
            Request::BadblocksList => "badblocks-list",
            Request::BadblocksInject { .. } => "badblocks-inject",
            Request::BadblocksClear { .. } => "badblocks-clear",
        }
    }
}

/// How often a streaming connection checks whether its subscriber left.
const EVENTS_IDLE_CHECK: Duration = Duration::from_millis(500);

/// What the control socket serves, and nothing more: the `status` document, the
/// flush counters, the bad-range set (which `badblocks-inject`/`-clear` change: the
/// only commands that act), and the event hub.
#[derive(Clone)]
pub struct ControlHandles {
    pub status: Arc<dyn Fn() -> StatusReport + Send + Sync>,
    /// The flush counters of the region's flusher.
    pub flush: Arc<FlushStats>,
    pub queue_stats: Arc<QueueStats>,
    pub media: Arc<MediaErrors>,
    pub events: Arc<EventHub>,
    /// The `instance` label of the metrics.
    pub metrics_instance: Arc<str>,
}

impl ControlHandles {
    /// The `stats` answer now (without the control socket's own counters, which
    /// its server adds).
    pub fn stats(&self) -> StatsReport {
        StatsReport {
            flush: self.flush.snapshot(),
            queue: self.queue_stats.snapshot(),
            clients: None,
        }
    }

    /// The metrics now, rendered (the `metrics` answer, the `--metrics-file` text).
    pub fn metrics(&self) -> String {
        metrics::render(&metrics::MetricsSnapshot {
            instance: self.metrics_instance.to_string(),
            status: (self.status)(),
            stats: self.stats(),
            latency: self.flush.latency_buckets(),
        })
    }
}

/// The `stats` answer: the flush counters and the queue's, side by side.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    #[serde(flatten)]
    pub flush: StatsSnapshot,
    #[serde(flatten)]
    pub queue: QueueCounters,
    /// The control socket's clients (its server's own counters).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientCounters>,
}

/// Answers one request line (decoded with its version checked).
pub fn answer(daemon: &ControlHandles, line: &str) -> Answer {
    match jsonl::decode::<Request>(line) {
        Ok(req) => answer_request(daemon, req),
        Err(e) => Answer::error(format!("bad request {line:?}: {e}")),
    }
}

/// One answer of the control socket; which fields are set depends on the request.
/// Built typed here and read typed by the CLI ([`request`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<StatusReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsReport>,
    /// The bad ranges now (badblocks commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<BadRange>>,
    /// Ranges an inject added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<Vec<BadRange>>,
    /// Whether a clear changed anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Why the bad ranges are not on disk, if they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_error: Option<String>,
    /// The metrics in the Prometheus text exposition format 0.0.4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// "subscribed", the acknowledgement of an events stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
}

impl Answer {
    fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    fn error(e: impl Into<String>) -> Self {
        Self {
            error: Some(e.into()),
            ..Self::default()
        }
    }

    /// The answer, or its error as an `Err`.
    pub fn into_result(self) -> Result<Self, String> {
        if self.ok {
            Ok(self)
        } else {
            Err(self.error.unwrap_or_else(|| "request failed".into()))
        }
    }
}

/// Answers one request.
pub fn answer_request(daemon: &ControlHandles, req: Request) -> Answer {
    let ranges = |persist| Answer {
        ranges: Some(daemon.media.list()),
        persist_error: if persist {
            daemon.media.persist_error()
        } else {
            None
        },
        ..Answer::ok()
    };
    match req {
        Request::Status => Answer {
            status: Some(Box::new((daemon.status)())),
            ..Answer::ok()
        },
        Request::Stats => Answer {
            stats: Some(daemon.stats()),
            ..Answer::ok()
        },
        Request::Metrics => Answer {
            metrics: Some(daemon.metrics()),
            ..Answer::ok()
        },
        Request::BadblocksList => ranges(false),
        Request::BadblocksInject { offset, length } => {
            match checked_range(offset, length, daemon.media.size()) {
                Err(e) => Answer::error(e),
                Ok(range) => {
                    let added = daemon.media.report(Source::Operator, &[range]);
                    Answer {
                        added: Some(added),
                        ..ranges(true)
                    }
                }
            }
        }
        Request::BadblocksClear { offset, length } => {
            match checked_range(offset, length, daemon.media.size()) {
                Err(e) => Answer::error(e),
                Ok(range) => {
                    let changed = daemon.media.clear(range);
                    Answer {
                        changed: Some(changed),
                        ..ranges(true)
                    }
                }
            }
        }
        Request::Events { .. } => {
            Answer::error("events is a stream: send it on its own connection")
        }
    }
}

/// A range from a client: non-empty, and inside the `size`-byte file (a range that
/// is not is refused, never clipped: the operator asked for bytes that do not exist).
fn checked_range(offset: u64, length: u64, size: u64) -> Result<BadRange, String> {
    if length == 0 {
        return Err("the length must be positive".into());
    }
    match offset.checked_add(length) {
        None => Err(format!(
            "offset {offset:#x} + length {length:#x} is past the largest file offset"
        )),
        Some(end) if end > size => Err(format!(
            "[{offset:#x}, {end:#x}) is not inside the file: it has {size:#x} bytes ({} MiB)",
            size >> 20
        )),
        Some(_) => Ok(BadRange { offset, length }),
    }
}

/// Serves the control socket on a background thread with the default
/// [`ClientPolicy`] (the `nvdimm` export's socket, owner only). See [`spawn_with`].
pub fn spawn(
    listener: UnixListener,
    daemon: ControlHandles,
    services: &Arc<Services>,
) -> std::io::Result<()> {
    spawn_with(listener, daemon, services, ClientPolicy::default())
}

/// Serves the control socket on a background thread, one worker thread (a
/// [`Services`] worker) per client, at most `policy.max_clients` at once (see
/// [`clients`]). The caller keeps the bound socket (and removes its path at exit);
/// this takes a duplicate of its listener. Accept errors back off, never spin; out
/// of descriptors, the waiting client is told so and closed ([`accept`]).
pub fn spawn_with(
    listener: UnixListener,
    daemon: ControlHandles,
    services: &Arc<Services>,
    policy: ClientPolicy,
) -> std::io::Result<()> {
    let clients = Clients::new(policy);
    {
        let clients = clients.clone();
        services.on_shutdown(Box::new(move || clients.close_all()));
    }
    let svc = services.clone();
    services.spawn(
        "control",
        |_| {},
        move || {
            let out_of_fds =
                clients::closing_line("the daemon is out of file descriptors; try again later");
            let mut acceptor = Acceptor::new(listener, "control socket accept");
            while let Ok(true) = service::wait_readable(&svc, acceptor.listener().as_fd()) {
                let pause = match acceptor.accept(&out_of_fds) {
                    Accepted::Stream(stream) => {
                        admit(&clients, &svc, &daemon, stream);
                        continue;
                    }
                    Accepted::Nothing => continue,
                    Accepted::Shed => {
                        clients.counters.shed.fetch_add(1, Ordering::Relaxed);
                        accept::Backoff::FIRST
                    }
                    Accepted::Failed(pause) => pause,
                };
                if svc.sleep(pause) {
                    break;
                }
            }
        },
    )
}

/// Gives `stream` a slot and a worker thread, or tells it why not.
fn admit(clients: &Arc<Clients>, svc: &Arc<Services>, daemon: &ControlHandles, stream: UnixStream) {
    let stream = Arc::new(stream);
    let Some(ticket) = clients.admit(stream.clone()) else {
        return;
    };
    let peer = Peer::of(&stream);
    let (d, c) = (daemon.clone(), clients.clone());
    let worker = stream.clone();
    if let Err(e) = svc.spawn_worker("control-client", move || {
        serve_peer(worker, &d, &c, &ticket, &peer);
    }) {
        // The ticket went with the closure: the slot is free again.
        clients.counters.shed.fetch_add(1, Ordering::Relaxed);
        accept::refuse(
            &stream,
            &clients::closing_line(&format!(
                "the daemon cannot start a thread for this client ({e}); try again later"
            )),
        );
        clients.notice(format_args!("cannot start a client thread: {e}"));
    }
}

/// Serves one client with every command allowed and no deadline (tests and
/// fuzzers drive it through a socket pair).
#[cfg(test)]
pub(crate) fn serve_client(stream: UnixStream, daemon: &ControlHandles) {
    let clients = Clients::new(ClientPolicy {
        idle_timeout: Duration::from_secs(3600),
        ..ClientPolicy::default()
    });
    let stream = Arc::new(stream);
    let Some(ticket) = clients.admit(stream.clone()) else {
        return;
    };
    let peer = Peer::of(&stream);
    serve_peer(stream, daemon, &clients, &ticket, &peer);
}

/// Answers `peer`'s requests until it leaves, takes longer than the idle timeout
/// to send one, or turns into an events stream.
fn serve_peer(
    stream: Arc<UnixStream>,
    daemon: &ControlHandles,
    clients: &Clients,
    ticket: &Ticket,
    peer: &Peer,
) {
    let policy = &clients.policy;
    let access = policy.access(peer);
    // An answer the client does not read is given up after the same time.
    let _ = stream.set_write_timeout(Some(policy.idle_timeout));
    let mut out = &*stream;
    let mut reader = LineReader::new(
        DeadlineReader::new(stream.clone(), policy.idle_timeout),
        jsonl::MAX_LINE,
    );
    loop {
        ticket.idle();
        reader.get_ref().restart(policy.idle_timeout);
        let msg = jsonl::read_message::<Request, _>(&mut reader);
        if !ticket.busy() {
            // Closed to make room for another client meanwhile.
            break;
        }
        let reply = match msg {
            Ok(None) => break,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                clients.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                accept::refuse(
                    &stream,
                    &clients::closing_line(&format!(
                        "closed: no complete request within {} s (--control-idle-timeout)",
                        policy.idle_timeout.as_secs()
                    )),
                );
                debug!("control client (pid {}) timed out", peer.pid);
                break;
            }
            Err(_) => break,
            Ok(Some(Ok(Request::Events { backlog }))) => {
                if !ticket.stream() {
                    Answer::error(format!(
                        "too many events streams ({} of {} clients); try again later",
                        policy.max_streams(),
                        policy.max_clients
                    ))
                } else {
                    if let Err(e) = stream_events(&mut out, daemon, backlog) {
                        debug!("events subscriber left: {e}");
                    }
                    return;
                }
            }
            Ok(Some(Ok(req))) if req.changes_state() && access == Access::ReadOnly => {
                clients.counters.denied.fetch_add(1, Ordering::Relaxed);
                clients.notice(format_args!(
                    "refused {} to uid {} (pid {}): not an operator (--operator-group)",
                    req.name(),
                    peer.uid,
                    peer.pid
                ));
                Answer::error(policy.refusal(peer, req.name()))
            }
            Ok(Some(Ok(Request::Stats))) => Answer {
                stats: Some(StatsReport {
                    clients: Some(clients.snapshot()),
                    ..daemon.stats()
                }),
                ..Answer::ok()
            },
            Ok(Some(Ok(req))) => answer_request(daemon, req),
            Ok(Some(Err(e))) => {
                if let jsonl::MessageError::TooLong { .. } = e {
                    clients.notice(format_args!("{e}"));
                }
                Answer::error(format!("bad request: {e}"))
            }
        };
        if jsonl::write_message(&mut out, &reply).is_err() {
            break;
        }
    }
    debug!("control client left");
}

/// Sends events to the subscriber until it disconnects (or a write fails). Whatever
/// it sends meanwhile is read and ignored.
fn stream_events(out: &mut &UnixStream, daemon: &ControlHandles, backlog: bool) -> io::Result<()> {
    let rx = daemon.events.subscribe(backlog);
    jsonl::write_message(
        out,
        &Answer {
            events: Some("subscribed".into()),
            ..Answer::ok()
        },
    )?;
    loop {
        match rx.recv_timeout(EVENTS_IDLE_CHECK) {
            Ok(event) => {
                jsonl::write_message(out, &event)?;
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer_closed(out)? {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Drains what the peer sent without blocking; true once it has closed its side.
fn peer_closed(stream: &UnixStream) -> io::Result<bool> {
    let mut buf = [0u8; 512];
    loop {
        match rustix::net::recv(stream, &mut buf[..], rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Ok(true),
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Client side: subscribes to events and calls `each` with every line (the
/// acknowledgement first) until `each` returns false or the daemon goes away.
pub fn subscribe(
    path: &Path,
    backlog: bool,
    mut each: impl FnMut(&str) -> bool,
) -> std::io::Result<()> {
    let stream = UnixStream::connect(path)?;
    jsonl::write_message(&mut &stream, &Request::Events { backlog })?;
    let mut reader = LineReader::new(&stream, jsonl::MAX_ANSWER_LINE);
    while let Some(line) = reader.next_line()? {
        let Line::Text(line) = line else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the daemon sent a line that is not UTF-8 or too long",
            ));
        };
        if !each(&line) {
            break;
        }
    }
    Ok(())
}

/// Client side: sends one request and returns the typed answer (the CLI).
pub fn request(path: &Path, request: &Request) -> io::Result<Answer> {
    serde_json::from_value(call(path, request)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the daemon's answer is not what this version expects: {e}"),
        )
    })
}

/// Client side: sends one request and returns the answer as JSON, whatever it says
/// (tests check the wire form with it).
pub fn call(path: &Path, request: &Request) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A daemon that refuses the connection (busy, out of descriptors) says why in
    // one line and closes: the line is read even if the request could not be sent.
    let sent = jsonl::write_message(&mut &stream, request);
    let mut reader = LineReader::new(&stream, jsonl::MAX_ANSWER_LINE);
    match (jsonl::read_message::<Value, _>(&mut reader), sent) {
        (Ok(Some(Ok(v))), _) => Ok(v),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Ok(Some(Err(e))), Ok(())) => {
            Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
        (Ok(None), Ok(())) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without an answer",
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        path::PathBuf,
        sync::mpsc,
    };

    use super::*;
    use crate::{
        durability::{Flusher, Mode, Policy},
        events::EventKind,
        region::Region,
        report::DeviceStatus,
    };

    use serde_json::json;

    /// The answer to `line` in its wire form.
    fn ask(d: &ControlHandles, line: &str) -> Value {
        serde_json::to_value(answer(d, line)).unwrap()
    }

    pub(crate) fn daemon() -> ControlHandles {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon_with_state(dir.path());
        std::mem::forget(dir); // lives as long as the test process
        d
    }

    /// A daemon whose backing file is `img` in `state_dir`, its records there too.
    fn daemon_with_state(state_dir: &std::path::Path) -> ControlHandles {
        let img = state_dir.join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&img)
            .unwrap();
        let events: Arc<crate::events::EventHub> = Arc::default();
        let state = crate::state::StateFiles::new(&img, Some(state_dir), Some(&f)).unwrap();
        let flusher = Flusher::new(f.try_clone().unwrap(), Policy::Fsync);
        let services: Arc<crate::service::Services> = Arc::default();
        let health_record = crate::state::health::HealthRecorder::start(
            &flusher,
            &state,
            &crate::state::health::RecordOptions {
                health_copy: crate::state::health::HealthCopy::Off,
                adopt_legacy: false,
            },
            events.clone(),
            &services,
        )
        .unwrap();
        let media =
            crate::media::MediaErrors::load(&img, 2 << 20, state, events.clone(), Arc::default())
                .unwrap();
        let device: Arc<DeviceStatus> = Arc::default();
        let queue: Arc<crate::device::queue::QueueStats> = Arc::default();
        let d = Arc::new(crate::host::Shared {
            region: Arc::new(Region {
                path: PathBuf::from("/img"),
                file: f.try_clone().unwrap(),
                size: 2 << 20,
                readonly: false,
                flusher,
                baseline: None,
                mode_requested: Mode::Auto,
                policy_reason: "test".into(),
            }),
            events,
            media,
            services: Arc::default(),
            guard: {
                let g = std::sync::OnceLock::new();
                let _ = g.set(Arc::default());
                g
            },
            agent: Default::default(),
            socket: Default::default(),
            export: crate::host::ExportState::VirtioPmem {
                device,
                queue: queue.clone(),
            },
            seccomp: crate::sandbox::SeccompMode::Off,
            health_record,
        });
        ControlHandles {
            status: {
                let d = d.clone();
                Arc::new(move || d.report())
            },
            flush: d.region.flusher.stats.clone(),
            queue_stats: queue,
            media: d.media.clone(),
            events: d.events.clone(),
            metrics_instance: "/img".into(),
        }
    }

    #[test]
    fn badblocks_commands_record_persist_and_clear_ranges() {
        let state = tempfile::tempdir().unwrap();
        let d = daemon_with_state(state.path());
        let rx = d.events.subscribe(false);
        let a = ask(
            &d,
            r#"{"command":"badblocks-inject","offset":4100,"length":10}"#,
        );
        assert_eq!(a["ok"], true, "{a}");
        assert_eq!(a["ranges"], json!([{"offset": 4096, "length": 512}]));
        // Outside the 2 MiB file, or past its end: refused with the reason (it was
        // ignored and answered ok, so the CLI said nothing and exited 0).
        for (offset, length) in [(4194304, 512), (2097152 - 512, 1024)] {
            let req =
                format!(r#"{{"command":"badblocks-inject","offset":{offset},"length":{length}}}"#);
            let a = ask(&d, &req);
            assert_eq!(a["ok"], false, "{a}");
            let e = a["error"].as_str().unwrap();
            assert!(
                e.contains("is not inside the file: it has 0x200000 bytes"),
                "{e}"
            );
        }
        let a = ask(
            &d,
            r#"{"command":"badblocks-clear","offset":4194304,"length":512}"#,
        );
        assert_eq!(a["ok"], false, "{a}");
        assert_eq!(
            ask(&d, r#"{"command":"badblocks-list"}"#)["ranges"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let e = rx.recv_timeout(Duration::from_secs(1)).unwrap().to_line();
        assert!(
            e.contains("bad-ranges-changed") && e.contains("operator"),
            "{e}"
        );
        // Persisted before it was published: a fresh daemon on the same state has it.
        let again = daemon_with_state(state.path());
        assert_eq!(
            ask(&again, r#"{"command":"badblocks-list"}"#)["ranges"],
            json!([{"offset": 4096, "length": 512}])
        );
        let a = ask(
            &d,
            r#"{"command":"badblocks-clear","offset":4096,"length":512}"#,
        );
        assert_eq!(
            (a["changed"].clone(), a["ranges"].clone()),
            (json!(true), json!([]))
        );
        assert_eq!((d.status)().bad_ranges, vec![]);
    }

    #[test]
    fn events_stream_until_the_subscriber_leaves() {
        let d = daemon();
        d.events.publish(EventKind::Sealed { sealed: true });
        let (client, server) = UnixStream::pair().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let d2 = d.clone();
        std::thread::spawn(move || {
            serve_client(server, &d2);
            done_tx.send(()).unwrap();
        });
        (&client)
            .write_all(b"{\"command\":\"events\",\"backlog\":true}\n")
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut lines = BufReader::new(client.try_clone().unwrap()).lines();
        let mut next =
            || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
        assert_eq!(next()["events"], "subscribed");
        assert_eq!(next()["event"], "sealed", "backlog first");
        d.events.publish(EventKind::LeaseTaken {
            lease: "write lease held".into(),
        });
        let v = next();
        assert_eq!(
            (v["event"].as_str(), v["seq"].as_u64()),
            (Some("lease-taken"), Some(2))
        );
        drop(lines);
        drop(client);
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the streaming thread ends when the subscriber disconnects");
        // Its subscription is dropped at the next publish.
        d.events.publish(EventKind::Sealed { sealed: false });
        assert_eq!(d.events.subscribers(), 0);
    }

    #[test]
    fn a_range_past_two_to_the_64_is_refused_and_status_keeps_working() {
        let d = daemon();
        for (offset, length) in [(u64::MAX - 100, 512), (u64::MAX, 1), (4096, 0)] {
            let a = ask(
                &d,
                &format!(r#"{{"command":"badblocks-inject","offset":{offset},"length":{length}}}"#),
            );
            assert_eq!(a["ok"], false, "{a}");
            let a = ask(
                &d,
                &format!(r#"{{"command":"badblocks-clear","offset":{offset},"length":{length}}}"#),
            );
            assert_eq!(a["ok"], false, "{a}");
        }
        // The largest range that fits in 64 bits is outside the file: refused too.
        let a = ask(
            &d,
            &format!(
                r#"{{"command":"badblocks-inject","offset":{},"length":512}}"#,
                u64::MAX - 512
            ),
        );
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            a["error"].as_str().unwrap().contains("not inside the file"),
            "{a}"
        );
        assert_eq!(ask(&d, r#"{"command":"status"}"#)["ok"], true);
    }

    #[test]
    fn metrics_answer_the_text_with_the_instance_label() {
        let d = daemon();
        let a = answer(&d, r#"{"command":"metrics"}"#);
        let text = a.metrics.expect("a metrics field");
        assert!(a.ok && a.error.is_none());
        assert!(
            text.contains("vhost_device_pmem_flush_requests_total{instance=\"/img\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("vhost_device_pmem_policy{instance=\"/img\",policy=\"fsync\"} 1\n"));
    }

    #[test]
    fn events_on_a_request_connection_is_refused_cleanly() {
        let v = ask(&daemon(), r#"{"command":"events"}"#);
        assert_eq!(v["ok"], false);
        let v = ask(&daemon(), r#"{"command":"status"}"#);
        assert_eq!(v["status"]["guard"]["lease"], "");
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"stats"}"#).unwrap(),
            Request::Stats
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Metrics).unwrap(),
            r#"{"command":"metrics"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"events"}"#).unwrap(),
            Request::Events { backlog: false }
        );
        assert_eq!(
            serde_json::to_string(&Request::Events { backlog: true }).unwrap(),
            r#"{"command":"events","backlog":true}"#
        );
    }
}
