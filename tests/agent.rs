//! The agent channel with real VMs: the built-in guest's agent answers heartbeats, takes
//! the host's time, exchanges key-value pairs, shuts down when asked and runs exec; a
//! guest that stops answering raises `heartbeat_lost`; a guest that sends garbage only
//! gets it dropped and counted; snapshots carry the channel. (Migration with an agent is
//! in `tests/migration.rs`, which has the peer-host helpers.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{kvm_available, scratch_dir, TIMEOUT};
use luvisor_runtime::agent::{AgentError, HealthState, ShutdownHow, LOST_AFTER, MAX_OUTPUT};
use luvisor_runtime::events::VmEventKind;
use luvisor_runtime::vm::SnapshotOptions;
use luvisor_runtime::{Registry, Vm, VmOutcome, VmState};

/// A VM whose command line is empty: it serves its agent channel. Returns once the
/// guest published `ready`.
fn serving(registry: &Registry, name: &str) -> Arc<Vm> {
    let vm = registry.create(common::builtin(name, "")).unwrap();
    vm.start().unwrap();
    assert_eq!(
        vm.wait_for_guest_kvp("ready", Some("1"), TIMEOUT).unwrap(),
        "1"
    );
    vm
}

/// Polls `f` until it holds (each look is cheap); panics after a long while.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The guest's time has been set by the last clock setting the host pushed.
fn time_applied(vm: &Vm) -> bool {
    let s = vm.agent_stats().unwrap();
    s.time_generation > 0 && s.time_generation_applied == s.time_generation
}

#[test]
fn the_guest_publishes_its_keys_and_answers_heartbeats() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "keys");
    let boot_id = vm.kvp_guest_get("boot_id").expect("boot_id");
    assert_eq!(boot_id.len(), 16, "{boot_id}");
    let uptime: u64 = vm.kvp_guest_get("uptime_ms").unwrap().parse().unwrap();
    // uptime_ms is fresh: it changes with the heartbeats.
    wait_until("uptime_ms moves on", || {
        vm.kvp_guest_get("uptime_ms")
            .and_then(|u| u.parse::<u64>().ok())
            .is_some_and(|now| now > uptime)
    });
    let health = vm.health();
    assert!(
        matches!(health.state, HealthState::Ok | HealthState::Late),
        "{health:?}"
    );
    assert!(health.last_seen_ms.is_some());
    assert_eq!(vm.agent_name().as_deref(), Some("luvisor-guest"));
    let stats = vm.agent_stats().unwrap();
    assert!(stats.pongs >= 1 && stats.sessions == 1, "{stats:?}");
    assert_eq!((stats.malformed, stats.oversized), (0, 0));
    vm.stop();
    assert_eq!(vm.health().state, HealthState::None);
}

#[test]
fn a_guest_that_stops_answering_is_lost_and_found_again() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let events = registry.events().subscribe();
    let vm = serving(&registry, "hangs");
    // Longer than the lost threshold, so the heartbeat is lost and then comes back.
    let hang = LOST_AFTER + Duration::from_secs(2);
    let r = vm
        .exec(&format!("agent-hang {}", hang.as_millis()), TIMEOUT)
        .unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    let mut seen = Vec::new();
    while !seen.contains(&VmEventKind::HeartbeatRestored) {
        assert!(
            events.wait(Duration::from_secs(60)),
            "no heartbeat event; saw {seen:?}, health {:?}",
            vm.health()
        );
        for e in events.take_all() {
            assert_eq!(e.vm, vm.id());
            assert_eq!(e.name, "hangs");
            if e.kind == VmEventKind::HeartbeatLost {
                // Raised once the guest was silent for LOST_AFTER of running time.
                assert!(vm.health().last_seen_ms.unwrap() >= LOST_AFTER.as_millis() as u64);
            }
            seen.push(e.kind);
        }
    }
    assert_eq!(
        seen,
        [VmEventKind::HeartbeatLost, VmEventKind::HeartbeatRestored]
    );
    assert_eq!(vm.exec("hello", TIMEOUT).unwrap().code, 0);
    vm.stop();
}

