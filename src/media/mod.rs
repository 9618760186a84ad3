// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The media-error service of one backing file: takes reports from every source,
//! keeps the persistent set, and tells the sinks (guest agent, events).
//!
//! Owns: the order "merge → persist → publish" (a range is written to the state
//! directory before anyone is told about it; if that write fails the range is kept,
//! published and announced all the same, the failure shows in `status`, and the
//! write is retried) and the source threads. Never touches the backing file's data.

pub mod channel;
pub mod ranges;
pub mod sources;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use self::{
    channel::GuestChannel,
    ranges::{BadRange, BadRanges, RangesRecord},
    sources::{HostDevice, PoisonWatch, Scrubber, SysfsWatch},
};
use crate::{
    blockmap,
    events::{EventHub, EventKind},
    service::{self, Services},
    state::{Kind, StateFiles},
    util::lock,
};

/// How often a failed write of the state file is retried.
const PERSIST_RETRY: Duration = Duration::from_secs(5);

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
    state: StateFiles,
    ranges: Mutex<BadRanges>,
    /// Why the last write of the state file failed; `None` once a write succeeded.
    persist_error: Mutex<Option<String>>,
    events: Arc<EventHub>,
    channel: Mutex<Option<Arc<GuestChannel>>>,
    services: Arc<Services>,
}

impl MediaErrors {
    /// Loads the recorded ranges of `backing` (a corrupt state file is an error: the
    /// daemon must not forget bad ranges silently).
    pub fn load(
        backing: &Path,
        size: u64,
        state: StateFiles,
        events: Arc<EventHub>,
        services: Arc<Services>,
    ) -> std::io::Result<Arc<Self>> {
        let ranges: BadRanges = state
            .load::<RangesRecord>(Kind::BadRanges)?
            .map(Into::into)
            .unwrap_or_default();
        if !ranges.is_empty() {
            warn!(
                "{} known bad range(s) of {} (from {})",
                ranges.list().len(),
                backing.display(),
                state.path(Kind::BadRanges).display()
            );
        }
        Ok(Arc::new(Self {
            backing: backing.to_owned(),
            size,
            state,
            ranges: Mutex::new(ranges),
            persist_error: Mutex::new(None),
            events,
            channel: Mutex::new(None),
            services,
        }))
    }

    /// The size of the backing file the ranges are offsets of.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why the bad-range set is not on disk, if it is not.
    pub fn persist_error(&self) -> Option<String> {
        lock(&self.persist_error).clone()
    }

    /// Writes the set to the state directory. A failure is logged and kept for
    /// `status`, and a retry thread writes the then-current set until it succeeds.
    fn persist(self: &Arc<Self>, set: &BadRanges) {
        match self.state.save(Kind::BadRanges, &RangesRecord::from(set)) {
            Ok(()) => {
                if lock(&self.persist_error).take().is_some() {
                    info!(
                        "bad ranges of {} are on disk again ({})",
                        self.backing.display(),
                        self.state.path(Kind::BadRanges).display()
                    );
                }
            }
            Err(e) => {
                let msg = format!(
                    "cannot write {}: {e}",
                    self.state.path(Kind::BadRanges).display()
                );
                error!("media errors: {msg}; the ranges are kept in memory and published, retrying every {PERSIST_RETRY:?}");
                let first = lock(&self.persist_error).replace(msg).is_none();
                if first {
                    self.start_persist_retry();
                }
            }
        }
    }

