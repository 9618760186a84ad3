// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guarded NVDIMM export (`vhost-device-pmem nvdimm`): judges a host file,
//! hot-plugs it into a running QEMU as `memory-backend-file` + `nvdimm` over QMP (or
//! prints the cold-plug arguments), checks that QEMU mapped the very file it judged
//! with the promised flags, and guards it while the VM runs, on the same host
//! runtime as `serve`.
//!
//! Owns: the NVDIMM's start-up order, the QMP plug sequence, the mapping check, the
//! wait for QEMU's exit and the interval syncs after a lost block map. Never serves
//! vhost-user and never writes file data; an NVDIMM cannot be unplugged, so it
//! never tries.

pub mod mapping;
pub mod qmp;

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{mpsc::RecvTimeoutError, Mutex},
    time::Duration,
};

use log::{error, info, warn};
use serde_json::{json, Value};

use crate::{
    blockmap::prepare::{self, PrepareError, Progress},
    config::{NvdimmAction, NvdimmConfig, NvdimmMode},
    durability::{Flusher, Mode, Policy, SyncContext},
    events::EventKind,
    guard::GuardOptions,
    host::{ControlClients, ExportState, Host, HostOptions},
    media::channel::GuestChannel,
    region::{Export, RegionSpec},
    report::NvdimmStatus,
    sandbox::Profile,
    service,
    util::lock,
    Error,
};

use self::{
    mapping::{FileId, Mapping},
    qmp::{Qmp, QmpError},
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

/// What the NVDIMM export refuses, and why.
#[derive(Debug, thiserror::Error)]
pub enum NvdimmError {
    #[error(
        "{0}: no such file; refused: QEMU's memory-backend-file would create an empty one. \
         Make it with `vhost-device-pmem prepare {0} --size SIZE`"
    )]
    NoSuchFile(PathBuf),
    #[error(
        "{0}: no such file; --prepare does not create one (`vhost-device-pmem prepare FILE \
         --size SIZE` does)"
    )]
    PrepareNoFile(PathBuf),
    #[error("--prepare")]
    Prepare(#[source] PrepareError),
    #[error("resolve {path}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{file}: a sync failed in an earlier run ({error} during {context}); refused: the guest \
         could not be told. Check the data, then run `vhost-device-pmem health --file {file} \
         --clear`"
    )]
    EarlierSyncFailure {
        file: PathBuf,
        error: String,
        context: SyncContext,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("SO_PEERCRED on {socket}")]
    PeerCred {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fstat the exported file")]
    Fstat(#[source] io::Error),
    #[error("watch QEMU (pid {pid}) for its exit")]
    WatchQemu {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("--attach: the VM has no memory device {id}; run without --attach to hot-plug it")]
    NoDevice { id: String },
    #[error("--attach: device {id} is backed by {found}, not {want}")]
    WrongBackend {
        id: String,
        found: String,
        want: String,
    },
    #[error("the VM already has a memory device {id}; give --attach to guard it, or another --id")]
    AlreadyPresent { id: String },
    #[error("QEMU gave no guest-physical address for device {id}: the agent cannot find it")]
    NoGuestAddress { id: String },
    #[error("device {id} is not in query-memory-devices after the plug")]
    MissingAfterPlug { id: String },
    #[error("hot-plug refused by QEMU")]
    ObjectAdd(#[source] QmpError),
    #[error(
        "hot-plug refused by QEMU (QEMU needs -machine nvdimm=on and -m ...,slots=N,maxmem=M \
         with room for {size} bytes)"
    )]
    DeviceAdd {
        size: u64,
        #[source]
        source: QmpError,
    },
    #[error("cannot read /proc/{pid}/smaps{}", unplug_hint(id))]
    Smaps {
        pid: u32,
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU (pid {pid}) {problem} {file} (device {major}:{minor} inode {inode}): it opened another file{}", unplug_hint(id))]
    NotMapped {
        pid: u32,
        problem: MappingProblem,
        file: String,
        major: u32,
        minor: u32,
        inode: u64,
        id: String,
    },
    #[error(
        "QEMU (pid {pid}) {problem} {file}: the guest's writes are not durable by themselves{}",
        unplug_hint(id)
    )]
    NotDurable {
        pid: u32,
        problem: MappingProblem,
        file: String,
        id: String,
    },
}