#[test]
fn a_paused_guest_gets_the_time_again_when_it_resumes() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "clock");
    wait_until("the first clock setting is applied", || time_applied(&vm));
    let generation = vm.agent_stats().unwrap().time_generation;
    // The guest reports a Unix time close to the host's.
    let out = vm.exec("time", TIMEOUT).unwrap().stdout;
    let guest_ms: u64 = out.trim().strip_prefix("time ").unwrap().parse().unwrap();
    let host_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        guest_ms.abs_diff(host_ms) < 60_000,
        "{guest_ms} vs {host_ms}"
    );

    // While paused the guest's clock stands still, so it falls behind by the pause;
    // the host sets it again on resume.
    let pause = Duration::from_millis(1500);
    vm.pause().unwrap();
    std::thread::sleep(pause);
    vm.resume().unwrap();
    wait_until("the clock is set after the resume", || {
        vm.agent_stats().unwrap().time_generation > generation && time_applied(&vm)
    });
    let drift = vm.time_drift_ms().unwrap();
    assert!(
        drift.abs() < pause.as_millis() as f64 / 2.0,
        "drift {drift} ms after a {pause:?} pause"
    );
    vm.stop();
}

#[test]
fn key_value_pairs_go_both_ways_within_their_limits() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = registry.create(common::builtin("kvp", "")).unwrap();
    // Set before the start: delivered when the guest's agent says HELLO.
    vm.kvp_host_set("role", "web").unwrap();
    vm.start().unwrap();
    vm.wait_for_guest_kvp("ready", Some("1"), TIMEOUT).unwrap();
    vm.kvp_host_set("zone", "eu-1").unwrap();
    let r = vm.exec("kvp-get role; kvp-get zone", TIMEOUT).unwrap();
    assert_eq!((r.code, r.stdout.as_str()), (0, "role=web\nzone=eu-1\n"));
    assert!(vm.kvp_host_delete("zone").unwrap());
    assert!(!vm.kvp_host_delete("zone").unwrap());
    let r = vm.exec("kvp-get zone", TIMEOUT).unwrap();
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        vm.kvp_host_list(),
        [("role".to_string(), "web".to_string())]
    );

    // The guest publishes its own.
    assert_eq!(vm.exec("kvp-set color blue", TIMEOUT).unwrap().code, 0);
    assert_eq!(
        vm.wait_for_guest_kvp("color", Some("blue"), TIMEOUT)
            .unwrap(),
        "blue"
    );
    assert!(vm.kvp_guest_list().iter().any(|(k, _)| k == "boot_id"));

    // Limits, with messages that say which.
    let e = vm.kvp_host_set(&"k".repeat(65), "v").unwrap_err();
    assert!(e.to_string().contains("1 to 64 bytes"), "{e}");
    let e = vm.kvp_host_set("big", &"v".repeat(1025)).unwrap_err();
    assert!(
        e.to_string()
            .contains("1025 bytes; a value has at most 1024"),
        "{e}"
    );
    assert!(vm.kvp_host_set("white space", "v").is_err());
    for i in 1..256 {
        vm.kvp_host_set(&format!("k{i}"), "v").unwrap();
    }
    let e = vm.kvp_host_set("one-too-many", "v").unwrap_err();
    assert!(matches!(e, AgentError::TooManyKeys { .. }), "{e}");
    // A value of the largest size arrives whole.
    let value = "x".repeat(1024);
    vm.kvp_host_set("k1", &value).unwrap();
    let r = vm.exec("kvp-get k1", TIMEOUT).unwrap();
    assert_eq!(r.stdout, format!("k1={value}\n"));
    // A guest that publishes past the limits is refused (and counted), and goes on.
    let refused = vm.agent_stats().unwrap().kvp_refused;
    assert_eq!(vm.exec("agent-evil kvp-big", TIMEOUT).unwrap().code, 0);
    wait_until("the oversized pair is refused", || {
        vm.agent_stats().unwrap().kvp_refused > refused
    });
    assert_eq!(vm.kvp_guest_get("evil"), None);
    assert_eq!(vm.exec("hello", TIMEOUT).unwrap().code, 0);
    vm.stop();
}

