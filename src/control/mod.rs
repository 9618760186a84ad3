// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: newline-delimited JSON requests and answers for operators and
//! orchestration (`{"command":"status"}` → `{"ok":true,"status":{…}}`), and the
//! `events` stream (`{"command":"events"}` → an acknowledgement, then one JSON line
//! per event until the subscriber disconnects).
//!
//! Owns: the wire format of control requests and the server thread. Never changes the
//! device or the durability policy; the only commands that act are
//! `badblocks-inject` and `badblocks-clear` (operators recording media errors).

pub mod events;
pub mod metrics;
pub mod metrics_file;
pub mod status;

use std::{
    io,
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{mpsc::RecvTimeoutError, Arc},
    thread,
    time::Duration,
};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    control::{events::EventHub, status::StatusReport},
    device::queue::{QueueCounters, QueueStats},
    durability::StatsSnapshot,
    jsonl::{self, Line, LineReader},
    media::{ranges::BadRange, MediaErrors, Source},
    region::Region,
    service::{self, Services},
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

/// How often a streaming connection checks whether its subscriber left.
const EVENTS_IDLE_CHECK: Duration = Duration::from_millis(500);

/// What the control socket serves, and nothing more: the `status` document, the
/// flush counters, the bad-range set (which `badblocks-inject`/`-clear` change: the
/// only commands that act), and the event hub.
#[derive(Clone)]
pub struct ControlHandles {
    pub status: Arc<dyn Fn() -> StatusReport + Send + Sync>,
    /// For the flush counters.
    pub region: Arc<Region>,
    pub queue_stats: Arc<QueueStats>,
    pub media: Arc<MediaErrors>,
    pub events: Arc<EventHub>,
    /// The `instance` label of the metrics.
    pub metrics_instance: Arc<str>,
}

impl ControlHandles {
    /// The `stats` answer now.
    pub fn stats(&self) -> StatsReport {
        StatsReport {
            flush: self.region.flusher.stats.snapshot(),
            queue: self.queue_stats.snapshot(),
        }
    }

    /// The metrics now, rendered (the `metrics` answer, the `--metrics-file` text).
    pub fn metrics(&self) -> String {
        metrics::render(&metrics::MetricsSnapshot {
            instance: self.metrics_instance.to_string(),
            status: (self.status)(),
            stats: self.stats(),
            latency: self.region.flusher.stats.latency_buckets(),
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
        Request::BadblocksInject { offset, length } => match checked_range(offset, length) {
            Err(e) => Answer::error(e),
            Ok(range) => {
                let added = daemon.media.report(Source::Operator, &[range]);
                Answer {
                    added: Some(added),
                    ..ranges(true)
                }
            }
        },
        Request::BadblocksClear { offset, length } => match checked_range(offset, length) {
            Err(e) => Answer::error(e),
            Ok(range) => {
                let changed = daemon.media.clear(range);
                Answer {
                    changed: Some(changed),
                    ..ranges(true)
                }
            }
        },
        Request::Events { .. } => {
            Answer::error("events is a stream: send it on its own connection")
        }
    }
}

/// A range from a client: non-empty and not past 2^64.
fn checked_range(offset: u64, length: u64) -> Result<BadRange, String> {
    if length == 0 {
        return Err("the length must be positive".into());
    }
    if offset.checked_add(length).is_none() {
        return Err(format!(
            "offset {offset:#x} + length {length:#x} is past the largest file offset"
        ));
    }
    Ok(BadRange { offset, length })
}

/// Serves the control socket on a background thread, one thread per client. The
/// caller keeps the bound socket (and removes its path at exit); this takes a
/// duplicate of its listener.
pub fn spawn(
    listener: UnixListener,
    daemon: ControlHandles,
    services: &Arc<Services>,
) -> std::io::Result<()> {
    let svc = services.clone();
    services.spawn(
        "control",
        |_| {},
        move || {
            while let Ok(true) = service::wait_readable(&svc, listener.as_fd()) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let d = daemon.clone();
                        let _ = thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(stream, &d));
                    }
                    Err(e) => warn!("control socket accept failed: {e}"),
                }
            }
        },
    )
}

pub(crate) fn serve_client(stream: UnixStream, daemon: &ControlHandles) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = LineReader::new(stream, jsonl::MAX_LINE);
    loop {
        let reply = match jsonl::read_message::<Request, _>(&mut reader) {
            Ok(None) | Err(_) => break,
            Ok(Some(Ok(Request::Events { backlog }))) => {
                if let Err(e) = stream_events(&mut out, daemon, backlog) {
                    debug!("events subscriber left: {e}");
                }
                return;
            }
            Ok(Some(Ok(req))) => answer_request(daemon, req),
            Ok(Some(Err(e))) => {
                if let jsonl::MessageError::TooLong { .. } = e {
                    warn!("control socket: {e}");
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
fn stream_events(out: &mut UnixStream, daemon: &ControlHandles, backlog: bool) -> io::Result<()> {
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
    jsonl::write_message(&mut &stream, request)?;
    let mut reader = LineReader::new(&stream, jsonl::MAX_ANSWER_LINE);
    match jsonl::read_message::<Value, _>(&mut reader)? {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        None => Err(io::Error::new(
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
        control::{events::EventKind, status::DeviceStatus},
        daemon::Daemon,
        durability::{Flusher, Mode, Policy},
        region::Region,
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
        let events: Arc<crate::control::events::EventHub> = Arc::default();
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
        let d = Arc::new(Daemon {
            region: Arc::new(Region {
                path: PathBuf::from("/img"),
                file: f.try_clone().unwrap(),
                size: 2 << 20,
                readonly: false,
                flusher,
                baseline: None,
            }),
            status: Arc::new(DeviceStatus::default()),
            mode_requested: Mode::Auto,
            policy_reason: "test".into(),
            socket_path: PathBuf::from("/s"),
            events,
            guard: Arc::default(),
            media,
            agent: None,
            services,
            queue_stats: Arc::default(),
            seccomp: crate::sandbox::SeccompMode::Off,
            health_record,
        });
        ControlHandles {
            status: {
                let d = d.clone();
                Arc::new(move || d.status_report())
            },
            region: d.region.clone(),
            queue_stats: d.queue_stats.clone(),
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
        // Outside the 2 MiB file: ignored, not an error.
        let a = ask(
            &d,
            r#"{"command":"badblocks-inject","offset":4194304,"length":512}"#,
        );
        assert_eq!(a["added"], json!([]), "{a}");
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
        thread::spawn(move || {
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
        // The largest range that fits is fine, clipped to the file.
        let a = ask(
            &d,
            &format!(
                r#"{{"command":"badblocks-inject","offset":{},"length":512}}"#,
                u64::MAX - 512
            ),
        );
        assert_eq!(
            (a["ok"].clone(), a["added"].clone()),
            (json!(true), json!([])),
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
