//! The forms results are reported in: [`human`] (the default), [`tap`] (TAP version 13)
//! and [`junit`] (JUnit XML, written once the run is over).

pub mod human;
pub mod junit;
pub mod tap;

use std::time::Duration;

use super::{FileReport, TestResult};

/// Receives results as a run produces them. Each file's calls come together: its
/// `file_started`, its tests, then its `file_finished`.
pub trait Reporter {
    fn file_started(&mut self, _path: &str) {}
    fn test_finished(&mut self, _path: &str, _test: &TestResult) {}
    fn file_finished(&mut self, _report: &FileReport) {}
}

/// A reporter that reports nothing (when only the JUnit file is wanted, or in tests).
pub struct Silent;

impl Reporter for Silent {}

/// A duration for people: "0.4 ms", "12 ms", "1.25 s".
pub fn human_time(time: Duration) -> String {
    let ms = time.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// Splits "file:line" into its parts; `None` when there is no line number.
pub fn split_location(location: &str) -> Option<(&str, u64)> {
    let (file, line) = location.rsplit_once(':')?;
    Some((file, line.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_well() {
        assert_eq!(human_time(Duration::from_micros(420)), "0.4 ms");
        assert_eq!(human_time(Duration::from_millis(12)), "12 ms");
        assert_eq!(human_time(Duration::from_millis(1250)), "1.25 s");
    }

    #[test]
    fn locations_split_at_the_last_colon() {
        assert_eq!(split_location("a:b/x.lua:12"), Some(("a:b/x.lua", 12)));
        assert_eq!(split_location("x.lua"), None);
    }
}
