// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The media-error service of one backing file: takes reports from every source,
//! keeps the persistent set, and tells the sinks (guest agent, events).
//!
//! Owns: the order "merge → persist → publish" (a range is on disk before anyone is
//! told about it) and the source threads. Never touches the backing file's data.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    badblocks::{self, BadRange, BadRanges},
    blockmap,
    events::{EventHub, EventKind},
    guest_channel::GuestChannel,
    media::{self, HostDevice, PoisonWatch, Scrubber, SysfsWatch},
};

/// How often an unchanged device badblocks list is translated again anyway (the
/// file's extent map is re-read then).
pub const RETRANSLATE: Duration = Duration::from_secs(10);

/// Who reported a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The host block device's `badblocks` attribute.
    HostDevice,
    /// A memory-failure SIGBUS on the daemon's mapping.
    MemoryFailure,
    /// A read error found by the scrub.
    Scrub,
    /// An operator, through the control socket.
    Operator,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HostDevice => "host-device",
            Self::MemoryFailure => "memory-failure",
            Self::Scrub => "scrub",
            Self::Operator => "operator",
        })
    }
}

/// The set of bad ranges of one backing file and everyone who needs it.
pub struct MediaErrors {
    backing: PathBuf,
    size: u64,
    state_path: PathBuf,
    ranges: Mutex<BadRanges>,
    events: Arc<EventHub>,
    channel: Mutex<Option<Arc<GuestChannel>>>,
}

impl MediaErrors {
    /// Loads the recorded ranges of `backing` (a corrupt state file is an error: the
    /// daemon must not forget bad ranges silently).
    pub fn load(
        backing: &Path,
        size: u64,
        state_dir: Option<&Path>,
        events: Arc<EventHub>,
    ) -> std::io::Result<Arc<Self>> {
        let state_path = badblocks::state_path(backing, state_dir);
        let ranges = badblocks::load(&state_path)?;
        if !ranges.is_empty() {
            warn!(
                "{} known bad range(s) of {} (from {})",
                ranges.list().len(),
                backing.display(),
                state_path.display()
            );
        }
        Ok(Arc::new(Self {
            backing: backing.to_owned(),
            size,
            state_path,
            ranges: Mutex::new(ranges),
            events,
            channel: Mutex::new(None),
        }))
    }

    pub fn list(&self) -> Vec<BadRange> {
        self.ranges.lock().unwrap().list()
    }

    /// Connects the guest agent's channel; it gets the current list at once.
    pub fn attach_channel(&self, channel: Arc<GuestChannel>) {
        channel.publish(self.list());
        *self.channel.lock().unwrap() = Some(channel);
    }

    /// Records ranges reported by `source`: clipped to the file, merged, persisted,
    /// then published. Returns the ranges that were new.
    pub fn report(&self, source: Source, ranges: &[BadRange]) -> std::io::Result<Vec<BadRange>> {
        let mut set = self.ranges.lock().unwrap();
        let mut next = set.clone();
        let mut added = Vec::new();
        for r in ranges {
            let end = r.end().min(self.size);
            if r.offset >= end {
                warn!(
                    "{source}: bad range {r:?} lies outside the {}-byte file; ignored",
                    self.size
                );
                continue;
            }
            let r = BadRange {
                offset: r.offset,
                length: end - r.offset,
            };
            if next.insert(r) {
                added.push(r);
            }
        }
        if added.is_empty() {
            return Ok(added);
        }
        badblocks::save(&self.state_path, &self.backing, &next)?;
        *set = next;
        let list = set.list();
        drop(set);
        for r in &added {
            error!(
                "media error ({source}): bytes [{:#x}, {:#x}) of {} are bad",
                r.offset,
                r.end(),
                self.backing.display()
            );
        }
        self.publish(source, added.clone(), Vec::new(), list);
        Ok(added)
    }

    /// Forgets ranges (an operator who repaired or replaced the media). Returns
    /// whether anything changed. The guest's own badblocks list is not shortened by
    /// this (Linux offers no way to remove entries from it); a guest reboot is.
    pub fn clear(&self, range: BadRange) -> std::io::Result<bool> {
        let mut set = self.ranges.lock().unwrap();
        let mut next = set.clone();
        if !next.clear(range) {
            return Ok(false);
        }
        badblocks::save(&self.state_path, &self.backing, &next)?;
        *set = next;
        let list = set.list();
        drop(set);
        info!(
            "bad range [{:#x}, {:#x}) cleared by the operator",
            range.offset,
            range.end()
        );
        self.publish(Source::Operator, Vec::new(), vec![range], list);
        Ok(true)
    }

