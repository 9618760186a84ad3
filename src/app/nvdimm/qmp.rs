// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small blocking QMP client over a unix socket: the greeting, capabilities
//! negotiation, commands matched to their answers by `id`, events collected in
//! arrival order (a bounded number and size of them), an absolute deadline on
//! every exchange, and the peer's pid (SO_PEERCRED).
//!
//! Owns: the QMP wire protocol (one JSON object per line) and its bounds: a line
//! longer than [`MAX_LINE`] is an error, at most [`MAX_EVENTS`] events of at most
//! [`MAX_EVENT_BYTES`] in all are kept (older ones are dropped and counted), and an
//! exchange (connect + greeting + capabilities; each command and its answer) ends
//! by its deadline however slowly the peer sends. Never decides what to plug or
//! whether a mapping is acceptable; that is `nvdimm`.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketType};
use serde_json::{json, Value};

/// The longest line accepted from QEMU (a `query-*` answer of a big VM is a few
/// KiB; a line without end is a broken peer, not a monitor).
pub const MAX_LINE: usize = 1 << 20;
/// Events kept while waiting for answers (the oldest go first).
pub const MAX_EVENTS: usize = 64;
/// Bytes of events kept in all (an event larger than this is dropped whole).
pub const MAX_EVENT_BYTES: usize = 256 << 10;
/// Bytes read from the socket at a time.
const READ_SIZE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: {what} not done within {timeout:?} (--qmp-timeout bounds each whole exchange, however slowly QEMU answers)")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("QMP: QEMU closed the monitor connection")]
    Closed,
    #[error("QMP: not QMP: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error: its class and description.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One QMP connection, after capabilities negotiation.
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read and not yet taken as lines (at most one partial line).
    pending: Vec<u8>,
    next_id: u64,
    timeout: Duration,
    /// Events received while waiting for answers, oldest first; at most
    /// [`MAX_EVENTS`] of at most [`MAX_EVENT_BYTES`] in all.
    pub events: VecDeque<Value>,
    /// The line length of each event in [`Self::events`], and their sum.
    event_sizes: VecDeque<usize>,
    event_bytes: usize,
    /// Events received but not kept (over the bounds).
    pub events_dropped: u64,
    /// QEMU's version as the greeting gave it ("11.1.0").
    pub version: String,
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities, all within
    /// `timeout` (a monitor whose backlog is full makes connect(2) wait: that wait
    /// counts too); every later command and its answer get `timeout` each.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let connect_err = |source: io::Error| QmpError::Connect {
            path: path.display().to_string(),
            source,
        };
        let fd: OwnedFd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| connect_err(e.into()))?;
        // A unix connect waits for room in the listener's backlog for at most
        // SO_SNDTIMEO, then fails with EAGAIN.
        net::sockopt::set_socket_timeout(&fd, net::sockopt::Timeout::Send, Some(timeout))
            .map_err(|e| connect_err(e.into()))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| connect_err(e.into()))?;
        match net::connect(&fd, &addr) {
            Ok(()) => {}
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INPROGRESS) => {
                return Err(QmpError::Timeout {
                    what: "connecting (the monitor's backlog stayed full)",
                    timeout,
                })
            }
            Err(e) => return Err(connect_err(e.into())),
        }
        Self::handshake(UnixStream::from(fd), timeout, deadline)
    }

    /// Speaks QMP over an already connected stream (tests use a socket pair): the
    /// greeting and capabilities within `timeout`.
    pub fn over(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        Self::handshake(stream, timeout, Instant::now() + timeout)
    }

    fn handshake(
        stream: UnixStream,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Self, QmpError> {
        let mut qmp = Self {
            stream,
            pending: Vec::new(),
            next_id: 1,
            timeout,
            events: VecDeque::new(),
            event_sizes: VecDeque::new(),
            event_bytes: 0,
            events_dropped: 0,
            version: String::new(),
        };
        let what = "the greeting and capabilities negotiation";
        let (greeting, _) = qmp.read(deadline, what)?;
        let Some(q) = greeting.get("QMP") else {
            return Err(QmpError::Protocol(format!(
                "expected the greeting, got {greeting}"
            )));
        };
        let v = &q["version"]["qemu"];
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        qmp.exchange("qmp_capabilities", json!({}), deadline, what)?;
        Ok(qmp)
    }

    /// The pid of the process on the other end (SO_PEERCRED): QEMU itself.
    pub fn peer_pid(&self) -> io::Result<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.stream)?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }

    /// Runs `command` with `arguments` and returns its `return` value, all within
    /// the timeout; an `error` answer is [`QmpError::Command`]. Answers are
    /// matched by `id`; events that arrive meanwhile are kept in [`Self::events`]
    /// (within its bounds).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        self.exchange(command, arguments, deadline, "a command and its answer")
    }

    /// Waits up to `timeout` for event `name` and takes it out of [`Self::events`]
    /// (one that already arrived counts); `Ok(None)` if none came in time. Other
    /// events that arrive meanwhile are kept (within the bounds).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Option<Value>, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                if let Some(len) = self.event_sizes.remove(i) {
                    self.event_bytes -= len;
                }
                return Ok(self.events.remove(i));
            }
            match self.read(deadline, "waiting for an event") {
                Ok((msg, len)) if msg.get("event").is_some() => self.keep_event(msg, len),
                // An answer to nothing pending: skip it.
                Ok(_) => {}
                Err(QmpError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn exchange(
        &mut self,
        command: &str,
        arguments: Value,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.write(line.as_bytes(), deadline, what)?;
        loop {
            let (msg, len) = self.read(deadline, what)?;
            if msg.get("event").is_some() {
                self.keep_event(msg, len);
                continue;
            }
            if msg.get("id") != Some(&json!(id)) {
                // An answer to something else (not ours): skip it.
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: err["class"].as_str().unwrap_or("?").into(),
                    desc: err["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected answer {msg}")));
        }
    }

    /// Keeps an event whose line was `len` bytes, dropping the oldest over the
    /// bounds.
    fn keep_event(&mut self, event: Value, len: usize) {
        if len > MAX_EVENT_BYTES {
            self.events_dropped += 1;
            return;
        }
        while self.events.len() >= MAX_EVENTS || self.event_bytes + len > MAX_EVENT_BYTES {
            let (Some(_), Some(old)) = (self.events.pop_front(), self.event_sizes.pop_front())
            else {
                break;
            };
            self.event_bytes -= old;
            self.events_dropped += 1;
        }
        self.event_bytes += len;
        self.event_sizes.push_back(len);
        self.events.push_back(event);
    }

    /// The time left to `deadline`, or the timeout error.
    fn left(&self, deadline: Instant, what: &'static str) -> Result<Duration, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Timeout {
                what,
                timeout: self.timeout,
            });
        }
        Ok(left)
    }

    fn write(
        &mut self,
        mut data: &[u8],
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), QmpError> {
        while !data.is_empty() {
            let left = self.left(deadline, what)?;
            self.stream.set_write_timeout(Some(left))?;
            match self.stream.write(data) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(QmpError::Timeout {
                        what,
                        timeout: self.timeout,
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One message and the length of its line, by `deadline`: each read(2) waits
    /// only for what is left of it.
    fn read(&mut self, deadline: Instant, what: &'static str) -> Result<(Value, usize), QmpError> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i + 1;
                let line: Vec<u8> = self.pending.drain(..end).collect();
                let value = serde_json::from_slice(&line).map_err(|e| {
                    QmpError::Protocol(format!(
                        "{e}: {}",
                        String::from_utf8_lossy(&line[..line.len().min(256)]).trim()
                    ))
                })?;
                return Ok((value, line.len()));
            }
            scanned = self.pending.len();
            if scanned > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a line longer than {MAX_LINE} bytes"
                )));
            }
            let left = self.left(deadline, what)?;
            self.stream.set_read_timeout(Some(left))?;
            let start = self.pending.len();
            let want = READ_SIZE.min(MAX_LINE + 1 - start);
            self.pending.resize(start + want, 0);
            let got = self.stream.read(&mut self.pending[start..]);
            let n = match got {
                Ok(n) => n,
                Err(e) => {
                    self.pending.truncate(start);
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    if is_timeout(&e) {
                        return Err(QmpError::Timeout {
                            what,
                            timeout: self.timeout,
                        });
                    }
                    return Err(e.into());
                }
            };
            self.pending.truncate(start + n);
            if n == 0 {
                return Err(QmpError::Closed);
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        thread,
    };

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A peer that reads requests and answers each from `script`: (expected command,
    /// lines to send back, `ID` replaced by the request's id).
    fn fake_qemu(script: Vec<(&'static str, Vec<&'static str>)>) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            writeln!(w, "{GREETING}").unwrap();
            for (command, answers) in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let req: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(req["execute"], command, "{line}");
                for a in answers {
                    writeln!(w, "{}", a.replace("ID", &req["id"].to_string())).unwrap();
                }
            }
            // Keep the connection open until the client is done.
            let mut rest = String::new();
            let _ = r.read_line(&mut rest);
        });
        ours
    }

    #[test]
    fn negotiates_then_matches_answers_by_id_and_keeps_events() {
        let s = fake_qemu(vec![
            ("qmp_capabilities", vec![r#"{"return": {}, "id": ID}"#]),
            (
                "query-memory-devices",
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "ACPI_DEVICE_OST", "data": {}}"#,
                    r#"{"return": {}, "id": 999}"#,
                    r#"{"return": [{"type": "nvdimm", "data": {"addr": 4294967296, "id": "nv0"}}], "id": ID}"#,
                ],
            ),
            (
                "device_add",
                vec![
                    r#"{"error": {"class": "GenericError", "desc": "nvdimm is not enabled: add 'nvdimm=on' to '-M'"}, "id": ID}"#,
                ],
            ),
        ]);
        let mut q = Qmp::over(s, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, "11.1.0");
        let r = q.execute("query-memory-devices", json!({})).unwrap();
        assert_eq!(r[0]["data"]["addr"], 4294967296u64);
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.events[0]["event"], "ACPI_DEVICE_OST");
        let e = q
            .execute("device_add", json!({"driver": "nvdimm"}))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("GenericError: nvdimm is not enabled"),
            "{e}"
        );
        // The pid of the other end of a socket pair is this process.
        assert_eq!(q.peer_pid().unwrap(), std::process::id());
    }

    #[test]
    fn waits_for_a_named_event_keeping_the_others() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut w = theirs.try_clone().unwrap();
        let peer = thread::spawn(move || {
            let mut r = BufReader::new(theirs);
            writeln!(w, "{GREETING}").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            writeln!(w, r#"{{"return": {{}}, "id": {}}}"#, req["id"]).unwrap();
            writeln!(w, r#"{{"event": "ACPI_DEVICE_OST", "data": {{}}}}"#).unwrap();
            writeln!(
                w,
                r#"{{"event": "DEVICE_DELETED", "data": {{"device": "pmem1"}}}}"#
            )
            .unwrap();
            r
        });
        let mut q = Qmp::over(ours, Duration::from_secs(5)).unwrap();
        let ev = q
            .wait_event("DEVICE_DELETED", Duration::from_secs(5))
            .unwrap()
            .expect("the event");
        assert_eq!(ev["data"]["device"], "pmem1");
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.events[0]["event"], "ACPI_DEVICE_OST");
        // One that already arrived counts; then nothing more comes.
        let ev = q.wait_event("ACPI_DEVICE_OST", Duration::from_millis(100));
        assert!(ev.unwrap().is_some());
        assert_eq!((q.events.len(), q.event_bytes), (0, 0));
        let none = q.wait_event("DEVICE_DELETED", Duration::from_millis(100));
        assert!(none.unwrap().is_none());
        drop(peer.join().unwrap());
    }

    #[test]
    fn a_silent_or_closing_peer_is_an_error_not_a_hang() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let e = Qmp::over(ours, Duration::from_millis(200)).err().unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        drop(theirs);
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let e = Qmp::over(ours, Duration::from_secs(1)).err().unwrap();
        assert!(matches!(e, QmpError::Closed), "{e}");
        let (ours, theirs) = UnixStream::pair().unwrap();
        writeln!(&theirs, r#"{{"return": {{}}}}"#).unwrap();
        let e = Qmp::over(ours, Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("expected the greeting"), "{e}");
    }

    /// A peer that sends `text` one byte every half second; the flag says it sent
    /// all of it.
    fn dripping(mut theirs: UnixStream, text: String) -> Arc<AtomicBool> {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        thread::spawn(move || {
            for b in text.bytes() {
                if theirs.write_all(&[b]).is_err() {
                    // The client left before the end: not done.
                    return;
                }
                thread::sleep(Duration::from_millis(500));
            }
            d.store(true, Ordering::SeqCst);
        });
        done
    }

    #[test]
    fn a_peer_dripping_a_byte_per_half_second_is_cut_off_at_the_deadline() {
        // The greeting alone would take a minute at this rate; the handshake's
        // deadline ends it while the peer is still sending.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let done = dripping(theirs, format!("{GREETING}\n"));
        let e = Qmp::over(ours, Duration::from_millis(1500)).err().unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("greeting"), "{e}");
        assert!(
            !done.load(Ordering::SeqCst),
            "the client waited for the whole drip"
        );

        // A command: the answer drips; its own deadline ends it.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs.try_clone().unwrap());
            writeln!(w, "{GREETING}").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            writeln!(w, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            dripping(theirs, r#"{"return": [], "id": 2}"#.to_string() + "\n")
        });
        let mut q = Qmp::over(ours, Duration::from_millis(1500)).unwrap();
        let e = q.execute("query-memory-devices", json!({})).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(!peer.join().unwrap().load(Ordering::SeqCst));
    }

    #[test]
    fn a_flood_of_events_is_capped_in_count_and_bytes_and_the_answer_still_comes() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let big = "x".repeat(MAX_EVENT_BYTES);
        thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            writeln!(w, "{GREETING}").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            writeln!(w, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            for i in 0..10_000 {
                writeln!(w, r#"{{"event": "SMALL", "data": {{"n": {i}}}}}"#).unwrap();
            }
            // Events larger than the whole budget are never kept.
            for _ in 0..8 {
                writeln!(w, r#"{{"event": "BIG", "data": {{"s": "{big}"}}}}"#).unwrap();
            }
            writeln!(w, r#"{{"return": [], "id": 2}}"#).unwrap();
            line.clear();
            let _ = r.read_line(&mut line);
        });
        let mut q = Qmp::over(ours, Duration::from_secs(20)).unwrap();
        assert_eq!(
            q.execute("query-memory-devices", json!({})).unwrap(),
            json!([])
        );
        assert_eq!(q.events.len(), MAX_EVENTS);
        assert!(q.event_bytes <= MAX_EVENT_BYTES, "{}", q.event_bytes);
        assert_eq!(q.events_dropped, 10_000 - MAX_EVENTS as u64 + 8);
        // The newest are kept.
        assert_eq!(q.events.back().unwrap()["data"]["n"], 9_999);
        assert!(q.events.iter().all(|e| e["event"] == "SMALL"));
    }

    #[test]
    fn a_line_longer_than_the_cap_is_an_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut w = theirs;
            let chunk = vec![b' '; 64 << 10];
            // Far more than the cap, and never a newline.
            for _ in 0..(4 * MAX_LINE / chunk.len()) {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let e = Qmp::over(ours, Duration::from_secs(20)).err().unwrap();
        assert!(e.to_string().contains("longer than"), "{e}");
        // A line at the cap passes.
        let (ours, theirs) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut w = theirs;
            let pad = MAX_LINE - GREETING.len() - 1;
            let mut line = GREETING.as_bytes().to_vec();
            line.extend(std::iter::repeat_n(b' ', pad));
            line.push(b'\n');
            assert_eq!(line.len(), MAX_LINE);
            w.write_all(&line).unwrap();
            let mut r = BufReader::new(w.try_clone().unwrap());
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            writeln!(w, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            let _ = r.read_line(&mut req);
        });
        Qmp::over(ours, Duration::from_secs(20)).unwrap();
    }

    #[test]
    fn a_monitor_whose_backlog_is_full_is_given_up_at_the_deadline() {
        use rustix::net::{bind, listen, socket_with, SocketFlags};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        listen(&listener, 0).unwrap();
        // Fill the backlog (nobody accepts): the next blocking connect waits.
        let mut queued = Vec::new();
        loop {
            let c = socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )
            .unwrap();
            match net::connect(&c, &SocketAddrUnix::new(&path).unwrap()) {
                Ok(()) => queued.push(c),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 1024, "the backlog never filled");
        }
        let e = Qmp::connect(&path, Duration::from_millis(500))
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("backlog"), "{e}");
    }
}
