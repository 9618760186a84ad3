// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host runtime both exports run on: the region judged, the state records and
//! the health record, the media-error sources, the guard, the control socket, the
//! metrics file, the signals, the sandbox and readiness, each step written once.
//! `app::serve` and `app::nvdimm` call the steps in their order; a fix to start-up
//! lands in both by construction.
//!
//! Owns: the start-up steps and the rule of their order (nothing that opens, binds
//! or creates runs after the sandbox), the exit (services stopped, the final sync,
//! the last metrics, the sockets removed), and the one `status` report. Never
//! serves vhost-user and never speaks QMP (the apps do).

pub mod peer;
pub mod report;
pub mod signals;

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use log::{info, warn};

use crate::{
    control::{self, clients::ClientPolicy, metrics_file, ControlHandles},
    device::queue::QueueStats,
    durability::SyncContext,
    events::{EventHub, EventKind},
    guard::{self, Guard, GuardHandles, GuardOptions, GuardState},
    media::{channel::GuestChannel, MediaErrors},
    region::{Region, RegionError, RegionSpec},
    report::{DeviceStatus, NvdimmStatus, SeccompMode},
    sandbox::{self, Profile},
    service::Services,
    socket::{self, BindOptions, BoundSocket},
    state::{
        health::{HealthRecorder, RecordOptions},
        Kind, StateFiles,
    },
    systemd, Error,
};

use self::signals::Signals;

/// How long the services may take to stop at exit.
const SERVICE_STOP_GRACE: Duration = Duration::from_secs(5);

/// Re-read of the device's badblocks for the changes the kernel does not notify
/// (entries written to the attribute by hand). Reading an unchanged list costs one
/// small sysfs read; it is translated again only when it changed. Only on a device
/// that keeps a badblocks list (pmem, md); a file on any other device starts no
/// watcher at all.
const BADBLOCKS_REREAD: Duration = Duration::from_millis(500);

/// How often STATUS= is refreshed at most, and the longest gap between watchdog
/// pings when the service manager asked for them.
const NOTIFY_TICK: Duration = Duration::from_secs(1);

/// What both exports ask of the host.
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub region: RegionSpec,
    pub state_dir: Option<PathBuf>,
    /// Group that may connect to the sockets this host binds.
    pub socket_group: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub agent_socket: Option<PathBuf>,
    pub guard: GuardOptions,
    /// Who may use the control socket, and how many at once.
    pub control_clients: ControlClients,
    pub scrub: Option<Scrub>,
    pub metrics: Option<MetricsOptions>,
    /// The `instance` label of every series (`--metrics-instance`), in the metrics
    /// file and the `metrics` answer alike; `None`: the backing file's canonical path.
    pub metrics_instance: Option<String>,
    pub seccomp: SeccompMode,
    pub profile: Profile,
    /// The health record's second copy, and whether identity-less records are
    /// adopted.
    pub records: RecordOptions,
    /// Bind sockets in directories others may write (`--allow-shared-socket-dir`).
    pub allow_shared_socket_dir: bool,
    /// The export's own paths that must not name the backing file either (e.g.
    /// `--socket-path`), by the option that gives them.
    pub other_paths: Vec<(&'static str, PathBuf)>,
}

/// `--control-max-clients`, `--control-idle-timeout`, `--operator-group`,
/// `--control-group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlClients {
    pub max: usize,
    pub idle_timeout_secs: u64,
    /// May send the commands that change state (besides root and the daemon's uid).
    pub operator_group: Option<String>,
    /// The control socket's group (read-only commands); the operator group if unset.
    pub control_group: Option<String>,
}

impl Default for ControlClients {
    fn default() -> Self {
        let p = ClientPolicy::default();
        Self {
            max: p.max_clients,
            idle_timeout_secs: p.idle_timeout.as_secs(),
            operator_group: None,
            control_group: None,
        }
    }
}

