//! What a policy's `tick` sees and asks for: the snapshot of the host and the VMs
//! ([`TickInput`]), the per-VM history behind the windowed helpers ([`History`]), the
//! `ctx` table built from them, and the intents a tick makes ([`Decision`]).
//!
//! A [`TickInput`] is plain serde data: a live tick captures it from the registry
//! ([`TickInput::capture`]), `luvisor serve --record` writes it to the trace, and
//! `luvisor policy simulate` reads it back. The `ctx` a tick gets is built only from the
//! input and the history, and decisions depend only on the input and the VM knobs it
//! holds, so replaying the same inputs in the same order gives the same decisions.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use luvisor_runtime::pool::{clamp_target, PoolSnapshot};
use luvisor_runtime::vm::dynamic_memory::{MemoryKnobs, MemoryStats};
use luvisor_runtime::Registry;
use mlua::{Function, Lua, Table, Value};
use serde::{Deserialize, Serialize};

use super::migrate::{self, MigrateDecision, MigrationSnapshot};
use super::peers::PeerSnapshot;
use crate::options::{describe, size_value};

/// How many ticks of history each VM keeps for `ctx:mean` and friends.
pub const HISTORY_TICKS: usize = 120;

/// The host part of a snapshot (`ctx.host`), in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSnapshot {
    pub memory_total: u64,
    pub memory_available: u64,
    /// What the host keeps for itself (`hv.host{ memory_reserve = ... }`).
    pub memory_reserve: u64,
    /// Guest memory resident on the host over every VM.
    pub vms_resident: u64,
}

/// The guest's statistics as the balloon last reported them (`vm.memory.stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    #[serde(flatten)]
    pub stats: MemoryStats,
    /// How long ago the guest sent them.
    pub age_ms: u64,
}

/// One VM's memory (`vm.memory`), in bytes except `buffer` (percent) and `weight`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    pub size: u64,
    pub target: u64,
    pub resident: u64,
    pub min: u64,
    pub max: u64,
    pub startup: u64,
    pub buffer: u32,
    pub weight: u32,
    pub stats: Option<StatsSnapshot>,
}

impl MemorySnapshot {
    /// The knobs, to clamp an intent exactly as `Vm::set_memory_target` does.
    pub fn knobs(&self) -> MemoryKnobs {
        MemoryKnobs {
            startup: self.startup,
            min: self.min,
            max: self.max,
            buffer_percent: self.buffer,
            weight: self.weight,
        }
    }
}

/// One VM in a snapshot (an entry of `ctx.vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub name: String,
    pub state: String,
    pub memory: MemorySnapshot,
}

/// Everything one tick reads: the host, every VM, the peer hosts, the migrations, and
/// when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickInput {
    /// Milliseconds since the policy engine started (`ctx.now_ms`).
    pub now_ms: u64,
    pub host: HostSnapshot,
    pub vms: Vec<VmSnapshot>,
    /// The peer hosts `hv.hosts` declared (`ctx.hosts`), as last polled. Empty in traces
    /// of format version 1.
    #[serde(default)]
    pub hosts: Vec<PeerSnapshot>,
    /// What the migration guards read (`ctx.migrations` is its `running`).
    #[serde(default)]
    pub migrations: MigrationSnapshot,
    /// The warm pools (`ctx.pools`). Empty in traces before format version 3.
    #[serde(default)]
    pub pools: Vec<PoolSnapshot>,
}

impl TickInput {
    /// The live state of the host and of every VM in `registry`, VMs in creation order;
    /// no peers and no migrations (the engine adds its own).
    pub fn capture(registry: &Registry, epoch: Instant) -> TickInput {
        let info = luvisor_runtime::host::HostInfo::query();
        let vms: Vec<VmSnapshot> = registry
            .list()
            .iter()
            .map(|vm| {
                let knobs = vm.memory_knobs();
                VmSnapshot {
                    name: vm.name().to_string(),
                    state: vm.state().as_str().to_string(),
                    memory: MemorySnapshot {
                        size: vm.memory_size(),
                        target: vm.memory_target(),
                        resident: vm.memory_resident(),
                        min: knobs.min,
                        max: knobs.max,
                        startup: knobs.startup,
                        buffer: knobs.buffer_percent,
                        weight: knobs.weight,
                        stats: vm.memory_stats().map(|s| StatsSnapshot {
                            age_ms: s.age.as_millis() as u64,
                            stats: s.stats,
                        }),
                    },
                }
            })
            .collect();
        TickInput {
            now_ms: epoch.elapsed().as_millis() as u64,
            host: HostSnapshot {
                memory_total: info.memory_total,
                memory_available: info.memory_available,
                memory_reserve: luvisor_runtime::host::memory_reserve(),
                // The same figure Registry::vms_resident gives, without counting twice.
                vms_resident: vms.iter().map(|vm| vm.memory.resident).sum(),
            },
            vms,
            hosts: Vec::new(),
            migrations: MigrationSnapshot::default(),
            pools: Vec::new(),
        }
    }

