//! The default report: a line per test as it ends (✓ passed, ✗ failed, - pending, with
//! its time), then every failure with where it happened and what differed, then the
//! totals. Colour only when asked (on a terminal).

use std::io::Write;

use super::{human_time, Reporter};
use crate::testing::{FileReport, Outcome, RunReport, TestResult};

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

pub struct Human<W: Write> {
    out: W,
    colour: bool,
    verbose: bool,
    /// The failed tests so far, with their files, for the failures section.
    failures: Vec<(String, TestResult)>,
}

impl<W: Write> Human<W> {
    /// `colour`: use ANSI colours; `verbose`: show what every test printed, and Lua
    /// tracebacks of errors.
    pub fn new(out: W, colour: bool, verbose: bool) -> Human<W> {
        Human {
            out,
            colour,
            verbose,
            failures: Vec::new(),
        }
    }

    fn paint(&self, style: &str, text: &str) -> String {
        if self.colour {
            format!("{style}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    /// The failures section and the totals.
    pub fn finish(&mut self, report: &RunReport) {
        let failures = std::mem::take(&mut self.failures);
        if !failures.is_empty() {
            let _ = writeln!(self.out, "\n{}", self.paint(BOLD, "Failures:"));
        }
        for (n, (file, test)) in failures.iter().enumerate() {
            let Outcome::Failed(failure) = &test.outcome else {
                continue;
            };
            let title = if test.name == *file {
                file.clone()
            } else {
                format!("{file}: {}", test.name)
            };
            let _ = writeln!(
                self.out,
                "\n{}",
                self.paint(&format!("{BOLD}{RED}"), &format!("{}) {title}", n + 1))
            );
            let mut lines: Vec<String> = Vec::new();
            if let Some(phase) = &failure.phase {
                lines.push(format!("in {phase}"));
            }
            match failure.stack.split_first() {
                Some((first, rest)) => {
                    lines.push(format!("at {first}"));
                    lines.extend(rest.iter().map(|f| format!("   from {f}")));
                }
                None => {
                    if let Some(at) = &failure.location {
                        lines.push(format!("at {at}"));
                    }
                }
            }
            for line in failure.message.lines() {
                lines.push(self.paint(BOLD, line));
            }
            if let Some(diff) = &failure.diff {
                for line in diff.lines() {
                    let styled = if line.starts_with("- ") {
                        self.paint(RED, line)
                    } else if line.starts_with("+ ") {
                        self.paint(GREEN, line)
                    } else if line.starts_with("@@") {
                        self.paint(DIM, line)
                    } else {
                        line.to_string()
                    };
                    lines.push(styled);
                }
            }
            for also in &failure.also {
                lines.push(format!("also: {also}"));
            }
            if !test.output.is_empty() {
                lines.push(self.paint(DIM, "output:"));
                lines.extend(test.output.lines().map(|l| format!("  {l}")));
            }
            if self.verbose {
                if let Some(traceback) = &failure.traceback {
                    lines.extend(traceback.lines().map(str::to_string));
                }
            }
            for line in lines {
                let _ = writeln!(self.out, "   {line}");
            }
        }
        let counts = report.counts();
        let _ = writeln!(self.out);
        let mut totals = vec![
            self.paint(GREEN, &format!("{} passed", counts.passed)),
            if counts.failed > 0 {
                self.paint(
                    &format!("{BOLD}{RED}"),
                    &format!("{} failed", counts.failed),
                )
            } else {
                format!("{} failed", counts.failed)
            },
        ];
        if counts.pending > 0 {
            totals.push(self.paint(YELLOW, &format!("{} skipped", counts.pending)));
        }
        let _ = writeln!(self.out, "{}", totals.join(", "));
        let files = report.files.len();
        let mut closing = format!(
            "{files} file{} in {}",
            if files == 1 { "" } else { "s" },
            human_time(report.time)
        );
        if counts.pending > 0 {
            closing.push_str("; skipped tests are pending");
        }
        let _ = writeln!(self.out, "{}", self.paint(DIM, &closing));
        if report.interrupted {
            let _ = writeln!(
                self.out,
                "{}",
                self.paint(
                    &format!("{BOLD}{RED}"),
                    "interrupted: the run was stopped before every test ran; what the \
                     tests made was cleaned up"
                )
            );
        } else if counts.total() == 0 {
            let _ = writeln!(self.out, "no test ran: nothing matched");
        }
        let _ = self.out.flush();
    }
}

impl<W: Write> Reporter for Human<W> {
    fn file_started(&mut self, path: &str) {
        let _ = writeln!(self.out, "{}", self.paint(BOLD, path));
        let _ = self.out.flush();
    }

    fn test_finished(&mut self, path: &str, test: &TestResult) {
        let time = self.paint(DIM, &format!("({})", human_time(test.time)));
        let line = match &test.outcome {
            Outcome::Passed => format!("{} {} {time}", self.paint(GREEN, "✓"), test.name),
            Outcome::Failed(_) => {
                self.failures.push((path.to_string(), test.clone()));
                format!("{} {time}", self.paint(RED, &format!("✗ {}", test.name)))
            }
            Outcome::Pending(reason) => {
                let why = match reason {
                    Some(reason) => format!("(pending: {reason})"),
                    None => "(pending)".into(),
                };
                format!(
                    "{} {}",
                    self.paint(YELLOW, &format!("- {}", test.name)),
                    self.paint(DIM, &why)
                )
            }
        };
        let _ = writeln!(self.out, "  {line}");
        if self.verbose && !test.output.is_empty() {
            for l in test.output.lines() {
                let _ = writeln!(self.out, "      {}", self.paint(DIM, l));
            }
        }
        let _ = self.out.flush();
    }

    fn file_finished(&mut self, report: &FileReport) {
        if self.verbose && !report.output.is_empty() {
            let _ = writeln!(
                self.out,
                "  {}",
                self.paint(DIM, "printed outside the tests:")
            );
            for l in report.output.lines() {
                let _ = writeln!(self.out, "      {}", self.paint(DIM, l));
            }
        }
    }
}