/// `--scrub-interval` and `--scrub-rate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scrub {
    pub interval: Duration,
    pub rate: u64,
}

/// `--metrics-file`, `--metrics-interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsOptions {
    pub path: PathBuf,
    pub interval: Duration,
}

/// The export's own live state, which the report reads.
pub enum ExportState {
    /// `serve`: the device's connection state and the queue's counters.
    VirtioPmem {
        device: Arc<DeviceStatus>,
        queue: Arc<QueueStats>,
    },
    /// `nvdimm`: the plug, QEMU and the mapping check.
    Nvdimm(Box<Mutex<NvdimmStatus>>),
}

/// A start-up step, as [`Host::steps`] records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The signals blocked in every thread (before any thread starts).
    Signals,
    /// The backing file opened, locked and judged.
    Region,
    /// The state records named, the health record restored and watched.
    Health,
    /// The bad-range record loaded.
    BadRanges,
    /// A socket bound (or taken from the service manager).
    Bind,
    /// The control server started.
    Control,
    /// The first metrics file written and its writer started.
    Metrics,
    /// The media-error sources started.
    MediaSources,
    /// The guest channel served.
    Agent,
    /// The lease, the seal and the block-map watcher.
    Guard,
    /// The signal thread started.
    SignalThread,
    /// The seccomp filter installed on every thread.
    Sandbox,
    /// READY=1 sent (and the notifier started).
    Ready,
}

impl Step {
    /// Whether the step opens, binds, locks or creates something, and so must run
    /// before the sandbox.
    pub fn before_sandbox(self) -> bool {
        matches!(
            self,
            Self::Signals
                | Self::Region
                | Self::Health
                | Self::BadRanges
                | Self::Bind
                | Self::Control
                | Self::Metrics
                | Self::SignalThread
        )
    }
}

/// What every part of a running export shares, and what the report reads.
pub struct Shared {
    pub region: Arc<Region>,
    pub events: Arc<EventHub>,
    pub media: Arc<MediaErrors>,
    pub services: Arc<Services>,
    /// Set once the guard runs.
    pub guard: OnceLock<Arc<GuardState>>,
    /// Set once the guest channel runs.
    pub agent: OnceLock<Arc<GuestChannel>>,
    /// The socket the VMM reaches the export by (vhost-user or QMP), once known.
    pub socket: OnceLock<PathBuf>,
    pub export: ExportState,
    pub seccomp: SeccompMode,
    /// The health record: restored, written, retried until it is everywhere.
    pub health_record: HealthRecorder,
}

/// A running host: the shared state, and what the host must undo at exit.
pub struct Host {
    pub shared: Arc<Shared>,
    options: HostOptions,
    signals: Option<Signals>,
    /// The metrics writer's handles (for the last write at exit).
    control: Option<ControlHandles>,
    /// Sockets this host bound; their paths go when the host ends.
    bound: Vec<BoundSocket>,
    /// `--agent-socket`, bound at start-up and served by [`Host::start_agent`].
    agent_socket: Option<BoundSocket>,
    guard: Option<Guard>,
    steps: Vec<Step>,
}

