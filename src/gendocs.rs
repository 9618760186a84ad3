// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hidden `generate-docs` subcommand: writes the man pages (one for the command,
//! one per visible subcommand), the bash, zsh and fish completions and the Markdown
//! command reference (`docs/cli.md` in the tree) from the clap definitions. Never
//! hand-written text; never installs them.

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
/// for the Debian package, and the command reference (`cli.md`).
#[derive(Parser, Debug)]
#[command(name = "vhost-device-pmem generate-docs")]
struct Args {
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// The file name of the Markdown reference, in `--out DIR` and in `docs/`.
pub const REFERENCE: &str = "cli.md";

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
    fs::write(out.join(REFERENCE), markdown(cmd))
}

/// The command reference in Markdown: the `--help` text of the command and of every
/// visible subcommand, depth first, each under its own heading. Plain text (no
/// terminal styles) and no wrapping but clap's own, so the output does not depend on
/// the terminal it is made on.
pub fn markdown(cmd: clap::Command) -> String {
    let mut cmd = cmd.color(clap::ColorChoice::Never);
    cmd.build();
    let mut out = String::from(
        "<!-- SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause -->\n\
         <!-- Generated from the clap definitions by `vhost-device-pmem generate-docs \
         --out DIR` (DIR/cli.md); do not edit. tests/cli_reference.rs checks it is current. -->\n\n\
         # Command reference\n\n\
         Every command's `--help`, as the binary prints it. The exit statuses are in the \
         README; the options' background is in [reference.md](reference.md).\n",
    );
    section(&mut out, &cmd, cmd.get_name().to_string());
    out
}

fn section(out: &mut String, cmd: &clap::Command, path: String) {
    let mut cmd = cmd.clone();
    let help = cmd.render_long_help().to_string();
    out.push_str(&format!(
        "\n## `{path}`\n\n```text\n{}\n```\n",
        help.trim_end()
    ));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        section(out, sub, format!("{path} {}", sub.get_name()));
    }
}