#[test]
fn exec_returns_output_and_exit_codes() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "exec");
    let r = vm.exec("hello", TIMEOUT).unwrap();
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "hello from luvisor guest\n")
    );
    assert!(!r.truncated);
    let r = vm.exec("compute 1000; hello", TIMEOUT).unwrap();
    assert!(r.stdout.starts_with("compute ") && r.stdout.ends_with("guest\n"));
    let r = vm.exec("blk-info", TIMEOUT).unwrap();
    assert_eq!(r.code, 2);
    assert!(
        r.stdout.starts_with("error: blk-info: no such disk"),
        "{r:?}"
    );
    let r = vm.exec("no-such-command", TIMEOUT).unwrap();
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (2, "error: no-such-command: unknown command\n")
    );
    // serve only ends a command line.
    assert_eq!(vm.exec("serve", TIMEOUT).unwrap().code, 2);
    // Output past the limit is cut.
    for i in 0..48 {
        vm.kvp_host_set(&format!("k{i}"), &"v".repeat(1000))
            .unwrap();
    }
    let r = vm.exec("kvp-list", TIMEOUT).unwrap();
    assert!(r.truncated);
    assert_eq!(r.stdout.len(), MAX_OUTPUT);
    // Exec output goes to the reply, not to the console.
    assert!(!vm.console().text().contains("hello from luvisor guest"));
    // Bad commands are refused before they reach the guest.
    assert!(matches!(
        vm.exec(&"x".repeat(1025), TIMEOUT).unwrap_err(),
        AgentError::CommandTooLong { len: 1025 }
    ));
    assert!(vm.exec("hello\nexit 3", TIMEOUT).is_err());
    // Several threads at once: one exec at a time, each gets its own answer.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.exec(&format!("compute {}", 1000 + i), TIMEOUT))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap().code, 0);
    }
    // An exec that ends the VM gets the ending as its error.
    let e = vm.exec("exit 7", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("exit code 7"), "{e}");
    // It served its channel: no hint about command lines that do not.
    assert!(!e.to_string().contains("command line"), "{e}");
    assert!(matches!(
        vm.exec("hello", TIMEOUT).unwrap_err(),
        AgentError::NotRunning { .. }
    ));
}

/// Work that reaches the guest while its agent is still being set up (an exec or a
/// shutdown sent right after the start) is done at once: the guest must not idle with
/// it in hand until the first heartbeat (a second later) wakes it. The host's first
/// PING goes out a heartbeat interval after the agent connected, so an answer that came
/// with no PING sent did not wait for one.
#[test]
fn an_exec_or_a_shutdown_right_after_the_start_is_done_at_once() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = registry.create(common::builtin("at-once", "")).unwrap();
    vm.start().unwrap();
    let r = vm.exec("hello", TIMEOUT).unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        vm.agent_stats().unwrap().pings,
        0,
        "the exec waited for a heartbeat"
    );
    vm.stop();

    // A shutdown queued before the agent connected reaches it during its setup.
    let vm = registry
        .create(common::builtin("down-at-once", ""))
        .unwrap();
    vm.start().unwrap();
    let out = vm.shutdown(TIMEOUT).unwrap();
    assert_eq!(out.how, ShutdownHow::Graceful, "{out:?}");
    assert!(out.acknowledged);
    assert_eq!(
        vm.agent_stats().unwrap().pings,
        0,
        "the shutdown waited for a heartbeat"
    );
}