impl Host {
    /// Blocks the signals, opens and judges the file, restores and watches the
    /// health record and loads the bad ranges: everything an export does before it
    /// binds a socket.
    pub fn open(options: HostOptions, export: ExportState) -> Result<Self, Error> {
        let signals = Signals::block().map_err(Error::Signals)?;
        let region = Region::open(&options.region)?;
        let events: Arc<EventHub> = Arc::default();
        let state = StateFiles::new(
            &region.path,
            options.state_dir.as_deref(),
            Some(&region.file),
        )?
        .adopting_legacy(options.records.adopt_legacy);
        // Nothing below may write over the image: no option may name it.
        let records = [state.path(Kind::Health), state.path(Kind::BadRanges)];
        let mut named: Vec<(&'static str, Option<&Path>)> = vec![
            ("--control-socket", options.control_socket.as_deref()),
            ("--agent-socket", options.agent_socket.as_deref()),
            (
                "--metrics-file",
                options.metrics.as_ref().map(|m| m.path.as_path()),
            ),
            (
                "the health record (--state-dir)",
                Some(records[0].as_path()),
            ),
            (
                "the bad-range record (--state-dir)",
                Some(records[1].as_path()),
            ),
        ];
        named.extend(
            options
                .other_paths
                .iter()
                .map(|(o, p)| (*o, Some(p.as_path()))),
        );
        crate::backing::refuse_paths_naming(&region.file, &region.path, &named)
            .map_err(RegionError::Backing)?;
        let services: Arc<Services> = Arc::default();
        // Whatever waits for events (the notifier, the NVDIMM's loop) learns of the
        // shutdown the moment it is asked for.
        {
            let events = events.clone();
            services.on_shutdown(Box::new(move || {
                events.publish(EventKind::Stopping);
            }));
        }
        let health_record = HealthRecorder::start(
            &region.flusher,
            &state,
            &options.records,
            events.clone(),
            &services,
        )?;
        let media = MediaErrors::load(
            &region.path,
            region.size,
            state,
            events.clone(),
            services.clone(),
        )
        .map_err(|source| Error::State {
            what: "load the bad-range record",
            source,
        })?;
        let shared = Arc::new(Shared {
            region: Arc::new(region),
            events,
            media,
            services,
            guard: OnceLock::new(),
            agent: OnceLock::new(),
            socket: OnceLock::new(),
            export,
            seccomp: options.seccomp,
            health_record,
        });
        Ok(Self {
            shared,
            options,
            signals: Some(signals),
            control: None,
            bound: Vec::new(),
            agent_socket: None,
            guard: None,
            steps: vec![Step::Signals, Step::Region, Step::Health, Step::BadRanges],
        })
    }

    /// The steps run so far, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Records `step`, refusing one that must come before the sandbox once it is
    /// in place (it would be killed or denied there).
    fn step(&mut self, step: Step) -> Result<(), Error> {
        if step.before_sandbox() && self.steps.contains(&Step::Sandbox) {
            return Err(Error::StartOrder(step));
        }
        self.steps.push(step);
        Ok(())
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.shared.region
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.shared.services
    }

    pub fn events(&self) -> &Arc<EventHub> {
        &self.shared.events
    }

    /// Binds `path` (or takes `inherited`) for a listener the export serves; returns
    /// it with the path it is reachable at. The path is removed when the host ends,
    /// unless it was inherited.
    pub fn bind(
        &mut self,
        path: &Path,
        inherited: Option<UnixListener>,
    ) -> Result<(UnixListener, PathBuf), Error> {
        self.step(Step::Bind)?;
        let sock = match inherited {
            Some(l) => BoundSocket::inherited(l),
            None => socket::bind(
                path,
                self.bind_options(self.options.socket_group.as_deref()),
            )?,
        };
        let listener = sock.listener.try_clone().map_err(Error::Dup)?;
        let path = sock.path.clone();
        self.bound.push(sock);
        Ok((listener, path))
    }

