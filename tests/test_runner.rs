//! `luvisor test` from the outside: its TAP read by a real TAP consumer (Perl's
//! TAP::Parser), its JUnit XML validated against tests/junit.xsd with xmllint, --filter,
//! --jobs, plain files, usage errors, and cleanup after a failing test and after SIGINT.
//! (The DSL's own behaviour is tests/lua/test_dsl.lua; a cancelled run counting threads
//! is lua-api/tests/runner_cancel.rs.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// `luvisor test ARGS` run in `dir`.
fn luvisor_test(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("test")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run luvisor test")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn describe(output: &Output) -> String {
    let (stdout, stderr) = text(output);
    format!(
        "exit status {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        output.status
    )
}

/// Whether a command-line tool works here. In CI (`CI=true`) a missing one is a failure
/// (.ci/run installs it); elsewhere the test is skipped with a message.
fn tool_available(what: &str, program: &str, args: &[&str], package: &str) -> bool {
    let works = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{what} is missing; install Debian's {package} (.ci/run does)");
        }
        eprintln!("skipping: {what} is missing (Debian's {package})");
    }
    works
}

fn tap_parser_available() -> bool {
    tool_available(
        "Perl's TAP::Parser",
        "perl",
        &["-MTAP::Parser", "-e", "1"],
        "perl",
    )
}

fn xmllint_available() -> bool {
    tool_available("xmllint", "xmllint", &["--version"], "libxml2-utils")
}

/// One test point as TAP::Parser read it.
#[derive(Debug, PartialEq, Eq)]
struct Point {
    number: u64,
    ok: bool,
    skip: bool,
    description: String,
    /// The YAML diagnostics under it, as TAP::Parser read them: message, type, at.line.
    yaml: Option<(String, String, String)>,
}

/// What TAP::Parser made of a TAP stream.
#[derive(Debug)]
struct Parsed {
    points: Vec<Point>,
    plan: String,
    version: String,
    errors: String,
    bailed_out: bool,
    passed: bool,
}