/// An exec whose caller gave up keeps running in the guest; the next exec waits for
/// it (within its own timeout, which then names it), and then gets its own answer.
#[test]
fn an_exec_after_one_that_timed_out_waits_for_the_guest_to_finish_it() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "abandon");
    let e = vm.exec("sleep 300", Duration::from_millis(1)).unwrap_err();
    assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
    let stale = vm.agent_stats().unwrap().stale_replies;
    let r = vm.exec("hello", TIMEOUT).unwrap();
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "hello from luvisor guest\n")
    );
    // The sleep's result came first, and went nowhere.
    assert_eq!(vm.agent_stats().unwrap().stale_replies, stale + 1);

    // A guest that never finishes the abandoned exec: the next one times out saying why.
    let e = vm
        .exec("sleep 600000", Duration::from_millis(1))
        .unwrap_err();
    assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
    let e = vm.exec("hello", Duration::from_millis(50)).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "to answer exec \"hello\" (the guest still runs an earlier exec, \"sleep 600000\", \
             whose caller gave up)"
        ),
        "{e}"
    );
    vm.stop();
}

/// A guest whose command line does not serve the channel ends without answering; the
/// error says so, and how to make the built-in guest serve it.
#[test]
fn waiting_on_a_guest_that_does_not_serve_its_channel_says_why() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = registry
        .create(common::builtin("no-serve", "hello"))
        .unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    let e = vm.wait_for_guest_kvp("ready", None, TIMEOUT).unwrap_err();
    assert_eq!(
        e.to_string(),
        "vm 'no-serve' ended (exit code 0) before it published guest key \"ready\" (the \
         built-in guest serves its agent channel only when its command line is empty or ends \
         with `serve`)"
    );
}

#[test]
fn a_vm_without_an_agent_says_so() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let mut config = common::builtin("plain", "");
    config.agent = false;
    let vm = registry.create(config).unwrap();
    vm.start().unwrap();
    // Without a channel to serve, an empty command line ends at once, as it used to.
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    assert!(!vm.has_agent());
    assert_eq!(vm.health().state, HealthState::None);
    assert!(matches!(
        vm.kvp_host_set("a", "b").unwrap_err(),
        AgentError::NoAgent { .. }
    ));
    let e = vm.exec("hello", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("agent = false"), "{e}");
}

#[test]
fn shutdown_is_graceful_when_the_guest_answers_and_forced_when_not() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "polite");
    let out = vm.shutdown(TIMEOUT).unwrap();
    assert_eq!(out.how, ShutdownHow::Graceful);
    assert_eq!(out.code(), Some(0));
    assert!(out.acknowledged);
    assert_eq!(vm.state(), VmState::Stopped);
    let again = vm.shutdown(TIMEOUT).unwrap();
    assert_eq!(again.how, ShutdownHow::AlreadyStopped);
    assert_eq!(again.code(), Some(0));

    // A guest busy in a long loop never reaches a wait point: a hard stop.
    let busy = registry
        .create(common::builtin("busy", "compute 100000000000"))
        .unwrap();
    busy.start().unwrap();
    let out = busy.shutdown(Duration::from_millis(300)).unwrap();
    assert_eq!(out.how, ShutdownHow::Forced);
    assert_eq!(out.outcome, VmOutcome::Stopped);
    assert!(!out.acknowledged);

    // A paused VM cannot answer: stopped at once.
    let paused = serving(&registry, "paused");
    paused.pause().unwrap();
    assert_eq!(paused.shutdown(TIMEOUT).unwrap().how, ShutdownHow::Forced);

    // The guest also obeys while its command line waits (in sleep).
    let sleeper = registry
        .create(common::builtin("sleeper", "sleep 600000"))
        .unwrap();
    sleeper.start().unwrap();
    let out = sleeper.shutdown(TIMEOUT).unwrap();
    assert_eq!((out.how, out.code()), (ShutdownHow::Graceful, Some(0)));
}

