//! JUnit XML, the form CI servers (Jenkins, GitLab, GitHub actions' reporters) read:
//!
//! ```xml
//! <testsuites name="luvisor test" tests=".." failures=".." errors=".." skipped=".." time="..">
//!   <testsuite name="FILE" tests=".." failures=".." errors=".." skipped=".." time=".."
//!              timestamp="2025-01-31T12:00:00" hostname="..">
//!     <testcase name="describe … it" classname="dir.file" time="0.012"/>
//!     <testcase ...><failure message="first line" type="assertion">details</failure></testcase>
//!     <testcase ...><error message="..." type="error">details</error></testcase>
//!     <testcase ...><skipped message="pending"/></testcase>
//!     <system-out>what the file's top level printed</system-out>
//!   </testsuite>
//! </testsuites>
//! ```
//!
//! One testsuite per file. A failed assertion is a `failure`; any other error (an
//! `error()`, a failing `hv` call, an interrupted test, a failed cleanup) is an `error`.
//! What a test printed is its `system-out`. `tests/junit.xsd` is the schema.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::testing::{Counts, FailureKind, FileReport, Outcome, RunReport};

/// Text with XML's special characters escaped and characters XML cannot hold (most
/// control characters) written as `\xNN`. In attributes, line breaks and tabs are kept
/// as character references.
fn escape(text: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\r' if attribute => out.push_str("&#13;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\n' | '\r' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || matches!(c as u32, 0xfffe | 0xffff) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn seconds(time: std::time::Duration) -> String {
    format!("{:.3}", time.as_secs_f64())
}

/// `tests/lua/storage.lua` → `tests.lua.storage`.
fn classname(path: &str) -> String {
    let path = path.strip_prefix("./").unwrap_or(path);
    let path = path.strip_suffix(".lua").unwrap_or(path);
    path.trim_start_matches('/').replace('/', ".")
}

/// UTC, as xs:dateTime without a zone: "2025-01-31T12:00:00".
fn timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// (tests, failures, errors, skipped) of some tests.
fn tally(files: &[&FileReport]) -> (usize, usize, usize, usize) {
    let counts = Counts::of(files.iter().flat_map(|f| &f.tests));
    let errors = files
        .iter()
        .flat_map(|f| &f.tests)
        .filter(|t| matches!(&t.outcome, Outcome::Failed(f) if f.kind != FailureKind::Assertion))
        .count();
    (
        counts.total(),
        counts.failed - errors,
        errors,
        counts.pending,
    )
}

/// The whole run as a JUnit XML document.
pub fn render(report: &RunReport) -> String {
    let host = hostname();
    let all: Vec<&FileReport> = report.files.iter().collect();
    let (tests, failures, errors, skipped) = tally(&all);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"luvisor test\" tests=\"{tests}\" failures=\"{failures}\" \
         errors=\"{errors}\" skipped=\"{skipped}\" time=\"{}\">",
        seconds(report.time)
    );
    for file in &report.files {
        let (tests, failures, errors, skipped) = tally(&[file]);
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" \
             skipped=\"{skipped}\" time=\"{}\" timestamp=\"{}\" hostname=\"{}\">",
            escape(&file.path, true),
            seconds(file.time),
            timestamp(file.started),
            escape(&host, true)
        );
        let class = escape(&classname(&file.path), true);
        for test in &file.tests {
            let _ = write!(
                x,
                "    <testcase name=\"{}\" classname=\"{class}\" time=\"{}\"",
                escape(&test.name, true),
                seconds(test.time)
            );
            let mut inner = String::new();
            match &test.outcome {
                Outcome::Passed => {}
                Outcome::Pending(reason) => {
                    let message = match reason {
                        Some(reason) => format!("pending: {reason}"),
                        None => "pending".into(),
                    };
                    let _ = writeln!(
                        inner,
                        "      <skipped message=\"{}\"/>",
                        escape(&message, true)
                    );
                }
                Outcome::Failed(failure) => {
                    let element = if failure.kind == FailureKind::Assertion {
                        "failure"
                    } else {
                        "error"
                    };
                    let first_line = failure.message.lines().next().unwrap_or("");
                    let _ = writeln!(
                        inner,
                        "      <{element} message=\"{}\" type=\"{}\">{}</{element}>",
                        escape(first_line, true),
                        failure.kind.as_str(),
                        escape(&failure.details(), false)
                    );
                }
            }
            if !test.output.is_empty() {
                let _ = writeln!(
                    inner,
                    "      <system-out>{}</system-out>",
                    escape(&test.output, false)
                );
            }
            if inner.is_empty() {
                x.push_str("/>\n");
            } else {
                x.push_str(">\n");
                x.push_str(&inner);
                x.push_str("    </testcase>\n");
            }
        }
        if !file.output.is_empty() {
            let _ = writeln!(
                x,
                "    <system-out>{}</system-out>",
                escape(&file.output, false)
            );
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_xml() {
        assert_eq!(
            escape("a<b & \"c\"\n\u{1}", true),
            "a&lt;b &amp; &quot;c&quot;&#10;\\x01"
        );
        assert_eq!(escape("a<b\n\"\u{1b}", false), "a&lt;b\n\"\\x1b");
    }

    #[test]
    fn classnames_come_from_paths() {
        assert_eq!(classname("tests/lua/storage.lua"), "tests.lua.storage");
        assert_eq!(classname("./x.lua"), "x");
    }

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00");
        let leap_day = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 3661);
        assert_eq!(timestamp(leap_day), "2000-02-29T01:01:01");
    }
}