/// Reads `tap` with Perl's TAP::Parser (the parser `prove` uses).
fn parse_tap(tap: &str) -> Parsed {
    const SCRIPT: &str = r#"
use TAP::Parser;
my $tap = do { local $/; <STDIN> };
my $p = TAP::Parser->new({ tap => $tap });
while (my $r = $p->next) {
    if ($r->is_test) {
        my $d = $r->description; $d =~ s/^- //;
        print join("\t", "test", $r->number, ($r->is_ok ? 1 : 0), ($r->has_skip ? 1 : 0), $d), "\n";
    } elsif ($r->is_yaml) {
        my $y = $r->data;
        print join("\t", "yaml", $y->{message}, $y->{type}, $y->{at}{line}), "\n";
    } elsif ($r->is_bailout) {
        print "bailout\n";
    }
}
print join("\t", "plan", $p->plan), "\n";
print join("\t", "version", $p->version), "\n";
print join("\t", "errors", join(" | ", $p->parse_errors)), "\n";
print join("\t", "passed", ($p->has_problems ? 0 : 1)), "\n";
"#;
    let mut child = Command::new("perl")
        .args(["-e", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run perl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(tap.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "perl failed on:\n{tap}");
    let mut parsed = Parsed {
        points: Vec::new(),
        plan: String::new(),
        version: String::new(),
        errors: String::new(),
        bailed_out: false,
        passed: false,
    };
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields[0] {
            "test" => parsed.points.push(Point {
                number: fields[1].parse().unwrap(),
                ok: fields[2] == "1",
                skip: fields[3] == "1",
                description: fields[4].to_string(),
                yaml: None,
            }),
            "yaml" => {
                let point = parsed.points.last_mut().expect("YAML after a test point");
                point.yaml = Some((fields[1].into(), fields[2].into(), fields[3].into()));
            }
            "bailout" => parsed.bailed_out = true,
            "plan" => parsed.plan = fields[1].into(),
            "version" => parsed.version = fields[1].into(),
            "errors" => parsed.errors = fields.get(1).unwrap_or(&"").to_string(),
            "passed" => parsed.passed = fields[1] == "1",
            other => panic!("unexpected line from perl: {other}"),
        }
    }
    parsed
}

/// Validates a JUnit XML file against tests/junit.xsd; xmllint's complaint if invalid.
fn validate_junit(xml: &Path) -> Result<(), String> {
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(repo().join("tests/junit.xsd"))
        .arg(xml)
        .output()
        .expect("run xmllint");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn example_tests_in_tap_are_read_by_a_tap_consumer() {
    if !common::kvm_available() || !tap_parser_available() {
        return;
    }
    let output = luvisor_test(repo(), &["--isolate", "--format", "tap", "examples/tests"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (tap, _) = text(&output);
    let parsed = parse_tap(&tap);
    assert_eq!(parsed.version, "13");
    assert_eq!(parsed.plan, "1..7");
    assert_eq!(parsed.errors, "", "{tap}");
    assert!(!parsed.passed && !parsed.bailed_out);
    let summary: Vec<(u64, bool, bool, &str)> = parsed
        .points
        .iter()
        .map(|p| (p.number, p.ok, p.skip, p.description.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                1,
                true,
                false,
                "a deliberately failing suite passes this one"
            ),
            (
                2,
                false,
                false,
                "a deliberately failing suite expects a VM with one vCPU, but makes it with two"
            ),
            (
                3,
                false,
                false,
                "a deliberately failing suite expects a console the guest does not print"
            ),
            (
                4,
                true,
                false,
                "the built-in guest boots, prints and exits with its code"
            ),
            (
                5,
                true,
                false,
                "the built-in guest gets a fresh registry for each test's VMs"
            ),
            (
                6,
                true,
                false,
                "the built-in guest with bad input refuses an unknown option and names it"
            ),
            (7, true, true, "the built-in guest boots a Linux kernel"),
        ]
    );
    assert_eq!(
        parsed.points[1].yaml,
        Some((
            "tables differ at 1 path".into(),
            "assertion".into(),
            "14".into()
        ))
    );
    let (message, kind, line) = parsed.points[2].yaml.clone().unwrap();
    assert!(message.starts_with("strings differ"), "{message}");
    assert_eq!((kind.as_str(), line.as_str()), ("assertion", "23"));
}

#[test]
fn example_tests_in_junit_validate_against_the_schema() {
    if !common::kvm_available() || !xmllint_available() {
        return;
    }
    let dir = common::scratch_dir("runner-junit-examples");
    let xml = dir.join("report.xml");
    let output = luvisor_test(
        repo(),
        &[
            "--isolate",
            "examples/tests",
            "--junit",
            xml.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    validate_junit(&xml).unwrap();
    let report = std::fs::read_to_string(&xml).unwrap();
    for expected in [
        r#"<testsuites name="luvisor test" tests="7" failures="2" errors="0" skipped="1""#,
        r#"<testsuite name="examples/tests/failing.lua" tests="3" failures="2" errors="0" skipped="0""#,
        r#"<testcase name="a deliberately failing suite expects a VM with one vCPU, but makes it with two" classname="examples.tests.failing""#,
        r#"<failure message="tables differ at 1 path" type="assertion">examples/tests/failing.lua:14: tables differ at 1 path"#,
        r#"<skipped message="pending: the built-in guest is not Linux"/>"#,
    ] {
        assert!(report.contains(expected), "missing {expected}\n{report}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Names, messages and output with characters that TAP and XML treat specially.
#[test]
fn awkward_names_and_output_stay_valid_tap_and_junit() {
    let dir = common::scratch_dir("runner-awkward");
    write(
        &dir,
        "awkward.lua",
        r#"
describe("a <suite> & \"quotes\"", function()
  it("has # and \\ in its name", function() print("tab\there", "\1\27[31m") end)
  it("fails with ]]> in its diff", function()
    print("<output/> &")
    assert.equal("line 1\n]]>\0\n", "line 1\n<x>\n")
  end)
  it("raises a table", function() error({}) end)
  pending("is pending # for a \"reason\"", "needs: a fix")
end)
"#,
    );
    let xml = dir.join("report.xml");
    let output = luvisor_test(
        &dir,
        &["--format", "tap", "--junit", "report.xml", "awkward.lua"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (tap, _) = text(&output);
    if tap_parser_available() {
        let parsed = parse_tap(&tap);
        assert_eq!(parsed.errors, "", "{tap}");
        assert_eq!(parsed.plan, "1..4");
        let points: Vec<(bool, bool, &str)> = parsed
            .points
            .iter()
            .map(|p| (p.ok, p.skip, p.description.as_str()))
            .collect();
        assert_eq!(
            points,
            [
                (
                    true,
                    false,
                    r#"a <suite> & "quotes" has \# and \\ in its name"#
                ),
                (
                    false,
                    false,
                    r#"a <suite> & "quotes" fails with ]]> in its diff"#
                ),
                (false, false, r#"a <suite> & "quotes" raises a table"#),
                (
                    true,
                    true,
                    r#"a <suite> & "quotes" is pending \# for a "reason""#
                ),
            ],
            "{tap}"
        );
        assert_eq!(
            parsed.points[2]
                .yaml
                .as_ref()
                .map(|y| (y.0.as_str(), y.1.as_str())),
            Some(("(error object is a table value)", "error"))
        );
    }
    if xmllint_available() {
        validate_junit(&xml).unwrap();
        let report = std::fs::read_to_string(&xml).unwrap();
        assert!(
            report.contains(r#"failures="1" errors="1" skipped="1""#),
            "{report}"
        );
        assert!(report.contains("&lt;output/&gt; &amp;"), "{report}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The names of the tests a TAP stream says passed.
fn passed(tap: &str) -> Vec<&str> {
    tap.lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(|l| l.split_once(" - ").unwrap().1)
        .collect()
}

#[test]
fn filter_selects_tests_by_their_full_name() {
    let dir = common::scratch_dir("runner-filter");
    write(
        &dir,
        "filtered.lua",
        r#"
describe("disks", function()
  it("open", function() end)
  describe("overlays", function()
    it("open", function() end)
  end)
end)
describe("vms", function()
  before_each(function() error("the hooks of tests that are not selected do not run") end)
  it("start", function() end)
end)
"#,
    );
    write(&dir, "plain.lua", "assert(true)\n");
    for (pattern, expected) in [
        ("open$", vec!["disks open", "disks overlays open"]),
        ("^disks overlays", vec!["disks overlays open"]),
        ("s o", vec!["disks open", "disks overlays open"]),
    ] {
        let output = luvisor_test(
            &dir,
            &["--format", "tap", "--filter", pattern, "filtered.lua"],
        );
        let (tap, _) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{pattern}: {tap}");
        assert_eq!(passed(&tap), expected, "{pattern}: {tap}");
    }
    // Nothing selected fails the run, so a mistyped filter cannot pass in CI.
    let output = luvisor_test(
        &dir,
        &["--format", "tap", "--filter", "nothing", "filtered.lua"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output).0.contains("\n1..0\n"),
        "{}",
        describe(&output)
    );
    // A bad pattern is a usage error, before anything runs: one plain line naming it.
    let output = luvisor_test(&dir, &["--filter", "[", "filtered.lua"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert_eq!(
        text(&output).1,
        "luvisor test: --filter \"[\" is not a valid Lua pattern: malformed pattern (missing ']')\n",
        "{}",
        describe(&output)
    );
    // A plain file is one test named by its path.
    let output = luvisor_test(&dir, &["--format", "tap", "--filter", "plain", "."]);
    let (tap, _) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{tap}");
    assert_eq!(passed(&tap), ["./plain.lua"], "{tap}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jobs_run_files_at_the_same_time_each_with_its_own_vms() {
    let dir = common::scratch_dir("runner-jobs");
    // Each file waits until the other has started: they pass only if they run at once.
    // Both make a VM named "same": each file has its own registry.
    for (me, other) in [("a", "b"), ("b", "a")] {
        write(
            &dir,
            &format!("{me}.lua"),
            &format!(
                r#"
local function seen(name)
  local f = io.open(name)
  if f then f:close() end
  return f ~= nil
end
it("meets {other}", function()
  hv.vm{{ name = "same", memory = "16M", guest = hv.guest.builtin{{}} }}
  assert(io.open("{me}.started", "w")):close()
  local deadline = hv.now() + 60
  while not seen("{other}.started") do
    assert(hv.now() < deadline, "{other}.lua never ran at the same time")
    hv.sleep(0.01)
  end
  assert.equal(1, #hv.vms())
end)
"#
            ),
        );
    }
    let output = luvisor_test(&dir, &["--jobs", "2", "a.lua", "b.lua"]);
    assert!(output.status.success(), "{}", describe(&output));
    let (stdout, _) = text(&output);
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
    // Reported file by file, even when they run at once.
    let a = stdout.find("a.lua\n  ✓ meets b").expect(&stdout);
    let b = stdout.find("b.lua\n  ✓ meets a").expect(&stdout);
    assert!(a != b);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn isolated_files_run_in_their_own_empty_directories() {
    let dir = common::scratch_dir("runner-isolate");
    for name in ["one", "two"] {
        write(
            &dir,
            &format!("{name}.lua"),
            r#"
it("starts in an empty directory and writes there", function()
  assert.falsy(io.open("mine"), "the other file's file is not here")
  assert(io.open("mine", "w")):close()
  assert.match("^/", arg[0])
end)
"#,
        );
    }
    let output = luvisor_test(&dir, &["--isolate", "--jobs", "2", "one.lua", "two.lua"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        !dir.join("mine").exists(),
        "nothing is written where luvisor started"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plain_files_usage_errors_and_exit_codes() {
    let dir = common::scratch_dir("runner-plain");
    write(
        &dir,
        "passes.lua",
        "local x = 1 + 1\nassert(x == 2)\nprint('fine')\n",
    );
    write(
        &dir,
        "fails.lua",
        "local x = 1\n\nassert(x == 2, 'x is ' .. x)\n",
    );
    write(&dir, "broken.lua", "local x = \n");
    write(
        &dir,
        "top_level_error.lua",
        "it('is never run', function() end)\nerror('the file is broken')\n",
    );
    let output = luvisor_test(&dir, &["passes.lua"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        text(&output).0.contains("  ✓ passes.lua ("),
        "{}",
        describe(&output)
    );

    let output = luvisor_test(&dir, &["."]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (stdout, _) = text(&output);
    for expected in [
        "  ✗ ./fails.lua (",
        "   at ./fails.lua:3\n   x is 1\n",
        "  ✗ ./broken.lua (",
        "./broken.lua:2: unexpected symbol near <eof>",
        "   in the file's top level (its tests did not run)\n   at ./top_level_error.lua:2\n",
        "1 passed, 3 failed",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}\n{stdout}");
    }
    assert!(!stdout.contains("is never run"), "{stdout}");

    // Usage errors: exit 2, nothing runs.
    for (args, message) in [
        (
            vec!["missing.lua"],
            "missing.lua: no such file or directory",
        ),
        (vec!["--jobs", "0", "passes.lua"], "0 is not in 1..=65535"),
    ] {
        let output = luvisor_test(&dir, &args);
        assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
        assert!(text(&output).1.contains(message), "{}", describe(&output));
    }
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let output = luvisor_test(&dir, &["empty"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(text(&output).1.contains("no .lua files in empty"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A test that fails with a running VM and an overlay leaves nothing behind: the next
/// test of the file finds no VM, no overlay and no extra thread.
#[test]
fn a_failing_test_leaves_no_vms_overlays_or_threads() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("runner-cleanup");
    write(
        &dir,
        "cleanup.lua",
        r#"
local function threads()
  for line in io.lines("/proc/self/status") do
    local n = line:match("^Threads:%s+(%d+)")
    if n then return tonumber(n) end
  end
end
local base = hv.disk.create{ path = "base.img", size = "4M" }
local before

describe("cleanup", function()
  it("warms up", function()
    -- The first VM of a process starts its VM preparer thread, which stays.
    local vm = hv.vm{ name = "warm", memory = "16M", guest = hv.guest.builtin{ cmdline = "exit 0" } }
    vm:start()
    vm:wait{ timeout = 20 }
  end)

  it("counts the threads", function()
    before = threads()
  end)

  it("fails while a VM runs on an overlay", function()
    local overlay = hv.disk.overlay{ base = base, path = "left.qcow2" }
    local vm = hv.vm{ name = "left", vcpus = 2, memory = "16M", disks = { overlay },
                      guest = hv.guest.builtin{ cmdline = "blk-write 0 8 3; idle" } }
    vm:start()
    vm:wait_for_console("blk-write 0 8 done", { timeout = 20 })
    assert(io.open("left.qcow2"))
    assert.equal(1, 2)
  end)

  it("finds nothing left behind", function()
    assert.equal(0, #hv.vms())
    assert.falsy(io.open("left.qcow2"), "the overlay was removed")
    assert.equal(before, threads())
    -- The name is free again.
    hv.vm{ name = "left", memory = "16M", guest = hv.guest.builtin{} }
  end)
end)
"#,
    );
    let output = luvisor_test(&dir, &["--format", "tap", "cleanup.lua"]);
    let (tap, _) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let results: Vec<&str> = tap
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .collect();
    assert_eq!(
        results,
        [
            "ok 1 - cleanup warms up",
            "ok 2 - cleanup counts the threads",
            "not ok 3 - cleanup fails while a VM runs on an overlay",
            "ok 4 - cleanup finds nothing left behind",
        ],
        "{tap}"
    );
    assert!(dir.join("base.img").exists());
    assert!(!dir.join("left.qcow2").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits for `child` to exit, at most `limit` (a safety net, not a measurement).
fn wait_at_most(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("luvisor test did not exit within {limit:?} of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT while a test holds a running VM and an overlay: the run stops, cleans up and
/// exits 130, reporting the test as interrupted and bailing out of the TAP stream.
#[test]
fn sigint_stops_the_run_cleans_up_and_exits_nonzero() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("runner-sigint");
    write(
        &dir,
        "sigint.lua",
        r#"
local base = hv.disk.create{ path = "base.img", size = "4M" }
describe("interrupted", function()
  it("waits for ever", function()
    local overlay = hv.disk.overlay{ base = base, path = "held.qcow2" }
    local vm = hv.vm{ name = "held", vcpus = 2, memory = "16M", disks = { overlay },
                      guest = hv.guest.builtin{ cmdline = "idle" } }
    vm:start()
    io.stderr:write("ready\n")
    io.stderr:flush()
    -- Catching the interruption does not keep the test going.
    while true do pcall(hv.sleep, 600) end
  end)
  it("never runs", function() end)
end)
"#,
    );
    write(
        &dir,
        "later.lua",
        "it('never runs either', function() end)\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["test", "--format", "tap", "sigint.lua", "later.lua"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "luvisor test ended early"
        );
        if line.trim() == "ready" {
            break;
        }
    }
    assert!(dir.join("held.qcow2").exists());
    // SAFETY: kill only sends a signal to the child process we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = wait_at_most(&mut child, Duration::from_secs(60));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let mut tap = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut tap).unwrap();
    assert_eq!(status.code(), Some(130), "{tap}\n{rest}");
    assert!(
        rest.contains("SIGINT received: stopping the tests and cleaning up"),
        "{rest}"
    );
    assert!(
        tap.contains("not ok 1 - interrupted waits for ever\n"),
        "{tap}"
    );
    assert!(tap.contains("  type: interrupted\n"), "{tap}");
    assert!(
        tap.ends_with("Bail out! interrupted: not every test ran\n"),
        "{tap}"
    );
    assert!(!tap.contains("never runs"), "{tap}");
    assert!(!dir.join("held.qcow2").exists(), "the overlay was removed");
    if tap_parser_available() {
        let parsed = parse_tap(&tap);
        assert!(parsed.bailed_out && !parsed.passed, "{tap}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
