//! The engine with real VMs records (in state `created`: targets can be set in any state,
//! and no KVM is needed): loads, hot reloads, broken edits, runaway ticks, removal,
//! recording and replay. Every wait is for an event (a status change), with a long
//! safety timeout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use luvisor_runtime::vm::dynamic_memory::MemoryKnobs;
use luvisor_runtime::{GuestSpec, Registry, VmConfig};

use super::*;

const M: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("luvisor-policy-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn registry(names: &[&str]) -> Arc<Registry> {
    let registry = Arc::new(Registry::new());
    for name in names {
        let mut config = VmConfig::new(
            *name,
            GuestSpec::Builtin {
                cmdline: "idle".into(),
            },
        );
        config.memory = 1024 * M;
        config.dynamic_memory = Some(MemoryKnobs {
            startup: 512 * M,
            min: 128 * M,
            max: 1024 * M,
            buffer_percent: 20,
            weight: 5000,
        });
        registry.create(config).unwrap();
        registry
            .find(name)
            .unwrap()
            .set_memory_target(512 * M, "test")
            .unwrap();
    }
    registry
}

/// A policy that sets every VM to `mib` MiB.
fn fixed_policy(name: &str, mib: u64) -> String {
    format!(
        "return {{ name = '{name}', interval_ms = 20, tick = function(ctx)\n\
         for _, vm in ipairs(ctx.vms) do\n\
         ctx:set_memory_target(vm, {mib} * 1024 * 1024, 'fixed at {mib}M')\n\
         end\nend }}\n"
    )
}

/// Writes `text` to `path` the way editors do: a temporary file renamed over it.
fn save(path: &Path, text: &str) {
    let temporary = path.with_extension("lua.tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn target(registry: &Registry, vm: &str) -> u64 {
    registry.find(vm).unwrap().memory_target()
}

fn status(engine: &PolicyEngine, name: &str) -> PolicyStatus {
    engine.status_of(name).unwrap()
}

#[test]
fn a_loaded_policy_ticks_and_sets_targets_with_its_reasons() {
    let dir = scratch("load");
    let registry = registry(&["a", "b"]);
    let engine = engine(&registry);
    let file = dir.join("fixed.lua");
    std::fs::write(&file, fixed_policy("fixed", 300)).unwrap();
    let loaded = engine.load(&file, Limits::default()).unwrap();
    assert_eq!(loaded.name.as_deref(), Some("fixed"));
    assert_eq!(loaded.generation, 1);
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= 2));
    assert_eq!(target(&registry, "a"), 300 * M);
    assert_eq!(target(&registry, "b"), 300 * M);
    let status = status(&engine, "fixed");
    assert_eq!(status.failures, 0);
    assert_eq!(status.last_decisions.len(), 2);
    assert_eq!(status.last_decisions[0].reason, "fixed at 300M");
    assert!(status.last_tick_ms.is_some());
    // The same file again is a reload; another file may not take the name.
    assert_eq!(engine.load(&file, Limits::default()).unwrap().generation, 2);
    let other = dir.join("other.lua");
    std::fs::write(&other, fixed_policy("fixed", 200)).unwrap();
    let error = engine.load(&other, Limits::default()).unwrap_err();
    assert!(error.contains("'fixed' is already taken"), "{error}");
    assert_eq!(engine.status().len(), 1);
    engine.unload("fixed").unwrap();
    assert!(engine.status().is_empty());
    assert!(engine
        .unload("fixed")
        .unwrap_err()
        .contains("no policy named 'fixed'"));
    shutdown(&registry);
}

#[test]
fn edits_reload_broken_edits_keep_the_previous_version_and_removal_stops() {
    let dir = scratch("reload");
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    let file = dir.join("p.lua");
    std::fs::write(&file, fixed_policy("p", 300)).unwrap();
    let found = engine.watch(&dir, Limits::default()).unwrap();
    assert_eq!(found.len(), 1);
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 300 * M));

    // Loading reads the file, which is no change: a few ticks later it is still the
    // first version.
    let ticks = status(&engine, "p").ticks;
    assert!(engine.wait_until(WAIT, |s| s[0].ticks > ticks + 15));
    assert_eq!(status(&engine, "p").generation, 1);

    // An edit: the new version runs.
    save(&file, &fixed_policy("p", 400));
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 400 * M));
    assert_eq!(status(&engine, "p").generation, 2);

    // A broken edit: the error names file and line; version 2 goes on ticking.
    save(
        &file,
        "return {\n name = 'p',\n tick = function(ctx)\n ctx:oops(\nend }\n",
    );
    assert!(engine.wait_until(WAIT, |s| s[0].last_error.is_some()));
    let broken = status(&engine, "p");
    assert_eq!(broken.generation, 2);
    let error = broken.last_error.clone().unwrap();
    assert!(error.contains("p.lua:5:"), "{error}");
    let ticks = broken.ticks;
    assert!(engine.wait_until(WAIT, |s| s[0].ticks > ticks + 2));
    assert_eq!(target(&registry, "vm1"), 400 * M);

    // A version that fails its shadow run is refused too.
    save(
        &file,
        "return { name = 'p', tick = function(ctx)\n error('not ready') end }\n",
    );
    assert!(engine.wait_until(WAIT, |s| s[0]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("shadow run failed"))));
    let error = status(&engine, "p").last_error.unwrap();
    assert!(error.contains("p.lua:2: not ready"), "{error}");
    assert_eq!(status(&engine, "p").generation, 2);

    // Fixed: version 3 runs, the error is gone.
    save(&file, &fixed_policy("p", 500));
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 500 * M));
    let fixed = status(&engine, "p");
    assert_eq!((fixed.generation, fixed.last_error), (3, None));

    // A new file is loaded; a removed one stops.
    std::fs::write(dir.join("q.lua"), fixed_policy("q", 500)).unwrap();
    assert!(engine.wait_until(WAIT, |s| s.iter().any(|s| s.name.as_deref() == Some("q"))));
    std::fs::remove_file(&file).unwrap();
    assert!(engine.wait_until(WAIT, |s| s.len() == 1 && s[0].name.as_deref() == Some("q")));
    shutdown(&registry);
}