    /// Binds the control socket (or takes the inherited one) and starts its
    /// server.
    pub fn start_control(&mut self, inherited: Option<UnixListener>) -> Result<(), Error> {
        let handles = self
            .control
            .clone()
            .unwrap_or_else(|| self.control_handles());
        let path = self.options.control_socket.clone();
        if inherited.is_some() || path.is_some() {
            let was_inherited = inherited.is_some();
            let c = self.options.control_clients.clone();
            let operator = match c.operator_group.clone() {
                Some(g) => {
                    let gid = socket::group_id(&g)?;
                    Some((g, gid))
                }
                None => None,
            };
            let policy = ClientPolicy::new(c.max, c.idle_timeout_secs, operator);
            // Read-only access for the control group; the operator group's members
            // must reach the socket too. Never `--socket-group`: that is QEMU's.
            let group = c.control_group.or(c.operator_group);
            self.step(Step::Bind)?;
            let sock = match inherited {
                Some(l) => BoundSocket::inherited(l),
                None => socket::bind(
                    path.as_deref().unwrap_or(Path::new("")),
                    self.bind_options(group.as_deref()),
                )?,
            };
            let listener = sock.listener.try_clone().map_err(Error::Dup)?;
            let shown = sock.path.clone();
            self.bound.push(sock);
            self.step(Step::Control)?;
            control::spawn_with(listener, handles.clone(), &self.shared.services, policy)
                .map_err(|e| Error::Start("the control socket", e))?;
            info!(
                "control socket: {}{}",
                shown.display(),
                if was_inherited { " (inherited)" } else { "" }
            );
        }
        self.control = Some(handles);
        Ok(())
    }

    /// Binds the agent socket (`--agent-socket`), if asked for; it is served by
    /// [`Host::start_agent`] (which may run under the sandbox: it binds nothing).
    pub fn bind_agent(&mut self) -> Result<(), Error> {
        if let Some(path) = self.options.agent_socket.clone() {
            self.step(Step::Bind)?;
            self.agent_socket = Some(socket::bind(
                &path,
                self.bind_options(self.options.socket_group.as_deref()),
            )?);
        }
        Ok(())
    }

