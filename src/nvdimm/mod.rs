// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guarded NVDIMM export (`vhost-device-pmem nvdimm`): judges a host file,
//! hot-plugs it into a running QEMU as `memory-backend-file` + `nvdimm` over QMP (or
//! prints the cold-plug arguments), checks that QEMU mapped the very file it judged
//! with the promised flags, and guards it while the VM runs.
//!
//! Owns: the judgement of an NVDIMM file, the QMP plug sequence, the mapping check,
//! the interval syncs after a lost block map, and the export's `status`. Never
//! serves vhost-user and never writes file data; an NVDIMM cannot be unplugged, so
//! it never tries.

pub mod mapping;
pub mod qmp;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    backing::BackingFile,
    blockmap::{
        self,
        guard::{GuardHandles, GuardOptions},
        prepare::{self, Progress},
        Verdict,
    },
    config::{NvdimmAction, NvdimmConfig, NvdimmMode},
    control::{
        self,
        events::{EventHub, EventKind},
        status::StatusReport,
    },
    daemon::{enter_sandbox, watch_health},
    durability::{choose_policy, Flusher, Mode, Policy, SyncContext},
    io_err,
    media::{channel::GuestChannel, MediaErrors},
    region::Region,
    sandbox::{Profile, SeccompMode},
    service::Services,
    socket,
    state::{health::HealthRecorder, StateFiles},
    sys, Error,
};

use self::{
    mapping::{FileId, Mapping},
    qmp::Qmp,
};

/// The backend's `align`, and what the file size must be a multiple of. QEMU places
/// an NVDIMM at a guest-physical address aligned to its backend's alignment (the
/// nvdimm memory region takes the backend's), and rounds the region's size down to
/// it. 2 MiB makes the region start and size 2 MiB-aligned, which a guest needs to
/// map an fsdax namespace with 2 MiB pages (and is the kernel's memremap alignment
/// on x86); it is also the size rule of `serve`.
pub const ALIGN: u64 = 2 << 20;

/// Why the guard takes no lease on an NVDIMM's file.
pub const NO_LEASE: &str = "a lease is impossible while QEMU holds the file open (Linux grants a write lease only to the sole opener); the block map is verified periodically instead";

/// The export's part of `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NvdimmStatus {
    /// direct or volatile.
    pub mode: String,
    /// The nvdimm device's id; its backend is `memdev`.
    pub id: String,
    pub memdev: String,
    pub qmp_socket: String,
    /// pending, hot-plugged or re-attached.
    pub attached: String,
    pub qemu_pid: Option<u32>,
    pub qemu_version: Option<String>,
    /// QEMU maps the judged file (its device:inode is in /proc/PID/smaps).
    pub mapping_verified: bool,
    /// The mapping's line of /proc/PID/maps.
    pub maps_line: Option<String>,
    pub vm_flags: Option<String>,
    /// MAP_SYNC is in effect for QEMU's mapping (VmFlags `sf`).
    pub sf: bool,
    /// The NVDIMM's guest-physical address (query-memory-devices).
    pub guest_address: Option<u64>,
    pub align: u64,
    pub sync_interval_secs: u64,
    /// Syncs made because the block map changed (the guest cannot ask for one).
    pub interval_syncs: u64,
    /// Set once QEMU's process is gone.
    pub qemu_exited: bool,
}

/// A file judged for export.
pub struct Judged {
    pub backing: BackingFile,
    pub verdict: Option<Verdict>,
    pub policy: Policy,
    pub reason: String,
}