#[test]
fn a_changed_module_reloads_the_policies_that_may_use_it() {
    let dir = scratch("module");
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    save(&dir.join("lib/size.lua"), "return { mib = 300 }");
    std::fs::write(
        dir.join("uses.lua"),
        "local size = require('lib.size')
         return { name = 'uses', interval_ms = 20, tick = function(ctx)
         ctx:set_memory_target('vm1', size.mib * 1024 * 1024, 'from lib.size') end }
",
    )
    .unwrap();
    engine.watch(&dir, Limits::default()).unwrap();
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 300 * M));
    save(&dir.join("lib/size.lua"), "return { mib = 350 }");
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 350 * M));
    assert_eq!(status(&engine, "uses").generation, 2);
    shutdown(&registry);
}

#[test]
fn a_watched_file_that_never_loaded_shows_its_error_until_fixed() {
    let dir = scratch("never");
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    let file = dir.join("bad.lua");
    std::fs::write(&file, "return 42").unwrap();
    let found = engine.watch(&dir, Limits::default()).unwrap();
    assert_eq!(found.len(), 1);
    assert!(!found[0].running);
    assert_eq!(found[0].generation, 0);
    assert!(found[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("must return a policy table"));
    save(&file, &fixed_policy("good", 256));
    assert!(engine.wait_until(WAIT, |_| target(&registry, "vm1") == 256 * M));
    assert!(status(&engine, "good").running);
    shutdown(&registry);
}

#[test]
fn runaway_ticks_are_stopped_and_other_policies_keep_running() {
    let dir = scratch("runaway");
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    let limits = Limits {
        instruction_budget: 1_000_000,
        memory_limit: 16 << 20,
    };
    let spin = dir.join("spin.lua");
    std::fs::write(
        &spin,
        "return { name = 'spin', interval_ms = 20, tick = function(ctx)\n while true do end\n end }\n",
    )
    .unwrap();
    let bomb = dir.join("bomb.lua");
    std::fs::write(
        &bomb,
        "local t = {}\nreturn { name = 'bomb', interval_ms = 20, tick = function(ctx)\n\
         for i = 1, 1e9 do t[#t + 1] = string.rep('x', 1000) .. i end\n end }\n",
    )
    .unwrap();
    // They fail their shadow runs, so they do not load.
    let error = engine.load(&spin, limits).unwrap_err();
    assert!(
        error.contains("spin.lua:2: instruction budget of 1000000 exceeded"),
        "{error}"
    );
    let error = engine.load(&bomb, limits).unwrap_err();
    assert!(error.contains("not enough memory"), "{error}");
    assert!(engine.status().is_empty());

    // Ones that turn bad after loading fail their ticks, which are counted.
    for (file, name, body) in [
        (&spin, "spin", "while true do end"),
        (
            &bomb,
            "bomb",
            "for i = 1, 1e9 do t[#t + 1] = string.rep('x', 1000) .. i end",
        ),
    ] {
        std::fs::write(
            file,
            format!(
                "local t, n = {{}}, 0\nreturn {{ name = '{name}', interval_ms = 20, tick = function(ctx)\n\
                 n = n + 1\n if n > 1 then {body} end\n end }}\n"
            ),
        )
        .unwrap();
        engine.load(file, limits).unwrap();
    }
    let steady = dir.join("steady.lua");
    std::fs::write(&steady, fixed_policy("steady", 200)).unwrap();
    engine.load(&steady, limits).unwrap();
    assert!(engine.wait_until(WAIT, |s| s.iter().all(|s| s.ticks >= 3)));
    let spin = status(&engine, "spin");
    assert!(spin.failures >= 2 && spin.running);
    assert!(spin
        .last_error
        .unwrap()
        .contains("instruction budget of 1000000 exceeded"));
    let bomb = status(&engine, "bomb");
    assert!(bomb.failures >= 2 && bomb.running);
    assert!(bomb.last_error.unwrap().contains("not enough memory"));
    assert_eq!(status(&engine, "steady").failures, 0);
    assert_eq!(target(&registry, "vm1"), 200 * M);
    shutdown(&registry);
}

#[test]
fn a_stuck_policy_blocks_neither_others_nor_the_caller_and_unload_stops_it() {
    let dir = scratch("stuck");
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    let stuck = dir.join("stuck.lua");
    // Loads and passes its shadow run, then loops with a budget it cannot reach soon.
    std::fs::write(
        &stuck,
        "local n = 0\nreturn { name = 'stuck', interval_ms = 10, tick = function(ctx)\n\
         n = n + 1\n if n > 1 then while true do end end\n end }\n",
    )
    .unwrap();
    let huge = Limits {
        instruction_budget: u64::MAX / 2,
        ..Limits::default()
    };
    engine.load(&stuck, huge).unwrap();
    let steady = dir.join("steady.lua");
    std::fs::write(&steady, fixed_policy("steady", 200)).unwrap();
    engine.load(&steady, Limits::default()).unwrap();
    let ticks = status(&engine, "steady").ticks;
    assert!(
        engine.wait_until(WAIT, |_| engine.status_of("steady").unwrap().ticks
            > ticks + 3)
    );
    // Unloading interrupts the stuck tick.
    engine.unload("stuck").unwrap();
    assert!(engine.status_of("stuck").is_none());
    shutdown(&registry);
}

#[test]
fn a_recorded_run_replays_to_the_same_decisions() {
    let dir = scratch("replay");
    let registry = registry(&["a", "b", "c"]);
    let engine = engine(&registry);
    let trace = dir.join("trace.jsonl");
    engine.set_recorder(Some(Arc::new(TraceFile::create(&trace).unwrap())));
    // Decisions that depend on the Lua state, the history and the VMs' targets.
    let file = dir.join("stateful.lua");
    std::fs::write(
        &file,
        r#"
        local step = 0
        return { name = "stateful", interval_ms = 10, tick = function(ctx)
            step = step + 1
            for i, vm in ipairs(ctx.vms) do
                local mean = ctx:mean(vm, "target", 3)
                local want = math.floor(mean) + (step % 3) * i * 4096 * 16
                ctx:set_memory_target(vm, want, string.format("step %d, mean %.0f", step, mean))
            end
        end }
        "#,
    )
    .unwrap();
    engine.load(&file, Limits::default()).unwrap();
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= 8));
    engine.set_recorder(None);
    shutdown(&registry);

    let records = record::read_trace(&trace).unwrap();
    let live = records
        .iter()
        .filter(|r| matches!(r, TraceRecord::Tick { .. }))
        .count();
    assert!(live >= 9, "a shadow run and 8 ticks, got {live}");
    let instance = record::load_file(&file, Limits::default()).unwrap();
    let replayed = record::simulate(&instance, &records);
    assert_eq!(replayed.len(), live);
    assert!(replayed[0].shadow);
    for tick in &replayed {
        assert_eq!(tick.matches(), Some(true), "tick {}: {:?}", tick.tick, tick);
        assert_eq!(tick.decisions.len(), 3);
    }
    // The decisions changed from tick to tick, so the match means something.
    assert_ne!(replayed[1].decisions, replayed[2].decisions);
}

