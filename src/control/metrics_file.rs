// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `--metrics-file` writer: the metrics text, replaced atomically every
//! interval, for node_exporter's textfile collector.
//!
//! Owns: the atomic replacement (a temporary file in the same directory, renamed
//! over the old one, so a reader sees the old text or the new, never a part) and the
//! service that repeats it. Never renders (that is [`super::metrics`]).

use std::{
    fs::Permissions,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{info, warn};

use crate::{control::ControlHandles, service::Services};

/// Replaces `path` with `text`: a temporary file in the same directory (a dot name
/// not ending in `.prom`, so the collector never reads it half-written), mode 0644
/// (the collector runs as another user), renamed over `path`. Not fsynced: the text
/// is rewritten every interval and worthless after a crash.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes the metrics of `handles` to `path` once.
pub fn write_once(path: &Path, handles: &ControlHandles) -> io::Result<()> {
    write_atomic(path, &handles.metrics())
}

/// Starts the service that rewrites `path` every `interval` until shutdown. A failed
/// write is logged once (and its recovery once) and retried at the next interval.
/// The caller writes the first file before and the last one after (at exit, once
/// the final sync is counted).
pub fn spawn(
    path: PathBuf,
    interval: Duration,
    handles: ControlHandles,
    services: &Arc<Services>,
) -> io::Result<()> {
    let svc = services.clone();
    services.spawn(
        "metrics-file",
        |_| {},
        move || {
            let mut failing = false;
            while !svc.sleep(interval) {
                match write_once(&path, &handles) {
                    Ok(()) if failing => {
                        info!("metrics file {} written again", path.display());
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        warn!("cannot write the metrics file {}: {e}", path.display());
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt};

    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pmem.prom");
        write_atomic(&p, "a 1\n").unwrap();
        let first = fs::metadata(&p).unwrap();
        write_atomic(&p, "a 2\n").unwrap();
        let second = fs::metadata(&p).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "a 2\n");
        assert_ne!(
            first.ino(),
            second.ino(),
            "replaced by a rename, not rewritten"
        );
        assert_eq!(second.mode() & 0o777, 0o644);
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pmem.prom")]);
        // A directory that does not exist is an error, not a panic.
        assert!(write_atomic(&d.path().join("no/such.prom"), "").is_err());
    }
}
