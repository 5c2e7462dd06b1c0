//! The `hearth` command: `hearth up` runs a node; the other verbs talk to a running node
//! through its local API.

mod bench;
mod cli;
mod client;
mod verbs;
mod watch;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap exits with status 2 on usage errors by itself.
    let args = cli::Args::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