// ---------------------------------------------------------------------------------------
// Migration triggers: peer hosts, ctx:migrate and its guards, the helpers, and the
// shipped migrate_on_pressure policy.
//
// The migrations themselves run through a recording `MigrationExecutor`: a test double at
// the seam the real live migration (`Vm::migrate`, landing separately) plugs into. The
// peers are real: a control handler serving a registry on a loopback port, polled through
// `RemoteHost` like any other host.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use luvisor_runtime::migration::PeerKey;

use super::context::{History, TickInput};
use super::migrate::{MigrateDecision, MigrationLimits, MigrationSnapshot, NOT_AVAILABLE};
use super::peers::{PeerHost, PeerSnapshot};

const G: u64 = 1 << 30;

/// A private key file of 32 bytes in `dir`.
fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("key");
    std::fs::write(&path, [42u8; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A peer host: a control handler serving a registry of two VMs on a loopback port.
fn peer_host(key: &Path) -> String {
    let registry = registry(&["p1", "p2"]);
    luvisor_runtime::remote::test_listener::spawn(
        PeerKey::from_file(key).unwrap(),
        crate::remote::control_handler(&registry),
    )
    .unwrap()
}

fn declare(name: &str, addr: &str, key: &Path) -> PeerHost {
    PeerHost {
        name: name.into(),
        addr: addr.into(),
        key_file: key.to_path_buf(),
        key: PeerKey::from_file(key).unwrap(),
    }
}

fn reachable(engine: &PolicyEngine, name: &str) -> bool {
    engine.hosts().iter().any(|h| h.name == name && h.reachable)
}

#[test]
fn peers_are_polled_into_ctx_hosts_which_is_read_only() {
    let dir = scratch("peers");
    let key = key_file(&dir);
    let addr = peer_host(&key);
    let registry = registry(&["vm1"]);
    let engine = engine(&registry);
    engine
        .set_peers(vec![
            declare("b", &addr, &key),
            // Nothing listens on port 1: refused at once.
            declare("down", "127.0.0.1:1", &key),
        ])
        .unwrap();
    assert!(engine.wait_until(WAIT, |_| {
        let hosts = engine.hosts();
        hosts[0].reachable && hosts[1].error.as_deref() != Some("not polled yet")
    }));
    let hosts = engine.hosts();
    assert_eq!(hosts[0].vms, Some(2));
    assert!(hosts[0].memory_total.unwrap() > 0 && hosts[0].age_ms.is_some());
    assert_eq!(hosts[0].error, None);
    assert!(!hosts[1].reachable);
    assert_eq!((hosts[1].memory_total, hosts[1].age_ms), (None, None));
    let error = hosts[1].error.clone().unwrap();
    assert!(error.contains("127.0.0.1:1"), "{error}");

    let file = dir.join("hosts.lua");
    std::fs::write(
        &file,
        r#"
        return { name = "hosts", interval_ms = 20, tick = function(ctx)
            assert(#ctx.hosts == 2)
            local b, down = ctx.hosts[1], ctx.hosts[2]
            assert(b.name == "b" and b.reachable and b.vms == 2 and b.error == nil)
            assert(b.memory_available > 0 and b.memory_reserve > 0 and b.vms_resident >= 0)
            assert(down.name == "down" and not down.reachable and down.memory_total == nil)
            assert(type(down.error) == "string" and down.addr == "127.0.0.1:1")
            assert(not pcall(function() ctx.hosts[1].reachable = false end))
            assert(not pcall(function() ctx.hosts[3] = {} end))
            assert(not pcall(rawset, ctx.hosts[1], "vms", 0))
            assert(not pcall(rawset, ctx.hosts, 1, {}))
            assert(#ctx.migrations == 0)
            local names = {}
            for i, h in ipairs(ctx.hosts) do names[i] = h.name end
            ctx:set_memory_target("vm1", "256M", table.concat(names, ","))
        end }
        "#,
    )
    .unwrap();
    engine.load(&file, Limits::default()).unwrap();
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= 2));
    let status = status(&engine, "hosts");
    assert_eq!(status.failures, 0, "{:?}", status.last_error);
    assert_eq!(status.last_decisions[0].reason, "b,down");

    // A new declaration replaces the old one; an empty one leaves no peers.
    engine.set_peers(Vec::new()).unwrap();
    assert!(engine.hosts().is_empty());
    shutdown(&registry);
}

/// A [`MigrationExecutor`] that records its calls and ends each migration when the test
/// sends the outcome for its VM.
#[derive(Default)]
struct RecordingExecutor {
    calls: Mutex<Vec<(String, String, String)>>,
    gates: Mutex<HashMap<String, Receiver<Result<serde_json::Value, String>>>>,
}

impl RecordingExecutor {
    /// A gate for `vm`: what is sent on it is how its migration ends.
    fn gate(&self, vm: &str) -> Sender<Result<serde_json::Value, String>> {
        let (tx, rx) = channel();
        self.gates.lock().unwrap().insert(vm.into(), rx);
        tx
    }

    fn executor(self: &Arc<Self>) -> MigrationExecutor {
        let this = self.clone();
        Arc::new(move |vm, host, reason| {
            this.calls.lock().unwrap().push((
                vm.name().to_string(),
                host.name.clone(),
                reason.to_string(),
            ));
            let gate = this.gates.lock().unwrap().remove(vm.name());
            match gate {
                Some(gate) => gate.recv().unwrap_or_else(|_| Err("gate dropped".into())),
                None => Err(format!("no gate for vm '{}'", vm.name())),
            }
        })
    }
}

fn migration_state(engine: &PolicyEngine, vm: &str) -> Option<&'static str> {
    engine
        .migrations()
        .iter()
        .rev()
        .find(|m| m.vm == vm)
        .map(|m| m.state)
}

/// The migrate decisions of every live (not shadow) tick in `records`.
fn recorded_migrations(records: &[TraceRecord]) -> Vec<Vec<MigrateDecision>> {
    records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Tick {
                shadow: false,
                migrations,
                ..
            } => Some(migrations.clone()),
            _ => None,
        })
        .collect()
}

