//! `luvisor`: the command line. It parses arguments and dispatches; the work happens in
//! `luvisor-lua` (scripts, REPL helpers) and `luvisor-runtime` (the VMM).

mod doctor;
mod logging;
mod policy_cmd;
mod repl;
mod serve;
mod test_cmd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use luvisor_runtime::Registry;

#[derive(Parser)]
#[command(
    name = "luvisor",
    version,
    about = "A virtualization runtime on Linux KVM, driven by Lua",
    long_about = "luvisor runs virtual machines on Linux KVM. VMs, their memory and their \
                  consoles are Lua objects: scripts create, drive and check them through the \
                  `hv` module.\n\nExamples:\n  luvisor run examples/quickstart.lua\n  \
                  luvisor run -i lab.lua\n  \
                  luvisor repl\n  luvisor repl --connect 10.0.0.2:7001 --key-file KEY\n  \
                  luvisor doctor\n  \
                  luvisor serve lab.lua --policies policies/\n  \
                  luvisor test tests/ --format tap --junit report.xml\n  \
                  luvisor completions bash > /etc/bash_completion.d/luvisor"
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
    /// `-e CODE` runs CODE first (repeatable, in order, as in `lua -e`); `-i` then enters
    /// the REPL with the globals the code left. A script error prints the message with a
    /// traceback and exits 1; `os.exit(n)` exits n. Every VM the script started is stopped
    /// on any exit.
    #[command(after_help = "Examples:\n  luvisor run examples/quickstart.lua\n  \
                            luvisor run -e 'print(hv.version)'\n  \
                            luvisor run -i lab.lua        # then explore the lab's VMs at the prompt\n  \
                            cat test.lua | luvisor run - arg1")]
    Run {
        /// Run CODE before the script; may be given several times.
        #[arg(short = 'e', value_name = "CODE", allow_hyphen_values = true)]
        code: Vec<String>,
        /// After the code and the script ran, enter the REPL with their globals.
        #[arg(short = 'i')]
        interactive: bool,
        /// The Lua script to run; `-` reads it from standard input. Needed unless -e or
        /// -i is given.
        #[arg(required_unless_present_any = ["code", "interactive"])]
        script: Option<PathBuf>,
        /// Arguments for the script (`arg[1]`, `arg[2]`, ... and `...`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// An interactive Lua prompt with the `hv` module loaded.
    ///
    /// Expressions print their values; an incomplete chunk continues on the next line; Tab
    /// completes global names and the fields and methods of `a.b.` and `a:`. Ctrl-C
    /// cancels the current input or interrupts a running chunk, waits on VMs included;
    /// Ctrl-D exits and stops every VM. History is kept in
    /// $XDG_STATE_HOME/luvisor/history (default ~/.local/state/luvisor/history). With
    /// input piped in, nothing goes into the history, and the exit code is 1 if any
    /// chunk failed.
    ///
    /// With `--connect ADDR --key-file KEY`, the prompt is the same local one, with the
    /// global `host` bound to `hv.connect(ADDR, { key_file = KEY })`: a handle on that
    /// `luvisor serve --listen` host (`host:vms()`, `host:vm(name)`, `host:info()`,
    /// `host:policies()`). `hv` itself stays local. See docs/remote.md.
    #[command(after_help = "Examples:\n  luvisor repl\n  \
                            luvisor repl --connect 10.0.0.2:7001 --key-file /etc/luvisor/key")]
    Repl {
        /// Connect to the luvisor host at ADDR (host:port) and bind it to the global `host`.
        #[arg(long, value_name = "ADDR", requires = "key_file")]
        connect: Option<String>,
        /// The key file shared with that host (needed with --connect).
        #[arg(long, value_name = "KEY", requires = "connect")]
        key_file: Option<PathBuf>,
    },
    /// Serve: run the config script, then keep its VMs and the policies running until
    /// SIGTERM or SIGINT.
    ///
    /// CONFIG is a Lua script with the `hv` module, as for `run`; it runs once (defining
    /// and starting VMs), then luvisor serves. `--policies DIR` loads every policy file
    /// of DIR and reloads one when it is saved (see docs/policies.md). The first SIGTERM
    /// or SIGINT stops the policies and every VM and exits 0; a second one exits at once.
    /// A config script that fails exits 1, after stopping the VMs it started.
    /// `--listen ADDR --key-file KEY` receives live migrations from peers holding the
    /// same key (see docs/migration.md); each arrival is printed, and handed to the
    /// config script's `hv.migration.on_arrival` handler if it set one.
    #[command(
        after_help = "Examples:\n  luvisor serve lab.lua --policies policies/\n  \
                            luvisor serve --policies policies/ --record trace.jsonl\n  \
                            luvisor serve --listen 0.0.0.0:7001 --key-file /etc/luvisor/peer.key\n  \
                            luvisor --log-level info --log-format json serve lab.lua"
    )]
    Serve {
        /// A Lua script that defines the VMs to serve (optional).
        #[arg(value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// Load the policies of DIR and reload them when their files change.
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// Write host and VM stats and every policy tick (input and decisions) to TRACE as
        /// JSON lines, for `luvisor policy simulate`.
        #[arg(long, value_name = "TRACE")]
        record: Option<PathBuf>,
        /// Accept authenticated peers on ADDR (e.g. 0.0.0.0:7001, or 127.0.0.1:0 for a
        /// free port): live migrations arrive here. Needs --key-file. The address is
        /// printed once listening.
        #[arg(long, value_name = "ADDR", requires = "key_file")]
        listen: Option<String>,
        /// The pre-shared key peers must hold: a file only its owner can read (mode 600).
        #[arg(long, value_name = "KEY", requires = "listen")]
        key_file: Option<PathBuf>,
    },
    /// Run Lua test files: describe/it suites, or plain scripts that assert.
    ///
    /// Each PATH is a test file, or a directory whose .lua files (recursively, skipping
    /// names that start with '.') are test files; without PATHS, `tests/`. Each file runs
    /// in a fresh Lua state with the `hv` module and its own VM registry, so files never
    /// see each other's VMs.
    ///
    /// A test file declares tests with `describe(name, fn)` (groups, nestable),
    /// `it(name, fn)`, `pending(name[, reason])` (counted, never run; `it` without a
    /// function is pending too), and `before_each(fn)`/`after_each(fn)` (run around every
    /// test of their group and its subgroups: before_each outer to inner, after_each inner
    /// to outer, even when the test failed). A test's full name is its groups' names and
    /// its own, joined by spaces. Assertions: `assert.equal(expected, actual)` (deep for
    /// tables; a diff path by path, a line diff for multi-line strings), `not_equal`,
    /// `truthy`, `falsy`, `error(fn[, pattern])`, `error_contains(fn, text)`,
    /// `match(pattern, s)`, `contains(text, s)`, `fail(message)`; plain `assert(v, msg)`
    /// works as in Lua. Failures say file:line. `print` output is kept per test and shown
    /// with its failure. A file that calls none of these is one test, named by its path,
    /// that passes if the file runs without error.
    ///
    /// Cleanup: every VM created during a test is destroyed when the test ends, pass or
    /// fail, and so is every overlay made with hv.disk.overlay (and whatever else an hv
    /// object registers, such as labs); what the file's top level made goes when the file
    /// ends. Ctrl-C (SIGINT) or SIGTERM stops the running tests, cleans up the same way and
    /// exits 130; a second one exits at once.
    ///
    /// Output: a line per test (✓, ✗ or - for pending, with its time), then each failure
    /// with its location, message and diff, then the totals ("N passed, N failed, N
    /// skipped"); colour only on a terminal. `--format tap` writes TAP version 13 instead
    /// (failures carry YAML diagnostics, pending tests are `# SKIP`). `--junit FILE`
    /// also writes JUnit XML (a testsuite per file, a testcase per test, with failure,
    /// error and skipped elements) for CI servers.
    ///
    /// Exit codes: 0 when every selected test passed (pending ones do not fail a run) and
    /// at least one was selected; 1 when a test failed or none was selected; 2 for a
    /// usage error (no such path, no .lua files, a bad --filter pattern); 130 when
    /// interrupted.
    #[command(after_help = "Examples:\n  luvisor test tests/lua/\n  \
                            luvisor test examples/tests/ --format tap\n  \
                            luvisor test tests/ --jobs 4 --junit report.xml\n  \
                            luvisor test storage.lua --filter 'overlay'\n  \
                            luvisor test --isolate tests/lua/   # each file in its own empty directory")]
    Test {
        /// Test files or directories (default: tests/).
        #[arg(value_name = "PATHS")]
        paths: Vec<PathBuf>,
        /// Run N files at once, each on its own thread (tests of one file always run in
        /// order).
        #[arg(short = 'j', long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Run only the tests whose full name ("describe … it") matches this Lua pattern
        /// (as in string.find). A plain file's test is named by its path. A file's top
        /// level always runs, since that is where its tests are declared.
        #[arg(long, value_name = "PATTERN")]
        filter: Option<String>,
        /// How to report on standard output.
        #[arg(long, value_enum, default_value = "human", value_name = "FORMAT")]
        format: test_cmd::Format,
        /// Also write the results as JUnit XML to FILE.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Run each file in a new empty temporary directory (its working directory,
        /// removed afterwards), so files that write relative paths cannot collide; arg[0]
        /// is then the file's absolute path.
        #[arg(long)]
        isolate: bool,
        /// Show what every test printed (and Lua tracebacks of failures).
        #[arg(short, long)]
        verbose: bool,
        /// When to colour the human output.
        #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
        color: test_cmd::Colour,
    },
    /// Try a policy file without VMs: check it, or replay a recorded trace through it.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Check that this host can run VMs, and explain what kind of KVM it has.
    ///
    /// Opens /dev/kvm, asks it for its API version and the capabilities luvisor needs,
    /// and boots a probe VM. Exits non-zero when no VM can run here.
    Doctor {
        /// Print one JSON object with every check, its status and its values.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for luvisor.
    ///
    /// For example: `luvisor completions bash > ~/.local/share/bash-completion/completions/luvisor`,
    /// or `luvisor completions zsh > ~/.zfunc/_luvisor`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff) on standard output.
    ///
    /// Without COMMAND, luvisor(1), which lists the subcommands; with it, that
    /// subcommand's page (luvisor-run(1) for `run`). For example:
    /// `luvisor manpage > luvisor.1 && man ./luvisor.1`.
    Manpage {
        /// A subcommand whose page to print: run, repl, serve, test, policy, doctor,
        /// completions, manpage or guest-elf.
        #[arg(value_name = "COMMAND")]
        command: Option<String>,
    },
    /// Write the built-in test guest's ELF image to PATH.
    ///
    /// The image `hv.guest.builtin{}` boots. It also carries a PVH entry, so QEMU boots
    /// the same guest: `qemu-system-x86_64 -M microvm -enable-kvm -kernel PATH -append
    /// 'hello; exit 0' -device isa-debug-exit,iobase=0x500,iosize=4 -serial stdio ...`
    /// (see guest/README.md, "Running under QEMU").
    #[command(after_help = "Example:\n  luvisor guest-elf /tmp/guest.elf")]
    GuestElf {
        /// Where to write the image (an existing file is replaced).
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load a policy and run one tick against a sample host with three VMs.
    ///
    /// Prints the policy's name, interval and the decisions of that tick; exits 1 with the
    /// error (file and line) when the file does not load or the tick fails.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Replay a trace recorded by `luvisor serve --record` through a policy.
    ///
    /// Replays the trace's ticks of the policy with the same name (or, when there are
    /// none, every recorded sample) and prints each tick's decisions, then a summary on
    /// stderr: the tick cost, and whether each tick decided what the recording did.
    Simulate {
        /// The policy file.
        file: PathBuf,
        /// The trace (JSON lines).
        #[arg(long, value_name = "TRACE")]
        trace: PathBuf,
        /// Print each tick as one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit 1 when a tick decides differently from the recording.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    let registry = Arc::new(Registry::new());
    let code = match cli.command {
        Command::Run {
            code,
            interactive,
            script,
            args,
        } => {
            if interactive && script.as_deref() == Some(Path::new("-")) {
                usage_error(
                    "run",
                    clap::error::ErrorKind::ArgumentConflict,
                    "-i reads the prompt's input from standard input, so the script cannot \
                     come from it too ('-'); give the script as a file",
                );
            }
            run(&registry, &code, script.as_deref(), &args, interactive)
        }
        Command::Repl { connect, key_file } => repl::run(
            registry.clone(),
            connect.as_deref().zip(key_file.as_deref()),
        ),
        Command::Serve {
            config,
            policies,
            record,
            listen,
            key_file,
        } => serve::run(
            &registry,
            serve::Options {
                config: config.as_deref(),
                policies: policies.as_deref(),
                record: record.as_deref(),
                listen: listen.as_deref().zip(key_file.as_deref()),
            },
        ),
        Command::Test {
            paths,
            jobs,
            filter,
            format,
            junit,
            isolate,
            verbose,
            color,
        } => test_cmd::run(test_cmd::Options {
            paths,
            jobs: usize::from(jobs),
            filter,
            format,
            junit,
            isolate,
            verbose,
            colour: color,
        }),
        Command::Policy(PolicyCommand::Check { file }) => policy_cmd::check(&file),
        Command::Policy(PolicyCommand::Simulate {
            file,
            trace,
            json,
            check,
        }) => policy_cmd::simulate(&file, &trace, json, check),
        Command::Doctor { json } => doctor::run(json),
        Command::Completions { shell } => completions(shell),
        Command::Manpage { command } => manpage(command.as_deref()),
        Command::GuestElf { path } => guest_elf(&path),
    };
    luvisor_lua::policy::shutdown(&registry);
    // Pools and labs remove their VMs' overlay files; stopping alone would leave them.
    luvisor_runtime::pool::shutdown(&registry);
    luvisor_runtime::lab::destroy_all();
    registry.stop_all();
    code
}

/// Exits with clap's usage error (code 2) for `subcommand`.
fn usage_error(subcommand: &str, kind: clap::error::ErrorKind, message: &str) -> ! {
    let mut command = Cli::command();
    command.build();
    match command.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(kind, message).exit(),
        None => command.error(kind, message).exit(),
    }
}

/// `luvisor run`: the -e code in order, then the script, then (with -i) the REPL.
fn run(
    registry: &Arc<Registry>,
    code: &[String],
    script: Option<&Path>,
    args: &[String],
    interactive: bool,
) -> ExitCode {
    let lua = match luvisor_lua::new_user_state(registry.clone()) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("luvisor: cannot set up Lua: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = (|| {
        // `arg` is there for -e code too, as in `lua`.
        luvisor_lua::script::set_arg(&lua, script, args)?;
        for chunk in code {
            luvisor_lua::script::run_code(&lua, chunk)?;
        }
        match script {
            Some(script) => luvisor_lua::script::run_file(&lua, script, args),
            None => Ok(()),
        }
    })();
    match result {
        Err(message) => {
            eprintln!("luvisor: {message}");
            ExitCode::FAILURE
        }
        Ok(()) if interactive => repl::interact(&lua),
        Ok(()) => ExitCode::SUCCESS,
    }
}

