// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `serve`: the virtio-pmem export over vhost-user. Starts the host runtime in
//! serve's order, then serves one VMM connection after another on the same socket
//! until SIGINT/SIGTERM, resetting the device and making the data durable between
//! them.
//!
//! Owns: serve's start-up order, the accept loop and who is connected. Never
//! handles a request (that is `device`) or a flush (`durability`).

use std::{
    os::{
        fd::{AsFd, AsRawFd},
        unix::net::UnixListener,
    },
    sync::{Arc, Mutex, RwLock},
};

use log::{debug, error, info};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::{
    config::Config,
    device::{queue::QueueStats, PmemBackend, LIMIT_TIMER_EVENT},
    durability::SyncContext,
    events::EventKind,
    guard::GuardOptions,
    host::{peer, ControlClients, ExportState, Host, HostOptions, MetricsOptions, Scrub, Shared},
    media::channel::GuestChannel,
    region::{Export, RegionSpec},
    report::{DeviceStatus, VmmIdentity},
    sandbox::Profile,
    service::{self, Services},
    systemd::Inherited,
    util::{accept::Backoff, lock, rfc3339_now},
    Error,
};

/// What the host runtime is asked for by `serve`'s configuration.
pub fn host_options(config: &Config) -> HostOptions {
    HostOptions {
        region: RegionSpec {
            file: config.file.clone(),
            mode: config.mode,
            readonly: config.readonly,
            allow_shared_permissions: config.allow_shared_permissions,
            export: Export::VirtioPmem,
        },
        state_dir: config.state_dir.clone(),
        socket_group: config.socket_group.clone(),
        control_socket: config.control_socket.clone(),
        agent_socket: config.agent_socket.clone(),
        guard: GuardOptions {
            verify_interval: config.verify_interval,
            seal: config.seal,
            no_lease: None,
            // Change notices catch what a lease cannot: the file renamed over,
            // deleted or moved away (no open, so no lease break).
            change_notices: true,
        },
        control_clients: ControlClients {
            max: config.control_max_clients,
            idle_timeout_secs: config.control_idle_timeout,
            operator_group: config.operator_group.clone(),
            control_group: config.control_group.clone(),
        },
        scrub: (config.scrub_interval > 0).then(|| Scrub {
            interval: std::time::Duration::from_secs(config.scrub_interval),
            rate: config.scrub_rate,
        }),
        metrics: config.metrics_file.clone().map(|path| MetricsOptions {
            path,
            interval: std::time::Duration::from_secs(config.metrics_interval),
        }),
        metrics_instance: config.metrics_instance.clone(),
        seccomp: config.seccomp,
        profile: Profile::Serve,
        other_paths: vec![("--socket-path", config.socket_path.clone())],
        records: config.records.clone(),
        allow_shared_socket_dir: config.allow_shared_socket_dir,
    }
}

/// A started `serve`: the host runtime and the vhost-user listener, ready for
/// the accept loop.
pub struct Serving {
    pub host: Host,
    listener: UnixListener,
    device: Arc<DeviceStatus>,
    queue: Arc<QueueStats>,
}