fn refusals(decisions: &[MigrateDecision]) -> Vec<Option<&str>> {
    decisions.iter().map(|d| d.refused.as_deref()).collect()
}

#[test]
fn migrate_intents_go_through_the_guards_and_run_in_the_background() {
    let dir = scratch("guards");
    let key = key_file(&dir);
    let addr = peer_host(&key);
    let registry = registry(&["web", "db"]);
    let engine = engine(&registry);
    let trace = dir.join("trace.jsonl");
    engine.set_recorder(Some(Arc::new(TraceFile::create(&trace).unwrap())));
    engine.set_migration_limits(MigrationLimits {
        cooldown_ms: 3_600_000,
        ..MigrationLimits::default()
    });
    engine
        .set_peers(vec![declare("peer", &addr, &key)])
        .unwrap();
    assert!(engine.wait_until(WAIT, |_| reachable(&engine, "peer")));

    // Asks for the same three migrations every tick: web, db, and web again.
    let file = dir.join("mover.lua");
    std::fs::write(
        &file,
        r#"
        return { name = "mover", interval_ms = 20, tick = function(ctx)
            local ok, why = ctx:migrate("web", "peer", "first")
            assert(ok == (why == nil))
            ctx:migrate(ctx.vms[2], ctx.hosts[1], "second")
            ctx:migrate(ctx.vms[1], "peer", "again")
        end }
        "#,
    )
    .unwrap();

    // No executor: every intent is refused as not available.
    engine.set_migration_executor(None);
    engine.load(&file, Limits::default()).unwrap();
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= 2));
    let refused = status(&engine, "mover");
    assert_eq!(
        refusals(&refused.last_migrate_decisions),
        [Some(NOT_AVAILABLE); 3]
    );
    assert!(refused.migrations.is_empty());

    // With an executor: web starts; db waits for the per-host limit; web is not asked
    // twice.
    let executor = Arc::new(RecordingExecutor::default());
    let web_done = executor.gate("web");
    let db_done = executor.gate("db");
    engine.set_migration_executor(Some(executor.executor()));
    assert!(engine.wait_until(WAIT, |_| migration_state(&engine, "web") == Some("running")));
    // Two more ticks while web runs.
    let ticks = status(&engine, "mover").ticks;
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= ticks + 2));
    let running = status(&engine, "mover");
    let d = &running.last_migrate_decisions;
    assert!(d[0]
        .refused
        .as_deref()
        .unwrap()
        .contains("already migrating to 'peer'"));
    assert!(d[1]
        .refused
        .as_deref()
        .unwrap()
        .contains("limit of 1 outgoing migration(s)"));
    assert!(d[2]
        .refused
        .as_deref()
        .unwrap()
        .contains("already migrating"));
    assert_eq!(running.migrations.len(), 1);
    assert_eq!(running.migrations[0].addr, addr);

    // web ends: it cools down, and db may go.
    web_done
        .send(Ok(serde_json::json!({ "downtime_ms": 5 })))
        .unwrap();
    assert!(engine.wait_until(WAIT, |_| migration_state(&engine, "db") == Some("running")));
    let ticks = status(&engine, "mover").ticks;
    assert!(engine.wait_until(WAIT, |s| s[0].ticks >= ticks + 2));
    let d = status(&engine, "mover").last_migrate_decisions;
    assert!(d[0]
        .refused
        .as_deref()
        .unwrap()
        .contains("vm 'web' is cooling down"));
    assert!(d[1]
        .refused
        .as_deref()
        .unwrap()
        .contains("already migrating"));

    // db fails: the outcome and the error are in the status.
    db_done
        .send(Err("the destination ran out of memory".into()))
        .unwrap();
    assert!(engine.wait_until(WAIT, |_| migration_state(&engine, "db") == Some("failed")));
    let ended = status(&engine, "mover");
    let (web, db) = (&ended.migrations[0], &ended.migrations[1]);
    assert_eq!((web.vm.as_str(), web.state), ("web", "succeeded"));
    assert_eq!(web.report, Some(serde_json::json!({ "downtime_ms": 5 })));
    assert!(web.ended_ms.is_some());
    assert_eq!((db.vm.as_str(), db.state), ("db", "failed"));
    assert_eq!(
        db.error.as_deref(),
        Some("the destination ran out of memory")
    );
    assert_eq!(
        *executor.calls.lock().unwrap(),
        [
            ("web".into(), "peer".into(), "policy mover: first".into()),
            ("db".into(), "peer".into(), "policy mover: second".into()),
        ]
    );
    engine.unload("mover").unwrap();
    engine.set_recorder(None);
    shutdown(&registry);

    // The trace holds every verdict, and the tick that started web refused the rest.
    let records = record::read_trace(&trace).unwrap();
    let ticks = recorded_migrations(&records);
    let started = ticks
        .iter()
        .find(|d| d[0].refused.is_none())
        .expect("a tick started web");
    assert_eq!(started[0].vm, "web");
    assert!(started[1]
        .refused
        .as_deref()
        .unwrap()
        .contains("limit of 1 outgoing migration(s)"));
    assert!(started[2]
        .refused
        .as_deref()
        .unwrap()
        .contains("was already asked this tick"));
    // A replay computes the same verdicts from the recorded inputs.
    let instance = record::load_file(&file, Limits::default()).unwrap();
    let replayed = record::simulate(&instance, &records);
    assert!(replayed.len() >= 6);
    for tick in &replayed {
        assert_eq!(tick.matches(), Some(true), "tick {}: {:?}", tick.tick, tick);
    }
    assert!(replayed.iter().any(|t| t.migrations[0].refused.is_none()));
}

/// Runs `instance` over `inputs` as consecutive ticks; the results.
fn run_ticks(instance: &Instance, inputs: &[TickInput]) -> Vec<TickResult> {
    let mut history = History::default();
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let input = Rc::new(input.clone());
            history.push(&input);
            let (result, back) = instance.run(&input, i as u64 + 1, std::mem::take(&mut history));
            history = back;
            result
        })
        .collect()
}