    /// A made-up host with three VMs, for `luvisor policy check`: one under pressure, one
    /// with memory to spare, and one whose guest has sent no statistics.
    pub fn sample() -> TickInput {
        const M: u64 = 1 << 20;
        let stats = |total: u64, available: u64| {
            Some(StatsSnapshot {
                stats: MemoryStats {
                    total: Some(total),
                    available: Some(available),
                    free: Some(available / 2),
                    caches: Some(available / 2),
                    major_faults: Some(10),
                    minor_faults: Some(1000),
                    swap_in: Some(0),
                    swap_out: Some(0),
                    ..MemoryStats::default()
                },
                age_ms: 200,
            })
        };
        let vm = |name: &str, target: u64, stats| VmSnapshot {
            name: name.into(),
            state: "running".into(),
            memory: MemorySnapshot {
                size: target,
                target,
                resident: target / 2,
                min: 256 * M,
                max: 4096 * M,
                startup: 1024 * M,
                buffer: 20,
                weight: 5000,
                stats,
            },
        };
        let vms = vec![
            vm("busy", 1024 * M, stats(1024 * M, 100 * M)),
            vm("quiet", 2048 * M, stats(2048 * M, 1600 * M)),
            vm("booting", 1024 * M, None),
        ];
        TickInput {
            now_ms: 0,
            host: HostSnapshot {
                memory_total: 16384 * M,
                memory_available: 8192 * M,
                memory_reserve: 512 * M,
                vms_resident: vms.iter().map(|v| v.memory.resident).sum(),
            },
            vms,
            hosts: Vec::new(),
            migrations: MigrationSnapshot::default(),
            pools: vec![PoolSnapshot {
                name: "ci".into(),
                min: 1,
                max: 16,
                target: 2,
                ready: 2,
                claimed: 5,
                restoring: 0,
                claims: 40,
                claims_window: 12,
                window_ms: 10_000,
                returned: 35,
                memory: 128 * M,
            }],
        }
    }
}

/// A tick's intent for one VM, once Rust has checked and clamped it. Computed from the
/// tick's input alone, so a replay of the input computes the same decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub vm: String,
    /// What the policy asked for.
    pub asked: u64,
    /// What the VM is set to: `asked` within `[min, max]`, in whole pages.
    pub target: u64,
    /// `asked` was outside `[min, max]`.
    pub clamped: bool,
    /// The VM's target before this tick.
    pub previous: u64,
    /// The policy's reason.
    pub reason: String,
}

/// A tick's intent for one warm pool (`ctx:pool_target`), once Rust has clamped it the
/// way the pool will ([`clamp_target`]: within `[min, max]` and the host's free memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDecision {
    pub pool: String,
    /// The ready VMs the policy asked for.
    pub asked: u64,
    /// What the pool is set to.
    pub target: u64,
    pub clamped: bool,
    /// The pool's target before this tick.
    pub previous: u64,
    pub reason: String,
}

/// The fields the history keeps per VM and tick: the guest statistics, then the VM's own
/// figures, then `demand` (total - available, when the guest sent both).
pub const HISTORY_FIELDS: [&str; 14] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free",
    "total",
    "available",
    "caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "size",
    "target",
    "resident",
    "demand",
];

type Sample = [Option<u64>; HISTORY_FIELDS.len()];

/// Where some fields are in a [`Sample`].
const MAJOR_FAULTS: usize = 2;
const MINOR_FAULTS: usize = 3;
const RESIDENT: usize = 12;

fn sample_of(vm: &VmSnapshot) -> Sample {
    let mut sample: Sample = [None; HISTORY_FIELDS.len()];
    if let Some(stats) = &vm.memory.stats {
        for (slot, (_, value)) in sample.iter_mut().zip(stats.stats.fields()) {
            *slot = value;
        }
        if let (Some(total), Some(available)) = (stats.stats.total, stats.stats.available) {
            sample[13] = Some(total.saturating_sub(available));
        }
    }
    sample[10] = Some(vm.memory.size);
    sample[11] = Some(vm.memory.target);
    sample[12] = Some(vm.memory.resident);
    sample
}

/// How many ticks `ctx:migration_cost` reads to estimate a VM's dirty rate.
pub const DIRTY_RATE_TICKS: usize = 10;
/// The guest page size the fault counters are counted in.
const PAGE: u64 = 4096;
/// Most `ctx:held` keys a policy may use at once.
pub const MAX_HOLD_KEYS: usize = 1024;
/// Longest `ctx:held` key, in bytes.
pub const MAX_HOLD_KEY: usize = 256;

