//! `luvisor`: the command line. It parses arguments and dispatches; the work happens in
//! `luvisor-lua` (scripts, REPL helpers) and `luvisor-runtime` (the VMM).

mod doctor;
mod logging;
mod repl;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use luvisor_runtime::Registry;

#[derive(Parser)]
#[command(
    name = "luvisor",
    version,
    about = "A virtualization runtime on Linux KVM, driven by Lua",
    long_about = "luvisor runs virtual machines on Linux KVM. VMs, their memory and their \
                  consoles are Lua objects: scripts create, drive and check them through the \
                  `hv` module.\n\nExamples:\n  luvisor run examples/quickstart.lua\n  \
                  luvisor repl\n  luvisor doctor"
)]
struct Cli {
    /// Log level for messages on stderr: error, warn, info, debug or trace. RUST_LOG,
    /// when set, takes precedence and accepts per-module filters.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: logging::Level,

    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_name = "FORMAT")]
    log_format: logging::Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Lua script with the `hv` module; `arg` is set as in `lua`.
    ///
    /// A script error prints the message with a traceback and exits 1; `os.exit(n)`
    /// exits n. Every VM the script started is stopped on any exit.
    Run {
        /// The Lua script to run; `-` reads it from standard input.
        script: PathBuf,
        /// Arguments for the script (`arg[1]`, `arg[2]`, ... and `...`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// An interactive Lua prompt with the `hv` module loaded.
    ///
    /// Expressions print their values; an incomplete chunk continues on the next line.
    /// Ctrl-C cancels the current input or interrupts a running chunk, waits on VMs
    /// included; Ctrl-D exits and stops every VM.
    Repl,
    /// Check that this host can run VMs, and explain what kind of KVM it has.
    ///
    /// Exits non-zero when no VM can run here.
    Doctor,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    let registry = Arc::new(Registry::new());
    let code = match cli.command {
        Command::Run { script, args } => run(&registry, &script, &args),
        Command::Repl => repl::run(registry.clone()),
        Command::Doctor => doctor::run(),
    };
    registry.stop_all();
    code
}

fn run(registry: &Arc<Registry>, script: &std::path::Path, args: &[String]) -> ExitCode {
    let lua = match luvisor_lua::new_user_state(registry.clone()) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("luvisor: cannot set up Lua: {e}");
            return ExitCode::FAILURE;
        }
    };
    match luvisor_lua::script::run_file(&lua, script, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("luvisor: {message}");
            ExitCode::FAILURE
        }
    }
}
