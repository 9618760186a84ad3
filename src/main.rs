// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of vhost-device-pmem. Parses, dispatches, logs the error and exits 1.

mod gendocs;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use log::error;
use vhost_device_pmem::{
    backing::BackingError,
    blockmap::{
        check,
        prepare::{self, Progress},
    },
    config::{parse_offset, parse_size, Config, NvdimmArgs, NvdimmConfig, RecordArgs, ServeArgs},
    control,
    state::health::{self, EXIT_UNRECORDED},
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vhost-user virtio-pmem backend for block-map-immutable files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a backing file to a VMM over a vhost-user socket.
    Serve(Box<ServeArgs>),
    /// Export FILE to a running QEMU as a guarded NVDIMM: judge it (direct mode:
    /// DAX, MAP_SYNC, immutable block map), hot-plug memory-backend-file + nvdimm
    /// over QMP, check that QEMU mapped that file (with MAP_SYNC in direct mode),
    /// and guard it until SIGINT/SIGTERM or QEMU's exit. The VM keeps the NVDIMM
    /// when this exits; `--attach` guards it again.
    Nvdimm(Box<NvdimmArgs>),
    /// Print the daemon's status (JSON) from its control socket.
    Status {
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
    },
    /// Print the daemon's flush statistics (JSON) from its control socket.
    Stats {
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
    },
    /// Print the daemon's metrics in the Prometheus text exposition format (0.0.4)
    /// from its control socket.
    Metrics {
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
    },
    /// Print the daemon's events (JSON lines) as they happen, until interrupted.
    Events {
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
        /// Print the recent events (up to 64) first.
        #[arg(long)]
        backlog: bool,
    },
    /// Make FILE block-map immutable: create or extend it to SIZE (rounded up to
    /// 2 MiB), write zeros into holes and unwritten extents, unshare shared ones,
    /// fsync, verify. Never shrinks the file or changes its data; safe to interrupt
    /// and re-run.
    Prepare {
        file: PathBuf,
        /// Size, e.g. 64M or 4G (K, M, G, T are powers of 1024); default: the
        /// current size. Required to create a file.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// List, inject or clear bad ranges of a running daemon's backing file (byte
    /// offsets in the file; aligned to 512-byte sectors, as ndctl does).
    Badblocks {
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
        /// Print the daemon's JSON answer instead of a table (before or after the
        /// action).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: BadblocksAction,
    },
    /// Show the health record of FILE: whether a sync failed while it was served (a
    /// daemon started on it then answers every flush with EIO). The record is found
    /// by the file's path and by its identity (a moved or hard-linked file keeps
    /// it), in the state directory and in the health copy directory. Exit status 0
    /// when none is recorded (or it was cleared), 1 when one is, 2 when one cannot be
    /// read (corrupt, not a regular file of this user, without identity: nothing is
    /// changed; `--clear --force` renames it aside).
    Health {
        /// The backing file, as given to `serve --file`.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The daemon's `--state-dir`, if it had one.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        records: RecordArgs,
        /// Remove the record, after checking the data: the next daemon serves the
        /// file as healthy. Run it while no daemon serves the file.
        #[arg(long)]
        clear: bool,
        /// With --clear: also rename aside a record that cannot be read (to
        /// NAME.corrupt-SECS), after checking the data as for a failed sync.
        #[arg(long, requires = "clear")]
        force: bool,
    },
    /// Report whether FILE's block map is immutable and which mode `auto` would
    /// choose. Exit status: 0 immutable, 1 not immutable, 2 error.
    Check {
        file: PathBuf,
        /// Print JSON (stable field names) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BadblocksAction {
    /// Print the known bad ranges.
    List,
    /// Record [OFFSET, OFFSET+LEN) as bad (it reaches the guest through the agent).
    Inject {
        #[arg(value_parser = parse_offset)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
    },
    /// Forget [OFFSET, OFFSET+LEN) (after the media was repaired or replaced).
    Clear {
        #[arg(value_parser = parse_offset)]
        offset: u64,
        #[arg(value_parser = parse_size)]
        len: u64,
    },
}

fn run_badblocks(
    sock: &std::path::Path,
    json: bool,
    action: BadblocksAction,
) -> Result<(), String> {
    let req = match action {
        BadblocksAction::List => control::Request::BadblocksList,
        BadblocksAction::Inject { offset, len } => control::Request::BadblocksInject {
            offset,
            length: len,
        },
        BadblocksAction::Clear { offset, len } => control::Request::BadblocksClear {
            offset,
            length: len,
        },
    };
    let answer = control::request(sock, &req)
        .map_err(|e| format!("{}: {e}", sock.display()))?
        .into_result()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
        return Ok(());
    }
    let ranges = answer.ranges.unwrap_or_default();
    if ranges.is_empty() {
        println!("no bad ranges");
    }
    for r in ranges {
        println!(
            "offset {:#x} length {:#x} (sectors {} +{})",
            r.offset,
            r.length,
            r.offset / 512,
            r.length / 512
        );
    }
    if let Some(e) = answer.persist_error {
        eprintln!("warning: the bad ranges are not on disk yet: {e}");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Check { .. } => unreachable!("handled in main"),
        Command::Prepare { file, size } => {
            let r = prepare::prepare(&file, size, Progress::Auto).map_err(|e| e.to_string())?;
            let v = &r.verdict;
            println!(
                "{}: immutable, {} bytes on {}, {} extent(s); zero-filled {} bytes{}, unshared {} bytes, in {:.1}s",
                r.file,
                r.size,
                v.filesystem,
                v.extents,
                r.zeroed,
                if r.write_zeroes { " (FALLOC_FL_WRITE_ZEROES)" } else { "" },
                r.unshared,
                r.seconds
            );
            Ok(())
        }
        Command::Events {
            control_socket,
            backlog,
        } => control::subscribe(&control_socket, backlog, |line| {
            println!("{line}");
            true
        })
        .map_err(|e| format!("{}: {e}", control_socket.display())),
        Command::Serve(mut args) => {
            // Sockets passed by the service manager (socket activation); an inherited
            // vhost-user socket stands for --socket-path.
            let inherited = vhost_device_pmem::systemd::take_listen_fds()
                .map_err(|e| format!("socket activation: {e}"))?;
            if let Some(path) = inherited
                .vhost_user
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .and_then(|a| a.as_pathname().map(ToOwned::to_owned))
            {
                args.socket_path = Some(path);
            }
            let config = Config::try_from(*args).map_err(|e| e.to_string())?;
            match vhost_device_pmem::daemon::serve(config, inherited) {
                // Another daemon, or a VMM that still maps the region from an earlier
                // daemon, holds the file: a restart cannot help until it is gone, so
                // a distinct status the service unit does not restart.
                Err(e @ vhost_device_pmem::Error::Backing(BackingError::Locked(_))) => {
                    error!("{e}");
                    std::process::exit(EXIT_FILE_IN_USE.into());
                }
                Err(e @ vhost_device_pmem::Error::HealthUnrecorded(_)) => {
                    error!("{e}");
                    std::process::exit(EXIT_UNRECORDED.into());
                }
                r => r.map_err(|e| e.to_string()),
            }
        }
        Command::Nvdimm(args) => {
            let config = NvdimmConfig::try_from(*args).map_err(|e| e.to_string())?;
            match vhost_device_pmem::nvdimm::run(config) {
                Err(e @ vhost_device_pmem::Error::Backing(BackingError::Locked(_))) => {
                    error!("{e}");
                    std::process::exit(EXIT_FILE_IN_USE.into());
                }
                Err(e @ vhost_device_pmem::Error::HealthUnrecorded(_)) => {
                    error!("{e}");
                    std::process::exit(EXIT_UNRECORDED.into());
                }
                r => r.map_err(|e| e.to_string()),
            }
        }
        Command::Badblocks {
            control_socket,
            json,
            action,
        } => run_badblocks(&control_socket, json, action),
        Command::Health { .. } => unreachable!("handled in main"),
        Command::Status { control_socket } => print_call(&control_socket, control::Request::Status),
        Command::Stats { control_socket } => print_call(&control_socket, control::Request::Stats),
        Command::Metrics { control_socket } => {
            let answer = control::request(&control_socket, &control::Request::Metrics)
                .map_err(|e| format!("{}: {e}", control_socket.display()))?
                .into_result()?;
            print!("{}", answer.metrics.unwrap_or_default());
            Ok(())
        }
    }
}

fn print_call(sock: &std::path::Path, req: control::Request) -> Result<(), String> {
    let answer = control::request(sock, &req).map_err(|e| format!("{}: {e}", sock.display()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    answer.into_result().map(drop)
}

/// `check` has its own exit statuses: 0 immutable, 1 not immutable, 2 error.
fn run_check(file: &std::path::Path, json: bool) -> ExitCode {
    match check::check(file) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", check::render_text(&r));
            }
            ExitCode::from(r.exit_code())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": file.display().to_string(), "error": e.to_string()})
                );
            } else {
                error!("{}: {e}", file.display());
            }
            ExitCode::from(check::EXIT_ERROR)
        }
    }
}

/// Exit status of `serve` when the backing file is locked by another daemon or a VMM
/// (EX_TEMPFAIL); `RestartPreventExitStatus=` of the service unit.
const EXIT_FILE_IN_USE: u8 = 75;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Hidden from --help, the man pages and the completions it writes.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == gendocs::SUBCOMMAND)
    {
        return gendocs::main(Cli::command());
    }
    let cli = Cli::parse();
    if let Command::Check { file, json } = &cli.command {
        return run_check(file, *json);
    }
    if let Command::Health {
        file,
        state_dir,
        records,
        clear,
        force,
    } = &cli.command
    {
        let options = records.options(None, None);
        return ExitCode::from(health::command(
            file,
            state_dir.as_deref(),
            &options,
            *clear,
            *force,
        ));
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
