// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: newline-delimited JSON requests and answers for operators and
//! orchestration (`{"command":"status"}` → `{"ok":true,"status":{…}}`).
//!
//! Owns: the wire format of control requests and the server thread. Never changes the
//! device; every command here only reads (commands that act are added with care).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::Arc,
    thread,
    time::Duration,
};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{socket::BoundSocket, Daemon};

/// A control request.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Mode and why, file, size, negotiated features, connection and region state.
    Status,
    /// Flush counters and latency summary.
    Stats,
}

/// Answers one request line.
pub fn answer(daemon: &Daemon, line: &str) -> Value {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) => json!({"ok": true, "status": daemon.status_report()}),
        Ok(Request::Stats) => json!({"ok": true, "stats": daemon.region.flusher.stats.snapshot()}),
        Err(e) => json!({"ok": false, "error": format!("bad request {line:?}: {e}")}),
    }
}

/// Serves the control socket on a background thread, one thread per client.
pub fn spawn(sock: BoundSocket, daemon: Arc<Daemon>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let sock = sock; // dropped (and unlinked) only with the process
            for conn in sock.listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let d = daemon.clone();
                        let _ = thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(stream, &d));
                    }
                    Err(e) => warn!("control socket accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

fn serve_client(stream: UnixStream, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let mut reply = answer(daemon, line.trim()).to_string();
        reply.push('\n');
        if out.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
    debug!("control client left");
}

/// Client side: sends one request and returns the answer (used by the CLI and tests).
pub fn call(path: &Path, request: &Request) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
