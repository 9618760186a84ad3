// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's configuration: command-line flags and an optional TOML file with the
//! same keys; a flag given on the command line wins over the file.
//!
//! Owns: turning user input into a validated [`Config`]. Never opens the backing file.

use std::{fs, path::PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::{
    durability::Mode,
    sandbox::SeccompMode,
    socket::BindOptions,
    state::health::{HealthCopy, RecordOptions},
    util::rate::FlushRateLimit,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("missing {0}: give --{0} or set `{0}` in the config file")]
    Missing(&'static str),
    #[error("metrics-file {0}: its name must end in .prom (node_exporter's textfile collector reads only those)")]
    MetricsFileName(PathBuf),
    #[error("{0} must be positive")]
    Zero(&'static str),
    #[error("metrics-instance must not be empty")]
    EmptyInstance,
    #[error(
        "id {0:?}: QEMU ids start with a letter and hold only letters, digits, '-', '.' and '_'"
    )]
    BadId(String),
    #[error("{key} {path:?}: cannot make it absolute ({source}); give an absolute path")]
    NotAbsolute {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `vhost-device-pmem serve` flags.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// vhost-user unix socket to listen on (the VMM connects to it).
    #[arg(long, value_name = "SOCK")]
    pub socket_path: Option<PathBuf>,
    /// Listen on the inherited descriptor FDNUM instead of binding --socket-path
    /// (vhost-user.rst's backend conventions): a listening unix stream socket. The
    /// daemon never unlinks or chmods it.
    #[arg(long, value_name = "FDNUM", conflicts_with = "socket_path")]
    pub fd: Option<i32>,
    /// Backing file exported as the pmem region (a positive multiple of 2 MiB, and
    /// a power of two for QEMU). Also accepted as `--file FILE`.
    #[arg(value_name = "FILE", conflicts_with = "file")]
    pub file_arg: Option<PathBuf>,
    /// The backing file (as FILE).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Durability mode; `auto` picks the strongest one the file qualifies for.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Map the region read-only; flushes are answered without syscalls.
    #[arg(long, visible_alias = "read-only", overrides_with = "no_readonly")]
    pub readonly: bool,
    /// Turn off a `readonly = true` of the config file.
    #[arg(long, overrides_with = "readonly")]
    pub no_readonly: bool,
    /// JSON control socket for `status` and `stats`.
    #[arg(long, value_name = "SOCK")]
    pub control_socket: Option<PathBuf>,
    /// Group that may connect to the vhost-user and agent sockets (mode 0660), i.e.
    /// QEMU's; default: owner only (0600). The control socket has its own.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Group that may connect to the control socket (mode 0660) for the commands
    /// that only read (status, stats, metrics, events, badblocks list); default:
    /// the operator group if given, else owner only (0600).
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Group whose members may also run the control commands that change state
    /// (badblocks inject and clear); root and the daemon's own uid always may.
    #[arg(long, value_name = "GROUP")]
    pub operator_group: Option<String>,
    /// Most control clients served at once; at the cap the one idle the longest is
    /// closed to make room. Default 64.
    #[arg(long, value_name = "N")]
    pub control_max_clients: Option<usize>,
    /// Seconds a control client may take to send a whole request (or to read an
    /// answer) before it is closed. Default 60.
    #[arg(long, value_name = "SECS")]
    pub control_idle_timeout: Option<u64>,
    /// Serve a backing file that group or others may write.
    #[arg(long, overrides_with = "no_allow_shared_permissions")]
    pub allow_shared_permissions: bool,
    /// Turn off an `allow-shared-permissions = true` of the config file.
    #[arg(long, overrides_with = "allow_shared_permissions")]
    pub no_allow_shared_permissions: bool,
    /// Re-read the block map every SECS seconds (and whenever the file lease breaks);
    /// a change is reported, and under `direct` downgrades to datasync. 0: only on
    /// lease breaks.
    /// Default 60.
    #[arg(long, value_name = "SECS")]
    pub verify_interval: Option<u64>,
    /// XFS only: set the immutable attribute (chattr +i) while serving, so no other
    /// process can open the file for writing, fallocate or dedupe into it; cleared at
    /// exit. After a crash clear it by hand: `chattr -i FILE`.
    #[arg(long, overrides_with = "no_seal")]
    pub seal: bool,
    /// Turn off a `seal = true` of the config file.
    #[arg(long, overrides_with = "seal")]
    pub no_seal: bool,
    /// Unix socket for the guest agent's virtio-serial port (QEMU connects to it);
    /// bad ranges are pushed to the agent, which records them in the guest.
    #[arg(long, value_name = "SOCK")]
    pub agent_socket: Option<PathBuf>,
    /// PCI address of the virtio-pmem device in the guest (e.g. 0000:00:05.0), so
    /// the agent picks the right /dev/pmemN when the guest has several.
    #[arg(long, value_name = "ADDR")]
    pub guest_pci_address: Option<String>,
    /// Directory of the health record and the bad ranges; default: the backing
    /// file's directory. Only root or the daemon's user may be able to write it (and
    /// every directory above it, unless sticky).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub records: RecordArgs,
    /// Accept socket directories that group or others may write (refused by
    /// default); the sockets are still bound in a private directory and renamed
    /// into place.
    #[arg(long)]
    pub allow_shared_socket_dir: bool,
    /// Read the whole file every SECS seconds and record sectors that fail with EIO.
    /// 0 (default): no scrub.
    #[arg(long, value_name = "SECS")]
    pub scrub_interval: Option<u64>,
    /// Scrub at most this many bytes per second (suffixes K, M, G). Default 64M.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub scrub_rate: Option<u64>,
    /// Limit the guest's flush requests to OPS per second, in bursts of up to BURST
    /// (default OPS): a token bucket, full at the start. A flush over the limit is
    /// delayed until a token is due, never failed; `status` and the metrics count
    /// them. Whole numbers from 1 to 1000000. Default: no limit.
    #[arg(long, value_name = "OPS[,BURST]", value_parser = FlushRateLimit::parse)]
    pub flush_rate_limit: Option<FlushRateLimit>,
    /// Write the metrics (Prometheus text format) to PATH every --metrics-interval
    /// seconds, atomically (a temporary file in the same directory, renamed), for
    /// node_exporter's textfile collector; the name must end in `.prom`.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Seconds between two writes of --metrics-file. Default 15.
    #[arg(long, value_name = "SECS")]
    pub metrics_interval: Option<u64>,
    /// The `instance` label of every metric; default: the backing file's canonical
    /// path.
    #[arg(long, value_name = "NAME")]
    pub metrics_instance: Option<String>,
    /// The seccomp sandbox installed once start-up is done: `enforce` answers a
    /// system call outside its allow-list ENOSYS, logs and counts it, and kills
    /// the daemon only for one on its kill list (exec, fork, ptrace, a network
    /// socket, ...); `log` lets the call through and the kernel logs it, `off`
    /// installs none. Default enforce.
    #[arg(long, value_enum, value_name = "MODE")]
    pub seccomp: Option<SeccompMode>,
    /// TOML file with the options above as kebab-case keys (e.g. `socket-path`;
    /// not `fd`), and `log-level`; options on the command line win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
}

/// Where the records of a file are kept and how far they are trusted (`serve`,
/// `nvdimm`, `health`).
#[derive(Args, Debug, Default, Clone)]
pub struct RecordArgs {
    /// A second directory for the health record, on another filesystem than the
    /// state directory: a sync failure is written to both and found in either.
    /// Default: /var/lib/vhost-device-pmem when that directory exists.
    #[arg(long, value_name = "DIR", conflicts_with = "no_health_copy")]
    pub health_copy_dir: Option<PathBuf>,
    /// Keep the health record in the state directory only.
    #[arg(long)]
    pub no_health_copy: bool,
    /// Trust records that carry no file identity (written by 0.1) this once: they
    /// are applied and rewritten with the file's identity. Without it such a
    /// record stops the start-up.
    #[arg(long)]
    pub adopt_legacy_records: bool,
}

impl RecordArgs {
    /// The options, with the config file's `health-copy-dir` and `health-copy`
    /// (flags win; `health-copy = false` turns the copy off).
    pub fn options(&self, file_dir: Option<PathBuf>, file_copy: Option<bool>) -> RecordOptions {
        let health_copy = if self.no_health_copy {
            HealthCopy::Off
        } else if let Some(d) = &self.health_copy_dir {
            HealthCopy::Dir(d.clone())
        } else if file_copy == Some(false) {
            HealthCopy::Off
        } else if let Some(d) = file_dir {
            HealthCopy::Dir(d)
        } else {
            HealthCopy::Default
        };
        RecordOptions {
            health_copy,
            adopt_legacy: self.adopt_legacy_records,
        }
    }
}

/// The same keys, as read from a TOML file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    socket_path: Option<PathBuf>,
    file: Option<PathBuf>,
    mode: Option<Mode>,
    readonly: Option<bool>,
    control_socket: Option<PathBuf>,
    socket_group: Option<String>,
    control_group: Option<String>,
    operator_group: Option<String>,
    control_max_clients: Option<usize>,
    control_idle_timeout: Option<u64>,
    allow_shared_permissions: Option<bool>,
    verify_interval: Option<u64>,
    seal: Option<bool>,
    agent_socket: Option<PathBuf>,
    guest_pci_address: Option<String>,
    state_dir: Option<PathBuf>,
    health_copy_dir: Option<PathBuf>,
    health_copy: Option<bool>,
    allow_shared_socket_dir: Option<bool>,
    scrub_interval: Option<u64>,
    scrub_rate: Option<u64>,
    flush_rate_limit: Option<FlushRateLimit>,
    metrics_file: Option<PathBuf>,
    metrics_interval: Option<u64>,
    metrics_instance: Option<String>,
    seccomp: Option<SeccompMode>,
    log_level: Option<LogLevel>,
}

