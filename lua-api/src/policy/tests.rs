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