fn load_source(source: &str) -> Instance {
    Instance::load(
        "policies/t.lua",
        &std::env::temp_dir(),
        source,
        Limits::default(),
    )
    .unwrap()
}

/// The reasons of each tick's first decision.
fn reasons(results: &[TickResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| {
            assert_eq!(r.error, None);
            r.decisions[0].reason.clone()
        })
        .collect()
}

#[test]
fn held_counts_consecutive_ticks() {
    let p = load_source(
        r#"
        return { name = "hold", tick = function(ctx)
            local over = ctx.host.memory_available < 4 * 1024 * 1024 * 1024
            local held, n = ctx:held("low", over, 3)
            -- A second look in the same tick counts the tick once.
            local again, m = ctx:held("low", over, 3)
            assert(held == again and n == m)
            -- Not asked on tick 4: that breaks its streak.
            local gappy = "-"
            if ctx.tick ~= 4 then gappy = select(2, ctx:held("gappy", true, 1)) end
            ctx:set_memory_target("busy", "1G", string.format("%s %d %s", held, n, gappy))
        end }
        "#,
    );
    let mut input = TickInput::sample();
    let inputs: Vec<TickInput> = [1, 1, 8, 1, 1, 1, 1]
        .iter()
        .map(|&available| {
            input.host.memory_available = available * G;
            input.clone()
        })
        .collect();
    assert_eq!(
        reasons(&run_ticks(&p, &inputs)),
        [
            "false 1 1",
            "false 2 2",
            "false 0 3",
            "false 1 -",
            "false 2 1",
            "true 3 2",
            "true 4 3",
        ]
    );
    let p = load_source("return { name = 'x', tick = function(ctx) ctx:held('', true, 1) end }");
    let error = run_ticks(&p, &[TickInput::sample()])[0]
        .error
        .clone()
        .unwrap();
    assert!(
        error.contains("ctx:held: key must be a string of 1 to 256 bytes"),
        "{error}"
    );
    let p = load_source("return { name = 'x', tick = function(ctx) ctx:held('k', true, 0) end }");
    let error = run_ticks(&p, &[TickInput::sample()])[0]
        .error
        .clone()
        .unwrap();
    assert!(
        error.contains("n must be a whole number of ticks >= 1"),
        "{error}"
    );
}

#[test]
fn improves_asks_for_a_margin_in_bytes_or_percent() {
    let p = load_source(
        r#"
        return { name = "margin", tick = function(ctx)
            local M = 1024 * 1024
            assert(ctx:improves(100 * M, 700 * M, 500 * M) == true)
            local ok, by = ctx:improves(100 * M, 500 * M, "512M")
            assert(ok == false and by == 400 * M)
            assert(ctx:improves(1000, 1100, "10%") and not ctx:improves(1000, 1099, "10%"))
            -- A percent of a shortage: 10% of 1000 bytes short.
            assert(ctx:improves(-1000, -900, "10%") and not ctx:improves(-1000, -901, "10%"))
            assert(ctx:improves(5, 5) and not ctx:improves(5, 4))
            for _, bad in ipairs({ { "x", 1 }, { 1, nil }, { 1, 2, "abc%" }, { 1, 2, -3 } }) do
                local ok, err = pcall(ctx.improves, ctx, bad[1], bad[2], bad[3])
                assert(not ok and err:find("ctx:improves:", 1, true), tostring(err))
            end
        end }
        "#,
    );
    assert_eq!(run_ticks(&p, &[TickInput::sample()])[0].error, None);
}

#[test]
fn migration_cost_estimates_from_the_dirty_rate_and_the_bandwidth() {
    let p = load_source(
        r#"
        return { name = "cost", tick = function(ctx)
            local busy, quiet = ctx:migration_cost("busy"), ctx:migration_cost(ctx.vms[2])
            assert(not pcall(ctx.migration_cost, ctx, "nope"))
            ctx:set_memory_target("busy", "1G", string.format("%.0f %d %.6f %.6f %s|%.0f %d %.6f %s",
                busy.dirty_rate, busy.rounds, busy.downtime_s, busy.total_s, busy.converges,
                quiet.dirty_rate, quiet.rounds, quiet.total_s, quiet.converges))
        end }
        "#,
    );
    // busy's resident memory grows 100M a second; its guest's page faults say less.
    let mut input = TickInput::sample();
    let inputs: Vec<TickInput> = (0..5u64)
        .map(|i| {
            input.now_ms = i * 1000;
            input.vms[0].memory.resident = 512 * M + i * 100 * M;
            input.vms[0]
                .memory
                .stats
                .as_mut()
                .unwrap()
                .stats
                .minor_faults = Some(i * 1000);
            input.clone()
        })
        .collect();
    let last = reasons(&run_ticks(&p, &inputs)).pop().unwrap();
    let busy = super::migrate::estimate(912 * M, (100 * M) as f64, G, 0.3);
    let quiet = super::migrate::estimate(1024 * M, 0.0, G, 0.3);
    assert_eq!(
        last,
        format!(
            "{:.0} {} {:.6} {:.6} {}|0 {} {:.6} true",
            busy.dirty_rate,
            busy.rounds,
            busy.downtime_s,
            busy.total_s,
            busy.converges,
            quiet.rounds,
            quiet.total_s
        )
    );
    assert!(busy.converges && busy.rounds == 1 && busy.total_s > 0.89);

    // The bandwidth is hv.policy.migration_limits's.
    let mut slow = inputs[0].clone();
    slow.migrations.limits.bandwidth = 64 * M;
    let p = load_source(
        "return { name = 'bw', tick = function(ctx)\n\
         local c = ctx:migration_cost('quiet')\n\
         ctx:set_memory_target('busy', '1G', c.bandwidth .. ' ' .. c.total_s) end }",
    );
    assert_eq!(
        reasons(&run_ticks(&p, &[slow])),
        [format!("{} 16.0", 64 * M)]
    );
}

fn peer_snapshot(name: &str, available: u64) -> PeerSnapshot {
    PeerSnapshot {
        name: name.into(),
        addr: format!("10.0.0.{}:7001", name.len()),
        reachable: true,
        memory_total: Some(16 * G),
        memory_available: Some(available),
        memory_reserve: Some(G / 2),
        vms: Some(3),
        vms_resident: Some(4 * G),
        age_ms: Some(500),
        error: None,
    }
}