/// A log level (`--log-level`, the `log-level` key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        })
    }
}

/// Default of `scrub-rate`, bytes per second.
pub const DEFAULT_SCRUB_RATE: u64 = 64 << 20;

/// Default of `metrics-interval`, seconds.
pub const DEFAULT_METRICS_INTERVAL: u64 = 15;

/// Default of `verify-interval`, seconds.
pub const DEFAULT_VERIFY_INTERVAL: u64 = 60;

/// A complete, validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket_path: PathBuf,
    pub file: PathBuf,
    pub mode: Mode,
    pub readonly: bool,
    pub control_socket: Option<PathBuf>,
    /// Group of the vhost-user and agent sockets.
    pub socket_group: Option<String>,
    /// Group of the control socket (read-only commands).
    pub control_group: Option<String>,
    /// Members may run the control commands that change state.
    pub operator_group: Option<String>,
    /// Control clients served at once (positive).
    pub control_max_clients: usize,
    /// Seconds a control client may take per request (positive).
    pub control_idle_timeout: u64,
    pub allow_shared_permissions: bool,
    /// Seconds between block-map verifications; 0 disables the periodic ones.
    pub verify_interval: u64,
    /// Set the immutable attribute while serving (XFS only).
    pub seal: bool,
    pub agent_socket: Option<PathBuf>,
    pub guest_pci_address: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// The health record's second copy, and whether identity-less records are adopted.
    pub records: RecordOptions,
    /// Bind sockets in directories others may write.
    pub allow_shared_socket_dir: bool,
    /// Seconds between scrubs; 0: no scrub.
    pub scrub_interval: u64,
    /// Bytes per second a scrub may read.
    pub scrub_rate: u64,
    /// The guest's flush requests per second and burst; `None`: no limit.
    pub flush_rate_limit: Option<FlushRateLimit>,
    /// Where to write the metrics (a `.prom` name), if anywhere.
    pub metrics_file: Option<PathBuf>,
    /// Seconds between two writes of the metrics file (positive).
    pub metrics_interval: u64,
    /// The `instance` label; `None`: the backing file's canonical path.
    pub metrics_instance: Option<String>,
    /// The sandbox installed after start-up.
    pub seccomp: SeccompMode,
    /// The config file's `log-level` (`--log-level` and `RUST_LOG` win over it).
    pub log_level: Option<LogLevel>,
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let file_cfg = match &args.config {
            Some(path) => {
                let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_file(&text, path)?
            }
            None => FileConfig::default(),
        };
        let mut c = Config::merge(args, file_cfg)?;
        absolute_paths([
            ("socket-path", Some(&mut c.socket_path)),
            ("file", Some(&mut c.file)),
            ("control-socket", c.control_socket.as_mut()),
            ("agent-socket", c.agent_socket.as_mut()),
            ("state-dir", c.state_dir.as_mut()),
            ("metrics-file", c.metrics_file.as_mut()),
        ])?;
        Ok(c)
    }
}

