//! `luvisor test`: runs Lua test files written with `describe`/`it` (or plain scripts that
//! assert), each in a fresh Lua state with its own [`Registry`], and reports the results.
//!
//! - [`find_files`] turns the command line's paths into test files;
//! - [`run`] runs them, `jobs` files at a time on worker threads, and hands each result
//!   to a [`Reporter`] as it comes ([`report`] has the human, TAP and JUnit forms);
//! - the DSL (`dsl.lua`, loaded by [`dsl`]) collects tests when a file's top level runs,
//!   then the runner runs each selected test with its hooks inside a cleanup scope
//!   ([`crate::cleanup`]): what the test made (VMs, overlays, whatever registered a
//!   closer) is released when it ends, pass or fail;
//! - [`Cancel`] stops a run (Ctrl-C): the running tests are interrupted for good, their
//!   scopes and files are cleaned up, and no more files start.
//!
//! A file that never calls the DSL is one test, named by its path, that passes when the
//! file runs without error.

pub mod diff;
mod dsl;
mod file;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mlua::Lua;

use crate::interrupt::Interrupter;

pub use report::Reporter;

/// What kind of failure a test had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An assertion failed: one of the `assert` table's, or Lua's plain `assert`.
    Assertion,
    /// Any other error: `error(...)`, a runtime error, a failing `hv` call.
    Error,
    /// The run was cancelled (Ctrl-C) while the test ran.
    Interrupted,
    /// The test passed, but releasing what it made failed.
    Cleanup,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Assertion => "assertion",
            FailureKind::Error => "error",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Cleanup => "cleanup",
        }
    }
}

/// Why a test failed, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// One line, usually: the assertion's summary or the error message.
    pub message: String,
    /// `file:line` of the failing assertion or of the innermost frame of the test that
    /// raised the error.
    pub location: Option<String>,
    /// The test's frames from the failure outwards (`file:line`), innermost first.
    pub stack: Vec<String>,
    /// Where expected and actual differ (paths, a line diff), several lines.
    pub diff: Option<String>,
    /// The expected value, in one line (assertions only).
    pub expected: Option<String>,
    /// The actual value, in one line (assertions only).
    pub actual: Option<String>,
    /// Lua's traceback, without the runner's frames.
    pub traceback: Option<String>,
    /// "before_each" or "after_each" when a hook failed rather than the test.
    pub phase: Option<String>,
    /// Later failures of the same test: after_each hooks, cleanup.
    pub also: Vec<String>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            location: None,
            stack: Vec::new(),
            diff: None,
            expected: None,
            actual: None,
            traceback: None,
            phase: None,
            also: Vec::new(),
        }
    }

    /// Everything about the failure as plain text: where, the message, the diff, later
    /// failures and, for errors, the traceback (what JUnit's failure body holds).
    pub fn details(&self) -> String {
        let mut text = String::new();
        if let Some(phase) = &self.phase {
            text.push_str(&format!("in {phase}: "));
        }
        if let Some(at) = &self.location {
            text.push_str(&format!("{at}: "));
        }
        text.push_str(&self.message);
        if let Some(diff) = &self.diff {
            text.push('\n');
            text.push_str(diff);
        }
        for also in &self.also {
            text.push_str("\nalso: ");
            text.push_str(also);
        }
        if let Some(traceback) = self
            .traceback
            .as_ref()
            .filter(|_| self.kind != FailureKind::Assertion)
        {
            text.push('\n');
            text.push_str(traceback);
        }
        text
    }
}

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(Failure),
    /// Declared with `pending`, or `it` without a function; the reason if one was given.
    Pending(Option<String>),
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// The full name: the names of the enclosing `describe`s and of the test, joined by
    /// spaces. A plain file's one test is named by the file's path.
    pub name: String,
    pub outcome: Outcome,
    /// From the first before_each hook to the end of its cleanup.
    pub time: Duration,
    /// What the test printed with `print`.
    pub output: String,
    /// `file:line` where the test was declared.
    pub location: Option<String>,
}

/// One file's results.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The file as the command line named it (or as found under a directory it named).
    pub path: String,
    pub tests: Vec<TestResult>,
    /// From creating its Lua state to releasing its VMs.
    pub time: Duration,
    pub started: SystemTime,
    /// What the file's top level printed outside any test.
    pub output: String,
    /// The runner could not run the file to its end (no worker was left for it, or its
    /// worker stopped): its one test is the failure that says so.
    pub did_not_run: bool,
}

/// How many tests passed, failed and are pending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub pending: usize,
}

