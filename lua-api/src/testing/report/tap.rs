//! TAP version 13: one test point per test, numbered across the whole run, a `# file`
//! comment before each file's tests, YAML diagnostics under each failure, pending tests
//! as `# SKIP`, and the plan at the end (`1..N`), followed by `Bail out!` when the run
//! was interrupted.
//!
//! The YAML uses only mappings, integers, numbers and double-quoted strings (escaped,
//! so multi-line values such as diffs are one line with `\n`), which both full YAML
//! parsers and the "YAMLish" subset of Perl's TAP::Parser read the same way. (YAMLish
//! misreads list items that contain ": ", and block scalars that start with spaces.)

use std::fmt::Write as _;
use std::io::Write;

use super::{split_location, Reporter};
use crate::testing::{Counts, Outcome, RunReport, TestResult};

pub struct Tap<W: Write> {
    out: W,
    number: usize,
    /// Show what passing tests printed too, as comments.
    verbose: bool,
}

impl<W: Write> Tap<W> {
    /// Writes the version line.
    pub fn new(mut out: W, verbose: bool) -> Tap<W> {
        let _ = writeln!(out, "TAP version 13");
        Tap {
            out,
            number: 0,
            verbose,
        }
    }

    /// The plan, the totals as a comment, and `Bail out!` for an interrupted run.
    pub fn finish(&mut self, report: &RunReport) {
        let _ = writeln!(self.out, "1..{}", self.number);
        let Counts {
            passed,
            failed,
            pending,
        } = report.counts();
        let _ = writeln!(
            self.out,
            "# {passed} passed, {failed} failed, {pending} skipped"
        );
        if report.interrupted {
            let _ = writeln!(self.out, "Bail out! interrupted: not every test ran");
        }
        let _ = self.out.flush();
    }
}

/// A test point's description: no newlines, `#` and `\` escaped.
fn description(name: &str) -> String {
    name.replace('\\', "\\\\")
        .replace('#', "\\#")
        .replace(['\n', '\r'], " ")
}

/// A YAML double-quoted string (also valid for TAP::Parser's YAMLish reader).
pub fn yaml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn yaml_lines(out: &mut String, key: &str, text: &str) {
    let _ = writeln!(out, "  {key}: {}", yaml_string(text));
}

/// The YAML block of a test: for a failure, what and where; for every test, its time.
fn diagnostics(test: &TestResult) -> String {
    let mut y = String::from("  ---\n");
    if let Outcome::Failed(f) = &test.outcome {
        let _ = writeln!(y, "  message: {}", yaml_string(&f.message));
        let _ = writeln!(y, "  severity: fail");
        let _ = writeln!(y, "  type: {}", f.kind.as_str());
        if let Some(phase) = &f.phase {
            let _ = writeln!(y, "  phase: {}", yaml_string(phase));
        }
        if let Some((file, line)) = f.location.as_deref().and_then(split_location) {
            let _ = writeln!(
                y,
                "  at:\n    file: {}\n    line: {line}",
                yaml_string(file)
            );
        }
        if f.stack.len() > 1 {
            yaml_lines(&mut y, "stack", &f.stack.join("\n"));
        }
        if let Some(expected) = &f.expected {
            let _ = writeln!(y, "  expected: {}", yaml_string(expected));
        }
        if let Some(actual) = &f.actual {
            let _ = writeln!(y, "  actual: {}", yaml_string(actual));
        }
        if let Some(diff) = &f.diff {
            yaml_lines(&mut y, "diff", diff);
        }
        if !f.also.is_empty() {
            yaml_lines(&mut y, "also", &f.also.join("\n"));
        }
        if !test.output.is_empty() {
            yaml_lines(&mut y, "output", &test.output);
        }
    }
    let _ = writeln!(y, "  duration_ms: {:.3}", test.time.as_secs_f64() * 1000.0);
    y.push_str("  ...\n");
    y
}

impl<W: Write> Reporter for Tap<W> {
    fn file_started(&mut self, path: &str) {
        let _ = writeln!(self.out, "# {}", path.replace('\n', " "));
    }

    fn test_finished(&mut self, _path: &str, test: &TestResult) {
        self.number += 1;
        let n = self.number;
        let name = description(&test.name);
        let text = match &test.outcome {
            Outcome::Passed => {
                let mut text = String::new();
                if self.verbose {
                    for line in test.output.lines() {
                        let _ = writeln!(text, "# {line}");
                    }
                }
                let _ = writeln!(text, "ok {n} - {name}");
                text
            }
            Outcome::Pending(reason) => {
                let why = match reason {
                    Some(reason) => format!("pending: {}", reason.replace('\n', " ")),
                    None => "pending".into(),
                };
                format!("ok {n} - {name} # SKIP {why}\n")
            }
            Outcome::Failed(_) => format!("not ok {n} - {name}\n{}", diagnostics(test)),
        };
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{Failure, FailureKind};

    #[test]
    fn descriptions_and_strings_are_escaped() {
        assert_eq!(description("a # b\\c\nd"), "a \\# b\\\\c d");
        assert_eq!(
            yaml_string("say \"hi\"\n\t\u{1}é"),
            "\"say \\\"hi\\\"\\n\\t\\x01é\""
        );
    }

    #[test]
    fn a_failure_has_yaml_diagnostics() {
        let mut failure = Failure::new(FailureKind::Assertion, "tables differ at 1 path");
        failure.location = Some("t.lua:7".into());
        failure.stack = vec!["t.lua:7".into()];
        failure.diff = Some(".x: expected 1, got 2".into());
        let test = TestResult {
            name: "a # b".into(),
            outcome: Outcome::Failed(failure),
            time: std::time::Duration::from_millis(2),
            output: "hello\n".into(),
            location: None,
        };
        let mut tap = Tap::new(Vec::new(), false);
        tap.test_finished("t.lua", &test);
        let text = String::from_utf8(tap.out).unwrap();
        assert_eq!(
            text,
            "TAP version 13\nnot ok 1 - a \\# b\n  ---\n  message: \"tables differ at 1 path\"\n  \
             severity: fail\n  type: assertion\n  at:\n    file: \"t.lua\"\n    line: 7\n  diff: \
             \".x: expected 1, got 2\"\n  output: \"hello\\n\"\n  duration_ms: 2.000\n  ...\n"
        );
    }
}