/// What an NVDIMM that cannot be unplugged leaves the operator to do.
fn unplug_hint(id: &str) -> String {
    format!(
        "; the VM now has NVDIMM {id} and an NVDIMM cannot be unplugged: stop the guest's use of \
         it and restart QEMU (without it, or with a DAX file), or run `nvdimm --attach --mode \
         volatile` to keep it as scratch"
    )
}

/// What is wrong with QEMU's mappings of the judged file. The text completes
/// "QEMU (pid N) ... FILE".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingProblem {
    #[error("does not map")]
    NotMapped,
    #[error("maps without MAP_SYNC (VmFlags: {flags}; no `sf`):")]
    NoMapSync { flags: String },
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

/// The durability mode an NVDIMM mode asks for.
pub fn mode_of(mode: NvdimmMode) -> Mode {
    match mode {
        NvdimmMode::Direct => Mode::Direct,
        NvdimmMode::Volatile => Mode::Volatile,
    }
}

/// What the host runtime is asked for by `nvdimm`'s configuration.
pub fn host_options(config: &NvdimmConfig) -> HostOptions {
    HostOptions {
        region: RegionSpec {
            file: config.file.clone(),
            mode: mode_of(config.mode),
            readonly: false,
            allow_shared_permissions: config.allow_shared_permissions,
            export: Export::Nvdimm,
        },
        state_dir: config.state_dir.clone(),
        socket_group: None,
        control_socket: config.control_socket.clone(),
        agent_socket: config.agent_socket.clone(),
        guard: GuardOptions {
            verify_interval: config.verify_interval,
            seal: config.seal,
            no_lease: Some(NO_LEASE.into()),
            change_notices: true,
        },
        control_clients: ControlClients::default(),
        scrub: None,
        metrics: None,
        metrics_instance: None,
        seccomp: config.seccomp,
        profile: Profile::Nvdimm,
        other_paths: Vec::new(),
        records: config.records.clone(),
        allow_shared_socket_dir: config.allow_shared_socket_dir,
    }
}

/// Runs `nvdimm` to its end: prints the arguments, or plugs/attaches and guards
/// until SIGINT/SIGTERM or QEMU's exit.
pub fn run(config: NvdimmConfig) -> Result<(), Error> {
    if std::fs::symlink_metadata(&config.file).is_err() {
        return Err(if config.prepare {
            NvdimmError::PrepareNoFile(config.file.clone())
        } else {
            NvdimmError::NoSuchFile(config.file.clone())
        }
        .into());
    }
    if config.prepare {
        let r =
            prepare::prepare(&config.file, None, Progress::Auto).map_err(NvdimmError::Prepare)?;
        info!(
            "prepared {}: zero-filled {} bytes, unshared {} bytes",
            r.file, r.zeroed, r.unshared
        );
    }
    let export = Nvdimm::start(config)?;
    if export.config.action == NvdimmAction::PrintQemuArgs {
        let size = export.host.region().size;
        for a in qemu_args(&export.config, &export.path, size) {
            println!("{a}");
        }
        eprintln!(
            "# also give -m RAM,slots=N,maxmem=M with a free slot and M >= RAM + {size}; \
             run `vhost-device-pmem nvdimm --attach` to guard the file while the VM runs"
        );
        return Ok(());
    }
    export.run()
}

/// A running export.
pub struct Nvdimm {
    config: NvdimmConfig,
    /// The file's canonical path (what QEMU is given).
    path: PathBuf,
    pub host: Host,
}