/// One `ctx:held` key's streak.
#[derive(Debug, Clone, Copy, Default)]
struct Hold {
    /// The tick that last evaluated it.
    tick: u64,
    /// Consecutive ticks the condition held, up to and including `tick`.
    count: u64,
    /// The streak before `tick` (so a second call in the same tick counts it once).
    before: u64,
}

/// The last [`HISTORY_TICKS`] samples of each VM (with their `now_ms`), newest last, and
/// the `ctx:held` streaks. A policy's history survives its reloads; a VM that leaves the
/// snapshot loses its history. A shadow run works on a copy, so it changes nothing here.
#[derive(Debug, Clone, Default)]
pub struct History {
    vms: HashMap<String, VecDeque<(u64, Sample)>>,
    holds: HashMap<String, Hold>,
}

impl History {
    /// Adds one tick's input.
    pub fn push(&mut self, input: &TickInput) {
        self.vms
            .retain(|name, _| input.vms.iter().any(|vm| &vm.name == name));
        for vm in &input.vms {
            let samples = self.vms.entry(vm.name.clone()).or_default();
            if samples.len() == HISTORY_TICKS {
                samples.pop_front();
            }
            samples.push_back((input.now_ms, sample_of(vm)));
        }
    }

    /// The values of `field` in the last `n` samples of `vm` that have it.
    fn values(&self, vm: &str, field: usize, n: usize) -> impl Iterator<Item = u64> + '_ {
        let samples = self.vms.get(vm);
        let skip = samples.map_or(0, |s| s.len().saturating_sub(n));
        samples
            .into_iter()
            .flat_map(move |s| s.iter().skip(skip))
            .filter_map(move |(_, s)| s[field])
    }

    /// How many ticks of history `vm` has.
    pub fn len(&self, vm: &str) -> usize {
        self.vms.get(vm).map_or(0, VecDeque::len)
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Bytes per second `vm` dirtied over its last `n` ticks, as far as the engine can
    /// tell: the larger of its resident memory's growth and its guest's page faults
    /// (minor + major, counted as 4 KiB each). Both miss pages a guest rewrites in place,
    /// so this is a lower bound. 0 with fewer than two samples.
    pub fn dirty_rate(&self, vm: &str, n: usize) -> f64 {
        let Some(samples) = self.vms.get(vm) else {
            return 0.0;
        };
        let window: Vec<&(u64, Sample)> = samples
            .iter()
            .skip(samples.len().saturating_sub(n.max(2)))
            .collect();
        let (Some((first_ms, first)), Some((last_ms, last))) = (window.first(), window.last())
        else {
            return 0.0;
        };
        let seconds = last_ms.saturating_sub(*first_ms) as f64 / 1000.0;
        if seconds <= 0.0 {
            return 0.0;
        }
        let growth = |field: usize| match (first[field], last[field]) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let resident = growth(RESIDENT).unwrap_or(0) as f64;
        let faults = match (growth(MINOR_FAULTS), growth(MAJOR_FAULTS)) {
            (Some(minor), Some(major)) => minor.saturating_add(major).saturating_mul(PAGE),
            (Some(one), None) | (None, Some(one)) => one.saturating_mul(PAGE),
            (None, None) => 0,
        } as f64;
        resident.max(faults) / seconds
    }

    /// `ctx:held`: records whether `condition` holds for `key` in `tick`; how many
    /// consecutive ticks, this one included, it has held. A tick that does not ask about
    /// `key` breaks its streak; asking twice in one tick counts the tick once (the last
    /// answer counts).
    fn hold(&mut self, key: &str, condition: bool, tick: u64) -> Result<u64, String> {
        if !self.holds.contains_key(key) && self.holds.len() >= MAX_HOLD_KEYS {
            // Streaks not asked about last tick or this one are broken anyway.
            self.holds.retain(|_, h| h.tick.saturating_add(1) >= tick);
            if self.holds.len() >= MAX_HOLD_KEYS {
                return Err(format!(
                    "a policy may hold at most {MAX_HOLD_KEYS} keys at once"
                ));
            }
        }
        let hold = self.holds.entry(key.to_string()).or_default();
        if hold.tick != tick {
            hold.before = if hold.tick.saturating_add(1) == tick {
                hold.count
            } else {
                0
            };
        }
        hold.tick = tick;
        hold.count = if condition { hold.before + 1 } else { 0 };
        Ok(hold.count)
    }
}

/// What the `ctx` methods work on during one tick.
#[derive(Default)]
pub(crate) struct TickScope {
    /// A tick is running: the methods may be called.
    active: bool,
    /// The tick's input.
    input: Option<Rc<TickInput>>,
    /// Index of each VM of the input by name.
    index: HashMap<String, usize>,
    /// The history, including this tick's sample.
    pub history: History,
    /// Intents so far, at most one per VM (the last one counts), in the order made.
    decisions: Vec<Decision>,
    /// Where each VM's intent is in `decisions`.
    decided: HashMap<String, usize>,
    /// Migrate intents so far, each with its verdict, in the order made.
    migrations: Vec<MigrateDecision>,
    /// Pool targets so far, at most one per pool (the last one counts), in the order made.
    pools: Vec<PoolDecision>,
    /// The tick's number (for `ctx:held`).
    tick: u64,
}

