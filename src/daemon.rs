// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon: starts the services around one region (guard, media sources, control
//! socket, guest channel), then serves one VMM connection after another until
//! SIGINT/SIGTERM, and makes the data durable at every end.
//!
//! Owns: the start-up order, the accept loop, the shutdown signal and the exit
//! status. Never handles a request (that is `device`) or a flush (`durability`).

use std::{
    io,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    thread,
};

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    blockmap::{
        self,
        guard::{GuardHandles, GuardState},
    },
    config::Config,
    control::{
        self,
        events::EventHub,
        metrics_file,
        status::{DeviceStatus, StatusReport},
    },
    device::{queue::QueueStats, wire::VIRTIO_PMEM_F_SHMEM_REGION, PmemBackend},
    durability::{Flusher, Health, Mode, Policy, SyncContext},
    io_err,
    media::{channel::GuestChannel, MediaErrors},
    region::{open_region, Region},
    sandbox::{self, Profile, SeccompMode},
    service::Services,
    socket::{self, BoundSocket},
    state::{
        health::{HealthRecorder, RecordOptions},
        StateFiles,
    },
    sys,
    systemd::{self, Inherited},
    Error,
};

/// State shared by the vhost-user connections, the control socket and the logs.
pub struct Daemon {
    pub region: Arc<Region>,
    pub status: Arc<DeviceStatus>,
    pub mode_requested: Mode,
    pub policy_reason: String,
    pub socket_path: PathBuf,
    /// Events for `events` subscribers of the control socket.
    pub events: Arc<EventHub>,
    /// Lease, seal and verification state of the block-map guard.
    pub guard: Arc<GuardState>,
    /// Known bad ranges, their sources and sinks.
    pub media: Arc<MediaErrors>,
    /// The guest agent's channel, if configured.
    pub agent: Option<Arc<GuestChannel>>,
    /// The long-lived threads, and those that died.
    pub services: Arc<Services>,
    /// What the guest put on the ring that was not a flush, over all connections.
    pub queue_stats: Arc<QueueStats>,
    /// The sandbox the daemon serves under.
    pub seccomp: SeccompMode,
    /// The health record: restored, written, retried.
    pub health_record: HealthRecorder,
}

impl Daemon {
    /// The worst of what the flusher and the queue say.
    pub fn health(&self) -> Health {
        let queue = if self.status.queue_broken().is_some() {
            Health::QueueBroken
        } else {
            Health::Healthy
        };
        self.region.flusher.health().max(queue)
    }

