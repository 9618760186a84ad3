// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of vhost-device-pmem. Parses, dispatches, logs the error and exits 1.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use log::error;
use vhost_device_pmem::{
    config::{Config, ServeArgs},
    control,
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
    Serve(ServeArgs),
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
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::try_from(args).map_err(|e| e.to_string())?;
            vhost_device_pmem::serve(config).map_err(|e| e.to_string())
        }
        Command::Status { control_socket } => print_call(&control_socket, control::Request::Status),
        Command::Stats { control_socket } => print_call(&control_socket, control::Request::Stats),
    }
}

fn print_call(sock: &std::path::Path, req: control::Request) -> Result<(), String> {
    let answer = control::call(sock, &req).map_err(|e| format!("{}: {e}", sock.display()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    if answer["ok"] == true {
        Ok(())
    } else {
        Err(answer["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_string())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