/// `luvisor completions SHELL`: the completion script on standard output.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap_complete::Generator;
    let mut command = Cli::command();
    command.set_bin_name("luvisor");
    command.build();
    let mut out = std::io::stdout().lock();
    // try_generate, not generate: a closed pipe must be an error message, not a panic.
    match shell
        .try_generate(&command, &mut out)
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luvisor: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `luvisor guest-elf PATH`: the embedded guest image, for booting it elsewhere (QEMU).
fn guest_elf(path: &Path) -> ExitCode {
    match std::fs::write(path, luvisor_runtime::boot::builtin::GUEST_ELF) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "luvisor: cannot write the built-in guest image to {}: {e}",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// `luvisor manpage [COMMAND]`: luvisor(1), or luvisor-COMMAND(1).
fn manpage(subcommand: Option<&str>) -> ExitCode {
    // Building names the subcommands `luvisor-run` etc., as their pages are called.
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => match command.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                let names: Vec<&str> = command.get_subcommands().map(|s| s.get_name()).collect();
                usage_error(
                    "manpage",
                    clap::error::ErrorKind::InvalidValue,
                    &format!(
                        "there is no subcommand '{name}'; pages exist for: {}",
                        names.join(", ")
                    ),
                );
            }
        },
    };
    let mut out = std::io::stdout().lock();
    let result = clap_mangen::Man::new(page)
        .source(format!("luvisor {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)
        .and_then(|()| out.flush());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luvisor: cannot write the manual page: {e}");
            ExitCode::FAILURE
        }
    }
}
