// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hidden `generate-docs` subcommand: writes the man pages (one for the command,
//! one per visible subcommand) and the bash, zsh and fish completions from the clap
//! definitions, for the Debian package. Never hand-written text; never installs them.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser;
use clap_complete::Shell;

/// The hidden subcommand's name: `vhost-device-pmem generate-docs --out DIR`.
pub const SUBCOMMAND: &str = "generate-docs";

/// Writes the man pages and shell completions into DIR (`man/`, `completions/`),
/// for the Debian package.
#[derive(Parser, Debug)]
#[command(name = "vhost-device-pmem generate-docs")]
struct Args {
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Runs the hidden subcommand on the rest of the command line; `cmd` is the public
/// command line the pages and completions describe.
pub fn main(cmd: clap::Command) -> ExitCode {
    let args = Args::parse_from(std::env::args_os().skip(1));
    match generate(cmd, &args.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}: {e}", args.out.display());
            ExitCode::FAILURE
        }
    }
}

/// Writes `man/*.1` and `completions/{NAME.bash,_NAME,NAME.fish}` under `out`.
pub fn generate(cmd: clap::Command, out: &Path) -> io::Result<()> {
    let name = cmd.get_name().to_string();
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cmd.clone();
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
    }
    Ok(())
}