    /// How this host binds a socket for `group`.
    fn bind_options<'a>(&self, group: Option<&'a str>) -> BindOptions<'a> {
        BindOptions {
            group,
            allow_shared_dir: self.options.allow_shared_socket_dir,
        }
    }

    /// What the control socket and the metrics read.
    fn control_handles(&self) -> ControlHandles {
        let shared = self.shared.clone();
        let queue_stats = match &self.shared.export {
            ExportState::VirtioPmem { queue, .. } => queue.clone(),
            ExportState::Nvdimm(_) => Arc::default(),
        };
        ControlHandles {
            status: Arc::new(move || shared.report()),
            flush: self.shared.region.flusher.stats.clone(),
            queue_stats,
            media: self.shared.media.clone(),
            events: self.shared.events.clone(),
            metrics_instance: metrics_instance(
                self.options.metrics_instance.as_deref(),
                &self.shared.region.path,
            )
            .into(),
        }
    }

    /// Writes the first metrics file (a path that cannot be written stops the
    /// start-up with a clear error instead of a warning every interval) and starts
    /// its writer.
    pub fn start_metrics(&mut self) -> Result<(), Error> {
        let Some(m) = self.options.metrics.clone() else {
            return Ok(());
        };
        self.step(Step::Metrics)?;
        let handles = self.control_handles();
        metrics_file::write_once(&m.path, &handles).map_err(|source| Error::MetricsFile {
            path: m.path.clone(),
            source,
        })?;
        metrics_file::spawn(
            m.path.clone(),
            m.interval,
            handles.clone(),
            &self.shared.services,
        )
        .map_err(|e| Error::Start("the metrics file writer", e))?;
        info!(
            "metrics file: {} (every {} s, instance {:?})",
            m.path.display(),
            m.interval.as_secs(),
            &*handles.metrics_instance
        );
        self.control = Some(handles);
        Ok(())
    }

    /// The bad-range sources: the host device's badblocks, memory-failure notices
    /// and, if asked, the scrub. They read through duplicates of the daemon's
    /// descriptor: a new open of the file would break the daemon's lease.
    pub fn start_media_sources(&mut self) -> Result<(), Error> {
        self.step(Step::MediaSources)?;
        let region = &self.shared.region;
        let media = &self.shared.media;
        let dup = || region.file.try_clone().map_err(Error::Dup);
        media
            .watch_host_device(dup()?, BADBLOCKS_REREAD)
            .map_err(|e| Error::Start("the host device's badblocks watcher", e))?;
        // In direct mode the file is DAX and MAP_SYNC was granted when it was judged.
        let map_sync = region.flusher.policy() == crate::durability::Policy::Direct;
        if let Err(e) = media.watch_poison(&region.file, map_sync) {
            warn!("memory-failure notices are off: {e}");
        }
        if let Some(s) = self.options.scrub {
            media
                .start_scrub(dup()?, s.interval, s.rate)
                .map_err(|e| Error::Start("the scrub", e))?;
        }
        Ok(())
    }

    /// Serves the guest channel on the agent socket bound at start-up. `channel`
    /// says how the agent finds this export's disk.
    pub fn start_agent(&mut self, channel: Arc<GuestChannel>) -> Result<(), Error> {
        let Some(sock) = self.agent_socket.take() else {
            return Ok(());
        };
        self.step(Step::Agent)?;
        let listener = sock.listener.try_clone().map_err(Error::Dup)?;
        channel
            .spawn(listener, &self.shared.services)
            .map_err(|e| Error::Start("the guest channel", e))?;
        self.shared.media.attach_channel(channel.clone());
        let _ = self.shared.agent.set(channel);
        info!("guest agent channel: {}", sock.path.display());
        self.bound.push(sock);
        Ok(())
    }

    /// Whether an agent socket was asked for (and not served yet).
    pub fn has_agent_socket(&self) -> bool {
        self.agent_socket.is_some()
    }

    /// Lease, seal and block-map watcher; stopped (unsealing) when the host ends.
    pub fn start_guard(&mut self) -> Result<(), Error> {
        self.step(Step::Guard)?;
        let handles = GuardHandles {
            region: self.shared.region.clone(),
            events: self.shared.events.clone(),
            guard: Arc::default(),
        };
        self.guard = Some(guard::start(
            &handles,
            &self.shared.services,
            &self.options.guard,
        )?);
        let _ = self.shared.guard.set(handles.guard);
        Ok(())
    }

    /// Starts the signal thread: SIGINT and SIGTERM stop the export (`stopping`
    /// says what that means for it); the others are handled on purpose (see
    /// [`signals`]).
    pub fn start_signals(&mut self, stopping: &'static str) -> Result<(), Error> {
        self.step(Step::SignalThread)?;
        let signals = self.signals.take().expect("signals are started once");
        signals
            .spawn(self.shared.clone(), stopping)
            .map_err(|e| Error::Start("the signal thread", e))
    }

    /// Installs the seccomp filter of the export's profile on every thread (those
    /// started so far, and those started later, which inherit it).
    pub fn enter_sandbox(&mut self) -> Result<(), Error> {
        self.step(Step::Sandbox)?;
        match self.options.seccomp {
            SeccompMode::Off => {
                warn!("seccomp sandbox off (--seccomp off): every system call is allowed");
                return Ok(());
            }
            SeccompMode::Enforce => info!(
                "seccomp sandbox on (enforce): a system call outside the allow-list fails with \
                 ENOSYS and is logged and counted (status.sandbox_denials); one on the kill list \
                 (exec, fork, ptrace, a network socket, an executable mapping, ...) kills the \
                 daemon with SIGSYS; `--seccomp log` allows and logs such calls instead"
            ),
            SeccompMode::Log => warn!(
                "seccomp sandbox in log mode: system calls outside the allow-list are allowed \
                 and logged by the kernel (SECCOMP/audit lines in the kernel log)"
            ),
        }
        Ok(sandbox::enter(
            self.options.seccomp,
            self.options.profile,
            &self.shared.events,
            &self.shared.services,
        )?)
    }

    /// Tells the service manager the export is ready, and keeps its STATUS= (and
    /// the watchdog, if it asked for one) current.
    pub fn ready(&mut self) -> Result<(), Error> {
        self.step(Step::Ready)?;
        systemd::notify_or_log(&format!("READY=1\nSTATUS={}", self.shared.status_line()));
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Ok(());
        }
        let watchdog = systemd::watchdog_interval();
        let tick = watchdog.map(|w| (w / 2).min(NOTIFY_TICK));
        if let Some(w) = watchdog {
            info!(
                "service manager watchdog: {w:?}; pinging every {:?} while syncs and queue \
                 passes make progress",
                tick.unwrap_or(NOTIFY_TICK)
            );
        }
        let shared = self.shared.clone();
        let changes = self.shared.events.subscribe(false);
        self.shared
            .services
            .spawn(
                "notify",
                |_| {},
                move || {
                    systemd::run_notifier(
                        &shared.services,
                        &changes,
                        tick,
                        watchdog,
                        || shared.status_line(),
                        || shared.busy(),
                        systemd::notify_or_log,
                    );
                },
            )
            .map_err(|e| Error::Start("the service-manager notifier", e))
    }

    /// Ends the export: stops every service, stops the guard (unsealing), makes the
    /// data durable, writes the last metrics and removes the sockets it bound.
    pub fn finish(mut self) -> Result<(), Error> {
        // Publishes `stopping` (a shutdown hook) if no signal did yet.
        self.shared.services.stop_all(SERVICE_STOP_GRACE);
        drop(self.guard.take());
        let region = &self.shared.region;
        let result = match region.flusher.final_sync(SyncContext::Shutdown) {
            Ok(()) => {
                info!("{}; exiting", region.flusher.exit_claim());
                Ok(())
            }
            Err(source) => Err(Error::SyncFailed {
                file: region.path.clone(),
                source,
            }),
        };
        // A sync failure whose record is not everywhere ends the export with its own
        // status: a daemon started next could serve the file as healthy.
        let result = self.shared.health_record.finish().and(result);
        // The last metrics, with the final sync counted and no VMM connected.
        if let (Some(m), Some(handles)) = (&self.options.metrics, &self.control) {
            if let Err(e) = metrics_file::write_once(&m.path, handles) {
                warn!(
                    "cannot write the metrics file {} at exit: {e}",
                    m.path.display()
                );
            }
        }
        drop(std::mem::take(&mut self.bound));
        result
    }
}