#[test]
fn ctx_migrate_checks_its_arguments_and_returns_the_verdict() {
    let p = load_source(
        r#"
        return { name = "args", tick = function(ctx)
            local results = {}
            for _, call in ipairs({
                function() return ctx:migrate("nope", "b", "why") end,
                function() return ctx:migrate("busy", "nowhere", "why") end,
                function() return ctx:migrate("busy", "b") end,
                function() return ctx:migrate("busy", 3, "why") end,
            }) do
                local ok, err = pcall(call)
                assert(not ok)
                results[#results + 1] = err
            end
            local ok, why = ctx:migrate("busy", ctx.hosts[1], "room")
            results[#results + 1] = tostring(ok) .. " " .. tostring(why)
            ok, why = ctx:migrate("quiet", "b", "room")
            results[#results + 1] = tostring(ok) .. " " .. tostring(why)
            ctx:set_memory_target("busy", "1G", table.concat(results, "|"))
        end }
        "#,
    );
    let mut input = TickInput::sample();
    input.hosts = vec![peer_snapshot("b", 8 * G), peer_snapshot("cc", 8 * G)];
    input.migrations = MigrationSnapshot {
        available: true,
        ..MigrationSnapshot::default()
    };
    let result = &run_ticks(&p, &[input])[0];
    assert_eq!(result.error, None);
    let parts: Vec<String> = result.decisions[0]
        .reason
        .split('|')
        .map(String::from)
        .collect();
    assert!(
        parts[0].ends_with("ctx:migrate: no vm named 'nope'"),
        "{}",
        parts[0]
    );
    assert!(
        parts[1].ends_with("ctx:migrate: no host named 'nowhere'; the hosts are: b, cc"),
        "{}",
        parts[1]
    );
    assert!(
        parts[2].contains("a reason (a non-empty string) is required"),
        "{}",
        parts[2]
    );
    assert!(
        parts[3].contains("host must be an entry of ctx.hosts or a host name"),
        "{}",
        parts[3]
    );
    assert_eq!(parts[4], "true nil");
    assert!(
        parts[5].starts_with("false the limit of 1 outgoing"),
        "{}",
        parts[5]
    );
    // Both intents are recorded, with their verdicts; errors recorded nothing.
    assert_eq!(result.migrations.len(), 2);
    assert_eq!(refusals(&result.migrations)[0], None);
    assert_eq!(result.migrations[0].reason, "room");

    // Without peers, naming one is an error that says none are declared.
    let p = load_source(
        "return { name = 'x', tick = function(ctx) ctx:migrate('busy', 'b', 'why') end }",
    );
    let error = run_ticks(&p, &[TickInput::sample()])[0]
        .error
        .clone()
        .unwrap();
    assert!(
        error.contains("no peer hosts are declared (hv.hosts)"),
        "{error}"
    );
}

fn shipped(name: &str) -> Instance {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("policies")
        .join(name);
    record::load_file(&file, Limits::default()).unwrap()
}

/// This host short of memory: VMs resident 15G of 16G, 256M available.
fn under_pressure() -> TickInput {
    let mut input = TickInput::sample();
    input.host.vms_resident = 15 * G;
    input.host.memory_available = G / 4;
    input.vms[1].memory.weight = 100;
    input.vms[2].state = "running".into();
    input.migrations.available = true;
    input
}

#[test]
fn migrate_on_pressure_passes_check_and_does_nothing_without_peers() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/migrate_on_pressure.lua");
    let (policy, result) = record::check(&file, Limits::default()).unwrap();
    assert_eq!(policy.name, "migrate-on-pressure");
    assert!(result.decisions.is_empty() && result.migrations.is_empty());
    // Under pressure for a long time, with no peers: nothing, and no error.
    let p = shipped("migrate_on_pressure.lua");
    let inputs = vec![under_pressure(); 40];
    for result in run_ticks(&p, &inputs) {
        assert_eq!(result.error, None);
        assert!(result.decisions.is_empty() && result.migrations.is_empty());
    }
}

#[test]
fn migrate_on_pressure_moves_the_lowest_weight_vm_to_the_roomiest_peer_once_pressure_lasts() {
    let p = shipped("migrate_on_pressure.lua");
    let mut input = under_pressure();
    let mut stale = peer_snapshot("stale", 15 * G);
    stale.age_ms = Some(60_000);
    let mut down = peer_snapshot("down", 15 * G);
    down.reachable = false;
    input.hosts = vec![
        peer_snapshot("small", 4 * G),
        stale,
        down,
        peer_snapshot("roomy", 12 * G),
    ];
    let results = run_ticks(&p, &vec![input.clone(); 12]);
    // Nine ticks of pressure are not enough; the tenth acts, and while its migration
    // runs the policy waits (here the input says nothing runs, so it asks again, and
    // Rust's guards would refuse that).
    for result in &results[..9] {
        assert!(result.migrations.is_empty());
    }
    let asked = &results[9].migrations;
    assert_eq!(asked.len(), 1);
    assert_eq!(
        (asked[0].vm.as_str(), asked[0].host.as_str()),
        ("quiet", "roomy")
    );
    assert_eq!(asked[0].refused, None);
    assert!(asked[0].reason.starts_with("memory pressure 97% for 10 ticks (free memory below the reserve); roomy has 11776M headroom"), "{}", asked[0].reason);

    // A migration in flight: it waits.
    let mut busy = input.clone();
    busy.migrations
        .running
        .push(super::migrate::RunningMigration {
            vm: "quiet".into(),
            host: "roomy".into(),
            started_ms: 0,
        });
    let results = run_ticks(&p, &vec![busy; 12]);
    assert!(results.iter().all(|r| r.migrations.is_empty()));

    // Pressure that comes and goes never lasts ten ticks.
    let mut relieved = input.clone();
    relieved.host.vms_resident = 4 * G;
    relieved.host.memory_available = 10 * G;
    let flapping: Vec<TickInput> = (0..30)
        .map(|i| {
            if i % 7 == 6 {
                relieved.clone()
            } else {
                input.clone()
            }
        })
        .collect();
    assert!(run_ticks(&p, &flapping)
        .iter()
        .all(|r| r.migrations.is_empty()));

    // Here the headroom is 256M short. A peer with 2G of headroom: after taking quiet
    // (2G) it would have 0, not 512M more than here; the next VM goes (booting and busy
    // both weigh 5000 and have 1G; booting comes first by name).
    let mut tight = input.clone();
    tight.hosts = vec![peer_snapshot("small", 5 * G / 2)];
    let results = run_ticks(&p, &vec![tight.clone(); 10]);
    assert_eq!(results[9].migrations[0].vm, "booting");
    // And no move at all when none would improve things by the margin.
    tight.hosts = vec![peer_snapshot("small", 3 * G / 2)];
    assert!(run_ticks(&p, &vec![tight; 12])
        .iter()
        .all(|r| r.migrations.is_empty()));
}

#[test]
fn hv_hosts_validates_the_declaration_and_changes_nothing_when_it_fails() {
    let dir = scratch("hv-hosts");
    let key = key_file(&dir);
    let open_key = dir.join("open-key");
    std::fs::write(&open_key, [1u8; 32]).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short_key = dir.join("short-key");
    std::fs::write(&short_key, b"abc").unwrap();
    std::fs::set_permissions(&short_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let registry = Arc::new(Registry::new());
    let lua = crate::new_user_state(registry.clone()).unwrap();
    lua.globals().set("KEY", key.display().to_string()).unwrap();
    lua.globals()
        .set("OPEN_KEY", open_key.display().to_string())
        .unwrap();
    lua.globals()
        .set("SHORT_KEY", short_key.display().to_string())
        .unwrap();
    let declared: i64 = lua
        .load(
            "local list = hv.hosts{ { name = 'b', addr = '127.0.0.1:1', key_file = KEY } }\n\
             assert(list[1].name == 'b' and list[1].addr == '127.0.0.1:1' and list[1].key_file == KEY)\n\
             assert(list[1].reachable == false)\n\
             return #hv.hosts()",
        )
        .eval()
        .unwrap();
    assert_eq!(declared, 1);
    for (code, expected) in [
        ("hv.hosts(3)", "hv.hosts: expected a list of hosts"),
        ("hv.hosts{ x = 1 }", "expected a list of hosts (keys 1 to n)"),
        ("hv.hosts{ 'b' }", "hv.hosts: host 1: expected an options table"),
        ("hv.hosts{ { addr = '127.0.0.1:7002', key_file = KEY } }", "hv.hosts: host 1: option 'name' is required"),
        ("hv.hosts{ { name = 'a b', addr = '127.0.0.1:7002', key_file = KEY } }", "must be 1 to 64 letters"),
        ("hv.hosts{ { name = 'b', adr = '127.0.0.1:7002', key_file = KEY } }", "unknown option 'adr'; valid options are: name, addr, key_file"),
        ("hv.hosts{ { name = 'b', addr = '127.0.0.1', key_file = KEY } }", "hv.hosts: host 'b': option 'addr' must be \"host:port\""),
        ("hv.hosts{ { name = 'b', addr = '127.0.0.1:7002' } }", "hv.hosts: host 'b': option 'key_file' is required"),
        (
            "hv.hosts{ { name = 'b', addr = '127.0.0.1:7002', key_file = KEY }, { name = 'b', addr = '127.0.0.1:7003', key_file = KEY } }",
            "hv.hosts: two hosts are named 'b' (at 127.0.0.1:7002 and 127.0.0.1:7003); names must be unique",
        ),
        (
            "hv.hosts{ { name = 'b', addr = '127.0.0.1:7002', key_file = KEY }, { name = 'c', addr = '127.0.0.1:7002', key_file = KEY } }",
            "hosts 'b' and 'c' have the same address 127.0.0.1:7002",
        ),
        ("hv.hosts{ { name = 'b', addr = '127.0.0.1:7002', key_file = OPEN_KEY } }", "can be read by other users (mode 644); make it private with `chmod 600"),
        ("hv.hosts{ { name = 'b', addr = '127.0.0.1:7002', key_file = SHORT_KEY } }", "holds 3 bytes; a key needs at least 16"),
        ("hv.hosts{ { name = 'b', addr = '127.0.0.1:7002', key_file = '/nonexistent/key' } }", "option 'key_file': cannot read key file /nonexistent/key"),
        ("hv.policy.migration_limits{ per_host = -1 }", "option 'per_host' must be an integer from 0 to 64"),
        ("hv.policy.migration_limits{ bandwidth = 10 }", "'bandwidth' is bytes per second and must be at least 1M"),
        ("hv.policy.migration_limits{ cooldown = 1 }", "unknown option 'cooldown'"),
    ] {
        let error = lua.load(code).exec().unwrap_err();
        let message = crate::script::error_message(&error);
        assert!(message.contains(expected), "{code}: {message}");
    }
    // The failed declarations changed nothing.
    let engine = engine(&registry);
    assert_eq!(engine.peers().len(), 1);
    assert_eq!(engine.peers()[0].addr, "127.0.0.1:1");
    assert_eq!(engine.migration_limits(), MigrationLimits::default());
    let limits: String = lua
        .load(
            "local l = hv.policy.migration_limits{ per_host = 2, cooldown_s = 1.5, bandwidth = '100M' }\n\
             assert(#hv.hosts{} == 0 and #hv.hosts() == 0)\n\
             return l.per_host .. ' ' .. l.cooldown_s .. ' ' .. l.bandwidth",
        )
        .eval()
        .unwrap();
    assert_eq!(limits, format!("2 1.5 {}", 100 * M));
    assert_eq!(
        engine.migration_limits(),
        MigrationLimits {
            per_host: 2,
            cooldown_ms: 1500,
            bandwidth: 100 * M
        }
    );
    assert!(engine.peers().is_empty());
    shutdown(&registry);
}

#[test]
fn version_1_traces_replay_without_peers() {
    let dir = scratch("v1");
    let trace = dir.join("old.jsonl");
    let input = serde_json::to_value(TickInput::sample()).unwrap();
    let mut old_input = input.clone();
    old_input.as_object_mut().unwrap().remove("hosts");
    old_input.as_object_mut().unwrap().remove("migrations");
    old_input.as_object_mut().unwrap().remove("pools");
    std::fs::write(
        &trace,
        format!(
            "{}\n{}\n",
            serde_json::json!({ "type": "header", "format": record::FORMAT, "version": 1, "luvisor": "0.1.0" }),
            serde_json::json!({ "type": "sample", "input": old_input }),
        ),
    )
    .unwrap();
    let records = record::read_trace(&trace).unwrap();
    let TraceRecord::Sample { input: read } = &records[1] else {
        panic!("{:?}", records[1]);
    };
    let mut without_pools = TickInput::sample();
    without_pools.pools.clear();
    assert_eq!(read, &without_pools);
    let replayed = record::simulate(&shipped("migrate_on_pressure.lua"), &records);
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].error, None);
    std::fs::write(
        &trace,
        format!(
            "{}\n",
            serde_json::json!({ "type": "header", "format": record::FORMAT, "version": 9, "luvisor": "9" })
        ),
    )
    .unwrap();
    let error = record::read_trace(&trace).unwrap_err();
    assert!(
        error.contains("reads luvisor-policy-trace versions 1 to 3"),
        "{error}"
    );
}

/// The sample input with its pool seeing `claims_window` claims in its window, holding
/// `target` and as many ready, and `available` bytes free on the host.
fn pool_input(claims_window: u64, target: u64, available: u64) -> TickInput {
    let mut input = TickInput::sample();
    input.host.memory_available = available;
    let pool = &mut input.pools[0];
    pool.claims_window = claims_window;
    pool.target = target;
    pool.ready = target;
    input
}

#[test]
fn pool_targets_are_clamped_like_the_pool_clamps_them() {
    let p = load_source(
        r#"
        return { name = "p", tick = function(ctx)
            local pool = ctx.pools[1]
            assert(#ctx.pools == 1 and pool.name == "ci" and pool.window_s == 10)
            assert(pool.claims_window == 12 and pool.memory == 128 * 1024 * 1024)
            assert(not pcall(function() pool.target = 3 end), "ctx.pools is read-only")
            local n = 0
            for _ in pairs(pool) do n = n + 1 end
            assert(n == 12, n)
            ctx:pool_target(pool, 3, "first")
            local target, clamped = ctx:pool_target("ci", 100, "too many")
            assert(clamped and target < 100, target)
        end }
        "#,
    );
    let result = &run_ticks(&p, &[TickInput::sample()])[0];
    assert_eq!(result.error, None);
    // The last target for a pool counts.
    assert_eq!(result.pools.len(), 1);
    let d = &result.pools[0];
    assert_eq!(
        (d.pool.as_str(), d.asked, d.target, d.clamped, d.previous),
        ("ci", 100, 16, true, 2)
    );
    assert_eq!(d.reason, "too many");

    // Short of memory: 300M above the 512M reserve holds two more 128M VMs.
    let result = &run_ticks(&p, &[pool_input(12, 2, 812 * M)])[0];
    assert_eq!(result.error, None);
    assert_eq!((result.pools[0].target, result.pools[0].clamped), (4, true));

    let error = run_ticks(
        &load_source(
            "return { name = 'p', tick = function(ctx) ctx:pool_target('nope', 1, 'x') end }",
        ),
        &[TickInput::sample()],
    )[0]
    .error
    .clone()
    .unwrap();
    assert!(
        error.contains("ctx:pool_target: no pool named 'nope'; the pools are: ci"),
        "{error}"
    );
    let error = run_ticks(
        &load_source(
            "return { name = 'p', tick = function(ctx) ctx:pool_target('ci', -1, 'x') end }",
        ),
        &[TickInput::sample()],
    )[0]
    .error
    .clone()
    .unwrap();
    assert!(error.contains("n must be a whole number"), "{error}");
}

#[test]
fn warm_pool_rises_with_the_claim_rate_and_falls_slowly_once_it_stays_low() {
    let p = shipped("warm_pool.lua");
    const PLENTY: u64 = 64 << 30;
    // 12 claims in 10 s: 1.2/s, two seconds of them: min 1 + 3 = 4.
    let up = &run_ticks(&p, &[pool_input(12, 1, PLENTY)])[0];
    assert_eq!(up.error, None);
    assert_eq!(up.pools.len(), 1);
    assert_eq!((up.pools[0].target, up.pools[0].previous), (4, 1));
    // 50 claims in 10 s: 11, within max 16.
    let up = &run_ticks(&p, &[pool_input(50, 4, PLENTY)])[0];
    assert_eq!(up.pools[0].target, 11);
    // The claims stop: nothing for three ticks, then down by two a tick, to min.
    let quiet: Vec<TickInput> = [11, 11, 11, 11, 9, 7, 5, 3, 1, 1]
        .iter()
        .map(|&target| pool_input(0, target, PLENTY))
        .collect();
    let targets: Vec<Option<u64>> = run_ticks(&p, &quiet)
        .iter()
        .map(|r| {
            assert_eq!(r.error, None);
            r.pools.first().map(|d| d.target)
        })
        .collect();
    assert_eq!(
        targets,
        [
            None,
            None,
            None,
            Some(9),
            Some(7),
            Some(5),
            Some(3),
            Some(1),
            None,
            None
        ]
    );
    // A pause between bursts shorter than the settle time changes nothing.
    let bursty: Vec<TickInput> = (0..12)
        .map(|i| pool_input(if i % 3 == 2 { 30 } else { 0 }, 7, PLENTY))
        .collect();
    assert!(run_ticks(&p, &bursty)
        .iter()
        .all(|r| r.pools.iter().all(|d| d.target >= 7)));
}

#[test]
fn pool_targets_are_recorded_and_replay_the_same() {
    let dir = scratch("pool-trace");
    let p = shipped("warm_pool.lua");
    let inputs = [pool_input(12, 1, 64 << 30), pool_input(0, 4, 64 << 30)];
    let results = run_ticks(&p, &inputs);
    let mut lines = vec![serde_json::to_string(&TraceRecord::header()).unwrap()];
    for (i, (input, result)) in inputs.iter().zip(&results).enumerate() {
        lines.push(
            serde_json::to_string(&TraceRecord::Tick {
                policy: "warm_pool".into(),
                file: "policies/warm_pool.lua".into(),
                generation: 1,
                tick: i as u64 + 1,
                shadow: false,
                input: input.clone(),
                decisions: result.decisions.clone(),
                migrations: result.migrations.clone(),
                pools: result.pools.clone(),
                error: result.error.clone(),
            })
            .unwrap(),
        );
    }
    let trace = dir.join("pools.jsonl");
    std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
    let records = record::read_trace(&trace).unwrap();
    let replayed = record::simulate(&shipped("warm_pool.lua"), &records);
    assert_eq!(replayed.len(), 2);
    assert_eq!(replayed[0].pools[0].target, 4);
    assert!(replayed.iter().all(|t| t.matches() == Some(true)));
}