/// Refuses a missing file (QEMU would create it), opens and locks the file like
/// `serve`, reads its block map and decides whether `mode` may export it.
pub fn judge(config: &NvdimmConfig) -> Result<Judged, Error> {
    let path = &config.file;
    if std::fs::symlink_metadata(path).is_err() {
        return Err(Error::Nvdimm(format!(
            "{}: no such file; refused: QEMU's memory-backend-file would create an empty one. \
             Make it with `vhost-device-pmem prepare {} --size SIZE`",
            path.display(),
            path.display()
        )));
    }
    let backing = BackingFile::open(path, false, config.allow_shared_permissions)?;
    let verdict = match blockmap::inspect(&backing.file) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!("cannot read the block map of {}: {e}", path.display());
            None
        }
    };
    if let Some(v) = &verdict {
        v.log(path);
    }
    let file = path.display().to_string();
    let (policy, reason) = match config.mode {
        NvdimmMode::Direct => {
            choose_policy(Mode::Direct, false, verdict.as_ref(), &file).map_err(|e| {
                Error::Nvdimm(format!(
                    "refused: {e}. An NVDIMM on a page-cache (non-DAX) file is never durable: the \
                     guest has no flush request to send. Use a file on a DAX filesystem \
                     (`--prepare` makes its block map immutable), or `--mode volatile` for a \
                     scratch guest"
                ))
            })?
        }
        NvdimmMode::Volatile => (
            Policy::Volatile,
            "requested explicitly with --mode volatile (pmem=off)".into(),
        ),
    };
    if policy == Policy::Volatile {
        warn!("**************************************************************");
        warn!("* VOLATILE NVDIMM: NOTHING THE GUEST WRITES IS PROMISED DURABLE *");
        warn!("* (pmem=off: the page cache decides; scratch guests only)       *");
        warn!("**************************************************************");
    }
    info!("durability: {policy} ({reason})");
    Ok(Judged {
        backing,
        verdict,
        policy,
        reason,
    })
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The memory backend's id for device `id`.
pub fn memdev_id(id: &str) -> String {
    format!("mem-{id}")
}

/// The arguments that cold-plug the NVDIMM (one per element).
pub fn qemu_args(config: &NvdimmConfig, path: &Path, size: u64) -> Vec<String> {
    let pmem = if config.mode == NvdimmMode::Direct {
        "on"
    } else {
        "off"
    };
    vec![
        "-machine".into(),
        "nvdimm=on".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id={},mem-path={},size={size},share=on,pmem={pmem},align={ALIGN}",
            memdev_id(&config.id),
            qemu_escape(&path.display().to_string())
        ),
        "-device".into(),
        format!("nvdimm,id={},memdev={}", config.id, memdev_id(&config.id)),
    ]
}

/// Runs `nvdimm` to its end: prints the arguments, or plugs/attaches and guards
/// until SIGINT/SIGTERM or QEMU's exit.
pub fn run(config: NvdimmConfig) -> Result<(), Error> {
    let sigset = sys::sigset_of(&[libc::SIGINT, libc::SIGTERM]);
    sys::block_signals(&sigset).map_err(io_err("block signals"))?;
    if config.prepare {
        if std::fs::symlink_metadata(&config.file).is_err() {
            return Err(Error::Nvdimm(format!(
                "{}: no such file; --prepare does not create one (`vhost-device-pmem prepare FILE --size SIZE` does)",
                config.file.display()
            )));
        }
        let r = prepare::prepare(&config.file, None, Progress::Auto)
            .map_err(|e| Error::Nvdimm(format!("--prepare: {e}")))?;
        info!(
            "prepared {}: zero-filled {} bytes, unshared {} bytes",
            r.file, r.zeroed, r.unshared
        );
    }
    let judged = judge(&config)?;
    let path = std::fs::canonicalize(&judged.backing.path).map_err(io_err("resolve the file"))?;
    let size = judged.backing.size;
    if config.action == NvdimmAction::PrintQemuArgs {
        for a in qemu_args(&config, &path, size) {
            println!("{a}");
        }
        eprintln!(
            "# also give -m RAM,slots=N,maxmem=M with a free slot and M >= RAM + {size}; \
             run `vhost-device-pmem nvdimm --attach` to guard the file while the VM runs"
        );
        return Ok(());
    }
    Export::start(config, judged, path)?.run(sigset)
}

