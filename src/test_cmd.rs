//! `luvisor test`: runs Lua test files and reports in human form, TAP or JUnit XML.
//! The runner itself is `luvisor_lua::testing`; this is the command line around it:
//! choosing the report, Ctrl-C, and the exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use luvisor_lua::testing::{self, report, Cancel, RunReport};

use crate::serve::{signal_name, StopSignals};

/// Exit code of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// A line per test, then the failures with their diffs, then the totals.
    Human,
    /// TAP version 13, for TAP consumers (prove, tappy, CI plugins).
    Tap,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Colour {
    /// Colour when standard output is a terminal and NO_COLOR is not set.
    Auto,
    Always,
    Never,
}

/// What `luvisor test` was asked to do.
pub struct Options {
    pub paths: Vec<PathBuf>,
    pub jobs: usize,
    pub filter: Option<String>,
    pub format: Format,
    pub junit: Option<PathBuf>,
    pub isolate: bool,
    pub verbose: bool,
    pub colour: Colour,
}

pub fn run(options: Options) -> ExitCode {
    let paths = if options.paths.is_empty() {
        vec![PathBuf::from("tests")]
    } else {
        options.paths.clone()
    };
    let files = match testing::find_files(&paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("luvisor test: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(pattern) = &options.filter {
        if let Err(e) = testing::check_filter(pattern) {
            eprintln!("luvisor test: {e}");
            return ExitCode::from(2);
        }
    }
    // The JUnit file is named relative to where luvisor started, whatever directory the
    // tests run in.
    let junit = options
        .junit
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));

    // Before any other thread starts: only the signal thread takes SIGINT and SIGTERM.
    let signals = StopSignals::block();
    let cancel = Cancel::new();
    let on_signal = cancel.clone();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let first = signals.wait();
            eprintln!(
                "\nluvisor test: {} received: stopping the tests and cleaning up \
                 (again to exit at once)",
                signal_name(first)
            );
            on_signal.cancel();
            let second = signals.wait();
            eprintln!(
                "luvisor test: {} received again: exiting without cleaning up",
                signal_name(second)
            );
            std::process::exit(i32::from(INTERRUPTED));
        });
    if let Err(e) = spawned {
        eprintln!("luvisor test: cannot start the signal thread: {e}");
        return ExitCode::FAILURE;
    }

    let run_options = testing::Options {
        jobs: options.jobs,
        filter: options.filter.clone(),
        isolate: options.isolate,
        cancel,
        setup: None,
    };
    let stdout = std::io::stdout();
    let colour = match options.colour {
        Colour::Always => true,
        Colour::Never => false,
        Colour::Auto => stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let result: RunReport = match options.format {
        Format::Human => {
            let mut human = report::human::Human::new(stdout.lock(), colour, options.verbose);
            let result = testing::run(&files, &run_options, &mut human);
            human.finish(&result);
            result
        }
        Format::Tap => {
            let mut tap = report::tap::Tap::new(stdout.lock(), options.verbose);
            let result = testing::run(&files, &run_options, &mut tap);
            tap.finish(&result);
            result
        }
    };
    for warning in &result.warnings {
        eprintln!("luvisor test: {warning}");
    }
    let mut junit_written = true;
    if let Some(path) = &junit {
        if let Err(e) = std::fs::write(path, report::junit::render(&result)) {
            eprintln!(
                "luvisor test: cannot write the JUnit report {}: {e}",
                path.display()
            );
            junit_written = false;
        }
    }
    if result.interrupted {
        ExitCode::from(INTERRUPTED)
    } else if result.success() && junit_written {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