impl Shared {
    /// The service manager's one-line status: policy, health, connection.
    pub fn status_line(&self) -> String {
        format!(
            "policy {}, health {}, {}",
            self.region.flusher.policy(),
            self.health(),
            match &self.export {
                ExportState::VirtioPmem { device, .. } => match device.vmm() {
                    Some(v) if device.connected() => format!("VMM connected ({v})"),
                    _ if device.connected() => "VMM connected".to_string(),
                    _ => "waiting for a VMM".to_string(),
                },
                ExportState::Nvdimm(nv) => {
                    let nv = crate::util::lock(nv);
                    match (nv.qemu_pid, nv.mapping_verified, nv.qemu_exited) {
                        (Some(pid), true, false) => format!("NVDIMM mapped by QEMU pid {pid}"),
                        (_, _, true) => "QEMU exited".to_string(),
                        _ => "plugging the NVDIMM".to_string(),
                    }
                }
            }
        )
    }

    /// How long the sync and the queue pass in progress have run (for the
    /// watchdog).
    pub fn busy(&self) -> (Option<Duration>, Option<Duration>) {
        let pass = match &self.export {
            ExportState::VirtioPmem { queue, .. } => queue.pass.running_for(),
            ExportState::Nvdimm(_) => None,
        };
        (self.region.flusher.busy.running_for(), pass)
    }
}

/// The `instance` label of the metrics: `--metrics-instance`, or the backing file's
/// canonical path (as opened; the path given if it cannot be resolved).
fn metrics_instance(name: Option<&str>, file: &Path) -> String {
    name.map(str::to_owned).unwrap_or_else(|| {
        std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string()
    })
}