#[test]
fn a_guest_that_crashes_while_asked_to_shut_down_is_reported_crashed_not_graceful() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    // Its agent answers nothing (so it never acknowledges), and the guest takes commands
    // from the console: the test makes it crash once the shutdown waits.
    let vm = registry
        .create(common::builtin("crasher", "agent-hang 600000; listen"))
        .unwrap();
    vm.start().unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    vm.console()
        .wait_for("listening", 0, deadline, &|| false)
        .unwrap();
    let sent = std::sync::atomic::AtomicBool::new(false);
    let out = vm
        .shutdown_cancellable(TIMEOUT, &|| {
            // Polled while the shutdown waits for the guest to end.
            if !sent.swap(true, std::sync::atomic::Ordering::SeqCst) {
                vm.send_input(b"fault\n").unwrap();
            }
            false
        })
        .unwrap();
    assert!(sent.into_inner());
    assert_eq!(out.how, ShutdownHow::Crashed, "{out:?}");
    assert!(matches!(out.outcome, VmOutcome::Crashed(_)), "{out:?}");
    assert_eq!(out.code(), None);
    assert!(!out.acknowledged);
    assert_eq!(vm.state(), VmState::Crashed);
}

#[test]
fn a_hostile_guest_gets_its_garbage_dropped_and_counted() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::new();
    let vm = serving(&registry, "evil");
    let r = vm.exec("agent-evil all", TIMEOUT).unwrap();
    assert_eq!((r.code, r.stdout.as_str()), (0, "agent-evil all sent\n"));
    let stats = vm.agent_stats().unwrap();
    // crc, version and truncated are malformed; the 1 MiB header is oversized; 0x7f is
    // unknown; the 2 KiB value is refused.
    assert!(stats.malformed >= 3, "{stats:?}");
    assert!(stats.oversized >= 1, "{stats:?}");
    assert!(stats.unknown >= 1, "{stats:?}");
    assert!(stats.kvp_refused >= 1, "{stats:?}");
    assert!(stats.discarded_bytes > 0, "{stats:?}");
    // The channel and the VM go on.
    assert_eq!(vm.exec("hello", TIMEOUT).unwrap().code, 0);
    assert_eq!(vm.state(), VmState::Running);
    for kind in [
        "garbage",
        "crc",
        "oversized",
        "unknown",
        "version",
        "truncated",
    ] {
        assert_eq!(
            vm.exec(&format!("agent-evil {kind}"), TIMEOUT)
                .unwrap()
                .code,
            0
        );
        assert_eq!(vm.exec("hello", TIMEOUT).unwrap().code, 0, "after {kind}");
    }
    vm.stop();
}

#[test]
fn a_restored_snapshot_keeps_its_channel_and_gets_the_time() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("agent-snapshot");
    let registry = Registry::new();
    let vm = serving(&registry, "original");
    vm.kvp_host_set("role", "db").unwrap();
    assert_eq!(vm.exec("kvp-get role", TIMEOUT).unwrap().code, 0);
    let boot_id = vm.kvp_guest_get("boot_id").unwrap();
    let snap = dir.join("snap");
    vm.snapshot(&snap, &SnapshotOptions::default()).unwrap();
    let generation = vm.agent_stats().unwrap().time_generation;
    vm.stop();

    let restored = registry.restore(&snap, Some("restored")).unwrap();
    assert!(restored.has_agent());
    // The same boot, with both sides' keys.
    assert_eq!(restored.kvp_guest_get("boot_id"), Some(boot_id));
    assert_eq!(restored.kvp_host_get("role").as_deref(), Some("db"));
    let r = restored.exec("kvp-get role; hello", TIMEOUT).unwrap();
    assert_eq!(r.stdout, "role=db\nhello from luvisor guest\n");
    // The guest's clock stood still since the snapshot: the host set it again.
    wait_until("the clock is set after the restore", || {
        restored.agent_stats().unwrap().time_generation > generation && time_applied(&restored)
    });
    assert!(matches!(
        restored.health().state,
        HealthState::Ok | HealthState::Late
    ));
    let out = restored.shutdown(TIMEOUT).unwrap();
    assert_eq!(out.how, ShutdownHow::Graceful);
    std::fs::remove_dir_all(&dir).unwrap();
}