impl Counts {
    pub fn of<'a>(tests: impl IntoIterator<Item = &'a TestResult>) -> Counts {
        let mut counts = Counts::default();
        for test in tests {
            match test.outcome {
                Outcome::Passed => counts.passed += 1,
                Outcome::Failed(_) => counts.failed += 1,
                Outcome::Pending(_) => counts.pending += 1,
            }
        }
        counts
    }

    pub fn total(&self) -> usize {
        self.passed + self.failed + self.pending
    }
}

/// A whole run's results.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The files that ran, in the order they were given.
    pub files: Vec<FileReport>,
    /// The run was cancelled: some files or tests did not run.
    pub interrupted: bool,
    pub time: Duration,
    /// Things the user should know that are not test results (e.g. a fallback to one
    /// file at a time).
    pub warnings: Vec<String>,
}

impl RunReport {
    pub fn counts(&self) -> Counts {
        Counts::of(self.files.iter().flat_map(|f| &f.tests))
    }

    /// True when the run was not interrupted, some test was selected, and none failed.
    pub fn success(&self) -> bool {
        let counts = self.counts();
        !self.interrupted && counts.failed == 0 && counts.total() > 0
    }
}

/// Stops a run from any thread (the Ctrl-C handler): running tests are interrupted and
/// cannot catch it, after_each hooks are skipped, cleanup still happens, no more tests
/// or files start.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    cancelled: Arc<AtomicBool>,
    states: Mutex<Vec<(u64, Interrupter)>>,
    next_id: AtomicU64,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        for (_, interrupter) in self
            .0
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            interrupter.cancel();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn flag(&self) -> Arc<AtomicBool> {
        self.0.cancelled.clone()
    }

    /// Makes [`Cancel::cancel`] stop `lua`'s code until the guard is dropped.
    fn watch(&self, lua: &Lua) -> CancelWatch {
        let id = self.0.next_id.fetch_add(1, Ordering::SeqCst);
        if let Some(interrupter) = crate::interrupt::interrupter(lua) {
            self.0
                .states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, interrupter.clone()));
            // A cancel that came before the registration.
            if self.is_cancelled() {
                interrupter.cancel();
            }
        }
        CancelWatch {
            cancel: self.clone(),
            id,
        }
    }
}

struct CancelWatch {
    cancel: Cancel,
    id: u64,
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.cancel
            .0
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

/// Called on each test file's Lua state before the file runs (embedders and tests add
/// globals this way).
pub type StateSetup = Arc<dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync>;

/// How to run.
#[derive(Clone)]
pub struct Options {
    /// How many files run at once (each on its own thread). At least 1.
    pub jobs: usize,
    /// Only tests whose full name matches this Lua pattern run.
    pub filter: Option<String>,
    /// Each file runs in a new empty temporary directory as its working directory,
    /// removed afterwards; `arg[0]` is then the file's absolute path.
    pub isolate: bool,
    pub cancel: Cancel,
    pub setup: Option<StateSetup>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            jobs: 1,
            filter: None,
            isolate: false,
            cancel: Cancel::new(),
            setup: None,
        }
    }
}

/// Errors in what to run, before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("{path}: no such file or directory")]
    Missing { path: PathBuf },
    #[error("cannot read the directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no .lua files in {}", .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoFiles { paths: Vec<PathBuf> },
    #[error("--filter {pattern:?} is not a valid Lua pattern: {reason}")]
    BadFilter { pattern: String, reason: String },
}

/// The test files named by `paths`: files as they are, and every `.lua` file under a
/// directory, recursively (skipping names that start with `.`), sorted. A file named
/// twice runs once.
pub fn find_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SelectError> {
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).map_err(|_| SelectError::Missing { path: path.clone() })?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(std::path::absolute(f).unwrap_or_else(|_| f.clone())));
    if files.is_empty() {
        return Err(SelectError::NoFiles {
            paths: paths.to_vec(),
        });
    }
    Ok(files)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), SelectError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SelectError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| SelectError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "lua") {
            found.push(path);
        }
    }
    Ok(())
}

/// Checks that `pattern` is a valid Lua pattern (for `--filter`).
pub fn check_filter(pattern: &str) -> Result<(), SelectError> {
    let lua = Lua::new();
    let find: mlua::Function = lua
        .globals()
        .get::<mlua::Table>("string")
        .and_then(|s| s.get("find"))
        .map_err(|e| SelectError::BadFilter {
            pattern: pattern.into(),
            reason: e.to_string(),
        })?;
    find.call::<mlua::Value>(("", pattern))
        .map(|_| ())
        .map_err(|e| SelectError::BadFilter {
            pattern: pattern.into(),
            reason: crate::script::message_without_traceback(&e),
        })
}

enum Message {
    Started(usize),
    Test(usize, Box<TestResult>),
    File(usize, FileReport),
}