    fn start_persist_retry(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = self.services.spawn(
            "badblocks-save",
            |_| {},
            move || loop {
                // At shutdown: one last try, then give up (the error is logged).
                let last = me.services.sleep(PERSIST_RETRY);
                let set = lock(&me.ranges).clone();
                match me.state.save(Kind::BadRanges, &RangesRecord::from(&set)) {
                    Ok(()) => {
                        lock(&me.persist_error).take();
                        info!(
                            "bad ranges of {} written to {} after a retry",
                            me.backing.display(),
                            me.state.path(Kind::BadRanges).display()
                        );
                        return;
                    }
                    Err(e) => {
                        let msg = format!(
                            "cannot write {}: {e}",
                            me.state.path(Kind::BadRanges).display()
                        );
                        if last {
                            error!("media errors: at exit, {msg}: the last bad-range changes are lost with the process");
                            return;
                        }
                        *lock(&me.persist_error) = Some(msg);
                    }
                }
            },
        );
        if let Err(e) = spawned {
            error!("media errors: cannot start the state-file retry: {e}");
        }
    }

    pub fn list(&self) -> Vec<BadRange> {
        lock(&self.ranges).list()
    }

    /// Connects the guest agent's channel; it gets the current list at once.
    pub fn attach_channel(&self, channel: Arc<GuestChannel>) {
        channel.publish(self.list());
        *lock(&self.channel) = Some(channel);
    }

    /// Records ranges reported by `source`: clipped to the file, merged, persisted
    /// (see [`Self::persist`]), then published. Returns the ranges that were new.
    pub fn report(self: &Arc<Self>, source: Source, ranges: &[BadRange]) -> Vec<BadRange> {
        let mut set = lock(&self.ranges);
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
            if set.insert(r) {
                added.push(r);
            }
        }
        if added.is_empty() {
            return added;
        }
        self.persist(&set);
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
        added
    }

    /// Forgets ranges (an operator who repaired or replaced the media). Returns
    /// whether anything changed. The guest's own badblocks list is not shortened by
    /// this (Linux offers no way to remove entries from it); a guest reboot is.
    pub fn clear(self: &Arc<Self>, range: BadRange) -> bool {
        let mut set = lock(&self.ranges);
        if !set.clear(range) {
            return false;
        }
        self.persist(&set);
        let list = set.list();
        drop(set);
        info!(
            "bad range [{:#x}, {:#x}) cleared by the operator",
            range.offset,
            range.end()
        );
        self.publish(Source::Operator, Vec::new(), vec![range], list);
        true
    }

    fn publish(
        &self,
        source: Source,
        added: Vec<BadRange>,
        cleared: Vec<BadRange>,
        list: Vec<BadRange>,
    ) {
        if let Some(ch) = lock(&self.channel).as_ref() {
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
        self.services.spawn(
            "badblocks-watch",
            |_| {},
            move || {
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
                        me.services.sleep(period);
                    }
                    if me.services.stopping() {
                        return;
                    }
                }
            },
        )?;
        Ok(true)
    }

    /// Reports the entries of a device `badblocks` text that fall in the file.
    fn translate_device_badblocks(
        self: &Arc<Self>,
        file: &std::fs::File,
        dev: &HostDevice,
        text: &str,
    ) {
        let bad = sources::parse_badblocks(text);
        if bad.is_empty() {
            return;
        }
        match blockmap::read_extents(file, self.size) {
            Ok(extents) => {
                let ranges = sources::disk_sectors_to_file(&bad, dev.partition_start, &extents);
                self.report(Source::HostDevice, &ranges);
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
        self.services.spawn(
            "poison-watch",
            |_| {},
            move || loop {
                match service::wait_readable(&me.services, watch.fd()) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        error!("memory-failure notices: poll: {e}");
                        return;
                    }
                }
                let ranges = watch.take();
                if !ranges.is_empty() {
                    me.report(Source::MemoryFailure, &ranges);
                }
            },
        )?;
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
        self.services.spawn(
            "scrub",
            |_| {},
            move || loop {
                match scrubber.scrub(0, me.size, rate) {
                    Ok(bad) if !bad.is_empty() => {
                        me.report(Source::Scrub, &bad);
                    }
                    Ok(_) => info!("scrub of {} found no read errors", me.backing.display()),
                    Err(e) => error!("scrub of {} failed: {e}", me.backing.display()),
                }
                if me.services.sleep(interval) {
                    return;
                }
            },
        )?;
        Ok(())
    }
}
