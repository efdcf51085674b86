//! The `jobrun` command: parses the command line, runs the command and
//! turns how it ended into the exit status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = jobrun::cli::Cli::parse();
    jobrun::log::init(cli.verbose, cli.quiet, cli.log_format);
    jobrun::run(cli).into()
}