    fn publish(
        &self,
        source: Source,
        added: Vec<BadRange>,
        cleared: Vec<BadRange>,
        list: Vec<BadRange>,
    ) {
        if let Some(ch) = self.channel.lock().unwrap().as_ref() {
            ch.publish(list.clone());
        }
        self.events.publish(EventKind::BadRangesChanged {
            source: source.to_string(),
            added,
            cleared,
            total: list.len(),
        });
    }

    /// Watches the badblocks attribute of the host device under the file, if it has
    /// one; translates new entries through the file's current extent map.
    ///
    /// The kernel notifies (POLLPRI) only the changes libnvdimm makes itself (address
    /// range scrub, poison revalidation); an entry written to the attribute by hand
    /// is not notified, so the attribute is also re-read every `period`. A re-read
    /// that finds the same text skips the translation, except every
    /// [`RETRANSLATE`] (the extent map is read again then, in case it changed).
    pub fn watch_host_device(
        self: &Arc<Self>,
        file: std::fs::File,
        period: Duration,
    ) -> std::io::Result<bool> {
        let Some(dev) = HostDevice::of(&file)? else {
            info!(
                "media errors: {} is not on a block device; no device badblocks to watch",
                self.backing.display()
            );
            return Ok(false);
        };
        let Some(path) = dev.badblocks_path() else {
            info!(
                "media errors: {} keeps no badblocks list; the device source is off",
                dev.disk.display()
            );
            return Ok(false);
        };
        let watch = SysfsWatch::open(&path)?;
        info!("media errors: watching {}", path.display());
        let me = self.clone();
        thread::Builder::new()
            .name("badblocks-watch".into())
            .spawn(move || {
                let mut translated: Option<(String, Instant)> = None;
                loop {
                    match watch.read() {
                        Ok(text) => {
                            let fresh = translated.as_ref().is_some_and(|(last, at)| {
                                *last == text && at.elapsed() < RETRANSLATE
                            });
                            if !fresh {
                                me.translate_device_badblocks(&file, &dev, &text);
                                translated = Some((text, Instant::now()));
                            }
                        }
                        Err(e) => error!("media errors: cannot read {}: {e}", path.display()),
                    }
                    if let Err(e) = watch.wait(period) {
                        error!("media errors: poll {}: {e}", path.display());
                        thread::sleep(period);
                    }
                }
            })?;
        Ok(true)
    }

    /// Reports the entries of a device `badblocks` text that fall in the file.
    fn translate_device_badblocks(&self, file: &std::fs::File, dev: &HostDevice, text: &str) {
        let bad = media::parse_badblocks(text);
        if bad.is_empty() {
            return;
        }
        match blockmap::read_extents(file, self.size) {
            Ok(extents) => {
                let ranges = media::disk_sectors_to_file(&bad, dev.partition_start, &extents);
                if let Err(e) = self.report(Source::HostDevice, &ranges) {
                    error!("cannot record media errors: {e}");
                }
            }
            Err(e) => error!("media errors: cannot read the extent map: {e}"),
        }
    }

    /// Listens for memory-failure SIGBUS notices on a mapping of the file (a
    /// MAP_SYNC one with `map_sync`, see [`PoisonWatch::new`]).
    pub fn watch_poison(
        self: &Arc<Self>,
        file: &std::fs::File,
        map_sync: bool,
    ) -> std::io::Result<()> {
        let watch = PoisonWatch::new(file, self.size, map_sync)?;
        let me = self.clone();
        thread::Builder::new()
            .name("poison-watch".into())
            .spawn(move || loop {
                let mut pfd = libc::pollfd {
                    fd: watch.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, -1) };
                let ranges = watch.take();
                if !ranges.is_empty() {
                    if let Err(e) = me.report(Source::MemoryFailure, &ranges) {
                        error!("cannot record media errors: {e}");
                    }
                }
            })?;
        Ok(())
    }

    /// Reads the whole file every `interval`, at most `rate` bytes/s, and reports
    /// sectors that fail with EIO.
    pub fn start_scrub(
        self: &Arc<Self>,
        file: std::fs::File,
        interval: Duration,
        rate: u64,
    ) -> std::io::Result<()> {
        let scrubber = Scrubber::new(file, &self.backing);
        let me = self.clone();
        thread::Builder::new()
            .name("scrub".into())
            .spawn(move || loop {
                match scrubber.scrub(0, me.size, rate) {
                    Ok(bad) if !bad.is_empty() => {
                        if let Err(e) = me.report(Source::Scrub, &bad) {
                            error!("cannot record media errors: {e}");
                        }
                    }
                    Ok(_) => info!("scrub of {} found no read errors", me.backing.display()),
                    Err(e) => error!("scrub of {} failed: {e}", me.backing.display()),
                }
                thread::sleep(interval);
            })?;
        Ok(())
    }
}