impl Nvdimm {
    /// Judges the file and starts what the export runs before the QMP session: the
    /// file, its records, the control and agent sockets, the signal thread. With
    /// `--print-qemu-args` only the judgement.
    pub fn start(config: NvdimmConfig) -> Result<Self, Error> {
        let status = NvdimmStatus {
            mode: mode_of(config.mode),
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
        };
        let mut host = Host::open(
            host_options(&config),
            ExportState::Nvdimm(Box::new(Mutex::new(status))),
        )?;
        let path =
            std::fs::canonicalize(&host.region().path).map_err(|source| NvdimmError::Resolve {
                path: host.region().path.clone(),
                source,
            })?;
        if let Some(f) = host
            .region()
            .flusher
            .failure()
            .filter(|_| config.action != NvdimmAction::PrintQemuArgs)
        {
            // serve answers every flush EIO then; an NVDIMM has no flush to answer,
            // so the only honest answer is not to export it.
            return Err(NvdimmError::EarlierSyncFailure {
                file: host.region().path.clone(),
                error: f.error,
                context: f.context,
            }
            .into());
        }
        if config.action != NvdimmAction::PrintQemuArgs {
            if let Some(qmp) = &config.qmp_socket {
                let _ = host.shared.socket.set(qmp.clone());
            }
            host.start_control(None)?;
            host.bind_agent()?;
            host.start_signals("stopping the export (the VM keeps the NVDIMM)")?;
        }
        Ok(Self { config, path, host })
    }

    fn update(&self, f: impl FnOnce(&mut NvdimmStatus)) {
        if let ExportState::Nvdimm(nv) = &self.host.shared.export {
            f(&mut lock(nv));
        }
    }

    fn status(&self) -> NvdimmStatus {
        match &self.host.shared.export {
            ExportState::Nvdimm(nv) => lock(nv).clone(),
            ExportState::VirtioPmem { .. } => unreachable!("an NVDIMM export"),
        }
    }

    /// Announces and returns a refusal.
    fn refuse(&self, e: NvdimmError) -> Error {
        let reason = crate::error_chain(&e);
        error!("{reason}");
        self.host.events().publish(EventKind::NvdimmRefused {
            id: self.config.id.clone(),
            reason,
        });
        e.into()
    }

    /// The QMP session under the sandbox, then the guard, the media-error sources
    /// and the guest channel, then the wait for QEMU's exit or a signal.
    pub fn run(mut self) -> Result<(), Error> {
        // Start-up is done: the file judged, opened and locked, the state records
        // named, the control and agent sockets bound. The QMP session (connect,
        // the plug, SO_PEERCRED, the mapping check) and everything after it run
        // under the filter, on every thread (those started above included).
        self.host.enter_sandbox()?;
        let pid = self.plug_and_verify()?;
        self.host.start_guard()?;
        self.host.start_media_sources()?;
        if self.host.has_agent_socket() {
            let addr = self
                .status()
                .guest_address
                .ok_or(NvdimmError::NoGuestAddress {
                    id: self.config.id.clone(),
                })?;
            let channel = GuestChannel::for_nvdimm(
                self.host.region().size,
                addr,
                self.host.shared.media.list(),
            );
            info!("guest agent channel: the NVDIMM at guest-physical {addr:#x}");
            self.host.start_agent(channel)?;
        }
        self.watch_qemu(pid)?;
        self.host.ready()?;
        info!(
            "guarding {} for QEMU pid {pid} until SIGINT/SIGTERM or QEMU's exit",
            self.path.display()
        );
        self.guard_until_stopped();
        let id = self.config.id.clone();
        let path = self.path.clone();
        let result = self.host.finish();
        info!(
            "export of {} ends; a running VM keeps NVDIMM {id} (it cannot be unplugged) and nothing \
             guards the file until `vhost-device-pmem nvdimm --attach` runs again",
            path.display()
        );
        result
    }

