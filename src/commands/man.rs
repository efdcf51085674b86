//! `jobrun man`: manual pages from the command line's own definitions, so
//! they cannot drift from `--help`. The main page lists the commands and
//! refers to their pages (`jobrun-run(1)`); `--dir` writes all of them, and
//! `jobrun man COMMAND` prints one.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::CommandFactory;

use crate::cli::{Cli, ManArgs};
use crate::commands::Status;

pub fn run(args: ManArgs) -> Result<Status> {
    let command = documented_command();
    match (args.dir, args.command) {
        (Some(dir), _) => write_pages(&command, &dir)?,
        (None, Some(name)) => {
            let Some(sub) = command.find_subcommand(&name) else {
                bail!(
                    "there is no command {name:?}; pages exist for: {}",
                    subcommand_names(&command).join(", ")
                );
            };
            subcommand_page(sub).render(&mut std::io::stdout().lock())?;
        }
        (None, None) => main_page(&command, &mut std::io::stdout().lock())?,
    }
    Ok(Status::Success)
}

/// The command line as the pages describe it: built, so that subcommands
/// carry their `jobrun-NAME` names, and without clap's `help` command,
/// which has no page of its own.
fn documented_command() -> clap::Command {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    command
}

fn subcommand_names(command: &clap::Command) -> Vec<&str> {
    command.get_subcommands().map(|s| s.get_name()).collect()
}

/// jobrun.1: clap's page, and a SEE ALSO that names every command's page.
fn main_page(command: &clap::Command, out: &mut impl Write) -> Result<()> {
    clap_mangen::Man::new(command.clone()).render(out)?;
    let pages: Vec<String> = subcommand_names(command)
        .iter()
        .map(|name| format!("\\fBjobrun\\-{name}\\fR(1)"))
        .collect();
    writeln!(out, ".SH \"SEE ALSO\"\n{}", pages.join(",\n"))?;
    out.flush()?;
    Ok(())
}

/// The page of one command, titled `jobrun-NAME` as the main page names it.
fn subcommand_page(sub: &clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(sub.clone()).source(concat!("jobrun ", env!("CARGO_PKG_VERSION")))
}

/// jobrun.1 and jobrun-COMMAND.1 for every command.
fn write_pages(command: &clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the folder {}", dir.display()))?;
    let cannot_write = |name: &str| format!("cannot write {}", dir.join(name).display());
    let main = dir.join("jobrun.1");
    let mut file = std::fs::File::create(&main).with_context(|| cannot_write("jobrun.1"))?;
    main_page(command, &mut file).with_context(|| cannot_write("jobrun.1"))?;
    for sub in command.get_subcommands() {
        let page = subcommand_page(sub);
        page.generate_to(dir)
            .with_context(|| cannot_write(&page.get_filename()))?;
    }
    tracing::info!(
        "{} manual pages written to {}",
        1 + command.get_subcommands().count(),
        dir.display()
    );
    Ok(())
}