/// Makes every path option absolute, against the working directory at start-up
/// (a relative path, on the command line or in a config file, means what it meant
/// there), without touching the file system: nothing after start-up asks for the
/// working directory again (a relative name makes the C library and `tempfile` call
/// `getcwd`). A path that cannot be made absolute (empty, or relative while the
/// working directory is gone) is refused, naming its option.
fn absolute_paths<'a>(
    paths: impl IntoIterator<Item = (&'static str, Option<&'a mut PathBuf>)>,
) -> Result<(), ConfigError> {
    for (key, path) in paths {
        let Some(path) = path else { continue };
        if path.is_absolute() {
            continue;
        }
        *path = std::path::absolute(&*path).map_err(|source| ConfigError::NotAbsolute {
            key,
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The keys of a config file's text (`path` names it in errors).
fn parse_file(text: &str, path: &std::path::Path) -> Result<FileConfig, ConfigError> {
    parse_toml(text, path)
}

/// A config file's text as the keys of `T`.
fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

impl Config {
    /// How this daemon binds the sockets it binds itself.
    pub fn socket_options(&self) -> BindOptions<'_> {
        BindOptions {
            group: self.socket_group.as_deref(),
            allow_shared_dir: self.allow_shared_socket_dir,
        }
    }

    /// The configuration from flags and the text of a config file named `path`
    /// (what [`TryFrom<ServeArgs>`] does after reading the file; tests and fuzzers
    /// use it without one).
    pub fn from_file_text(
        args: ServeArgs,
        text: &str,
        path: &std::path::Path,
    ) -> Result<Self, ConfigError> {
        Self::merge(args, parse_file(text, path)?)
    }

    /// Flags over file keys over defaults, validated.
    fn merge(args: ServeArgs, file_cfg: FileConfig) -> Result<Self, ConfigError> {
        let metrics_file = args.metrics_file.or(file_cfg.metrics_file);
        if let Some(p) = &metrics_file {
            if p.extension().is_none_or(|e| e != "prom")
                || p.file_stem().is_none_or(|s| s.is_empty())
            {
                return Err(ConfigError::MetricsFileName(p.clone()));
            }
        }
        let metrics_interval = args
            .metrics_interval
            .or(file_cfg.metrics_interval)
            .unwrap_or(DEFAULT_METRICS_INTERVAL);
        if metrics_interval == 0 {
            return Err(ConfigError::Zero("metrics-interval"));
        }
        let control_max_clients = args
            .control_max_clients
            .or(file_cfg.control_max_clients)
            .unwrap_or(crate::control::clients::DEFAULT_MAX_CLIENTS);
        if control_max_clients == 0 {
            return Err(ConfigError::Zero("control-max-clients"));
        }
        let control_idle_timeout = args
            .control_idle_timeout
            .or(file_cfg.control_idle_timeout)
            .unwrap_or(crate::control::clients::DEFAULT_IDLE_TIMEOUT);
        if control_idle_timeout == 0 {
            return Err(ConfigError::Zero("control-idle-timeout"));
        }
        let metrics_instance = args.metrics_instance.or(file_cfg.metrics_instance);
        if metrics_instance.as_deref() == Some("") {
            return Err(ConfigError::EmptyInstance);
        }
        Ok(Config {
            metrics_file,
            metrics_interval,
            metrics_instance,
            seccomp: args.seccomp.or(file_cfg.seccomp).unwrap_or_default(),
            socket_path: args
                .socket_path
                .or(file_cfg.socket_path)
                .ok_or(ConfigError::Missing("socket-path"))?,
            file: args
                .file_arg
                .or(args.file)
                .or(file_cfg.file)
                .ok_or(ConfigError::Missing("file"))?,
            mode: args.mode.or(file_cfg.mode).unwrap_or_default(),
            log_level: file_cfg.log_level,
            readonly: flag(args.readonly, args.no_readonly, file_cfg.readonly),
            control_socket: args.control_socket.or(file_cfg.control_socket),
            socket_group: args.socket_group.or(file_cfg.socket_group),
            control_group: args.control_group.or(file_cfg.control_group),
            operator_group: args.operator_group.or(file_cfg.operator_group),
            control_max_clients,
            control_idle_timeout,
            allow_shared_permissions: flag(
                args.allow_shared_permissions,
                args.no_allow_shared_permissions,
                file_cfg.allow_shared_permissions,
            ),
            verify_interval: args
                .verify_interval
                .or(file_cfg.verify_interval)
                .unwrap_or(DEFAULT_VERIFY_INTERVAL),
            seal: flag(args.seal, args.no_seal, file_cfg.seal),
            agent_socket: args.agent_socket.or(file_cfg.agent_socket),
            guest_pci_address: args.guest_pci_address.or(file_cfg.guest_pci_address),
            state_dir: args.state_dir.or(file_cfg.state_dir),
            records: args
                .records
                .options(file_cfg.health_copy_dir, file_cfg.health_copy),
            allow_shared_socket_dir: flag(
                args.allow_shared_socket_dir,
                false,
                file_cfg.allow_shared_socket_dir,
            ),
            scrub_interval: args.scrub_interval.or(file_cfg.scrub_interval).unwrap_or(0),
            scrub_rate: args
                .scrub_rate
                .or(file_cfg.scrub_rate)
                .unwrap_or(DEFAULT_SCRUB_RATE),
            flush_rate_limit: args.flush_rate_limit.or(file_cfg.flush_rate_limit),
        })
    }
}

/// How an NVDIMM export promises durability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NvdimmMode {
    /// DAX host file, MAP_SYNC granted to QEMU, immutable block map: the guest's
    /// cache flushes make its writes durable. Refuses any other file.
    #[default]
    Direct,
    /// Any regular file, `pmem=off`: NOTHING the guest writes is promised durable
    /// (page cache); for scratch guests only.
    Volatile,
}

impl std::fmt::Display for NvdimmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Volatile => "volatile",
        })
    }
}

