//! Running one test file: its own Lua state and registry, the top level (which collects
//! the tests, or is the test of a plain file), each selected test inside a cleanup
//! scope, and the release of everything the file made.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use luvisor_runtime::Registry;
use mlua::Lua;

use super::dsl::{self, Dsl, Ran};
use super::{Failure, FailureKind, FileReport, Options, Outcome, TestResult};
use crate::{cleanup, script, StateLimits};

/// Numbers the scratch directories of `--isolate` within this process.
static SCRATCH_DIRS: AtomicU64 = AtomicU64::new(0);

/// Gives the calling thread its own working directory (and root and umask), so that
/// changing it does not move the other threads.
fn unshare_fs() -> std::io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only gives the calling thread a private copy of its
    // filesystem attributes; it takes no pointers and changes no memory.
    let rc = unsafe { libc::unshare(libc::CLONE_FS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether threads can have their own working directory here (seccomp filters of some
/// containers refuse unshare). Tried on a throwaway thread.
pub(crate) fn thread_cwd_available() -> bool {
    std::thread::spawn(|| unshare_fs().is_ok())
        .join()
        .unwrap_or(false)
}

/// One worker thread's way of running files.
pub(crate) struct Worker<'a> {
    options: &'a Options,
    /// The working directory to come back to after an isolated file.
    home: Option<PathBuf>,
}

impl<'a> Worker<'a> {
    /// Called on the worker thread. With `per_thread_cwd`, the thread gets its own working
    /// directory first.
    pub(crate) fn new(options: &'a Options, per_thread_cwd: bool) -> Worker<'a> {
        if options.isolate && per_thread_cwd {
            // thread_cwd_available() said this works; should it fail now, the worker runs
            // one file at a time like a single job, since it still returns to `home`.
            let _ = unshare_fs();
        }
        Worker {
            options,
            home: std::env::current_dir().ok(),
        }
    }

    /// Goes back to the working directory the worker started in (after a file whose run
    /// panicked in its scratch directory).
    pub(crate) fn return_home(&self) {
        if let (true, Some(home)) = (self.options.isolate, &self.home) {
            let _ = std::env::set_current_dir(home);
        }
    }

    /// Runs the file at `path`; `on_test` sees each result as it is recorded.
    pub(crate) fn run_file(&self, path: &Path, on_test: &mut dyn FnMut(&TestResult)) -> FileReport {
        let display = path.display().to_string();
        if !self.options.isolate {
            return self.run_here(path, &display, on_test);
        }
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "luvisor-test-{}-{}-{stem}",
            std::process::id(),
            SCRATCH_DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        let entered = std::fs::create_dir_all(&dir).and_then(|()| std::env::set_current_dir(&dir));
        if let Err(e) = entered {
            let mut run = FileRun::new(&display, on_test);
            run.record(TestResult {
                name: display.clone(),
                outcome: Outcome::Failed(Failure::new(
                    FailureKind::Error,
                    format!("cannot make the scratch directory {}: {e}", dir.display()),
                )),
                time: Default::default(),
                output: String::new(),
                location: None,
            });
            let _ = std::fs::remove_dir_all(&dir);
            return run.report;
        }
        let report = self.run_here(&absolute, &display, on_test);
        if let Some(home) = &self.home {
            let _ = std::env::set_current_dir(home);
        }
        let _ = std::fs::remove_dir_all(&dir);
        report
    }

    /// Runs the file at `path` (named `display` in reports) in the current directory.
    fn run_here(
        &self,
        path: &Path,
        display: &str,
        on_test: &mut dyn FnMut(&TestResult),
    ) -> FileReport {
        let start = Instant::now();
        let mut run = FileRun::new(display, on_test);
        let registry = Arc::new(Registry::new());
        // Ctrl-C reaches these states through the run's Cancel, not the process-wide
        // Ctrl-C counter.
        let lua = match crate::new_user_state_with_limits(registry.clone(), StateLimits::default())
        {
            Ok(lua) => lua,
            Err(e) => {
                run.fail_file(
                    FailureKind::Error,
                    format!("cannot set up Lua: {}", script::error_message(&e)),
                );
                return run.finish(start);
            }
        };
        let watch = self.options.cancel.watch(&lua);
        cleanup::install(&lua, registry.clone());
        let prepared = dsl::install(&lua, self.options.cancel.flag()).and_then(|dsl| {
            if let Some(setup) = &self.options.setup {
                setup(&lua)?;
            }
            Ok(dsl)
        });
        match prepared {
            Ok(dsl) => {
                let _ = script::set_arg(&lua, Some(path), &[]);
                let _ = cleanup::open_scope(&lua, display);
                self.run_tests(&lua, &dsl, path, &mut run);
                // What the file made outside its tests, then whatever is left.
                crate::policy::shutdown(&registry);
                if let Ok(scope) = cleanup::close_scope(&lua) {
                    if !scope.errors.is_empty() {
                        run.record(TestResult {
                            name: format!("{display} (cleanup)"),
                            outcome: Outcome::Failed(Failure::new(
                                FailureKind::Cleanup,
                                scope.errors.join("; "),
                            )),
                            time: Default::default(),
                            output: String::new(),
                            location: None,
                        });
                    }
                }
            }
            Err(e) => run.fail_file(
                FailureKind::Error,
                format!("cannot load the test DSL: {}", script::error_message(&e)),
            ),
        }
        crate::policy::shutdown(&registry);
        for vm in registry.list() {
            registry.destroy(vm.id());
        }
        drop(watch);
        drop(lua);
        run.finish(start)
    }

    fn run_tests(&self, lua: &Lua, dsl: &Dsl, path: &Path, run: &mut FileRun) {
        let display = run.report.path.clone();
        let source = match std::fs::read(path) {
            Ok(source) => source,
            Err(e) => {
                run.fail_file(FailureKind::Error, format!("cannot read {display}: {e}"));
                return;
            }
        };
        let start = Instant::now();
        let top = match script::load_source(lua, source, &format!("@{display}")) {
            Ok(chunk) => dsl.protect(chunk),
            Err(message) => Ran::Failed(Failure::new(FailureKind::Error, message)),
        };
        let top_time = start.elapsed();
        let output = dsl::take_output(lua);
        let filter = self.options.filter.as_deref();
        if !dsl.used().unwrap_or(false) {
            // A plain file: its top level is its one test. A failure is always reported;
            // a pass only when the filter selects the file's name.
            let outcome = outcome_of(top);
            let selected = matches!(outcome, Outcome::Failed(_))
                || filter.is_none_or(|p| dsl.matches(&display, p).unwrap_or(false));
            if selected {
                run.record(TestResult {
                    name: display,
                    outcome,
                    time: top_time,
                    output,
                    location: None,
                });
            }
            return;
        }
        run.report.output = output;
        if let Ran::Failed(mut failure) = top {
            failure.phase = Some("the file's top level (its tests did not run)".into());
            run.record(TestResult {
                name: display,
                outcome: Outcome::Failed(failure),
                time: top_time,
                output: String::new(),
                location: None,
            });
            return;
        }
        let tests = match dsl.tests() {
            Ok(tests) => tests,
            Err(e) => {
                run.fail_file(
                    FailureKind::Error,
                    format!(
                        "cannot read the collected tests: {}",
                        script::error_message(&e)
                    ),
                );
                return;
            }
        };
        for (index, test) in tests.into_iter().enumerate() {
            if self.options.cancel.is_cancelled() {
                break;
            }
            if let Some(pattern) = filter {
                if !dsl.matches(&test.name, pattern).unwrap_or(false) {
                    continue;
                }
            }
            if let Some(reason) = test.pending {
                run.record(TestResult {
                    name: test.name,
                    outcome: Outcome::Pending(Some(reason).filter(|r| !r.is_empty())),
                    time: Default::default(),
                    output: String::new(),
                    location: test.location,
                });
                continue;
            }
            let _ = cleanup::open_scope(lua, &test.name);
            let start = Instant::now();
            let ran = dsl.run(index);
            let scope = cleanup::close_scope(lua);
            let time = start.elapsed();
            let mut outcome = outcome_of(ran);
            let errors = scope.map(|s| s.errors).unwrap_or_default();
            if !errors.is_empty() {
                match &mut outcome {
                    Outcome::Failed(failure) => failure.also.extend(errors),
                    _ => {
                        outcome = Outcome::Failed(Failure::new(
                            FailureKind::Cleanup,
                            format!("releasing what the test made failed: {}", errors.join("; ")),
                        ))
                    }
                }
            }
            if self.options.cancel.is_cancelled() {
                if let Outcome::Failed(failure) = &mut outcome {
                    if failure.kind == FailureKind::Error && failure.message.contains("interrupted")
                    {
                        failure.kind = FailureKind::Interrupted;
                    }
                }
            }
            run.record(TestResult {
                name: test.name,
                outcome,
                time,
                output: dsl::take_output(lua),
                location: test.location,
            });
        }
    }
}

fn outcome_of(ran: Ran) -> Outcome {
    match ran {
        Ran::Passed => Outcome::Passed,
        Ran::Failed(failure) => Outcome::Failed(failure),
        Ran::Pending(reason) => Outcome::Pending(reason),
    }
}

/// A file's report as it is built, passing each result on as it is recorded.
struct FileRun<'a> {
    report: FileReport,
    on_test: &'a mut dyn FnMut(&TestResult),
}

impl<'a> FileRun<'a> {
    fn new(display: &str, on_test: &'a mut dyn FnMut(&TestResult)) -> FileRun<'a> {
        FileRun {
            report: FileReport {
                path: display.to_string(),
                tests: Vec::new(),
                time: Default::default(),
                started: SystemTime::now(),
                output: String::new(),
                did_not_run: false,
            },
            on_test,
        }
    }

    fn record(&mut self, test: TestResult) {
        (self.on_test)(&test);
        self.report.tests.push(test);
    }

    /// The file could not run: one failed test named by the file.
    fn fail_file(&mut self, kind: FailureKind, message: String) {
        let name = self.report.path.clone();
        self.record(TestResult {
            name,
            outcome: Outcome::Failed(Failure::new(kind, message)),
            time: Default::default(),
            output: String::new(),
            location: None,
        });
    }

    fn finish(mut self, start: Instant) -> FileReport {
        self.report.time = start.elapsed();
        self.report
    }
}
