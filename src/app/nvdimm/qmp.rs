// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small blocking QMP client over a unix socket: the greeting, capabilities
//! negotiation, commands matched to their answers by `id`, events collected in
//! arrival order, a deadline on every wait, and the peer's pid (SO_PEERCRED).
//!
//! Owns: the QMP wire protocol (one JSON object per line). Never decides what to
//! plug or whether a mapping is acceptable; that is `nvdimm`.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// The longest line accepted from QEMU (a `query-*` answer of a big VM is a few
/// KiB; a line without end is a broken peer, not a monitor).
const MAX_LINE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: no answer within {0:?}")]
    Timeout(Duration),
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
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    timeout: Duration,
    /// Events received while waiting for answers, oldest first.
    pub events: Vec<Value>,
    /// QEMU's version as the greeting gave it ("11.1.0").
    pub version: String,
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities; every later wait
    /// gives up after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::over(stream, timeout)
    }

    /// Speaks QMP over an already connected stream (tests use a socket pair).
    pub fn over(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            timeout,
            events: Vec::new(),
            version: String::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read(deadline)?;
        let Some(q) = greeting.get("QMP") else {
            return Err(QmpError::Protocol(format!(
                "expected the greeting, got {greeting}"
            )));
        };
        let v = &q["version"]["qemu"];
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The pid of the process on the other end (SO_PEERCRED): QEMU itself.
    pub fn peer_pid(&self) -> io::Result<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.writer)?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }

    /// Runs `command` with `arguments` and returns its `return` value; an `error`
    /// answer is [`QmpError::Command`]. Answers are matched by `id`; events that
    /// arrive meanwhile are kept in [`Self::events`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = self.read(deadline)?;
            if msg.get("event").is_some() {
                self.events.push(msg);
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

    /// One message, by `deadline`.
    fn read(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Timeout(self.timeout));
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = Vec::new();
        let n = match io::Read::take(&mut self.reader, MAX_LINE as u64).read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QmpError::Timeout(self.timeout))
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with(b"\n") {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        serde_json::from_slice(&line).map_err(|e| {
            QmpError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line).trim()))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

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
    fn a_silent_or_closing_peer_is_an_error_not_a_hang() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let e = Qmp::over(ours, Duration::from_millis(200)).err().unwrap();
        assert!(matches!(e, QmpError::Timeout(_)), "{e}");
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
}