/// What one tick decided.
#[derive(Debug, Default)]
pub(crate) struct Intents {
    pub decisions: Vec<Decision>,
    pub migrations: Vec<MigrateDecision>,
    pub pools: Vec<PoolDecision>,
}

impl TickScope {
    pub fn begin(&mut self, input: Rc<TickInput>, tick: u64, history: History) {
        self.index = input
            .vms
            .iter()
            .enumerate()
            .map(|(i, vm)| (vm.name.clone(), i))
            .collect();
        self.input = Some(input);
        self.history = history;
        self.decisions.clear();
        self.decided.clear();
        self.migrations.clear();
        self.pools.clear();
        self.tick = tick;
        self.active = true;
    }

    /// Ends the tick: its intents and the history, handed back.
    pub fn end(&mut self) -> (Intents, History) {
        self.active = false;
        self.input = None;
        (
            Intents {
                decisions: std::mem::take(&mut self.decisions),
                migrations: std::mem::take(&mut self.migrations),
                pools: std::mem::take(&mut self.pools),
            },
            std::mem::take(&mut self.history),
        )
    }

    fn vm(&self, name: &str) -> Option<&VmSnapshot> {
        let input = self.input.as_ref()?;
        self.index.get(name).map(|&i| &input.vms[i])
    }

    /// The peer `name` of the input; the error names the declared ones.
    fn host(&self, method: &str, name: &str) -> mlua::Result<&PeerSnapshot> {
        let hosts = self.input.as_ref().map_or(&[][..], |i| &i.hosts[..]);
        hosts.iter().find(|h| h.name == name).ok_or_else(|| {
            if hosts.is_empty() {
                runtime(format!(
                    "ctx:{method}: no host named '{name}': no peer hosts are declared (hv.hosts)"
                ))
            } else {
                let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                runtime(format!(
                    "ctx:{method}: no host named '{name}'; the hosts are: {}",
                    names.join(", ")
                ))
            }
        })
    }
}

pub(crate) type Scope = Rc<RefCell<TickScope>>;

fn runtime(message: String) -> mlua::Error {
    mlua::Error::runtime(message)
}

/// The peer host an argument names: its name, or an entry of `ctx.hosts`.
fn host_name(method: &str, value: &Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_string()),
        Value::Table(t) => match t.get::<Value>("name")? {
            Value::String(s) => Ok(s.to_str()?.to_string()),
            _ => Err(runtime(format!(
                "ctx:{method}: host must be an entry of ctx.hosts or a host name, got a table without a name"
            ))),
        },
        other => Err(runtime(format!(
            "ctx:{method}: host must be an entry of ctx.hosts or a host name, got {}",
            describe(other)
        ))),
    }
}

/// A policy's reason: a non-empty string.
fn reason(method: &str, why: Value) -> mlua::Result<String> {
    match why {
        Value::String(s) if !s.as_bytes().is_empty() => Ok(s.to_str()?.to_string()),
        other => Err(runtime(format!(
            "ctx:{method}: a reason (a non-empty string) is required, got {}",
            describe(&other)
        ))),
    }
}

/// A number argument (integer or float).
fn number(method: &str, what: &str, value: &Value) -> mlua::Result<f64> {
    match value {
        Value::Integer(i) => Ok(*i as f64),
        Value::Number(f) if f.is_finite() => Ok(*f),
        other => Err(runtime(format!(
            "ctx:{method}: {what} must be a number, got {}",
            describe(other)
        ))),
    }
}

/// How much `ctx:improves` asks for: bytes (a size), or a percent of `from_free`.
fn margin(from: f64, value: &Value) -> mlua::Result<f64> {
    if let Value::String(s) = value {
        let text = s.to_string_lossy();
        if let Some(percent) = text.trim().strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(p) if p.is_finite() && p >= 0.0 => Ok(from.abs() * p / 100.0),
                _ => Err(runtime(format!(
                    "ctx:improves: margin {text:?} must be a percent >= 0 such as \"10%\""
                ))),
            };
        }
    }
    let bytes = size_value(value).map_err(|got| {
        runtime(format!(
            "ctx:improves: margin must be a size (bytes, or \"512M\") or a percent (\"10%\"), got {got}"
        ))
    })?;
    Ok(bytes.unwrap_or(0) as f64)
}