/// A running export.
struct Export {
    config: NvdimmConfig,
    path: PathBuf,
    region: Arc<Region>,
    events: Arc<EventHub>,
    services: Arc<Services>,
    status: Arc<Mutex<NvdimmStatus>>,
    media: Arc<MediaErrors>,
    _bound: Option<socket::BoundSocket>,
    /// `--agent-socket`, bound during start-up (no bind under the filter); the
    /// guest channel is served on it once QMP gave the guest-physical address.
    agent: Option<socket::BoundSocket>,
    health_record: Arc<HealthRecorder>,
}

impl Export {
    fn start(config: NvdimmConfig, judged: Judged, path: PathBuf) -> Result<Self, Error> {
        let canonical = path.clone();
        let Judged {
            backing,
            verdict,
            policy,
            reason,
        } = judged;
        let events: Arc<EventHub> = Arc::default();
        let services: Arc<Services> = Arc::default();
        let state = StateFiles::new(
            &backing.path,
            config.state_dir.as_deref(),
            Some(&backing.file),
        )?
        .adopting_legacy(config.records.adopt_legacy);
        let flusher = Flusher::new(
            backing.file.try_clone().map_err(io_err("dup backing fd"))?,
            policy,
        );
        let health_record = Arc::new(watch_health(
            &flusher,
            &state,
            &config.records,
            &events,
            &services,
        )?);
        if let Some(f) = flusher.failure() {
            // serve answers every flush EIO then; an NVDIMM has no flush to answer,
            // so the only honest answer is not to export it.
            return Err(Error::Nvdimm(format!(
                "{}: a sync failed in an earlier run ({} during {}); refused: the guest could not be \
                 told. Check the data, then run `vhost-device-pmem health --file {} --clear`",
                backing.path.display(),
                f.error,
                f.context,
                backing.path.display()
            )));
        }
        let media = MediaErrors::load(
            &backing.path,
            backing.size,
            state,
            events.clone(),
            services.clone(),
        )
        .map_err(io_err("load the bad-range state file"))?;
        let region = Arc::new(Region {
            path: backing.path,
            file: backing.file,
            size: backing.size,
            readonly: false,
            flusher,
            baseline: verdict
                .as_ref()
                .filter(|v| v.immutable() && policy == Policy::Direct)
                .map(|v| v.fingerprint),
        });
        let status = Arc::new(Mutex::new(NvdimmStatus {
            mode: config.mode.to_string(),
            id: config.id.clone(),
            memdev: memdev_id(&config.id),
            qmp_socket: config
                .qmp_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            attached: "pending".into(),
            align: ALIGN,
            sync_interval_secs: config.sync_interval,
            ..Default::default()
        }));
        let mut bound = None;
        if let Some(path) = &config.control_socket {
            let sock = socket::bind(path, config.socket_options())?;
            let handles = control::ControlHandles {
                status: {
                    let region = region.clone();
                    let status = status.clone();
                    let media = media.clone();
                    let services = services.clone();
                    let reason = reason.clone();
                    let seccomp = config.seccomp;
                    let record = health_record.clone();
                    Arc::new(move || {
                        let mut r = report(&region, &status, &media, &services, &reason, seccomp);
                        r.health_record = record.report();
                        r
                    })
                },
                region: region.clone(),
                queue_stats: Arc::default(),
                media: media.clone(),
                events: events.clone(),
                metrics_instance: canonical.display().to_string().into(),
            };
            let listener = sock.listener.try_clone().map_err(io_err("dup listener"))?;
            control::spawn(listener, handles, &services).map_err(io_err("start control socket"))?;
            info!("control socket: {}", path.display());
            bound = Some(sock);
        }
        let agent = match &config.agent_socket {
            Some(path) => Some(socket::bind(path, config.socket_options())?),
            None => None,
        };
        Ok(Self {
            config,
            path,
            region,
            events,
            services,
            status,
            media,
            _bound: bound,
            agent,
            health_record,
        })
    }