/// `vhost-device-pmem nvdimm` flags.
#[derive(Args, Debug, Default, Clone)]
pub struct NvdimmArgs {
    /// The file exported as the NVDIMM (it must exist: QEMU would create a missing
    /// one); its whole size, a positive multiple of 2 MiB, is the NVDIMM's. Also
    /// accepted as `--file FILE`.
    #[arg(value_name = "FILE", conflicts_with = "file")]
    pub file_arg: Option<PathBuf>,
    /// The exported file (as FILE).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`, or a second
    /// `-chardev socket` + `-mon mode=control`): the device is hot-plugged through it
    /// and QEMU's pid read from it (SO_PEERCRED).
    #[arg(long, value_name = "SOCK")]
    pub qmp_socket: Option<PathBuf>,
    /// The nvdimm device's id in QEMU; its memory backend is `mem-ID`.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Durability mode: `direct` (default; DAX, MAP_SYNC and an immutable block map
    /// required) or `volatile` (any file, nothing promised, loudly).
    #[arg(long, value_enum)]
    pub mode: Option<NvdimmMode>,
    /// Make the file block-map immutable first (`vhost-device-pmem prepare`).
    #[arg(long, conflicts_with = "attach")]
    pub prepare: bool,
    /// The VM already has the device (an earlier export hot-plugged it, or it was
    /// cold-plugged with --print-qemu-args): verify QEMU's mapping and guard it.
    #[arg(long)]
    pub attach: bool,
    /// Judge the file, print the QEMU arguments that cold-plug it (one per line)
    /// and exit; nothing is hot-plugged.
    #[arg(long, conflicts_with_all = ["attach", "qmp_socket"])]
    pub print_qemu_args: bool,
    /// JSON control socket for `status`, `stats` and `events`.
    #[arg(long, value_name = "SOCK")]
    pub control_socket: Option<PathBuf>,
    /// Re-read the block map every SECS seconds. Default 60.
    #[arg(long, value_name = "SECS")]
    pub verify_interval: Option<u64>,
    /// After the block map changed: make the file durable every SECS seconds (the
    /// guest has no flush request to send). Default 1.
    #[arg(long, value_name = "SECS")]
    pub sync_interval: Option<u64>,
    /// XFS only: set the immutable attribute once QEMU has the file open; cleared at
    /// exit.
    #[arg(long, overrides_with = "no_seal")]
    pub seal: bool,
    /// Turn off a `seal = true` of the config file.
    #[arg(long, overrides_with = "seal")]
    pub no_seal: bool,
    /// Export a file that group or others may write.
    #[arg(long, overrides_with = "no_allow_shared_permissions")]
    pub allow_shared_permissions: bool,
    /// Turn off an `allow-shared-permissions = true` of the config file.
    #[arg(long, overrides_with = "allow_shared_permissions")]
    pub no_allow_shared_permissions: bool,
    /// Directory of the health record and bad ranges (as `serve --state-dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub records: RecordArgs,
    /// Accept socket directories that group or others may write (as `serve`).
    #[arg(long)]
    pub allow_shared_socket_dir: bool,
    /// Seconds each QMP exchange may take in all (connect, greeting and
    /// capabilities; then each command and its answer), however slowly QEMU
    /// answers. Default 30.
    #[arg(long, value_name = "SECS")]
    pub qmp_timeout: Option<u64>,
    /// Unix socket for the guest agent (a virtio-serial port's chardev connects to
    /// it): the bad ranges of the file reach the guest's /sys/block/pmemN/badblocks;
    /// the agent finds the NVDIMM by its guest-physical address.
    #[arg(long, value_name = "SOCK")]
    pub agent_socket: Option<PathBuf>,
    /// The seccomp sandbox installed once start-up is done (the file judged,
    /// opened and locked, the sockets bound), before the QMP session: `enforce`
    /// answers a system call outside its allow-list ENOSYS, logs and counts it,
    /// and kills the export only for one on its kill list (exec, fork, ptrace, a
    /// network socket, ...); `log` lets the call through and the kernel logs it,
    /// `off` installs none. Default enforce.
    #[arg(long, value_enum, value_name = "MODE")]
    pub seccomp: Option<SeccompMode>,
    /// TOML file with the settings above as kebab-case keys (e.g. `qmp-socket`;
    /// not the actions `prepare`, `attach`, `print-qemu-args`), and `log-level`;
    /// options on the command line win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
}