/// The VM an argument names: its name, or a VM table of `ctx.vms`.
fn vm_name(method: &str, value: &Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_string()),
        Value::Table(t) => match t.get::<Value>("name")? {
            Value::String(s) => Ok(s.to_str()?.to_string()),
            _ => Err(runtime(format!(
                "ctx:{method}: vm must be an entry of ctx.vms or a VM name, got a table without a name"
            ))),
        },
        other => Err(runtime(format!(
            "ctx:{method}: vm must be an entry of ctx.vms or a VM name, got {}",
            describe(other)
        ))),
    }
}

fn active(scope: &TickScope, method: &str) -> mlua::Result<()> {
    if scope.active {
        Ok(())
    } else {
        Err(runtime(format!(
            "ctx:{method} can only be called while tick runs"
        )))
    }
}

/// The functions every `ctx` carries, made once per Lua state.
pub(crate) struct Methods {
    set_memory_target: Function,
    mean: Function,
    max: Function,
    min: Function,
    migrate: Function,
    held: Function,
    improves: Function,
    migration_cost: Function,
    pool_target: Function,
}

/// Which window of history a helper reads: `n` ticks, default all that are kept.
fn window(method: &str, n: Value) -> mlua::Result<usize> {
    match n {
        Value::Nil => Ok(HISTORY_TICKS),
        Value::Integer(n) if n >= 1 => Ok((n as usize).min(HISTORY_TICKS)),
        Value::Number(f) if f >= 1.0 && f.fract() == 0.0 => Ok((f as usize).min(HISTORY_TICKS)),
        other => Err(runtime(format!(
            "ctx:{method}: n must be a whole number of ticks >= 1, got {}",
            describe(&other)
        ))),
    }
}

fn field_index(method: &str, field: &Value) -> mlua::Result<usize> {
    let name = match field {
        Value::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(runtime(format!(
                "ctx:{method}: field must be a string, got {}",
                describe(other)
            )))
        }
    };
    HISTORY_FIELDS
        .iter()
        .position(|f| *f == name)
        .ok_or_else(|| {
            runtime(format!(
                "ctx:{method}: no field '{name}' in the history; fields are {}",
                HISTORY_FIELDS.join(", ")
            ))
        })
}

/// A windowed helper: `ctx:NAME(vm, field, n)` folds the values of `field` over the last
/// `n` ticks of `vm` with `fold`; nil when none of those ticks has the field.
fn window_helper(
    lua: &Lua,
    scope: &Scope,
    method: &'static str,
    fold: fn(&mut dyn Iterator<Item = u64>) -> Option<Value>,
) -> mlua::Result<Function> {
    let scope = scope.clone();
    lua.create_function(
        move |_, (_ctx, vm, field, n): (Value, Value, Value, Value)| {
            let scope = scope.borrow();
            active(&scope, method)?;
            let name = vm_name(method, &vm)?;
            let field = field_index(method, &field)?;
            let n = window(method, n)?;
            if scope.vm(&name).is_none() {
                return Err(runtime(format!("ctx:{method}: no vm named '{name}'")));
            }
            let folded = fold(&mut scope.history.values(&name, field, n));
            Ok(folded.unwrap_or(Value::Nil))
        },
    )
}

fn integer(value: u64) -> Value {
    Value::Integer(value.min(i64::MAX as u64) as i64)
}

impl Methods {
    /// The functions, in the order the sandbox prelude's `make_builder` takes them.
    pub fn functions(&self) -> mlua::MultiValue {
        [
            &self.set_memory_target,
            &self.mean,
            &self.max,
            &self.min,
            &self.migrate,
            &self.held,
            &self.improves,
            &self.migration_cost,
            &self.pool_target,
        ]
        .into_iter()
        .map(|f| Value::Function(f.clone()))
        .collect()
    }