    fn update(&self, f: impl FnOnce(&mut NvdimmStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Announces and returns a refusal.
    fn refuse(&self, reason: String) -> Error {
        error!("{reason}");
        self.events.publish(EventKind::NvdimmRefused {
            id: self.config.id.clone(),
            reason: reason.clone(),
        });
        Error::Nvdimm(reason)
    }

    fn run(mut self, sigset: libc::sigset_t) -> Result<(), Error> {
        {
            let services = self.services.clone();
            thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: valid set and out-pointer; the signals are blocked in all threads.
                    while unsafe { libc::sigwait(&sigset, &mut sig) } != 0 {}
                    info!("signal {sig}: stopping the export (the VM keeps the NVDIMM)");
                    services.shutdown();
                })
                .map_err(io_err("start signal thread"))?;
        }
        // Start-up is done: the file judged, opened and locked, the state records
        // named, the control and agent sockets bound. The QMP session (connect,
        // the plug, SO_PEERCRED, the mapping check) and everything after it run
        // under the filter, on every thread (those started above included).
        enter_sandbox(self.config.seccomp, Profile::Nvdimm)?;
        let pid = self.plug_and_verify()?;
        let guard_handles = GuardHandles {
            region: self.region.clone(),
            events: self.events.clone(),
            guard: Arc::default(),
        };
        let guard = blockmap::guard::start(
            &guard_handles,
            &self.services,
            &GuardOptions {
                verify_interval: self.config.verify_interval,
                seal: self.config.seal,
                no_lease: Some(NO_LEASE.into()),
                change_notices: true,
            },
        )?;
        *self.guard_slot() = Some(guard_handles.guard.clone());
        let agent = self.agent.take();
        let _agent_sock = self.start_media_errors(agent)?;
        info!(
            "guarding {} for QEMU pid {pid} until SIGINT/SIGTERM or QEMU's exit",
            self.path.display()
        );
        let flusher = &self.region.flusher;
        let mut announced = false;
        while !self
            .services
            .sleep(Duration::from_secs(self.config.sync_interval))
        {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                info!("QEMU (pid {pid}) exited: nothing maps the NVDIMM any more");
                self.update(|s| {
                    s.qemu_exited = true;
                    s.mapping_verified = false;
                });
                self.events.publish(EventKind::NvdimmRefused {
                    id: self.config.id.clone(),
                    reason: format!("QEMU (pid {pid}) exited"),
                });
                break;
            }
            if interval_tick(
                flusher,
                &mut announced,
                &self.path,
                self.config.sync_interval,
            ) {
                self.update(|s| s.interval_syncs += 1);
            }
        }
        self.services.stop_all(Duration::from_secs(5));
        drop(guard);
        let result = match flusher.final_sync(SyncContext::Shutdown) {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::SyncFailed(format!("{}: {e}", self.path.display()))),
        };
        let result = self.health_record.finish().and(result);
        info!(
            "export of {} ends; a running VM keeps NVDIMM {} (it cannot be unplugged) and nothing \
             guards the file until `vhost-device-pmem nvdimm --attach` runs again",
            self.path.display(),
            self.config.id
        );
        result
    }

    /// The bad-range sources (the host device's badblocks, memory-failure notices)
    /// and, with `--agent-socket` (bound at start-up: `agent`), the guest channel
    /// matched by guest-physical address. Returns the channel's bound socket.
    fn start_media_errors(
        &self,
        agent: Option<socket::BoundSocket>,
    ) -> Result<Option<socket::BoundSocket>, Error> {
        let dup = || {
            self.region
                .file
                .try_clone()
                .map_err(io_err("dup backing fd"))
        };
        self.media
            .watch_host_device(dup()?, Duration::from_millis(500))
            .map_err(io_err("watch the host device's badblocks"))?;
        let map_sync = self.region.flusher.policy() == Policy::Direct;
        if let Err(e) = self.media.watch_poison(&self.region.file, map_sync) {
            warn!("memory-failure notices are off: {e}");
        }
        let Some(sock) = agent else {
            return Ok(None);
        };
        let addr = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .guest_address
            .ok_or_else(|| Error::Nvdimm("no guest-physical address for the agent".into()))?;
        let channel = GuestChannel::for_nvdimm(self.region.size, addr, self.media.list());
        let listener = sock.listener.try_clone().map_err(io_err("dup listener"))?;
        channel
            .spawn(listener, &self.services)
            .map_err(io_err("start the guest channel"))?;
        self.media.attach_channel(channel.clone());
        *AGENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel);
        info!(
            "guest agent channel: {} (the NVDIMM at guest-physical {addr:#x})",
            sock.path.display()
        );
        Ok(Some(sock))
    }

    fn guard_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<blockmap::guard::GuardState>>> {
        GUARD.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hot-plugs (or finds) the device, then checks QEMU's mapping; returns QEMU's
    /// pid.
    fn plug_and_verify(&self) -> Result<u32, Error> {
        let sock = self
            .config
            .qmp_socket
            .as_ref()
            .expect("checked by the config");
        let mut qmp = Qmp::connect(sock, Duration::from_secs(self.config.qmp_timeout))
            .map_err(|e| Error::Nvdimm(e.to_string()))?;
        let pid = qmp
            .peer_pid()
            .map_err(|e| Error::Nvdimm(format!("SO_PEERCRED on {}: {e}", sock.display())))?;
        info!("QMP {}: QEMU {} pid {pid}", sock.display(), qmp.version);
        self.update(|s| {
            s.qemu_pid = Some(pid);
            s.qemu_version = Some(qmp.version.clone());
        });
        let id = &self.config.id;
        let memdev = memdev_id(id);
        let existing = find_device(&mut qmp, id)?;
        match (self.config.action, existing) {
            (NvdimmAction::Attach, None) => {
                return Err(self.refuse(format!(
                    "--attach: the VM has no memory device {id}; run without --attach to hot-plug it"
                )))
            }
            (NvdimmAction::Attach, Some(d)) => {
                let want = format!("/objects/{memdev}");
                if d["memdev"].as_str() != Some(want.as_str()) {
                    return Err(self.refuse(format!(
                        "--attach: device {id} is backed by {}, not {want}",
                        d["memdev"]
                    )));
                }
                self.update(|s| s.attached = "re-attached".into());
            }
            (_, Some(_)) => {
                return Err(self.refuse(format!(
                    "the VM already has a memory device {id}; give --attach to guard it, or another --id"
                )))
            }
            (_, None) => {
                self.hot_plug(&mut qmp)?;
                self.update(|s| s.attached = "hot-plugged".into());
            }
        }
        let dev = find_device(&mut qmp, id)?.ok_or_else(|| {
            self.refuse(format!(
                "device {id} is not in query-memory-devices after the plug"
            ))
        })?;
        let addr = dev["addr"].as_u64();
        let dev_size = dev["size"].as_u64();
        info!(
            "NVDIMM {id}: guest-physical address {:#x}, size {:#x}",
            addr.unwrap_or(0),
            dev_size.unwrap_or(0)
        );
        self.update(|s| s.guest_address = addr);
        drop(qmp); // the monitor is free for the operator again
        self.verify_mapping(pid)?;
        Ok(pid)
    }

    fn hot_plug(&self, qmp: &mut Qmp) -> Result<(), Error> {
        let id = &self.config.id;
        let memdev = memdev_id(id);
        let pmem = self.config.mode == NvdimmMode::Direct;
        let object = json!({
            "qom-type": "memory-backend-file",
            "id": memdev,
            "mem-path": self.path.display().to_string(),
            "size": self.region.size,
            "share": true,
            "pmem": pmem,
            "align": ALIGN,
        });
        info!("QMP object-add {object}");
        qmp.execute("object-add", object)
            .map_err(|e| self.refuse(format!("hot-plug refused by QEMU: {e}")))?;
        let device = json!({ "driver": "nvdimm", "id": id, "memdev": memdev });
        info!("QMP device_add {device}");
        if let Err(e) = qmp.execute("device_add", device) {
            // The backend is not in use yet: it can go (a plugged NVDIMM cannot).
            if let Err(e2) = qmp.execute("object-del", json!({ "id": memdev })) {
                warn!("object-del {memdev} after the failed device_add: {e2}");
            }
            return Err(self.refuse(format!(
                "hot-plug refused by QEMU: {e} (QEMU needs -machine nvdimm=on and -m ...,slots=N,maxmem=M with room for {} bytes)",
                self.region.size
            )));
        }
        Ok(())
    }

    /// Finds the judged file among QEMU's mappings and checks `sf` in direct mode.
    fn verify_mapping(&self, pid: u32) -> Result<(), Error> {
        let id = &self.config.id;
        let fid = FileId::of(&self.region.file).map_err(io_err("fstat the file"))?;
        let after = "; the VM now has NVDIMM ".to_string()
            + id
            + " and an NVDIMM cannot be unplugged: stop the guest's use of it and restart QEMU \
               (without it, or with a DAX file), or run `nvdimm --attach --mode volatile` to keep \
               it as scratch";
        let maps: Vec<Mapping> = mapping::mappings_of(pid, fid)
            .map_err(|e| self.refuse(format!("cannot read /proc/{pid}/smaps: {e}{after}")))?;
        let (m, sf) = match check_mapping(NvdimmMode::Volatile, &maps) {
            Ok(found) => found,
            Err(why) => {
                return Err(self.refuse(format!(
                "QEMU (pid {pid}) {why} {} (device {}:{} inode {}): it opened another file{after}",
                self.path.display(),
                fid.major,
                fid.minor,
                fid.inode
            )))
            }
        };
        let flags = m.vm_flags.join(" ");
        info!("QEMU pid {pid} maps the file: {}", m.line);
        info!("VmFlags: {flags} (sf={sf})");
        self.update(|s| {
            s.mapping_verified = true;
            s.maps_line = Some(m.line.clone());
            s.vm_flags = Some(flags.clone());
            s.sf = sf;
        });
        self.events.publish(EventKind::NvdimmMapped {
            id: id.clone(),
            qemu_pid: pid,
            maps_line: m.line.clone(),
            sf,
        });
        if let Err(why) = check_mapping(self.config.mode, &maps) {
            return Err(self.refuse(format!(
                "QEMU (pid {pid}) {why} {}: the guest's writes are not durable by themselves{after}",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Judges QEMU's mappings of the file: the largest one, and whether every one has
/// MAP_SYNC in effect (`sf`); `direct` needs `sf`. The error completes "QEMU (pid
/// N) ... FILE".
pub fn check_mapping(mode: NvdimmMode, maps: &[Mapping]) -> Result<(&Mapping, bool), String> {
    let Some(m) = maps.iter().max_by_key(|m| m.len()) else {
        return Err("does not map".into());
    };
    let sf = maps.iter().all(|m| m.has_flag("sf"));
    if mode == NvdimmMode::Direct && !sf {
        return Err(format!(
            "maps without MAP_SYNC (VmFlags: {}; no `sf`):",
            m.vm_flags.join(" ")
        ));
    }
    Ok((m, sf))
}

/// One tick of the export's loop: once the guard downgraded `direct` (the block
/// map changed), the guest's writes become durable only by a sync, and the guest
/// cannot ask for one, so the whole file is synced every tick; a failure latches
/// (health `failed`, the sync-failed event, exit status 1). Returns whether a sync
/// succeeded.
fn interval_tick(flusher: &Flusher, announced: &mut bool, path: &Path, interval: u64) -> bool {
    if flusher.policy() != Policy::Datasync || flusher.failed() {
        return false;
    }
    if !*announced {
        error!(
            "the block map of {} changed under a running NVDIMM: making it durable every {interval} s \
             (the guest cannot ask for a flush); health is downgraded",
            path.display()
        );
        *announced = true;
    }
    flusher.sync_now(SyncContext::Interval).is_ok()
}

/// The guest channel once it runs (for `status`); one export per process.
static AGENT: Mutex<Option<Arc<GuestChannel>>> = Mutex::new(None);

/// The guard's state once it runs (for `status`); one export per process.
static GUARD: Mutex<Option<Arc<blockmap::guard::GuardState>>> = Mutex::new(None);

/// The `data` of QEMU's memory device `id`, if it has one.
fn find_device(qmp: &mut Qmp, id: &str) -> Result<Option<Value>, Error> {
    let list = qmp
        .execute("query-memory-devices", json!({}))
        .map_err(|e| Error::Nvdimm(e.to_string()))?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| &d["data"])
        .find(|d| d["id"].as_str() == Some(id))
        .cloned())
}

/// The `status` document of an export.
fn report(
    region: &Region,
    status: &Mutex<NvdimmStatus>,
    media: &MediaErrors,
    services: &Services,
    reason: &str,
    seccomp: SeccompMode,
) -> StatusReport {
    let nv = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let policy = region.flusher.policy();
    let live = nv.mapping_verified && !nv.qemu_exited;
    StatusReport {
        seccomp,
        health: region.flusher.health(),
        sync_failure: region.flusher.failure(),
        queue_broken: None,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        file: region.path.display().to_string(),
        size: region.size,
        readonly: false,
        mode_requested: match nv.mode.as_str() {
            "direct" => Mode::Direct,
            _ => Mode::Volatile,
        },
        policy,
        policy_reason: reason.into(),
        promise: if policy == Policy::Volatile {
            "NOTHING IS PERSISTENT: pmem=off, the guest's writes stay in the host page cache until it writes them back".into()
        } else if policy == Policy::Direct {
            "a guest cache flush makes its writes durable (MAP_SYNC on a DAX file with an immutable block map)".into()
        } else {
            "the block map changed: the guest's writes are durable only at the next interval sync"
                .into()
        },
        downgraded: region.flusher.downgrade_reason(),
        socket: nv.qmp_socket.clone(),
        connected: live,
        connections: u64::from(nv.mapping_verified),
        last_disconnect: nv.qemu_exited.then(|| "QEMU exited".into()),
        features_acked: "0x0".into(),
        shmem_region_feature: false,
        region_mapped: live,
        guard: GUARD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|g| g.snapshot()),
        bad_ranges: media.list(),
        bad_ranges_persist_error: media.persist_error(),
        agent: AGENT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|a| a.state.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        services_failed: services.failures(),
        health_record: None,
        nvdimm: Some(nv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NvdimmArgs;

    fn config(mode: NvdimmMode, file: &Path) -> NvdimmConfig {
        NvdimmConfig::try_from(NvdimmArgs {
            file: Some(file.into()),
            id: Some("nv0".into()),
            mode: Some(mode),
            print_qemu_args: true,
            ..Default::default()
        })
        .unwrap()
    }

    /// fsync(2) on a socket fails with EINVAL: a real failing sync.
    fn failing_file() -> std::fs::File {
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        std::fs::File::from(std::os::fd::OwnedFd::from(sock))
    }

    #[test]
    fn after_a_lost_block_map_every_tick_syncs_and_a_failure_latches() {
        let p = Path::new("/img");
        let mut announced = false;
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Direct);
        // Direct with the map intact: the guest's cache flushes suffice.
        assert!(!interval_tick(&fl, &mut announced, p, 1));
        assert_eq!(fl.stats.snapshot().syncs, 0);
        assert!(fl.downgrade("map changed"));
        assert!(interval_tick(&fl, &mut announced, p, 1));
        assert!(interval_tick(&fl, &mut announced, p, 1));
        assert_eq!(
            fl.stats.snapshot().syncs,
            3,
            "downgrade's own, then one per tick"
        );
        assert_eq!(fl.health(), crate::durability::Health::Downgraded);
        // Volatile never syncs.
        let fl = Flusher::new(tempfile::tempfile().unwrap(), Policy::Volatile);
        assert!(!interval_tick(&fl, &mut announced, p, 1));
        // A failing sync latches: health failed, context interval, no retry.
        let fl = Flusher::new(failing_file(), Policy::Datasync);
        assert!(!interval_tick(&fl, &mut announced, p, 1));
        assert_eq!(fl.health(), crate::durability::Health::Failed);
        assert_eq!(fl.failure().unwrap().context, SyncContext::Interval);
        assert!(!interval_tick(&fl, &mut announced, p, 1));
        assert_eq!(fl.stats.snapshot().syncs, 1);
        assert!(
            fl.final_sync(SyncContext::Shutdown).is_err(),
            "exit status 1"
        );
    }

    #[test]
    fn direct_needs_sf_on_every_mapping_and_a_missing_mapping_is_refused() {
        use std::{io::Write, os::fd::AsRawFd};
        assert_eq!(
            check_mapping(NvdimmMode::Volatile, &[]).unwrap_err(),
            "does not map"
        );
        // A real shared mapping of a page-cache file: no `sf`.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        // SAFETY: a fresh shared mapping of our own file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let id = FileId::of(f.as_file()).unwrap();
        let maps = mapping::mappings_of(std::process::id(), id).unwrap();
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, 4096) };
        let e = check_mapping(NvdimmMode::Direct, &maps).unwrap_err();
        assert!(e.contains("without MAP_SYNC") && e.contains("sh"), "{e}");
        let (m, sf) = check_mapping(NvdimmMode::Volatile, &maps).unwrap();
        assert!(!sf && m.has_flag("sh"));
        // With `sf` on every mapping, direct takes it.
        let mut with_sf = maps.clone();
        with_sf[0].vm_flags.push("sf".into());
        assert!(check_mapping(NvdimmMode::Direct, &with_sf).unwrap().1);
    }

    #[test]
    fn a_sync_failure_recorded_by_an_earlier_run_refuses_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img");
        std::fs::write(&f, vec![0u8; 2 << 20]).unwrap();
        let mut c = config(NvdimmMode::Volatile, &f);
        c.state_dir = Some(dir.path().into());
        let state = StateFiles::new(&f, Some(dir.path()), None).unwrap();
        state
            .save(
                crate::state::Kind::Health,
                &crate::durability::SyncFailure {
                    errno: libc::EIO,
                    error: "Input/output error".into(),
                    at: 1,
                    context: SyncContext::Interval,
                    requests: 0,
                },
            )
            .unwrap();
        let j = judge(&c).unwrap();
        let e = Export::start(c.clone(), j, f.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a sync failed in an earlier run") && e.contains("--clear"),
            "{e}"
        );
        state.remove(crate::state::Kind::Health).unwrap();
        let j = judge(&c).unwrap();
        assert!(Export::start(c, j, f).is_ok());
    }

    #[test]
    fn cold_plug_arguments_name_the_backend_its_flags_and_escape_commas() {
        let c = config(NvdimmMode::Direct, Path::new("/f"));
        let a = qemu_args(&c, Path::new("/mnt/pmem/a,b.img"), 64 << 20);
        assert_eq!(
            a,
            [
                "-machine",
                "nvdimm=on",
                "-object",
                "memory-backend-file,id=mem-nv0,mem-path=/mnt/pmem/a,,b.img,size=67108864,share=on,pmem=on,align=2097152",
                "-device",
                "nvdimm,id=nv0,memdev=mem-nv0",
            ]
        );
        let c = config(NvdimmMode::Volatile, Path::new("/f"));
        assert!(qemu_args(&c, Path::new("/x"), 2 << 20)[3].contains("pmem=off"));
    }

    #[test]
    fn direct_refuses_a_page_cache_file_naming_dax_and_volatile_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img");
        std::fs::write(&f, vec![1u8; 2 << 20]).unwrap();
        let e = judge(&config(NvdimmMode::Direct, &f))
            .err()
            .unwrap()
            .to_string();
        // tmpfs and ext4 without dax alike: no DAX here.
        assert!(
            e.contains("needs DAX") && e.contains("never durable"),
            "{e}"
        );
        let j = judge(&config(NvdimmMode::Volatile, &f)).unwrap();
        assert_eq!(j.policy, Policy::Volatile);
        // The lock is serve's: a second judge of the same file is refused.
        let e = judge(&config(NvdimmMode::Volatile, &f)).err().unwrap();
        assert!(
            matches!(e, Error::Backing(crate::backing::BackingError::Locked(_))),
            "{e}"
        );
        drop(j);
        let e = judge(&config(NvdimmMode::Volatile, &dir.path().join("nope")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no such file") && e.contains("would create"),
            "{e}"
        );
    }
}