    /// Until shutdown: after a downgrade (the block map changed) the whole file is
    /// synced every `--sync-interval`; before it, nothing wakes this thread but an
    /// event (a downgrade, QEMU's exit, a signal's shutdown).
    fn guard_until_stopped(&self) {
        let services = self.host.services().clone();
        let changes = self.host.events().subscribe(false);
        let flusher = &self.host.region().flusher;
        let interval = Duration::from_secs(self.config.sync_interval);
        let mut announced = false;
        while !services.stopping() {
            let wait =
                (flusher.policy() == Policy::Datasync && !flusher.failed()).then_some(interval);
            let woke = match wait {
                Some(t) => !matches!(changes.recv_timeout(t), Err(RecvTimeoutError::Disconnected)),
                None => changes.recv().is_ok(),
            };
            if !woke || services.stopping() {
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
    }

    /// A service that waits for QEMU's exit on a pidfd (no polling) and stops the
    /// export then.
    fn watch_qemu(&self, pid: u32) -> Result<(), Error> {
        let pidfd: OwnedFd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid as i32).ok_or(NvdimmError::WatchQemu {
                pid,
                source: io::Error::from_raw_os_error(libc::ESRCH),
            })?,
            rustix::process::PidfdFlags::empty(),
        )
        .map_err(|e| NvdimmError::WatchQemu {
            pid,
            source: e.into(),
        })?;
        let shared = self.host.shared.clone();
        let id = self.config.id.clone();
        self.host
            .services()
            .spawn(
                "qemu-exit",
                |_| {},
                move || {
                    if let Ok(true) = service::wait_readable(&shared.services, pidfd.as_fd()) {
                        info!("QEMU (pid {pid}) exited: nothing maps the NVDIMM any more");
                        if let ExportState::Nvdimm(nv) = &shared.export {
                            let mut nv = lock(nv);
                            nv.qemu_exited = true;
                            nv.mapping_verified = false;
                        }
                        shared.events.publish(EventKind::NvdimmRefused {
                            id,
                            reason: format!("QEMU (pid {pid}) exited"),
                        });
                        shared.services.shutdown();
                    }
                },
            )
            .map_err(|e| Error::Start("the QEMU exit watcher", e))
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
            .map_err(NvdimmError::Qmp)?;
        let pid = qmp.peer_pid().map_err(|source| NvdimmError::PeerCred {
            socket: sock.clone(),
            source,
        })?;
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
                return Err(self.refuse(NvdimmError::NoDevice { id: id.clone() }))
            }
            (NvdimmAction::Attach, Some(d)) => {
                let want = format!("/objects/{memdev}");
                if d["memdev"].as_str() != Some(want.as_str()) {
                    return Err(self.refuse(NvdimmError::WrongBackend {
                        id: id.clone(),
                        found: d["memdev"].to_string(),
                        want,
                    }));
                }
                self.update(|s| s.attached = "re-attached".into());
            }
            (_, Some(_)) => return Err(self.refuse(NvdimmError::AlreadyPresent { id: id.clone() })),
            (_, None) => {
                self.hot_plug(&mut qmp)?;
                self.update(|s| s.attached = "hot-plugged".into());
            }
        }
        let dev = find_device(&mut qmp, id)?
            .ok_or_else(|| self.refuse(NvdimmError::MissingAfterPlug { id: id.clone() }))?;
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
            "size": self.host.region().size,
            "share": true,
            "pmem": pmem,
            "align": ALIGN,
        });
        info!("QMP object-add {object}");
        qmp.execute("object-add", object)
            .map_err(|e| self.refuse(NvdimmError::ObjectAdd(e)))?;
        let device = json!({ "driver": "nvdimm", "id": id, "memdev": memdev });
        info!("QMP device_add {device}");
        if let Err(e) = qmp.execute("device_add", device) {
            // The backend is not in use yet: it can go (a plugged NVDIMM cannot).
            if let Err(e2) = qmp.execute("object-del", json!({ "id": memdev })) {
                warn!("object-del {memdev} after the failed device_add: {e2}");
            }
            return Err(self.refuse(NvdimmError::DeviceAdd {
                size: self.host.region().size,
                source: e,
            }));
        }
        Ok(())
    }

    /// Finds the judged file among QEMU's mappings and checks `sf` in direct mode.
    fn verify_mapping(&self, pid: u32) -> Result<(), Error> {
        let id = &self.config.id;
        let fid = FileId::of(&self.host.region().file).map_err(NvdimmError::Fstat)?;
        let maps: Vec<Mapping> = mapping::mappings_of(pid, fid).map_err(|source| {
            self.refuse(NvdimmError::Smaps {
                pid,
                id: id.clone(),
                source,
            })
        })?;
        let (m, sf) = match check_mapping(NvdimmMode::Volatile, &maps) {
            Ok(found) => found,
            Err(problem) => {
                return Err(self.refuse(NvdimmError::NotMapped {
                    pid,
                    problem,
                    file: self.path.display().to_string(),
                    major: fid.major,
                    minor: fid.minor,
                    inode: fid.inode,
                    id: id.clone(),
                }))
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
        self.host.events().publish(EventKind::NvdimmMapped {
            id: id.clone(),
            qemu_pid: pid,
            maps_line: m.line.clone(),
            sf,
        });
        if let Err(problem) = check_mapping(self.config.mode, &maps) {
            return Err(self.refuse(NvdimmError::NotDurable {
                pid,
                problem,
                file: self.path.display().to_string(),
                id: id.clone(),
            }));
        }
        Ok(())
    }
}

/// Judges QEMU's mappings of the file: the largest one, and whether every one has
/// MAP_SYNC in effect (`sf`); `direct` needs `sf`. The error completes "QEMU (pid
/// N) ... FILE".
pub fn check_mapping(
    mode: NvdimmMode,
    maps: &[Mapping],
) -> Result<(&Mapping, bool), MappingProblem> {
    let Some(m) = maps.iter().max_by_key(|m| m.len()) else {
        return Err(MappingProblem::NotMapped);
    };
    let sf = maps.iter().all(|m| m.has_flag("sf"));
    if mode == NvdimmMode::Direct && !sf {
        return Err(MappingProblem::NoMapSync {
            flags: m.vm_flags.join(" "),
        });
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

/// The `data` of QEMU's memory device `id`, if it has one.
fn find_device(qmp: &mut Qmp, id: &str) -> Result<Option<Value>, NvdimmError> {
    let list = qmp
        .execute("query-memory-devices", json!({}))
        .map_err(NvdimmError::Qmp)?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| &d["data"])
        .find(|d| d["id"].as_str() == Some(id))
        .cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NvdimmArgs;
    use crate::state::StateFiles;

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
            MappingProblem::NotMapped
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
        let e = check_mapping(NvdimmMode::Direct, &maps)
            .unwrap_err()
            .to_string();
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
        c.action = NvdimmAction::Attach;
        c.qmp_socket = Some(dir.path().join("qmp.sock"));
        let e = crate::error_chain(&Nvdimm::start(c.clone()).err().unwrap());
        assert!(
            e.contains("a sync failed in an earlier run") && e.contains("--clear"),
            "{e}"
        );
        state.remove(crate::state::Kind::Health).unwrap();
        let started = Nvdimm::start(c).unwrap();
        started.host.services().shutdown();
        started.host.finish().unwrap();
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
        let e = crate::error_chain(&Nvdimm::start(config(NvdimmMode::Direct, &f)).err().unwrap());
        // tmpfs and ext4 without dax alike: no DAX here.
        assert!(
            e.contains("needs DAX") && e.contains("never durable"),
            "{e}"
        );
        let j = Nvdimm::start(config(NvdimmMode::Volatile, &f)).unwrap();
        assert_eq!(j.host.region().flusher.policy(), Policy::Volatile);
        assert_eq!(j.host.shared.report().mode_requested, Mode::Volatile);
        // The lock is serve's: a second export of the same file is refused.
        let e = Nvdimm::start(config(NvdimmMode::Volatile, &f))
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                Error::Region(crate::region::RegionError::Backing(
                    crate::backing::BackingError::Locked(_)
                ))
            ),
            "{e}"
        );
        drop(j);
        let e = run(config(NvdimmMode::Volatile, &dir.path().join("nope")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no such file") && e.contains("would create"),
            "{e}"
        );
    }
}