    pub fn status_report(&self) -> StatusReport {
        let policy = self.region.flusher.policy();
        let features = self.status.features();
        StatusReport {
            health: self.health(),
            sync_failure: self.region.flusher.failure(),
            queue_broken: self.status.queue_broken(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            file: self.region.path.display().to_string(),
            size: self.region.size,
            readonly: self.region.readonly,
            mode_requested: self.mode_requested,
            policy,
            policy_reason: self.policy_reason.clone(),
            promise: policy.promise().into(),
            downgraded: self.region.flusher.downgrade_reason(),
            socket: self.socket_path.display().to_string(),
            connected: self.status.connected(),
            connections: self.status.connections(),
            last_disconnect: self.status.last_disconnect(),
            features_acked: format!("{features:#x}"),
            shmem_region_feature: features & VIRTIO_PMEM_F_SHMEM_REGION != 0,
            region_mapped: self.status.region_mapped(),
            guard: Some(self.guard.snapshot()),
            bad_ranges: self.media.list(),
            bad_ranges_persist_error: self.media.persist_error(),
            agent: self.agent.as_ref().map(|a| a.state.lock().unwrap().clone()),
            services_failed: self.services.failures(),
            seccomp: self.seccomp,
            health_record: self.health_record.report(),
            nvdimm: None,
        }
    }
}

/// How long the services may take to stop at exit.
const SERVICE_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the daemon until SIGINT/SIGTERM: serves one VMM connection after another on
/// the same socket, resetting the device between them. Sockets in `inherited` (from
/// the service manager) are used instead of binding the configured paths, and are
/// never unlinked or chmod'ed.
pub fn serve(config: Config, inherited: Inherited) -> Result<(), Error> {
    // SIGINT and SIGTERM are blocked in this thread and every thread it starts, so
    // the signal thread alone takes them.
    let sigset = sys::sigset_of(&[libc::SIGINT, libc::SIGTERM]);
    sys::block_signals(&sigset).map_err(io_err("block signals"))?;
    let (region, policy_reason) = open_region(&config)?;
    let events: Arc<EventHub> = Arc::default();
    let services: Arc<Services> = Arc::default();
    let state = StateFiles::new(
        &region.path,
        config.state_dir.as_deref(),
        Some(&region.file),
    )?
    .adopting_legacy(config.records.adopt_legacy);
    let health_record = watch_health(&region.flusher, &state, &config.records, &events, &services)?;
    let media = MediaErrors::load(
        &region.path,
        region.size,
        state,
        events.clone(),
        services.clone(),
    )
    .map_err(io_err("load the bad-range state file"))?;
    let agent = config
        .agent_socket
        .as_ref()
        .map(|_| GuestChannel::new(region.size, config.guest_pci_address.clone(), media.list()));
    let daemon = Arc::new(Daemon {
        region: Arc::new(region),
        status: Arc::new(DeviceStatus::default()),
        mode_requested: config.mode,
        policy_reason,
        socket_path: inherited
            .vhost_user
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .and_then(|a| a.as_pathname().map(ToOwned::to_owned))
            .unwrap_or_else(|| config.socket_path.clone()),
        events,
        guard: Arc::default(),
        media,
        agent,
        services,
        queue_stats: Arc::default(),
        seccomp: config.seccomp,
        health_record,
    });
    // Sockets this daemon bound; dropped (their paths removed) when serve returns.
    let mut bound = Vec::new();
    bound.extend(start_media_errors(&daemon, &config)?);
    // Lease, seal and block-map watcher; dropped (unsealing) however serve returns.
    let guard_handles = GuardHandles {
        region: daemon.region.clone(),
        events: daemon.events.clone(),
        guard: daemon.guard.clone(),
    };
    let _guard = blockmap::guard::start(&guard_handles, &daemon.services, &(&config).into())?;

    let Inherited {
        vhost_user: inherited_vsock,
        control: inherited_csock,
    } = inherited;
    let vsock = match inherited_vsock {
        Some(l) => BoundSocket::inherited(l),
        None => socket::bind(&config.socket_path, config.socket_options())?,
    };
    let handles = control::ControlHandles {
        status: {
            let d = daemon.clone();
            Arc::new(move || d.status_report())
        },
        region: daemon.region.clone(),
        queue_stats: daemon.queue_stats.clone(),
        media: daemon.media.clone(),
        events: daemon.events.clone(),
        metrics_instance: metrics_instance(&config, &daemon.region.path).into(),
    };
    let csock = match (inherited_csock, &config.control_socket) {
        (Some(l), _) => Some(BoundSocket::inherited(l)),
        (None, Some(path)) => Some(socket::bind(path, config.socket_options())?),
        (None, None) => None,
    };
    if let Some(csock) = csock {
        let listener = csock.listener.try_clone().map_err(io_err("dup listener"))?;
        control::spawn(listener, handles.clone(), &daemon.services)
            .map_err(io_err("start control socket"))?;
        info!(
            "control socket: {}{}",
            csock.path.display(),
            if csock.inherited { " (inherited)" } else { "" }
        );
        bound.push(csock);
    }
    if let Some(path) = &config.metrics_file {
        // The first write is made here, so a path that cannot be written stops the
        // start-up with a clear error instead of a warning every interval.
        metrics_file::write_once(path, &handles).map_err(|e| Error::Io {
            what: "write the metrics file (--metrics-file)",
            source: io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
        metrics_file::spawn(
            path.clone(),
            std::time::Duration::from_secs(config.metrics_interval),
            handles.clone(),
            &daemon.services,
        )
        .map_err(io_err("start the metrics file writer"))?;
        info!(
            "metrics file: {} (every {} s, instance {:?})",
            path.display(),
            config.metrics_interval,
            &*handles.metrics_instance
        );
    }

    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?);
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
    {
        let stop = stop.clone();
        let current = current.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: valid set and out-pointer; the signals are blocked in all threads.
                while unsafe { libc::sigwait(&sigset, &mut sig) } != 0 {}
                info!("signal {sig}: finishing in-flight requests and shutting down");
                systemd::notify_stopping();
                let _ = stop.write(1);
                if let Some(h) = current.lock().unwrap().as_ref() {
                    h.shutdown();
                }
            })
            .map_err(io_err("start signal thread"))?;
    }