/// The `nvdimm` keys, as read from a TOML file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NvdimmFileConfig {
    file: Option<PathBuf>,
    qmp_socket: Option<PathBuf>,
    id: Option<String>,
    mode: Option<NvdimmMode>,
    control_socket: Option<PathBuf>,
    verify_interval: Option<u64>,
    sync_interval: Option<u64>,
    seal: Option<bool>,
    allow_shared_permissions: Option<bool>,
    state_dir: Option<PathBuf>,
    qmp_timeout: Option<u64>,
    agent_socket: Option<PathBuf>,
    seccomp: Option<SeccompMode>,
    log_level: Option<LogLevel>,
}

/// Default of `sync-interval` (seconds).
pub const DEFAULT_SYNC_INTERVAL: u64 = 1;
/// Default of `qmp-timeout` (seconds).
pub const DEFAULT_QMP_TIMEOUT: u64 = 30;

/// What `nvdimm` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvdimmAction {
    /// object-add + device_add through QMP, then verify and guard.
    HotPlug,
    /// The VM has the device already: verify and guard.
    Attach,
    /// Print the cold-plug arguments and exit.
    PrintQemuArgs,
}

/// A complete, validated `nvdimm` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvdimmConfig {
    pub file: PathBuf,
    pub action: NvdimmAction,
    /// None only with `PrintQemuArgs`.
    pub qmp_socket: Option<PathBuf>,
    pub id: String,
    pub mode: NvdimmMode,
    pub prepare: bool,
    pub control_socket: Option<PathBuf>,
    pub verify_interval: u64,
    pub sync_interval: u64,
    pub seal: bool,
    pub allow_shared_permissions: bool,
    pub state_dir: Option<PathBuf>,
    pub records: RecordOptions,
    pub allow_shared_socket_dir: bool,
    pub qmp_timeout: u64,
    pub agent_socket: Option<PathBuf>,
    pub seccomp: SeccompMode,
    /// The config file's `log-level` (`--log-level` and `RUST_LOG` win over it).
    pub log_level: Option<LogLevel>,
}