/// Starts everything `serve` runs before its first connection, in this order:
/// the file judged and its records (`Host::open`), the first metrics file (so a
/// path that cannot be written stops the start-up before anything is bound, and
/// the file exists once the control socket answers), the agent socket and the
/// guest channel, the media-error sources, the guard, the vhost-user socket, the
/// control socket (last: once it answers, the daemon listens), the signal thread,
/// then the sandbox, then readiness.
pub fn start(config: &Config, inherited: Inherited) -> Result<Serving, Error> {
    let device: Arc<DeviceStatus> = Arc::default();
    // The flush rate limit's timer is made here, before the sandbox.
    let queue = Arc::new(
        QueueStats::with_limit(config.flush_rate_limit).map_err(|source| Error::Io {
            what: "create the flush rate limit's timer",
            source,
        })?,
    );
    if let Some(limit) = config.flush_rate_limit {
        info!(
            "flush rate limit: {} flush requests per second, bursts of {}; a flush over it is delayed, never failed",
            limit.ops_per_sec, limit.burst
        );
    }
    let mut host = Host::open(
        host_options(config),
        ExportState::VirtioPmem {
            device: device.clone(),
            queue: queue.clone(),
        },
    )?;
    let Inherited {
        vhost_user,
        control,
    } = inherited;
    host.start_metrics()?;
    host.bind_agent()?;
    if host.has_agent_socket() {
        let region = host.region();
        let channel = GuestChannel::new(
            region.size,
            config.guest_pci_address.clone(),
            host.shared.media.list(),
        );
        host.start_agent(channel)?;
    }
    host.start_media_sources()?;
    host.start_guard()?;
    let was_inherited = vhost_user.is_some();
    let (listener, shown) = host.bind(&config.socket_path, vhost_user)?;
    let _ = host.shared.socket.set(shown.clone());
    host.start_control(control)?;
    host.start_signals("finishing in-flight requests and shutting down")?;
    info!(
        "listening on {}{} for a VMM ({} bytes of {})",
        shown.display(),
        if was_inherited { " (inherited)" } else { "" },
        host.region().size,
        host.region().path.display()
    );
    // Start-up is done: everything that opens, binds, locks or creates has run.
    // From here on, every thread (those started above included) serves under the
    // allow-list, and so does each thread started later, which inherits it.
    host.enter_sandbox()?;
    // Listening, and the file judged (its policy chosen): ready.
    host.ready()?;
    Ok(Serving {
        host,
        listener,
        device,
        queue,
    })
}

/// Runs `serve` until SIGINT/SIGTERM.
pub fn run(config: &Config, inherited: Inherited) -> Result<(), Error> {
    start(config, inherited)?.run()
}

impl Serving {
    /// Serves one VMM connection after another until shutdown, then ends the host.
    pub fn run(self) -> Result<(), Error> {
        let services = self.host.services().clone();
        // The connection in progress ends at shutdown (after its current batch).
        let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
        {
            let current = current.clone();
            services.on_shutdown(Box::new(move || {
                if let Some(h) = lock(&current).as_ref() {
                    h.shutdown();
                }
            }));
        }
        let mut listener = Listener::from(self.listener.try_clone().map_err(Error::Dup)?);
        // A connection that cannot be set up (out of descriptors, say) waits in the
        // backlog and is tried again after a back-off: never the end of the daemon.
        let mut retry = Backoff::new("VMM connection set-up");
        while service::wait_readable(&services, self.listener.as_fd()).map_err(|e| Error::Io {
            what: "poll the vhost-user socket",
            source: e,
        })? {
            match self.serve_connection(&services, &mut listener, &current) {
                Ok(()) => retry.succeeded(),
                Err(e) => {
                    let e = crate::error_chain(&e);
                    if retry.pause(&e, services.stop_fd().as_raw_fd()) {
                        break;
                    }
                }
            }
        }
        self.host.finish()
    }

