// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of vhost-device-pmem: parses, dispatches, and ends with one of the
//! documented exit statuses ([`EXIT_STATUS_HELP`]).
//!
//! Owns: the subcommands and their output (text, or JSON carrying the protocol
//! version), the exit statuses, `error: ...` lines for the commands people run
//! (the daemons, `serve` and `nvdimm`, log theirs instead, with a priority the
//! journal keeps), the vhost-user backend conventions (`--print-capabilities`,
//! `serve --fd`). Never: a log line for a command-line error, or an exit status
//! outside the table.

mod gendocs;
mod logging;

use std::{
    error::Error,
    fmt,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory, Parser, Subcommand};
use log::error;
use serde_json::{json, Value};
use vhost_device_pmem::{
    backing::BackingError,
    blockmap::{
        check,
        prepare::{self, Progress},
    },
    config::{
        parse_offset, parse_size, Config, LogLevel, NvdimmArgs, NvdimmConfig, RecordArgs, ServeArgs,
    },
    control,
    jsonl::PROTOCOL_VERSION,
    region::RegionError,
    state::health::{self, EXIT_UNRECORDED},
};

use crate::logging::Output;

/// Success: done, or the answer is yes.
const EXIT_OK: u8 = 0;
/// Failure: the answer is no, the daemon refused the request, or the work failed.
const EXIT_FAILURE: u8 = 1;
/// Usage or error: the command could not run.
const EXIT_USAGE: u8 = 2;
/// The backing file is locked by another daemon or a VMM (EX_TEMPFAIL); the
/// service unit's `RestartPreventExitStatus=`.
const EXIT_FILE_IN_USE: u8 = 75;