    let mut listener = Listener::from(vsock.listener.try_clone().map_err(io_err("dup listener"))?);
    info!(
        "listening on {}{} for a VMM ({} bytes of {})",
        vsock.path.display(),
        if vsock.inherited { " (inherited)" } else { "" },
        daemon.region.size,
        daemon.region.path.display()
    );
    // Start-up is done: everything that opens, binds, locks or creates has run.
    // From here on, every thread (those started above included) serves under the
    // allow-list, and so does each thread started later, which inherits it.
    enter_sandbox(config.seccomp, Profile::Serve)?;
    // Listening, and the file judged (its policy chosen): ready.
    systemd::notify_or_log(&format!("READY=1\nSTATUS={}", status_line(&daemon)));
    start_notifier(&daemon)?;
    while wait_for_connection(listener.as_raw_fd(), &stop).map_err(io_err("poll"))? {
        serve_connection(&daemon, &mut listener, &current, &stop)?;
    }

    // One signal stops every service (accept loops, media sources, retries); then
    // the data is made durable.
    daemon.services.stop_all(SERVICE_STOP_GRACE);
    let result = match daemon.region.flusher.final_sync(SyncContext::Shutdown) {
        Ok(()) => {
            info!(
                "data is durable per policy {}; exiting",
                daemon.region.flusher.policy()
            );
            Ok(())
        }
        Err(e) => Err(Error::SyncFailed(format!(
            "{}: {e}",
            daemon.region.path.display()
        ))),
    };
    // A sync failure whose record is not everywhere ends the daemon with its own
    // status: a daemon started next could serve the file as healthy.
    let result = daemon.health_record.finish().and(result);
    // The last metrics, with the final sync counted and no VMM connected.
    if let Some(path) = &config.metrics_file {
        if let Err(e) = metrics_file::write_once(path, &handles) {
            warn!(
                "cannot write the metrics file {} at exit: {e}",
                path.display()
            );
        }
    }
    drop(vsock);
    drop(bound);
    result
}

/// Installs the seccomp filter of `profile` on all threads, saying so first.
pub(crate) fn enter_sandbox(mode: SeccompMode, profile: Profile) -> Result<(), Error> {
    match mode {
        SeccompMode::Off => {
            warn!("seccomp sandbox off (--seccomp off): every system call is allowed");
            return Ok(());
        }
        SeccompMode::Enforce => info!(
            "seccomp sandbox on (enforce): a system call outside the allow-list kills the \
             daemon with SIGSYS; `--seccomp log` logs such calls instead"
        ),
        SeccompMode::Log => warn!(
            "seccomp sandbox in log mode: system calls outside the allow-list are allowed \
             and logged by the kernel (SECCOMP/audit lines in the kernel log)"
        ),
    }
    sandbox::install(mode, profile).map_err(|e| Error::Sandbox(e.to_string()))
}

/// The `instance` label of the metrics: `--metrics-instance`, or the backing file's
/// canonical path (as opened; the path given if it cannot be resolved).
fn metrics_instance(config: &Config, file: &std::path::Path) -> String {
    config.metrics_instance.clone().unwrap_or_else(|| {
        std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string()
    })
}

/// The service manager's one-line status: policy, health, connection.
pub fn status_line(daemon: &Daemon) -> String {
    format!(
        "policy {}, health {}, {}",
        daemon.region.flusher.policy(),
        daemon.health(),
        if daemon.status.connected() {
            "VMM connected"
        } else {
            "waiting for a VMM"
        }
    )
}

/// Keeps the service manager's STATUS= current and, when it asked for a watchdog,
/// pings it at most every half interval, but only while the flusher and the request
/// queue make progress or are idle: a sync or a queue pass in progress for a whole
/// interval stops the pings (and says so in STATUS=), so the manager acts on a hung
/// fdatasync. No thread when there is no `NOTIFY_SOCKET`.
fn start_notifier(daemon: &Arc<Daemon>) -> Result<(), Error> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog.map_or(NOTIFY_TICK, |w| (w / 2).min(NOTIFY_TICK));
    if let Some(w) = watchdog {
        info!("service manager watchdog: {w:?}; pinging every {tick:?} while syncs and queue passes make progress");
    }
    let d = daemon.clone();
    let services = daemon.services.clone();
    daemon
        .services
        .spawn(
            "notify",
            |_| {},
            move || {
                let flusher = &d.region.flusher;
                systemd::run_notifier(
                    &services,
                    tick,
                    watchdog,
                    || status_line(&d),
                    || (flusher.busy.running_for(), d.queue_stats.pass.running_for()),
                    systemd::notify_or_log,
                );
            },
        )
        .map_err(io_err("start the service-manager notifier"))
}