impl NvdimmConfig {
    /// How the export binds its control and agent sockets.
    pub fn socket_options(&self) -> BindOptions<'_> {
        BindOptions {
            group: None,
            allow_shared_dir: self.allow_shared_socket_dir,
        }
    }
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` and `_`.
pub fn valid_qemu_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl TryFrom<NvdimmArgs> for NvdimmConfig {
    type Error = ConfigError;

    fn try_from(a: NvdimmArgs) -> Result<Self, ConfigError> {
        let file_cfg = match &a.config {
            Some(path) => {
                let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_toml(&text, path)?
            }
            None => NvdimmFileConfig::default(),
        };
        Self::merge(a, file_cfg)
    }
}

impl NvdimmConfig {
    /// The configuration from flags and the text of a config file named `path`.
    pub fn from_file_text(
        args: NvdimmArgs,
        text: &str,
        path: &std::path::Path,
    ) -> Result<Self, ConfigError> {
        Self::merge(args, parse_toml(text, path)?)
    }

    /// Flags over file keys over defaults, validated.
    fn merge(a: NvdimmArgs, f: NvdimmFileConfig) -> Result<Self, ConfigError> {
        let action = if a.print_qemu_args {
            NvdimmAction::PrintQemuArgs
        } else if a.attach {
            NvdimmAction::Attach
        } else {
            NvdimmAction::HotPlug
        };
        // The cold-plug arguments name no QMP socket, even one the file sets.
        let qmp_socket = match action {
            NvdimmAction::PrintQemuArgs => None,
            _ => Some(
                a.qmp_socket
                    .or(f.qmp_socket)
                    .ok_or(ConfigError::Missing("qmp-socket"))?,
            ),
        };
        let id = a.id.or(f.id).ok_or(ConfigError::Missing("id"))?;
        if !valid_qemu_id(&id) {
            return Err(ConfigError::BadId(id));
        }
        let sync_interval = a
            .sync_interval
            .or(f.sync_interval)
            .unwrap_or(DEFAULT_SYNC_INTERVAL);
        if sync_interval == 0 {
            return Err(ConfigError::Zero("sync-interval"));
        }
        let qmp_timeout = a
            .qmp_timeout
            .or(f.qmp_timeout)
            .unwrap_or(DEFAULT_QMP_TIMEOUT);
        if qmp_timeout == 0 {
            return Err(ConfigError::Zero("qmp-timeout"));
        }
        let mut c = Self {
            file: a
                .file_arg
                .or(a.file)
                .or(f.file)
                .ok_or(ConfigError::Missing("file"))?,
            action,
            qmp_socket,
            id,
            mode: a.mode.or(f.mode).unwrap_or_default(),
            prepare: a.prepare,
            control_socket: a.control_socket.or(f.control_socket),
            verify_interval: a
                .verify_interval
                .or(f.verify_interval)
                .unwrap_or(DEFAULT_VERIFY_INTERVAL),
            sync_interval,
            seal: flag(a.seal, a.no_seal, f.seal),
            allow_shared_permissions: flag(
                a.allow_shared_permissions,
                a.no_allow_shared_permissions,
                f.allow_shared_permissions,
            ),
            state_dir: a.state_dir.or(f.state_dir),
            records: a.records.options(None, None),
            allow_shared_socket_dir: a.allow_shared_socket_dir,
            qmp_timeout,
            agent_socket: a.agent_socket.or(f.agent_socket),
            seccomp: a.seccomp.or(f.seccomp).unwrap_or_default(),
            log_level: f.log_level,
        };
        absolute_paths([
            ("file", Some(&mut c.file)),
            ("qmp-socket", c.qmp_socket.as_mut()),
            ("control-socket", c.control_socket.as_mut()),
            ("state-dir", c.state_dir.as_mut()),
            ("agent-socket", c.agent_socket.as_mut()),
        ])?;
        Ok(c)
    }
}

/// A boolean option: `--x` or `--no-x` on the command line wins (clap keeps only the
/// last of the two), then the file, then off.
fn flag(yes: bool, no: bool, file: Option<bool>) -> bool {
    if yes || no {
        yes
    } else {
        file.unwrap_or(false)
    }
}

/// Parses a size: bytes, or a number with a binary suffix K, M, G, T (also KiB, MiB,
/// GiB, TiB), or hexadecimal bytes as the daemon prints them (`0x200000`, no
/// suffix). Decimal suffixes (MB, GB) are refused as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err(format!("bad size {s:?}: must be positive")),
        n => Ok(n),
    }
}

/// Parses an offset: like [`parse_size`], but 0 is an offset too.
pub fn parse_offset(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|e| {
            format!("bad size {s:?}: {e}; a hexadecimal number is bytes, without a suffix (e.g. 0x200000)")
        });
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected a number with an optional K, M, G or T suffix (powers of 1024), e.g. 64M or 4G, or hexadecimal bytes (0x200000)"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        "KB" | "MB" | "GB" | "TB" => {
            return Err(format!(
                "bad size {s:?}: {suffix} is ambiguous; use {} (powers of 1024)",
                &suffix[..1].to_ascii_uppercase()
            ))
        }
        _ => {
            return Err(format!(
                "bad size {s:?}: unknown suffix {suffix:?}; use K, M, G or T"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("bad size {s:?}: does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_ambiguity() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("2097152").unwrap(), 2 << 20);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("4GB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        // An offset may be 0.
        assert_eq!(parse_offset("0").unwrap(), 0);
        assert_eq!(parse_offset("4K").unwrap(), 4096);
        assert!(parse_offset("99999999999T").is_err());
        // As the daemon prints them.
        assert_eq!(parse_offset("0x200000").unwrap(), 2 << 20);
        assert_eq!(parse_size("0X200").unwrap(), 512);
        assert!(parse_size("0x0").is_err());
        assert!(parse_size("0x1M").unwrap_err().contains("without a suffix"));
        assert!(parse_size("0x").is_err());
        assert!(parse_size("0x10000000000000000").is_err());
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn command_line_alone() {
        let c = Config::try_from(ServeArgs {
            socket_path: Some("/run/p.sock".into()),
            file: Some("/var/lib/p.img".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            c,
            Config {
                socket_path: "/run/p.sock".into(),
                file: "/var/lib/p.img".into(),
                mode: Mode::Auto,
                readonly: false,
                control_socket: None,
                socket_group: None,
                control_group: None,
                operator_group: None,
                control_max_clients: crate::control::clients::DEFAULT_MAX_CLIENTS,
                control_idle_timeout: crate::control::clients::DEFAULT_IDLE_TIMEOUT,
                allow_shared_permissions: false,
                verify_interval: DEFAULT_VERIFY_INTERVAL,
                seal: false,
                agent_socket: None,
                guest_pci_address: None,
                state_dir: None,
                records: RecordOptions::default(),
                allow_shared_socket_dir: false,
                scrub_interval: 0,
                scrub_rate: DEFAULT_SCRUB_RATE,
                flush_rate_limit: None,
                metrics_file: None,
                metrics_interval: DEFAULT_METRICS_INTERVAL,
                metrics_instance: None,
                seccomp: SeccompMode::Enforce,
                log_level: None,
            }
        );
    }

    #[test]
    fn the_flush_rate_limit_comes_from_the_file_as_text_or_a_number_and_the_flag_wins() {
        let base = "socket-path = \"/s\"\nfile = \"/img\"\n";
        let of = |text: &str, flag: Option<FlushRateLimit>| {
            Config::from_file_text(
                ServeArgs {
                    flush_rate_limit: flag,
                    ..Default::default()
                },
                &format!("{base}{text}"),
                std::path::Path::new("t.toml"),
            )
        };
        let limit = |ops_per_sec, burst| Some(FlushRateLimit { ops_per_sec, burst });
        assert_eq!(of("", None).unwrap().flush_rate_limit, None);
        assert_eq!(
            of("flush-rate-limit = \"100,10\"\n", None)
                .unwrap()
                .flush_rate_limit,
            limit(100, 10)
        );
        assert_eq!(
            of("flush-rate-limit = 50\n", None)
                .unwrap()
                .flush_rate_limit,
            limit(50, 50)
        );
        assert_eq!(
            of("flush-rate-limit = 50\n", limit(7, 1))
                .unwrap()
                .flush_rate_limit,
            limit(7, 1)
        );
        for bad in [
            "flush-rate-limit = 0",
            "flush-rate-limit = -3",
            "flush-rate-limit = \"10,0\"",
            "flush-rate-limit = \"fast\"",
            "flush-rate-limit = 1.5",
            "flush-rate-limit = true",
        ] {
            let e = of(&format!("{bad}\n"), None).expect_err(bad).to_string();
            assert!(e.contains("t.toml"), "{bad}: {e}");
        }
        let e = of("flush-rate-limit = 0\n", None).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn file_supplies_what_the_command_line_leaves_out_and_flags_win() {
        let f = toml_file(
            "socket-path = \"/run/a.sock\"\nfile = \"/img\"\nmode = \"datasync\"\ncontrol-socket = \"/run/c\"\nverify-interval = 5\nseal = true\n",
        );
        let c = Config::try_from(ServeArgs {
            mode: Some(Mode::Fsync),
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/run/a.sock"));
        assert_eq!(c.mode, Mode::Fsync);
        assert_eq!(c.control_socket, Some("/run/c".into()));
        assert_eq!((c.verify_interval, c.seal), (5, true));
        let c = Config::try_from(ServeArgs {
            verify_interval: Some(1),
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.verify_interval, 1);
        // A boolean the file turns on, the command line turns off.
        let c = Config::try_from(ServeArgs {
            no_seal: true,
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.seal);
    }

    #[test]
    fn seccomp_comes_from_the_flag_then_the_file_then_enforce() {
        let f = toml_file("socket-path = \"/s\"\nfile = \"/f\"\nseccomp = \"log\"\n");
        let from = |seccomp, config: Option<&std::path::Path>| {
            Config::try_from(ServeArgs {
                socket_path: Some("/s".into()),
                file: Some("/f".into()),
                seccomp,
                config: config.map(Into::into),
                ..Default::default()
            })
            .unwrap()
            .seccomp
        };
        assert_eq!(from(None, None), SeccompMode::Enforce);
        assert_eq!(from(None, Some(f.path())), SeccompMode::Log);
        assert_eq!(
            from(Some(SeccompMode::Off), Some(f.path())),
            SeccompMode::Off
        );
        let bad = toml_file("seccomp = \"permissive\"\n");
        assert!(Config::try_from(ServeArgs {
            config: Some(bad.path().into()),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn the_last_of_a_flag_and_its_no_form_wins() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |args: &[&str]| {
            let mut argv = vec!["x", "--socket-path", "/s", "--file", "/f"];
            argv.extend_from_slice(args);
            Config::try_from(Cli::parse_from(argv).serve).unwrap()
        };
        assert!(parse(&["--seal"]).seal);
        assert!(!parse(&["--seal", "--no-seal"]).seal);
        assert!(parse(&["--no-readonly", "--readonly"]).readonly);
        assert!(!parse(&["--no-allow-shared-permissions"]).allow_shared_permissions);
    }

    #[test]
    fn unknown_keys_and_missing_values_are_clear_errors() {
        let f = toml_file("sockett-path = \"/x\"\n");
        let e = Config::try_from(ServeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("sockett-path"), "{e}");
        let e = Config::try_from(ServeArgs::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing socket-path: give --socket-path or set `socket-path` in the config file"
        );
    }

    #[test]
    fn metrics_options_are_checked_and_the_file_supplies_them() {
        let args = |file: &str| ServeArgs {
            socket_path: Some("/s".into()),
            file: Some("/f".into()),
            metrics_file: Some(file.into()),
            ..Default::default()
        };
        for bad in ["/var/lib/node/pmem.txt", "/var/lib/node/pmem", "/x/.prom"] {
            let e = Config::try_from(args(bad)).unwrap_err();
            assert!(e.to_string().contains("must end in .prom"), "{bad}: {e}");
            // Found by the fuzzer: the error said "metrics file", naming no key.
            assert!(e.to_string().starts_with("metrics-file "), "{bad}: {e}");
        }
        let c = Config::try_from(args("/var/lib/node/pmem.prom")).unwrap();
        assert_eq!(c.metrics_file, Some("/var/lib/node/pmem.prom".into()));
        assert_eq!(c.metrics_interval, DEFAULT_METRICS_INTERVAL);
        let e = Config::try_from(ServeArgs {
            metrics_interval: Some(0),
            ..args("/a.prom")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "metrics-interval must be positive");
        let f = toml_file(
            "socket-path = \"/s\"\nfile = \"/f\"\nmetrics-file = \"/m/a.prom\"\nmetrics-interval = 5\nmetrics-instance = \"vm1\"\n",
        );
        let c = Config::try_from(ServeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.metrics_file, c.metrics_interval, c.metrics_instance),
            (Some("/m/a.prom".into()), 5, Some("vm1".into()))
        );
        let f = toml_file("socket-path = \"/s\"\nfile = \"/f\"\nmetrics-file = \"/m/a.txt\"\n");
        assert!(Config::try_from(ServeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn nvdimm_flags_make_a_config_and_bad_ones_are_clear_errors() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            nv: NvdimmArgs,
        }
        let parse = |args: &[&str]| {
            let mut argv = vec!["x", "--file", "/f", "--id", "nv0"];
            argv.extend_from_slice(args);
            NvdimmConfig::try_from(Cli::try_parse_from(argv).map_err(|e| e.to_string())?.nv)
                .map_err(|e| e.to_string())
        };
        let c = parse(&["--qmp-socket", "/q"]).unwrap();
        assert_eq!(
            c,
            NvdimmConfig {
                file: "/f".into(),
                action: NvdimmAction::HotPlug,
                qmp_socket: Some("/q".into()),
                id: "nv0".into(),
                mode: NvdimmMode::Direct,
                prepare: false,
                control_socket: None,
                verify_interval: DEFAULT_VERIFY_INTERVAL,
                sync_interval: DEFAULT_SYNC_INTERVAL,
                seal: false,
                allow_shared_permissions: false,
                state_dir: None,
                records: RecordOptions::default(),
                allow_shared_socket_dir: false,
                qmp_timeout: DEFAULT_QMP_TIMEOUT,
                agent_socket: None,
                seccomp: SeccompMode::Enforce,
                log_level: None,
            }
        );
        let c = parse(&["--qmp-socket", "/q", "--seccomp", "log"]).unwrap();
        assert_eq!(c.seccomp, SeccompMode::Log);
        assert!(parse(&["--qmp-socket", "/q", "--seccomp", "permissive"]).is_err());
        let c = parse(&["--qmp-socket", "/q", "--attach", "--mode", "volatile"]).unwrap();
        assert_eq!(
            (c.action, c.mode),
            (NvdimmAction::Attach, NvdimmMode::Volatile)
        );
        let c = parse(&["--print-qemu-args"]).unwrap();
        assert_eq!(
            (c.action, c.qmp_socket),
            (NvdimmAction::PrintQemuArgs, None)
        );
        assert!(parse(&[]).unwrap_err().contains("missing qmp-socket"));
        assert!(parse(&["--qmp-socket", "/q", "--sync-interval", "0"])
            .unwrap_err()
            .contains("sync-interval must be positive"));
        assert!(parse(&["--qmp-socket", "/q", "--attach", "--prepare"]).is_err());
        assert!(parse(&["--print-qemu-args", "--attach"]).is_err());
        let e = NvdimmConfig::try_from(NvdimmArgs {
            file: Some("/f".into()),
            qmp_socket: Some("/q".into()),
            id: Some("0bad,id".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("start with a letter"), "{e}");
        assert!(valid_qemu_id("nv0.a_b-c") && !valid_qemu_id("") && !valid_qemu_id("a b"));
    }

    #[test]
    fn log_level_is_a_key_of_both_config_files() {
        let c = Config::from_file_text(
            ServeArgs::default(),
            "socket-path = \"/s\"\nfile = \"/f\"\nlog-level = \"debug\"\n",
            std::path::Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        let e = Config::from_file_text(
            ServeArgs::default(),
            "socket-path = \"/s\"\nfile = \"/f\"\nlog-level = \"loud\"\n",
            std::path::Path::new("p.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("log-level"), "{e}");
        let nv = NvdimmConfig::from_file_text(
            NvdimmArgs::default(),
            "file = \"/f\"\nqmp-socket = \"/q\"\nid = \"nv0\"\nlog-level = \"warn\"\n",
            std::path::Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(
            (nv.log_level, nv.id.as_str()),
            (Some(LogLevel::Warn), "nv0")
        );
        // An action is not a key.
        assert!(NvdimmConfig::from_file_text(
            NvdimmArgs::default(),
            "file = \"/f\"\nid = \"nv0\"\nprint-qemu-args = true\n",
            std::path::Path::new("n.toml"),
        )
        .is_err());
    }

    #[test]
    fn every_path_option_is_made_absolute_against_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        let c = Config::try_from(ServeArgs {
            socket_path: Some("run/p.sock".into()),
            file: Some("p.img".into()),
            control_socket: Some("./p.ctl".into()),
            agent_socket: Some("../p.agent".into()),
            state_dir: Some("state".into()),
            metrics_file: Some("m/p.prom".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.socket_path, cwd.join("run/p.sock"));
        assert_eq!(c.file, cwd.join("p.img"));
        assert_eq!(c.control_socket, Some(cwd.join("p.ctl")));
        assert_eq!(c.agent_socket, Some(cwd.join("../p.agent")));
        assert_eq!(c.state_dir, Some(cwd.join("state")));
        assert_eq!(c.metrics_file, Some(cwd.join("m/p.prom")));
        // Relative paths of a config file too; absolute ones stay as they are.
        let f = toml_file("socket-path = \"s.sock\"\nfile = \"/abs/f.img\"\n");
        let c = Config::try_from(ServeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.socket_path, cwd.join("s.sock"));
        assert_eq!(c.file, PathBuf::from("/abs/f.img"));
        let nv = NvdimmConfig::try_from(NvdimmArgs {
            file: Some("f.img".into()),
            qmp_socket: Some("q.sock".into()),
            id: Some("nv0".into()),
            control_socket: Some("c.sock".into()),
            state_dir: Some("st".into()),
            agent_socket: Some("a.sock".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(nv.file, cwd.join("f.img"));
        assert_eq!(nv.qmp_socket, Some(cwd.join("q.sock")));
        assert_eq!(nv.control_socket, Some(cwd.join("c.sock")));
        assert_eq!(nv.state_dir, Some(cwd.join("st")));
        assert_eq!(nv.agent_socket, Some(cwd.join("a.sock")));
    }

    #[test]
    fn a_path_that_cannot_be_made_absolute_is_refused_by_its_option() {
        let e = Config::try_from(ServeArgs {
            socket_path: Some("/s".into()),
            file: Some("/f".into()),
            state_dir: Some("".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("state-dir \"\": cannot make it absolute"),
            "{e}"
        );
        let e = NvdimmConfig::try_from(NvdimmArgs {
            file: Some("".into()),
            qmp_socket: Some("/q".into()),
            id: Some("nv0".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("give an absolute path"), "{e}");
    }

    #[test]
    fn shipped_example_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
        let mut n = 0;
        let entries = fs::read_dir(dir)
            .unwrap()
            .chain(fs::read_dir(format!("{dir}/systemd")).unwrap());
        for entry in entries {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let text = fs::read_to_string(&p).unwrap();
                let parsed: Result<FileConfig, _> = toml::from_str(&text);
                assert!(parsed.is_ok(), "{}: {:?}", p.display(), parsed.err());
                n += 1;
            }
        }
        assert!(n > 1, "no example configs in {dir} and {dir}/systemd");
    }
}