/// Runs `files` as `options` say, reporting to `reporter` as results come, and returns
/// every result. With one job, tests are reported as each ends; with more, each file's
/// tests are reported together when the file ends, so files never interleave.
pub fn run(files: &[PathBuf], options: &Options, reporter: &mut dyn Reporter) -> RunReport {
    let start = Instant::now();
    let mut warnings = Vec::new();
    let mut jobs = options.jobs.clamp(1, files.len().max(1));
    let per_thread_cwd = options.isolate && file::thread_cwd_available();
    if options.isolate && jobs > 1 && !per_thread_cwd {
        warnings.push(
            "--isolate: this system does not let a thread have its own working directory \
             (unshare(CLONE_FS) failed), so files run one at a time"
                .to_string(),
        );
        jobs = 1;
    }
    let next = AtomicUsize::new(0);
    let (sender, receiver) = mpsc::channel::<Message>();
    let mut reports: Vec<Option<FileReport>> = vec![None; files.len()];
    let mut started = vec![false; files.len()];
    let displays: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for worker in 0..jobs {
            let sender = sender.clone();
            let next = &next;
            let spawned = std::thread::Builder::new()
                .name(format!("test-worker-{worker}"))
                .spawn_scoped(scope, move || {
                    let worker = file::Worker::new(options, per_thread_cwd);
                    loop {
                        if options.cancel.is_cancelled() {
                            break;
                        }
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        let Some(path) = files.get(index) else { break };
                        let _ = sender.send(Message::Started(index));
                        let report = run_file_guarded(&worker, path, &mut |test| {
                            let _ = sender.send(Message::Test(index, Box::new(test.clone())));
                        });
                        let _ = sender.send(Message::File(index, report));
                    }
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => warnings.push(format!("cannot start test worker {worker}: {e}")),
            }
        }
        drop(sender);
        let mut streaming: Option<usize> = None;
        for message in receiver {
            match message {
                Message::Started(index) if jobs == 1 => {
                    started[index] = true;
                    reporter.file_started(&displays[index]);
                    streaming = Some(index);
                }
                Message::Started(index) => started[index] = true,
                Message::Test(index, test) if jobs == 1 => {
                    if streaming != Some(index) {
                        reporter.file_started(&displays[index]);
                        streaming = Some(index);
                    }
                    reporter.test_finished(&displays[index], &test);
                }
                Message::Test(..) => {}
                Message::File(index, report) => {
                    if streaming != Some(index) {
                        // Several jobs: the file's tests are reported now, together. One
                        // job: a file that reported no test as it ran.
                        reporter.file_started(&report.path);
                        if jobs > 1 {
                            for test in &report.tests {
                                reporter.test_finished(&report.path, test);
                            }
                        }
                    }
                    streaming = None;
                    reporter.file_finished(&report);
                    reports[index] = Some(report);
                }
            }
        }
        // The scope only waits for the workers' code to return; joining waits for their
        // threads to be gone, so a run leaves no thread behind.
        for handle in handles {
            if handle.join().is_err() {
                warnings.push("a test worker panicked".into());
            }
        }
    });
    let missing = fill_missing(
        &mut reports,
        &displays,
        &started,
        options.cancel.is_cancelled(),
    );
    if !missing.is_empty() {
        warnings.push(format!(
            "{} test file(s) did not run to their end; each is reported as failed",
            missing.len()
        ));
    }
    for report in missing.iter().filter_map(|&index| reports[index].as_ref()) {
        reporter.file_started(&report.path);
        for test in &report.tests {
            reporter.test_finished(&report.path, test);
        }
        reporter.file_finished(report);
    }
    RunReport {
        files: reports.into_iter().flatten().collect(),
        interrupted: options.cancel.is_cancelled(),
        time: start.elapsed(),
        warnings,
    }
}

/// Runs one file on a worker, turning a panic of the runner (or of a
/// [`Options::setup`]) into a failed test of that file, so the worker goes on with the
/// next file and the run cannot pass with results missing.
fn run_file_guarded(
    worker: &file::Worker,
    path: &Path,
    on_test: &mut dyn FnMut(&TestResult),
) -> FileReport {
    let started = SystemTime::now();
    let start = Instant::now();
    let mut recorded: Vec<TestResult> = Vec::new();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        worker.run_file(path, &mut |test| {
            recorded.push(test.clone());
            on_test(test);
        })
    }));
    match ran {
        Ok(report) => report,
        Err(panic) => {
            worker.return_home();
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let display = path.display().to_string();
            let failure = TestResult {
                name: display.clone(),
                outcome: Outcome::Failed(Failure::new(
                    FailureKind::Error,
                    format!("the test runner failed while running this file: {reason}"),
                )),
                time: start.elapsed(),
                output: String::new(),
                location: None,
            };
            on_test(&failure);
            recorded.push(failure);
            FileReport {
                path: display,
                tests: recorded,
                time: start.elapsed(),
                started,
                output: String::new(),
                did_not_run: true,
            }
        }
    }
}