    /// Serves one VMM connection to its end, with a fresh device state.
    fn serve_connection(
        &self,
        services: &Services,
        listener: &mut Listener,
        current: &Mutex<Option<ShutdownHandle>>,
    ) -> Result<(), Error> {
        let shared: &Shared = &self.host.shared;
        let backend = Arc::new(RwLock::new(
            PmemBackend::new(
                shared.region.clone(),
                self.device.clone(),
                shared.events.clone(),
                self.queue.clone(),
            )
            .map_err(|source| Error::Io {
                what: "create the device",
                source,
            })?,
        ));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut vud = VhostUserDaemon::new("vhost-device-pmem".into(), backend, mem)
            .map_err(|e| Error::VhostUser(crate::VhostUserError(e)))?;
        if let Some(limiter) = self.queue.limiter.as_ref() {
            // The worker waits on the limit's timer with the queue's kicks.
            for handler in vud.get_epoll_handlers() {
                handler
                    .register_listener(
                        limiter.timer.as_raw_fd(),
                        EventSet::IN,
                        u64::from(LIMIT_TIMER_EVENT),
                    )
                    .map_err(|source| Error::Io {
                        what: "watch the flush rate limit's timer",
                        source,
                    })?;
            }
        }
        vud.start(listener)
            .map_err(|e| Error::VhostUser(crate::VhostUserError(e)))?;
        let peer = peer::accepted_peer(self.listener.as_fd()).unwrap_or(VmmIdentity {
            pid: None,
            uid: None,
            comm: None,
            since: rfc3339_now(),
        });
        debug!("vhost-user connection from {peer}");
        self.device.set_connected(Some(peer.clone()));
        *lock(current) = vud.shutdown_handle();
        if services.stopping() {
            // Shutdown was asked for between the accept and now: honour it.
            vud.request_shutdown();
        }
        let result = vud.wait();
        *lock(current) = None;
        let why = match &result {
            Ok(()) => "the VMM disconnected".to_string(),
            // A VMM that exits (or is killed) closes the socket mid-read: not an error.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => "the VMM disconnected".to_string(),
            Err(e) => format!("the connection ended with an error: {e}"),
        };
        drop(vud); // stops and joins the vring worker after its current batch
        let was_vmm = self.device.negotiated();
        self.device.set_connected(None);
        if !was_vmm {
            // A probe (a health check, `socat`, a client that gave up): no VMM.
            debug!("{peer} connected and left without negotiating: {why}");
            return Ok(());
        }
        self.device.set_last_disconnect(why.clone());
        // Whatever the guest wrote before it went away is made durable now.
        if let Err(e) = shared.region.flusher.final_sync(SyncContext::Disconnect) {
            error!("sync after disconnect failed: {e}");
        }
        shared.events.publish(EventKind::VmmDisconnected {
            reason: why.clone(),
        });
        info!("{why}; device reset, waiting for the next connection (the VMM was {peer})");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::ServeArgs, host::Step, report::SeccompMode};

    fn config(dir: &std::path::Path) -> Config {
        let file = dir.join("img");
        std::fs::write(&file, vec![0u8; 2 << 20]).unwrap();
        let mut c = Config::try_from(ServeArgs {
            socket_path: Some(dir.join("vhost-user.sock")),
            file: Some(file),
            control_socket: Some(dir.join("control.sock")),
            agent_socket: Some(dir.join("agent.sock")),
            metrics_file: Some(dir.join("m.prom")),
            ..Default::default()
        })
        .unwrap();
        // The unit-test process must not be sandboxed; the order is the same.
        c.seccomp = SeccompMode::Off;
        c
    }

    #[test]
    fn everything_that_opens_or_binds_runs_before_the_sandbox_and_ready_comes_last() {
        let dir = tempfile::tempdir().unwrap();
        let serving = start(&config(dir.path()), Inherited::default()).unwrap();
        let steps = serving.host.steps().to_vec();
        assert_eq!(
            steps,
            [
                Step::Signals,
                Step::Region,
                Step::Health,
                Step::BadRanges,
                Step::Metrics,
                Step::Bind,
                Step::Agent,
                Step::MediaSources,
                Step::Guard,
                Step::Bind,
                Step::Bind,
                Step::Control,
                Step::SignalThread,
                Step::Sandbox,
                Step::Ready,
            ]
        );
        let sandbox = steps.iter().position(|s| *s == Step::Sandbox).unwrap();
        assert!(steps[..sandbox].iter().all(|s| *s != Step::Ready));
        assert!(steps[sandbox..].iter().all(|s| !s.before_sandbox()));
        // Every socket is there before the sandbox, and goes with the host.
        for s in ["vhost-user.sock", "control.sock", "agent.sock", "m.prom"] {
            assert!(dir.path().join(s).exists(), "{s}");
        }
        serving.host.services().shutdown();
        serving.run().unwrap();
        for s in ["vhost-user.sock", "control.sock", "agent.sock"] {
            assert!(!dir.path().join(s).exists(), "{s} removed at exit");
        }
    }

    #[test]
    fn a_step_that_binds_is_refused_once_the_sandbox_is_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let serving = start(&config(dir.path()), Inherited::default()).unwrap();
        let mut host = serving.host;
        let e = host
            .bind(&dir.path().join("late.sock"), None)
            .expect_err("refused");
        assert!(matches!(e, Error::StartOrder(Step::Bind)), "{e}");
        assert!(!dir.path().join("late.sock").exists());
        host.services().shutdown();
        host.finish().unwrap();
    }
}
