//! `vm`: capvm's command-line front end (see the `supervisor` library).

use std::io::{self, IsTerminal};
use std::process::ExitCode;

use clap::Parser;
use supervisor::cli::Cli;
use supervisor::commands::{self, Streams};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        // The detached supervisor's stderr is the guest's vm-bhyve.log: no colour codes there.
        .with_ansi(io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // A reader that went away (`vm list | head -1`) is not worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vm: ERROR: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<bool> {
    let stdout = io::stdout();
    let stdin = io::stdin();
    let mut streams = Streams {
        out: &mut stdout.lock(),
        err: &mut io::stderr(),
        input: &mut stdin.lock(),
    };
    Ok(commands::run(cli, &mut streams)?)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