/// Gives each file without a report a failed one that says why, except a file a
/// cancelled run never started (the run reports itself interrupted). Returns the indices
/// of the files it gave one.
fn fill_missing(
    reports: &mut [Option<FileReport>],
    displays: &[String],
    started: &[bool],
    cancelled: bool,
) -> Vec<usize> {
    let mut filled = Vec::new();
    for (index, report) in reports.iter_mut().enumerate() {
        if report.is_some() || (cancelled && !started[index]) {
            continue;
        }
        let why = if started[index] {
            "its test worker stopped before the file ended"
        } else {
            "no test worker was left to run it"
        };
        let display = displays[index].clone();
        *report = Some(FileReport {
            path: display.clone(),
            tests: vec![TestResult {
                name: display.clone(),
                outcome: Outcome::Failed(Failure::new(
                    FailureKind::Error,
                    format!("{display} did not run to its end: {why}"),
                )),
                time: Duration::ZERO,
                output: String::new(),
                location: None,
            }],
            time: Duration::ZERO,
            started: SystemTime::now(),
            output: String::new(),
            did_not_run: true,
        });
        filled.push(index);
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicBool;

    fn scratch(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("luvisor-runner-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_bad_filter_is_named_in_one_plain_line() {
        assert!(check_filter("^disks .*open$").is_ok());
        assert_eq!(
            check_filter("[").unwrap_err().to_string(),
            "--filter \"[\" is not a valid Lua pattern: malformed pattern (missing ']')"
        );
        assert_eq!(
            check_filter("%").unwrap_err().to_string(),
            "--filter \"%\" is not a valid Lua pattern: malformed pattern (ends with '%')"
        );
    }

    #[test]
    fn a_file_the_runner_panicked_on_fails_and_the_next_file_still_runs() {
        let dir = scratch("panic");
        let files: Vec<PathBuf> = ["a.lua", "b.lua"]
            .iter()
            .map(|name| {
                let path = dir.join(name);
                std::fs::write(&path, "assert(1 + 1 == 2)").unwrap();
                path
            })
            .collect();
        let panicked = Arc::new(AtomicBool::new(false));
        let once = panicked.clone();
        let options = Options {
            // The first file's state setup panics, as a bug in the runner would.
            setup: Some(Arc::new(move |_: &Lua| {
                if !once.swap(true, Ordering::SeqCst) {
                    panic!("a deliberate panic");
                }
                Ok(())
            })),
            ..Options::default()
        };
        let report = run(&files, &options, &mut report::Silent);
        assert!(panicked.load(Ordering::SeqCst));
        assert_eq!(report.files.len(), 2);
        let first = &report.files[0];
        assert!(first.did_not_run);
        match &first.tests[..] {
            [test] => match &test.outcome {
                Outcome::Failed(failure) => assert_eq!(
                    failure.message,
                    "the test runner failed while running this file: a deliberate panic"
                ),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(Counts::of(&report.files[1].tests).passed, 1);
        assert!(!report.success());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_without_a_report_are_failed_unless_a_cancel_kept_them_from_starting() {
        let displays: Vec<String> = ["ran.lua", "died.lua", "never.lua"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ran = FileReport {
            path: "ran.lua".into(),
            tests: Vec::new(),
            time: Duration::ZERO,
            started: SystemTime::now(),
            output: String::new(),
            did_not_run: false,
        };
        let started = [true, true, false];
        let mut reports = vec![Some(ran.clone()), None, None];
        assert_eq!(
            fill_missing(&mut reports, &displays, &started, false),
            [1, 2]
        );
        let messages: Vec<String> = reports
            .iter()
            .flatten()
            .flat_map(|r| &r.tests)
            .map(|t| match &t.outcome {
                Outcome::Failed(f) => f.message.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            messages,
            [
                "died.lua did not run to its end: its test worker stopped before the file ended",
                "never.lua did not run to its end: no test worker was left to run it",
            ]
        );
        let report = RunReport {
            files: reports.into_iter().flatten().collect(),
            interrupted: false,
            time: Duration::ZERO,
            warnings: Vec::new(),
        };
        assert!(!report.success());
        // Cancelled: a file that never started is simply not run.
        let mut reports = vec![Some(ran), None, None];
        assert_eq!(fill_missing(&mut reports, &displays, &started, true), [1]);
        assert!(reports[2].is_none());
    }
}