    pub fn new(lua: &Lua, scope: &Scope) -> mlua::Result<Methods> {
        let intents = scope.clone();
        let set_memory_target = lua.create_function(
            move |_, (_ctx, vm, bytes, why): (Value, Value, Value, Value)| {
                const METHOD: &str = "set_memory_target";
                let mut scope = intents.borrow_mut();
                active(&scope, METHOD)?;
                let name = vm_name(METHOD, &vm)?;
                let asked = size_value(&bytes)
                    .map_err(|got| {
                        runtime(format!(
                            "ctx:set_memory_target: bytes must be a size (bytes, or \"384M\"), got {got}"
                        ))
                    })?
                    .ok_or_else(|| runtime("ctx:set_memory_target: bytes is required".into()))?;
                let reason = reason(METHOD, why)?;
                let memory = &scope
                    .vm(&name)
                    .ok_or_else(|| {
                        runtime(format!("ctx:set_memory_target: no vm named '{name}'"))
                    })?
                    .memory;
                // Rounding down to whole pages is not clamping; leaving [min, max] is.
                let (target, _) = memory.knobs().clamp(asked);
                let clamped = asked < memory.min || asked > memory.max;
                let decision = Decision {
                    vm: name,
                    asked,
                    target,
                    clamped,
                    previous: memory.target,
                    reason,
                };
                match scope.decided.get(&decision.vm) {
                    Some(&at) => scope.decisions[at] = decision,
                    None => {
                        let at = scope.decisions.len();
                        scope.decided.insert(decision.vm.clone(), at);
                        scope.decisions.push(decision);
                    }
                }
                Ok((integer(target), clamped))
            },
        )?;
        let mean = window_helper(lua, scope, "mean", |values| {
            let (sum, count) = values.fold((0f64, 0u64), |(s, c), v| (s + v as f64, c + 1));
            (count > 0).then(|| Value::Number(sum / count as f64))
        })?;
        let max = window_helper(lua, scope, "max", |values| values.max().map(integer))?;
        let min = window_helper(lua, scope, "min", |values| values.min().map(integer))?;
        Ok(Methods {
            set_memory_target,
            mean,
            max,
            min,
            migrate: migrate_method(lua, scope)?,
            held: held_method(lua, scope)?,
            improves: lua.create_function(
                |_, (_ctx, from, to, wanted): (Value, Value, Value, Value)| {
                    let from = number("improves", "from_free", &from)?;
                    let to = number("improves", "to_free", &to)?;
                    let margin = margin(from, &wanted)?;
                    Ok((to - from >= margin, to - from))
                },
            )?,
            migration_cost: migration_cost_method(lua, scope)?,
            pool_target: pool_target_method(lua, scope)?,
        })
    }
}

/// `ctx:migrate(vm, host, reason)`: checks the intent, records it with the guards'
/// verdict, and returns `true`, or `false` and why it was refused.
fn migrate_method(lua: &Lua, scope: &Scope) -> mlua::Result<Function> {
    let scope = scope.clone();
    lua.create_function(
        move |_, (_ctx, vm, host, why): (Value, Value, Value, Value)| {
            const METHOD: &str = "migrate";
            let mut scope = scope.borrow_mut();
            active(&scope, METHOD)?;
            let vm = vm_name(METHOD, &vm)?;
            let host = host_name(METHOD, &host)?;
            let reason = reason(METHOD, why)?;
            let refused = {
                let snapshot = scope
                    .vm(&vm)
                    .ok_or_else(|| runtime(format!("ctx:migrate: no vm named '{vm}'")))?;
                let peer = scope.host(METHOD, &host)?;
                let input = scope.input.as_ref().ok_or_else(|| {
                    runtime("ctx:migrate can only be called while tick runs".into())
                })?;
                migrate::verdict(
                    &input.migrations,
                    input.now_ms,
                    snapshot,
                    peer,
                    &scope.migrations,
                )
            };
            scope.migrations.push(MigrateDecision {
                vm,
                host,
                reason,
                refused: refused.clone(),
            });
            Ok(match refused {
                None => (true, None),
                Some(why) => (false, Some(why)),
            })
        },
    )
}