/// How often STATUS= is refreshed (and, at most, how far apart watchdog pings are).
const NOTIFY_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Restores a sync failure recorded by an earlier run (the file is then served in
/// health `failed`: every flush EIO), and records the next one when it happens, with
/// an event, retrying until it is written everywhere (`state::health`). The record
/// goes only through `vhost-device-pmem health --clear`.
pub(crate) fn watch_health(
    flusher: &Flusher,
    state: &StateFiles,
    records: &RecordOptions,
    events: &Arc<EventHub>,
    services: &Arc<Services>,
) -> Result<HealthRecorder, Error> {
    HealthRecorder::start(flusher, state, records, events.clone(), services)
}

/// Starts the media-error sources and the guest channel; returns the channel's
/// bound socket, if any.
fn start_media_errors(daemon: &Daemon, config: &Config) -> Result<Option<BoundSocket>, Error> {
    let media = &daemon.media;
    let mut bound = None;
    if let (Some(path), Some(agent)) = (&config.agent_socket, &daemon.agent) {
        let sock = socket::bind(path, config.socket_options())?;
        let listener = sock.listener.try_clone().map_err(io_err("dup listener"))?;
        agent
            .spawn(listener, &daemon.services)
            .map_err(io_err("start the guest channel"))?;
        media.attach_channel(agent.clone());
        info!("guest agent channel: {}", path.display());
        bound = Some(sock);
    }
    // Sources read through duplicates of the daemon's descriptor: a new open of the
    // file would break the daemon's lease.
    let dup = || {
        daemon
            .region
            .file
            .try_clone()
            .map_err(io_err("dup backing fd"))
    };
    media
        .watch_host_device(dup()?, BADBLOCKS_REREAD)
        .map_err(io_err("watch the host device's badblocks"))?;
    // In direct mode the file is DAX and MAP_SYNC was granted when it was judged.
    let map_sync = daemon.region.flusher.policy() == Policy::Direct;
    if let Err(e) = media.watch_poison(&daemon.region.file, map_sync) {
        warn!("memory-failure notices are off: {e}");
    }
    if config.scrub_interval > 0 {
        media
            .start_scrub(
                dup()?,
                std::time::Duration::from_secs(config.scrub_interval),
                config.scrub_rate,
            )
            .map_err(io_err("start the scrub"))?;
    }
    Ok(bound)
}

/// Re-read of the device's badblocks for the changes the kernel does not notify
/// (entries written to the attribute by hand). Reading an unchanged list costs one
/// small sysfs read; it is translated again only when it changed (or every
/// [`media::RETRANSLATE`]).
const BADBLOCKS_REREAD: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits until a VMM connects (true) or shutdown was requested (false).
fn wait_for_connection(listen_fd: i32, stop: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listen_fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Serves one VMM connection to its end, with a fresh device state.
fn serve_connection(
    daemon: &Arc<Daemon>,
    listener: &mut Listener,
    current: &Mutex<Option<ShutdownHandle>>,
    stop: &EventFd,
) -> Result<(), Error> {
    let backend = Arc::new(RwLock::new(
        PmemBackend::new(
            daemon.region.clone(),
            daemon.status.clone(),
            daemon.events.clone(),
            daemon.queue_stats.clone(),
        )
        .map_err(io_err("create device"))?,
    ));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut vud = VhostUserDaemon::new("vhost-device-pmem".into(), backend, mem)
        .map_err(|e| Error::VhostUser(e.to_string()))?;
    vud.start(listener)
        .map_err(|e| Error::VhostUser(e.to_string()))?;
    daemon.status.set_connected(true);
    info!("VMM connected");
    *current.lock().unwrap() = vud.shutdown_handle();
    if stop.read().is_ok() {
        // A signal arrived between accept and now: honour it.
        let _ = stop.write(1);
        vud.request_shutdown();
    }
    let result = vud.wait();
    *current.lock().unwrap() = None;
    let why = match &result {
        Ok(()) => "the VMM disconnected".to_string(),
        // A VMM that exits (or is killed) closes the socket mid-read: not an error.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => "the VMM disconnected".to_string(),
        Err(e) => format!("the connection ended with an error: {e}"),
    };
    drop(vud); // stops and joins the vring worker after its current batch
    daemon.status.set_connected(false);
    daemon.status.set_last_disconnect(why.clone());
    // Whatever the guest wrote before it went away is made durable now.
    if let Err(e) = daemon.region.flusher.final_sync(SyncContext::Disconnect) {
        error!("sync after disconnect failed: {e}");
    }
    info!("{why}; device reset, waiting for the next connection");
    Ok(())
}