/// The exit statuses, the same for every subcommand (in `--help` and the man page).
const EXIT_STATUS_HELP: &str = "\
Exit status (every subcommand):
  0   success: done, or the answer is yes (check: ready to serve; health: no sync
      failure recorded)
  1   failure: the answer is no (check: not immutable, or a size serve or QEMU
      cannot take; health: a sync failure is recorded), the daemon refused the
      request (its reason on stderr), prepare could not finish, or serve/nvdimm
      refused the file or stopped on an error (a failed sync)
  2   usage or error: a bad command line or config file, or a file or daemon that
      cannot be reached or read
  75  the backing file is locked by another daemon or by a VMM that still maps it
      (serve, nvdimm); the service unit does not restart it";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vhost-user virtio-pmem backend for block-map-immutable files",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// Log level: off, error, warn, info, debug, trace. Wins over RUST_LOG, which
    /// wins over the config file's `log-level`; default info.
    #[arg(long, global = true, value_enum, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Print the vhost-user backend capabilities as JSON and exit 0, ignoring every
    /// other argument (QEMU's vhost-user.rst, "Backend program conventions").
    #[arg(long, global = true)]
    print_capabilities: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--control-socket` and `--json` of the commands that read a daemon.
#[derive(clap::Args, Debug, PartialEq, Eq)]
struct Read {
    /// The daemon's control socket.
    #[arg(long, value_name = "SOCK")]
    control_socket: PathBuf,
    /// Print the daemon's JSON answer (with its protocol version `v`).
    #[arg(long)]
    json: bool,
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
    /// Print the daemon's status (JSON, with or without --json) from its control
    /// socket.
    Status(Read),
    /// Print the daemon's flush statistics (JSON, with or without --json) from its
    /// control socket.
    Stats(Read),
    /// Print the daemon's metrics in the Prometheus text exposition format (0.0.4)
    /// from its control socket; with --json, the daemon's answer.
    Metrics(Read),
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
        /// Size, e.g. 64M or 4G (K, M, G, T are powers of 1024) or 0x4000000;
        /// default: the current size. Required to create a file.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Round the size up to a power of two, the only sizes QEMU 11.1 takes for
        /// a vhost-user device (it aborts on others); without it a size that is not
        /// one is kept, with a warning.
        #[arg(long)]
        power_of_two: bool,
    },
    /// List, inject or clear bad ranges of a running daemon's backing file (byte
    /// offsets in the file, decimal with K/M/G/T or hexadecimal as listed; aligned
    /// to 512-byte sectors, as ndctl does). A range outside the file is refused.
    Badblocks {
        /// The daemon's control socket (before or after the action).
        #[arg(long, value_name = "SOCK", global = true)]
        control_socket: Option<PathBuf>,
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
        /// The backing file, as given to `serve`.
        #[arg(value_name = "FILE", required_unless_present = "file_flag")]
        file: Option<PathBuf>,
        /// The backing file (as FILE).
        #[arg(long = "file", value_name = "FILE", conflicts_with = "file")]
        file_flag: Option<PathBuf>,
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
        /// Print JSON (with the protocol version `v`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Report whether FILE is ready to serve: its block map immutable, its size one
    /// `serve` and QEMU take, and which mode `auto` would choose. Exit status: 0
    /// ready, 1 not (the problems and the fix are printed), 2 error.
    Check {
        file: PathBuf,
        /// Print JSON (stable field names, with the protocol version `v`) instead
        /// of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish,
    /// powershell) to stdout; the Debian package installs bash, zsh and fish ones.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
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

/// Why a command ends with a status other than 0: the status, and the error that
/// `error: ...` prints (none when the command printed its own answer already).
struct Failed {
    code: u8,
    error: Option<Box<dyn Error + Send + Sync>>,
}

impl Failed {
    fn new(code: u8, error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self {
            code,
            error: Some(error.into()),
        }
    }

    /// The status alone: the command has said what it found.
    fn quiet(code: u8) -> Self {
        Self { code, error: None }
    }
}

/// A message with the error that caused it (printed as `message: caused by ...`).
#[derive(Debug)]
struct Context {
    message: String,
    source: Box<dyn Error + Send + Sync>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

fn context(message: impl Into<String>, source: impl Into<Box<dyn Error + Send + Sync>>) -> Context {
    Context {
        message: message.into(),
        source: source.into(),
    }
}

type CmdResult = Result<(), Failed>;

/// Sends `req` to the daemon at `sock`; its answer as JSON, whatever it says, with
/// the protocol version `v` it was sent with (the reader refuses any other). Exit 2
/// when the daemon cannot be reached or answers garbage.
fn ask(sock: &Path, req: &control::Request) -> Result<Value, Failed> {
    let mut answer = control::call(sock, req).map_err(|e| {
        Failed::new(
            EXIT_USAGE,
            context(format!("cannot reach the daemon at {}", sock.display()), e),
        )
    })?;
    if let Some(map) = answer.as_object_mut() {
        map.insert("v".into(), json!(PROTOCOL_VERSION));
    }
    Ok(answer)
}

/// The answer if the daemon said ok, else exit 1 with its reason.
fn accepted(sock: &Path, answer: Value) -> Result<Value, Failed> {
    if answer["ok"] == true {
        return Ok(answer);
    }
    let reason = answer["error"].as_str().unwrap_or("no reason given");
    Err(Failed::new(
        EXIT_FAILURE,
        format!(
            "{}: the daemon refused the request: {reason}",
            sock.display()
        ),
    ))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `status`, `stats`, `metrics`: the daemon's answer.
fn run_read(read: &Read, req: control::Request) -> CmdResult {
    let answer = ask(&read.control_socket, &req)?;
    let metrics_text = req == control::Request::Metrics && !read.json;
    if !metrics_text {
        // JSON either way for status and stats (their answer is a document); a
        // refusal is printed too, then reported.
        print_json(&answer);
    }
    let answer = accepted(&read.control_socket, answer)?;
    if metrics_text {
        print!("{}", answer["metrics"].as_str().unwrap_or_default());
    }
    Ok(())
}

fn run_badblocks(
    out: Output,
    sock: Option<PathBuf>,
    json: bool,
    action: BadblocksAction,
) -> CmdResult {
    let Some(sock) = sock else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "badblocks needs --control-socket <SOCK> (before or after the action)",
            )
            .exit();
    };
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
    let answer = ask(&sock, &req)?;
    if json {
        print_json(&answer);
    }
    let answer = accepted(&sock, answer)?;
    if json {
        return Ok(());
    }
    let range = |v: &Value| {
        let (o, l) = (
            v["offset"].as_u64().unwrap_or_default(),
            v["length"].as_u64().unwrap_or_default(),
        );
        format!(
            "offset {o:#x} length {l:#x} (sectors {} +{})",
            o / 512,
            l / 512
        )
    };
    match &action {
        BadblocksAction::Inject { offset, len } => match answer["added"].as_array() {
            Some(added) if !added.is_empty() => {
                for r in added {
                    println!("recorded as bad: {}", range(r));
                }
            }
            _ => println!(
                "[{offset:#x}, {:#x}) was already recorded as bad: nothing changed",
                offset + len
            ),
        },
        BadblocksAction::Clear { offset, len } => {
            if answer["changed"] == true {
                println!("cleared [{offset:#x}, {:#x})", offset + len);
            } else {
                println!(
                    "[{offset:#x}, {:#x}) held no bad range: nothing changed",
                    offset + len
                );
            }
        }
        BadblocksAction::List => {}
    }
    let ranges = answer["ranges"].as_array().cloned().unwrap_or_default();
    if ranges.is_empty() {
        println!("no bad ranges");
    }
    for r in &ranges {
        println!("{}", range(r));
    }
    if let Some(e) = answer["persist_error"].as_str() {
        out.warning(&format!("the bad ranges are not on disk yet: {e}"));
    }
    Ok(())
}

fn run_prepare(out: Output, file: &Path, size: Option<u64>, power_of_two: bool) -> CmdResult {
    let size = if power_of_two {
        // The size asked for (or the file's), then the next power of two.
        let base = match size {
            Some(s) => s,
            None => std::fs::metadata(file)
                .map_err(|e| Failed::new(EXIT_USAGE, context(file.display().to_string(), e)))?
                .len(),
        };
        Some(check::qemu_size(base).ok_or_else(|| {
            Failed::new(
                EXIT_USAGE,
                format!("{base} bytes cannot be rounded up to a power of two"),
            )
        })?)
    } else {
        size
    };
    let r =
        prepare::prepare(file, size, Progress::Auto).map_err(|e| Failed::new(EXIT_FAILURE, e))?;
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
    if let Some(p) = check::qemu_size_problem(r.size, &r.file) {
        out.warning(&format!("{}: {p}", r.file));
    }
    Ok(())
}

/// `check`: exit 0 ready, 1 not, 2 error.
fn run_check(file: &Path, json: bool) -> CmdResult {
    match check::check(file) {
        Ok(r) => {
            if json {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["v"] = json!(PROTOCOL_VERSION);
                print_json(&v);
            } else {
                print!("{}", check::render_text(&r));
            }
            match r.exit_code() {
                0 => Ok(()),
                code => Err(Failed::quiet(code)),
            }
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"v": PROTOCOL_VERSION, "file": file.display().to_string(), "error": e.to_string()})
                );
            }
            Err(Failed::new(
                check::EXIT_ERROR,
                context(file.display().to_string(), e),
            ))
        }
    }
}

/// The capabilities `--print-capabilities` prints: vhost-user.json's
/// `VHostUserBackendCapabilities` shape. That schema's `VHostUserBackendType` has no
/// pmem member (docs/operations.md), so the type is this project's own word; the
/// features are the options beyond the conventional ones.
fn capabilities() -> Value {
    json!({"type": "pmem", "features": ["file", "read-only"]})
}

/// Whether `--print-capabilities` is among the arguments (before a `--`): then
/// every other argument is ignored, as the convention asks.
fn wants_capabilities(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--print-capabilities")
}

/// The exit status of a daemon's error: 75 for a locked file (another daemon, or a
/// VMM that still maps the region from an earlier daemon: a restart cannot help
/// until it is gone, so a status the service unit does not restart), else 1.
fn daemon_exit(e: &vhost_device_pmem::Error) -> u8 {
    match e {
        vhost_device_pmem::Error::Region(RegionError::Backing(BackingError::Locked(_))) => {
            EXIT_FILE_IN_USE
        }
        // The failure record is not everywhere: no restart into `healthy`.
        vhost_device_pmem::Error::HealthUnrecorded { .. } => EXIT_UNRECORDED,
        _ => EXIT_FAILURE,
    }
}

/// The logger of a daemon command, once its config file (and `log-level`) is read.
fn daemon_logger(out: Output, flag: Option<LogLevel>, file: Option<LogLevel>) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let _ = out.init_logger(&logging::filter_spec(flag, rust_log.as_deref(), file));
}

/// `serve`: the sockets passed in (socket activation, `--fd`), the configuration,
/// then the daemon. Its errors are log lines (the journal files them as errors).
fn run_serve(out: Output, flag: Option<LogLevel>, mut args: ServeArgs) -> ExitCode {
    let setup = (|| -> Result<(Config, vhost_device_pmem::systemd::Inherited), (u8, String)> {
        let usage = |e: &dyn fmt::Display| (EXIT_USAGE, e.to_string());
        // Sockets passed by the service manager (socket activation); an inherited
        // vhost-user socket stands for --socket-path.
        let mut inherited = vhost_device_pmem::systemd::take_listen_fds()
            .map_err(|e| (EXIT_USAGE, format!("socket activation: {e}")))?;
        if let Some(fd) = args.fd {
            if inherited.vhost_user.is_some() {
                return Err(usage(&format!(
                    "--fd {fd} and a vhost-user socket passed by the service manager: give one"
                )));
            }
            if inherited
                .control
                .as_ref()
                .is_some_and(|c| std::os::fd::AsRawFd::as_raw_fd(c) == fd)
            {
                return Err(usage(&format!(
                    "--fd {fd} is the control socket the service manager passed"
                )));
            }
            let listener = vhost_device_pmem::systemd::take_fd(fd).map_err(|e| usage(&e))?;
            // Unnamed or abstract: named after the descriptor in `status` and logs.
            args.socket_path = Some(
                listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(ToOwned::to_owned))
                    .unwrap_or_else(|| PathBuf::from(format!("fd:{fd}"))),
            );
            inherited.vhost_user = Some(listener);
        } else if let Some(path) = inherited
            .vhost_user
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .and_then(|a| a.as_pathname().map(ToOwned::to_owned))
        {
            args.socket_path = Some(path);
        }
        let config =
            Config::try_from(args).map_err(|e| usage(&vhost_device_pmem::error_chain(&e)))?;
        Ok((config, inherited))
    })();
    let (config, inherited) = match setup {
        Ok(x) => x,
        Err((code, e)) => {
            daemon_logger(out, flag, None);
            error!("{e}");
            return ExitCode::from(code);
        }
    };
    daemon_logger(out, flag, config.log_level);
    match vhost_device_pmem::app::serve::run(&config, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", vhost_device_pmem::error_chain(&e));
            ExitCode::from(daemon_exit(&e))
        }
    }
}

fn run_nvdimm(out: Output, flag: Option<LogLevel>, args: NvdimmArgs) -> ExitCode {
    let config = match NvdimmConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            daemon_logger(out, flag, None);
            error!("{}", vhost_device_pmem::error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    daemon_logger(out, flag, config.log_level);
    match vhost_device_pmem::app::nvdimm::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", vhost_device_pmem::error_chain(&e));
            ExitCode::from(daemon_exit(&e))
        }
    }
}

/// The commands people run: their failures are `error: ...` lines.
fn run_command(out: Output, command: Command) -> CmdResult {
    match command {
        Command::Serve(_) | Command::Nvdimm(_) => unreachable!("daemons are run by main"),
        Command::Status(read) => run_read(&read, control::Request::Status),
        Command::Stats(read) => run_read(&read, control::Request::Stats),
        Command::Metrics(read) => run_read(&read, control::Request::Metrics),
        Command::Events {
            control_socket,
            backlog,
        } => control::subscribe(&control_socket, backlog, |line| {
            println!("{line}");
            true
        })
        .map_err(|e| {
            Failed::new(
                EXIT_USAGE,
                context(
                    format!("events of the daemon at {}", control_socket.display()),
                    e,
                ),
            )
        }),
        Command::Prepare {
            file,
            size,
            power_of_two,
        } => run_prepare(out, &file, size, power_of_two),
        Command::Badblocks {
            control_socket,
            json,
            action,
        } => run_badblocks(out, control_socket, json, action),
        Command::Health {
            file,
            file_flag,
            state_dir,
            records,
            clear,
            force,
            json,
        } => {
            let file = file.or(file_flag).expect("clap requires FILE or --file");
            let options = records.options(None, None);
            match health::command(&file, state_dir.as_deref(), &options, clear, force, json) {
                0 => Ok(()),
                // The command said why on stderr.
                code => Err(Failed::quiet(code)),
            }
        }
        Command::Check { file, json } => run_check(&file, json),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let name = cmd.get_name().to_string();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, name, &mut buf);
            io::stdout()
                .write_all(&buf)
                .map_err(|e| Failed::new(EXIT_USAGE, context("write the completions", e)))
        }
    }
}

fn main() -> ExitCode {
    // What stderr is (the journal, a terminal, anything else): decided once, before
    // any thread or sandbox exists.
    let out = Output::detect();
    if wants_capabilities(std::env::args_os()) {
        print_json(&capabilities());
        return ExitCode::SUCCESS;
    }
    // Hidden from --help, the man pages and the completions it writes.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == gendocs::SUBCOMMAND)
    {
        let _ = out.init_logger(&logging::filter_spec(None, None, None));
        return gendocs::main(Cli::command());
    }
    let cli = Cli::parse();
    match cli.command {
        // Daemons: the logger waits for the config file's `log-level`.
        Command::Serve(args) => run_serve(out, cli.log_level, *args),
        Command::Nvdimm(args) => run_nvdimm(out, cli.log_level, *args),
        command => {
            let rust_log = std::env::var("RUST_LOG").ok();
            let _ = out.init_logger(&logging::filter_spec(
                cli.log_level,
                rust_log.as_deref(),
                None,
            ));
            match run_command(out, command) {
                Ok(()) => ExitCode::from(EXIT_OK),
                Err(f) => {
                    if let Some(e) = &f.error {
                        out.error(&**e);
                    }
                    ExitCode::from(f.code)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use vhost_device_pmem::{
        config::{NvdimmAction, NvdimmMode, DEFAULT_SCRUB_RATE},
        durability::Mode,
    };

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["vhost-device-pmem"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn badblocks_takes_its_options_after_the_action_too() {
        for args in [
            &["badblocks", "list", "--control-socket", "/c", "--json"][..],
            &["badblocks", "--control-socket", "/c", "list", "--json"],
            &["badblocks", "--json", "list", "--control-socket=/c"],
        ] {
            let Command::Badblocks {
                control_socket,
                json,
                action,
            } = parse(args).unwrap().command
            else {
                panic!("{args:?}");
            };
            assert_eq!(
                (control_socket, json, action),
                (Some("/c".into()), true, BadblocksAction::List),
                "{args:?}"
            );
        }
    }

    #[test]
    fn offsets_and_lengths_are_taken_as_listed() {
        let action = |args: &[&str]| match parse(args).unwrap().command {
            Command::Badblocks { action, .. } => action,
            c => panic!("{c:?}"),
        };
        let base = ["badblocks", "--control-socket", "/c", "inject"];
        let with = |o, l| {
            let mut v = base.to_vec();
            v.extend([o, l]);
            action(&v)
        };
        let want = BadblocksAction::Inject {
            offset: 0x200000,
            len: 512,
        };
        assert_eq!(with("0x200000", "0x200"), want);
        assert_eq!(with("2097152", "512"), want);
        assert_eq!(with("2M", "512"), want);
        assert_eq!(with("0X200000", "0x200"), want);
        assert!(parse(&["badblocks", "inject", "0xZZ", "1"]).is_err());
        assert!(parse(&["badblocks", "inject", "0x1M", "1"]).is_err());
        assert!(parse(&["badblocks", "inject", "0", "0x0"]).is_err());
    }

    #[test]
    fn health_takes_the_file_as_an_argument_or_with_file() {
        for args in [&["health", "/f"][..], &["health", "--file", "/f"]] {
            let Command::Health {
                file, file_flag, ..
            } = parse(args).unwrap().command
            else {
                panic!();
            };
            assert_eq!(file.or(file_flag), Some("/f".into()), "{args:?}");
        }
        assert!(parse(&["health"]).is_err());
        assert!(parse(&["health", "/f", "--file", "/g"]).is_err());
    }

    #[test]
    fn every_read_command_takes_json() {
        for cmd in ["status", "stats", "metrics"] {
            let c = parse(&[cmd, "--control-socket", "/c", "--json"]).unwrap();
            let (Command::Status(r) | Command::Stats(r) | Command::Metrics(r)) = c.command else {
                panic!("{cmd}");
            };
            assert_eq!(
                r,
                Read {
                    control_socket: "/c".into(),
                    json: true
                }
            );
        }
        assert!(matches!(
            parse(&["health", "/f", "--json"]).unwrap().command,
            Command::Health { json: true, .. }
        ));
        assert!(matches!(
            parse(&["check", "--json", "/f"]).unwrap().command,
            Command::Check { json: true, .. }
        ));
    }

    #[test]
    fn log_level_is_global_and_a_known_level() {
        for args in [
            &["--log-level", "debug", "check", "/f"][..],
            &["check", "/f", "--log-level", "debug"],
            &[
                "badblocks",
                "list",
                "--log-level=debug",
                "--control-socket",
                "/c",
            ],
        ] {
            assert_eq!(
                parse(args).unwrap().log_level,
                Some(LogLevel::Debug),
                "{args:?}"
            );
        }
        assert!(parse(&["--log-level", "loud", "check", "/f"]).is_err());
    }

    #[test]
    fn serve_takes_its_file_positionally_and_the_conventional_options() {
        let serve = |args: &[&str]| -> Result<ServeArgs, clap::Error> {
            let mut argv = vec!["serve"];
            argv.extend_from_slice(args);
            match parse(&argv)?.command {
                Command::Serve(a) => Ok(*a),
                c => panic!("{c:?}"),
            }
        };
        let c =
            Config::try_from(serve(&["--socket-path=/s", "/img", "--read-only"]).unwrap()).unwrap();
        assert_eq!(
            c,
            Config {
                socket_path: "/s".into(),
                file: "/img".into(),
                mode: Mode::Auto,
                readonly: true,
                control_socket: None,
                socket_group: None,
                allow_shared_permissions: false,
                verify_interval: vhost_device_pmem::config::DEFAULT_VERIFY_INTERVAL,
                seal: false,
                agent_socket: None,
                guest_pci_address: None,
                state_dir: None,
                scrub_interval: 0,
                scrub_rate: DEFAULT_SCRUB_RATE,
                flush_rate_limit: None,
                metrics_file: None,
                metrics_interval: vhost_device_pmem::config::DEFAULT_METRICS_INTERVAL,
                metrics_instance: None,
                seccomp: Default::default(),
                log_level: None,
                control_group: None,
                operator_group: None,
                control_max_clients: vhost_device_pmem::control::clients::DEFAULT_MAX_CLIENTS,
                control_idle_timeout: vhost_device_pmem::control::clients::DEFAULT_IDLE_TIMEOUT,
                records: c.records.clone(),
                allow_shared_socket_dir: false,
            }
        );
        assert_eq!(serve(&["--fd=3", "/img"]).unwrap().fd, Some(3));
        // vhost-user.rst: --fd is incompatible with --socket-path.
        let e = serve(&["--fd=3", "--socket-path", "/s", "/img"]).unwrap_err();
        assert_eq!(e.exit_code(), i32::from(EXIT_USAGE));
        assert!(serve(&["--file", "/a", "/b"]).is_err());
    }

    #[test]
    fn nvdimm_takes_a_config_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("nv.toml");
        std::fs::write(
            &toml,
            "file = \"/f\"\nqmp-socket = \"/q\"\nid = \"nv0\"\nmode = \"volatile\"\nseal = true\nlog-level = \"debug\"\n",
        )
        .unwrap();
        let nv = |args: &[&str]| {
            let mut argv = vec!["nvdimm", "--config", toml.to_str().unwrap()];
            argv.extend_from_slice(args);
            match parse(&argv).unwrap().command {
                Command::Nvdimm(a) => NvdimmConfig::try_from(*a),
                c => panic!("{c:?}"),
            }
        };
        let c = nv(&[]).unwrap();
        assert_eq!(
            (
                c.file.to_str(),
                c.qmp_socket.as_deref().and_then(Path::to_str),
                c.id.as_str(),
                c.mode,
                c.seal,
                c.log_level,
                c.action
            ),
            (
                Some("/f"),
                Some("/q"),
                "nv0",
                NvdimmMode::Volatile,
                true,
                Some(LogLevel::Debug),
                NvdimmAction::HotPlug
            )
        );
        let c = nv(&["/g", "--mode", "direct", "--no-seal", "--id", "nv1"]).unwrap();
        assert_eq!(
            (c.file.to_str(), c.mode, c.seal, c.id.as_str()),
            (Some("/g"), NvdimmMode::Direct, false, "nv1")
        );
        // Printing the cold-plug arguments names no QMP socket, even the file's.
        let c = nv(&["--print-qemu-args"]).unwrap();
        assert_eq!(
            (c.action, c.qmp_socket),
            (NvdimmAction::PrintQemuArgs, None)
        );
        std::fs::write(&toml, "attach = true\n").unwrap();
        let e = nv(&[]).unwrap_err();
        assert!(e.to_string().contains("attach"), "{e}");
    }

    #[test]
    fn print_capabilities_is_found_anywhere_before_a_double_dash() {
        let args = |a: &[&str]| {
            std::iter::once(OsString::from("x"))
                .chain(a.iter().map(OsString::from))
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert!(wants_capabilities(args(&["--print-capabilities"])));
        assert!(wants_capabilities(args(&[
            "serve",
            "--bogus",
            "--print-capabilities"
        ])));
        assert!(!wants_capabilities(args(&[
            "serve",
            "--",
            "--print-capabilities"
        ])));
        assert!(!wants_capabilities(args(&["status"])));
        assert_eq!(capabilities()["type"], "pmem");
    }
}