/// `ctx:pool_target(pool, n, reason)`: asks the warm pool (an entry of `ctx.pools` or its
/// name) to keep `n` VMs ready; returns the target it gets and whether that was clamped.
fn pool_target_method(lua: &Lua, scope: &Scope) -> mlua::Result<Function> {
    let scope = scope.clone();
    lua.create_function(
        move |_, (_ctx, pool, n, why): (Value, Value, Value, Value)| {
            const METHOD: &str = "pool_target";
            let mut scope = scope.borrow_mut();
            active(&scope, METHOD)?;
            let name = match &pool {
                Value::String(s) => s.to_str()?.to_string(),
                Value::Table(t) => match t.get::<Value>("name")? {
                    Value::String(s) => s.to_str()?.to_string(),
                    _ => {
                        return Err(runtime(
                            "ctx:pool_target: pool must be an entry of ctx.pools or a pool name, got a table without a name".into(),
                        ))
                    }
                },
                other => {
                    return Err(runtime(format!(
                        "ctx:pool_target: pool must be an entry of ctx.pools or a pool name, got {}",
                        describe(other)
                    )))
                }
            };
            let asked = match n {
                Value::Integer(i) if i >= 0 => i as u64,
                Value::Number(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => f as u64,
                other => {
                    return Err(runtime(format!(
                        "ctx:pool_target: n must be a whole number of ready VMs >= 0, got {}",
                        describe(&other)
                    )))
                }
            };
            let reason = reason(METHOD, why)?;
            let input = scope
                .input
                .clone()
                .ok_or_else(|| runtime("ctx:pool_target can only be called while tick runs".into()))?;
            let snapshot = input.pools.iter().find(|p| p.name == name).ok_or_else(|| {
                if input.pools.is_empty() {
                    runtime(format!(
                        "ctx:pool_target: no pool named '{name}': no pool is defined (hv.pool.define)"
                    ))
                } else {
                    let names: Vec<&str> = input.pools.iter().map(|p| p.name.as_str()).collect();
                    runtime(format!(
                        "ctx:pool_target: no pool named '{name}'; the pools are: {}",
                        names.join(", ")
                    ))
                }
            })?;
            let free = input
                .host
                .memory_available
                .saturating_sub(input.host.memory_reserve);
            let applied = clamp_target(asked, snapshot, free);
            let decision = PoolDecision {
                pool: name,
                asked,
                target: applied.target,
                clamped: applied.clamped,
                previous: snapshot.target,
                reason,
            };
            match scope.pools.iter().position(|d| d.pool == decision.pool) {
                Some(at) => scope.pools[at] = decision,
                None => scope.pools.push(decision),
            }
            Ok((integer(applied.target), applied.clamped))
        },
    )
}

/// `ctx:held(key, condition, n)`: true once `condition` has been true for `n`
/// consecutive ticks; also returns how many ticks it has.
fn held_method(lua: &Lua, scope: &Scope) -> mlua::Result<Function> {
    let scope = scope.clone();
    lua.create_function(
        move |_, (_ctx, key, condition, n): (Value, Value, Value, Value)| {
            const METHOD: &str = "held";
            let mut scope = scope.borrow_mut();
            active(&scope, METHOD)?;
            let key = match key {
                Value::String(s)
                    if !s.as_bytes().is_empty() && s.as_bytes().len() <= MAX_HOLD_KEY =>
                {
                    s.to_str()?.to_string()
                }
                other => {
                    return Err(runtime(format!(
                        "ctx:held: key must be a string of 1 to {MAX_HOLD_KEY} bytes, got {}",
                        describe(&other)
                    )))
                }
            };
            let n = match n {
                Value::Integer(n) if n >= 1 => n as u64,
                Value::Number(f) if f >= 1.0 && f.fract() == 0.0 && f < 1e15 => f as u64,
                other => {
                    return Err(runtime(format!(
                        "ctx:held: n must be a whole number of ticks >= 1, got {}",
                        describe(&other)
                    )))
                }
            };
            let condition = !matches!(condition, Value::Nil | Value::Boolean(false));
            let tick = scope.tick;
            let count = scope
                .history
                .hold(&key, condition, tick)
                .map_err(|e| runtime(format!("ctx:held: {e}")))?;
            Ok((count >= n, integer(count)))
        },
    )
}

/// `ctx:migration_cost(vm)`: the [`migrate::estimate`] for `vm`, as a table.
fn migration_cost_method(lua: &Lua, scope: &Scope) -> mlua::Result<Function> {
    let scope = scope.clone();
    lua.create_function(move |lua, (_ctx, vm): (Value, Value)| {
        const METHOD: &str = "migration_cost";
        let scope = scope.borrow();
        active(&scope, METHOD)?;
        let name = vm_name(METHOD, &vm)?;
        let snapshot = scope
            .vm(&name)
            .ok_or_else(|| runtime(format!("ctx:migration_cost: no vm named '{name}'")))?;
        let bandwidth = scope
            .input
            .as_ref()
            .map_or(migrate::DEFAULT_BANDWIDTH, |i| {
                i.migrations.limits.bandwidth
            });
        let cost = migrate::estimate(
            snapshot.memory.resident,
            scope.history.dirty_rate(&name, DIRTY_RATE_TICKS),
            bandwidth,
            luvisor_runtime::remote::client::DEFAULT_MAX_DOWNTIME.as_secs_f64(),
        );
        let t = lua.create_table()?;
        t.set("memory", integer(cost.memory))?;
        t.set("dirty_rate", cost.dirty_rate)?;
        t.set("bandwidth", integer(cost.bandwidth))?;
        t.set("rounds", cost.rounds)?;
        t.set("bytes", cost.bytes)?;
        t.set("downtime_s", cost.downtime_s)?;
        t.set("total_s", cost.total_s)?;
        t.set("converges", cost.converges)?;
        Ok(t)
    })
}

/// Values per VM in [`build`]'s layout.
const VM_VALUES: usize = 22;
/// Values per peer host.
const HOST_VALUES: usize = 10;
/// Values per running migration.
const MIGRATION_VALUES: usize = 3;
/// Values per warm pool.
const POOL_VALUES: usize = 12;

fn optional(value: Option<u64>) -> Value {
    value.map_or(Value::Nil, integer)
}

/// The `ctx` for one tick: the input as one flat list of values, handed to `builder`
/// (the sandbox prelude's, see [`super::sandbox`]), which makes the read-only tables.
///
/// The layout: host total, available, reserve, resident; now_ms; tick; interval_ms; the
/// number of VMs; then 22 values per VM: name, state, size, target, resident, min, max,
/// startup, buffer, weight, whether it has stats, the ten statistics (nil when missing)
/// and the stats' age; then the number of peer hosts and 10 values per host: name, addr,
/// reachable, memory_total, memory_available, memory_reserve, vms, vms_resident, age_ms,
/// error; then the number of running migrations and 3 values each: vm, host, started_ms;
/// then the number of warm pools and 12 values each: name, min, max, target, ready,
/// claimed, restoring, claims, claims_window, window_ms, returned, memory.
pub(crate) fn build(
    lua: &Lua,
    input: &TickInput,
    tick: u64,
    interval_ms: u64,
    builder: &Function,
) -> mlua::Result<Table> {
    let mut values: Vec<Value> = Vec::with_capacity(
        11 + VM_VALUES * input.vms.len()
            + HOST_VALUES * input.hosts.len()
            + MIGRATION_VALUES * input.migrations.running.len()
            + POOL_VALUES * input.pools.len(),
    );
    let host = &input.host;
    values.extend(
        [
            host.memory_total,
            host.memory_available,
            host.memory_reserve,
            host.vms_resident,
            input.now_ms,
            tick,
            interval_ms,
            input.vms.len() as u64,
        ]
        .map(integer),
    );
    for vm in &input.vms {
        let m = &vm.memory;
        values.push(Value::String(lua.create_string(&vm.name)?));
        values.push(Value::String(lua.create_string(&vm.state)?));
        values.extend(
            [
                m.size,
                m.target,
                m.resident,
                m.min,
                m.max,
                m.startup,
                u64::from(m.buffer),
                u64::from(m.weight),
            ]
            .map(integer),
        );
        match &m.stats {
            Some(stats) => {
                values.push(Value::Boolean(true));
                values.extend(
                    stats
                        .stats
                        .fields()
                        .map(|(_, v)| v.map_or(Value::Nil, integer)),
                );
                values.push(integer(stats.age_ms));
            }
            None => values.extend(std::iter::repeat_n(Value::Nil, 12)),
        }
    }
    values.push(integer(input.hosts.len() as u64));
    for peer in &input.hosts {
        values.push(Value::String(lua.create_string(&peer.name)?));
        values.push(Value::String(lua.create_string(&peer.addr)?));
        values.push(Value::Boolean(peer.reachable));
        values.extend(
            [
                peer.memory_total,
                peer.memory_available,
                peer.memory_reserve,
                peer.vms,
                peer.vms_resident,
                peer.age_ms,
            ]
            .map(optional),
        );
        values.push(match &peer.error {
            Some(error) => Value::String(lua.create_string(error)?),
            None => Value::Nil,
        });
    }
    let running = &input.migrations.running;
    values.push(integer(running.len() as u64));
    for migration in running {
        values.push(Value::String(lua.create_string(&migration.vm)?));
        values.push(Value::String(lua.create_string(&migration.host)?));
        values.push(integer(migration.started_ms));
    }
    values.push(integer(input.pools.len() as u64));
    for pool in &input.pools {
        values.push(Value::String(lua.create_string(&pool.name)?));
        values.extend(
            [
                pool.min,
                pool.max,
                pool.target,
                pool.ready,
                pool.claimed,
                pool.restoring,
                pool.claims,
                pool.claims_window,
                pool.window_ms,
                pool.returned,
                pool.memory,
            ]
            .map(integer),
        );
    }
    builder.call(mlua::MultiValue::from_vec(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_ticks_and_forgets_vms_that_left() {
        let mut input = TickInput::sample();
        let mut history = History::default();
        for i in 0..(HISTORY_TICKS + 5) {
            input.vms[0].memory.target = i as u64;
            history.push(&input);
        }
        assert_eq!(history.len("busy"), HISTORY_TICKS);
        let target = HISTORY_FIELDS.iter().position(|f| *f == "target").unwrap();
        let last3: Vec<u64> = history.values("busy", target, 3).collect();
        assert_eq!(
            last3,
            vec![
                HISTORY_TICKS as u64 + 2,
                HISTORY_TICKS as u64 + 3,
                HISTORY_TICKS as u64 + 4
            ]
        );
        // "booting" has no stats: its demand is never recorded, its size is.
        let demand = HISTORY_FIELDS.iter().position(|f| *f == "demand").unwrap();
        assert_eq!(history.values("booting", demand, 10).count(), 0);
        assert_eq!(history.values("busy", demand, 1).next(), Some(924 << 20));
        input.vms.remove(0);
        history.push(&input);
        assert_eq!(history.len("busy"), 0);
        assert_eq!(history.len("quiet"), HISTORY_TICKS);
    }

    #[test]
    fn inputs_round_trip_through_json() {
        let input = TickInput::sample();
        let text = serde_json::to_string(&input).unwrap();
        assert_eq!(serde_json::from_str::<TickInput>(&text).unwrap(), input);
    }
}
