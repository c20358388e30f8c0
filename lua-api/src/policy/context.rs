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

use luvisor_runtime::vm::dynamic_memory::{MemoryKnobs, MemoryStats};
use luvisor_runtime::Registry;
use mlua::{Function, Lua, Table, Value};
use serde::{Deserialize, Serialize};

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

/// Everything one tick reads: the host and every VM, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickInput {
    /// Milliseconds since the policy engine started (`ctx.now_ms`).
    pub now_ms: u64,
    pub host: HostSnapshot,
    pub vms: Vec<VmSnapshot>,
}

impl TickInput {
    /// The live state of the host and of every VM in `registry`, VMs in creation order.
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

/// The last [`HISTORY_TICKS`] samples of each VM, newest last. A policy's history
/// survives its reloads; a VM that leaves the snapshot loses its history.
#[derive(Debug, Clone, Default)]
pub struct History {
    vms: HashMap<String, VecDeque<Sample>>,
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
            samples.push_back(sample_of(vm));
        }
    }

    /// The values of `field` in the last `n` samples of `vm` that have it.
    fn values(&self, vm: &str, field: usize, n: usize) -> impl Iterator<Item = u64> + '_ {
        let samples = self.vms.get(vm);
        let skip = samples.map_or(0, |s| s.len().saturating_sub(n));
        samples
            .into_iter()
            .flat_map(move |s| s.iter().skip(skip))
            .filter_map(move |s| s[field])
    }

    /// How many ticks of history `vm` has.
    pub fn len(&self, vm: &str) -> usize {
        self.vms.get(vm).map_or(0, VecDeque::len)
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
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
}

impl TickScope {
    pub fn begin(&mut self, input: Rc<TickInput>, history: History) {
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
        self.active = true;
    }

    /// Ends the tick: its decisions and the history, handed back.
    pub fn end(&mut self) -> (Vec<Decision>, History) {
        self.active = false;
        self.input = None;
        (
            std::mem::take(&mut self.decisions),
            std::mem::take(&mut self.history),
        )
    }

    fn vm(&self, name: &str) -> Option<&VmSnapshot> {
        let input = self.input.as_ref()?;
        self.index.get(name).map(|&i| &input.vms[i])
    }
}

pub(crate) type Scope = Rc<RefCell<TickScope>>;

fn runtime(message: String) -> mlua::Error {
    mlua::Error::runtime(message)
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
    pub fn functions(&self) -> (Function, Function, Function, Function) {
        (
            self.set_memory_target.clone(),
            self.mean.clone(),
            self.max.clone(),
            self.min.clone(),
        )
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
                let reason = match why {
                    Value::String(s) if !s.as_bytes().is_empty() => s.to_str()?.to_string(),
                    other => {
                        return Err(runtime(format!(
                            "ctx:set_memory_target: a reason (a non-empty string) is required, got {}",
                            describe(&other)
                        )))
                    }
                };
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
        })
    }
}

/// The `ctx` for one tick: the input as one flat list of values, handed to `builder`
/// (the sandbox prelude's, see [`super::sandbox`]), which makes the read-only tables.
///
/// The layout: host total, available, reserve, resident; now_ms; tick; interval_ms; the
/// number of VMs; then 22 values per VM: name, state, size, target, resident, min, max,
/// startup, buffer, weight, whether it has stats, the ten statistics (nil when missing)
/// and the stats' age.
pub(crate) fn build(
    lua: &Lua,
    input: &TickInput,
    tick: u64,
    interval_ms: u64,
    builder: &Function,
) -> mlua::Result<Table> {
    let mut values: Vec<Value> = Vec::with_capacity(8 + 22 * input.vms.len());
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
