//! Migration triggers: `ctx:migrate(vm, host, reason)` intents, the guards Rust puts on
//! them, the background threads that run the accepted ones, and the cost model behind
//! `ctx:migration_cost(vm)`.
//!
//! **The seam.** The engine does not migrate VMs itself: it calls a [`MigrationExecutor`]
//! on a thread of its own. Until one is set ([`builtin_executor`], or
//! [`PolicyEngine::set_migration_executor`](super::PolicyEngine::set_migration_executor)),
//! every migrate intent is refused with "live migration is not available".
//!
//! **Guards**, in the order they are checked (the first that fails is the reason given):
//!
//! 1. migrations are on (`per_host` > 0) and an executor is set;
//! 2. the VM has not ended (`stopped`, `crashed`);
//! 3. the host answered its last poll (`reachable`);
//! 4. one migration per VM at a time: none runs for it, and none was asked for it earlier
//!    in the same tick;
//! 5. a cooldown per VM: its last migration (success or failure) ended at least
//!    `cooldown_s` ago;
//! 6. at most `per_host` outgoing migrations run from this host at once.
//!
//! A tick checks the guards against its input ([`MigrationSnapshot`], recorded in traces),
//! so a replay gives the same verdicts. When the tick's intents are applied, the engine
//! checks again against the live book under one lock ([`MigrationBook::start`]): two
//! policies ticking at the same moment cannot both take the last slot; the one that loses
//! is refused then, and that refusal is what its status and the trace show.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use luvisor_runtime::vm::Vm;
use serde::{Deserialize, Serialize};

use super::context::VmSnapshot;
use super::peers::{PeerHost, PeerSnapshot};

/// Runs one live migration: moves `vm` to `host` (`reason` is the policy's), and returns
/// the migration's report (any JSON; status shows it) or why it failed. Called on a
/// thread of its own (`migrate-<vm>`), never on a policy's thread; it may take as long as
/// the migration does.
///
/// [`builtin_executor`] is the one that runs `Vm::migrate`.
pub type MigrationExecutor =
    Arc<dyn Fn(&Arc<Vm>, &PeerHost, &str) -> Result<serde_json::Value, String> + Send + Sync>;

/// The executor every policy engine starts with.
///
/// It calls `vm.migrate(&host.addr, options, progress)` with the peer's key (`host.key`,
/// read from `host.key_file` when `hv.hosts` declared it), logs `reason`, and maps the
/// report to JSON and the error to its chain. An engine whose
/// executor is taken away (`set_migration_executor(None)`) refuses migrate intents
/// with [`NOT_AVAILABLE`].
pub fn builtin_executor() -> Option<MigrationExecutor> {
    Some(Arc::new(|vm: &Arc<Vm>, host: &PeerHost, reason: &str| {
        tracing::info!(
            vm = vm.name(),
            host = host.name,
            reason,
            "policy migration starts"
        );
        let options = luvisor_runtime::migration::MigrateOptions::new(host.key.clone());
        vm.migrate(&host.addr, &options, &mut |_| {})
            .map(|report| report.to_json())
            .map_err(|e| crate::host::error_chain(&e))
    }))
}

/// Why an intent is refused while no executor is set.
pub const NOT_AVAILABLE: &str =
    "live migration is not available in this luvisor (no migration executor is set)";

/// `hv.policy.migration_limits{ per_host, cooldown_s, bandwidth }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationLimits {
    /// Most outgoing migrations at once from this host; 0 turns policy migrations off.
    pub per_host: u32,
    /// After a VM's migration ends (either way), how long before it may migrate again.
    pub cooldown_ms: u64,
    /// Bytes per second a migration is assumed to move (`ctx:migration_cost`).
    pub bandwidth: u64,
}

/// Default `per_host`.
pub const DEFAULT_PER_HOST: u32 = 1;
/// Default `cooldown_s`, in ms.
pub const DEFAULT_COOLDOWN_MS: u64 = 60_000;
/// Default `bandwidth`: 1 GiB/s.
pub const DEFAULT_BANDWIDTH: u64 = 1 << 30;
/// Largest `per_host`.
pub const MAX_PER_HOST: u32 = 64;

impl Default for MigrationLimits {
    fn default() -> MigrationLimits {
        MigrationLimits {
            per_host: DEFAULT_PER_HOST,
            cooldown_ms: DEFAULT_COOLDOWN_MS,
            bandwidth: DEFAULT_BANDWIDTH,
        }
    }
}

/// A migration in flight, as a tick sees it (`ctx.migrations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningMigration {
    pub vm: String,
    pub host: String,
    /// `ctx.now_ms` when it started.
    pub started_ms: u64,
}

/// When a VM's last migration ended (for the cooldown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedMigration {
    pub vm: String,
    pub ended_ms: u64,
}

/// What the guards read: part of a tick's input, so traces replay the same verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSnapshot {
    /// An executor is set.
    pub available: bool,
    pub limits: MigrationLimits,
    pub running: Vec<RunningMigration>,
    /// VMs whose last migration ended within the cooldown.
    pub ended: Vec<EndedMigration>,
}

impl Default for MigrationSnapshot {
    /// What a trace without migration data (format version 1) replays as: no executor.
    fn default() -> MigrationSnapshot {
        MigrationSnapshot {
            available: false,
            limits: MigrationLimits::default(),
            running: Vec::new(),
            ended: Vec::new(),
        }
    }
}

/// A tick's migrate intent and Rust's verdict on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateDecision {
    pub vm: String,
    /// The peer's name.
    pub host: String,
    /// The policy's reason.
    pub reason: String,
    /// Why the guards refused it; `None`: it was started (or, in a shadow run or a
    /// replay, would have been).
    pub refused: Option<String>,
}

fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// The guards against a tick's input: why `vm` may not migrate to `host` now, or `None`.
/// `earlier` are the intents this tick made before.
pub(crate) fn verdict(
    snapshot: &MigrationSnapshot,
    now_ms: u64,
    vm: &VmSnapshot,
    host: &PeerSnapshot,
    earlier: &[MigrateDecision],
) -> Option<String> {
    let limits = &snapshot.limits;
    if limits.per_host == 0 {
        return Some(
            "policy migrations are off (hv.policy.migration_limits{ per_host = 0 })".into(),
        );
    }
    if !snapshot.available {
        return Some(NOT_AVAILABLE.into());
    }
    if vm.state == "stopped" || vm.state == "crashed" {
        return Some(format!(
            "vm '{}' is {}: nothing to migrate",
            vm.name, vm.state
        ));
    }
    if !host.reachable {
        return Some(format!(
            "host '{}' is unreachable: {}",
            host.name,
            host.error.as_deref().unwrap_or("no answer")
        ));
    }
    let accepted = earlier.iter().filter(|d| d.refused.is_none());
    if let Some(running) = snapshot.running.iter().find(|m| m.vm == vm.name) {
        return Some(format!(
            "vm '{}' is already migrating to '{}' (one migration per vm at a time)",
            vm.name, running.host
        ));
    }
    if let Some(asked) = accepted.clone().find(|d| d.vm == vm.name) {
        return Some(format!(
            "a migration of vm '{}' to '{}' was already asked this tick (one migration per vm at a time)",
            vm.name, asked.host
        ));
    }
    if let Some(ended) = snapshot.ended.iter().find(|e| e.vm == vm.name) {
        let since = now_ms.saturating_sub(ended.ended_ms);
        if since < limits.cooldown_ms {
            return Some(format!(
                "vm '{}' is cooling down: its last migration ended {} ago; the cooldown is {}",
                vm.name,
                seconds(since),
                seconds(limits.cooldown_ms)
            ));
        }
    }
    let in_flight = snapshot.running.len() + accepted.count();
    if in_flight >= limits.per_host as usize {
        return Some(format!(
            "the limit of {} outgoing migration(s) at a time from this host is reached ({} in flight)",
            limits.per_host, in_flight
        ));
    }
    None
}

/// How a migration the engine started is going (`status.migrations`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationRecord {
    /// Counts the engine's migrations from 1.
    pub id: u64,
    /// The policy that asked.
    pub policy: String,
    pub vm: String,
    pub host: String,
    pub addr: String,
    pub reason: String,
    /// `"running"`, `"succeeded"` or `"failed"`.
    pub state: &'static str,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// The executor's report, once it succeeded.
    pub report: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// How many ended migrations the book keeps for status.
pub const KEPT_ENDED: usize = 32;

/// The engine's migrations: in flight, recently ended, and the limits and executor they
/// run under.
pub(crate) struct MigrationBook {
    pub limits: MigrationLimits,
    pub executor: Option<MigrationExecutor>,
    next_id: u64,
    running: Vec<MigrationRecord>,
    ended: VecDeque<MigrationRecord>,
    /// When each VM's last migration ended, for the cooldown.
    last_ended: HashMap<String, u64>,
}

impl MigrationBook {
    pub fn new(executor: Option<MigrationExecutor>) -> MigrationBook {
        MigrationBook {
            limits: MigrationLimits::default(),
            executor,
            next_id: 1,
            running: Vec::new(),
            ended: VecDeque::new(),
            last_ended: HashMap::new(),
        }
    }

    /// What a tick's guards read now.
    pub fn snapshot(&mut self, now_ms: u64) -> MigrationSnapshot {
        let cooldown = self.limits.cooldown_ms;
        self.last_ended
            .retain(|_, ended| now_ms.saturating_sub(*ended) < cooldown);
        let mut ended: Vec<EndedMigration> = self
            .last_ended
            .iter()
            .map(|(vm, &ended_ms)| EndedMigration {
                vm: vm.clone(),
                ended_ms,
            })
            .collect();
        // A stable order, so that equal states record equal inputs.
        ended.sort_by(|a, b| a.vm.cmp(&b.vm));
        MigrationSnapshot {
            available: self.executor.is_some(),
            limits: self.limits,
            running: self
                .running
                .iter()
                .map(|m| RunningMigration {
                    vm: m.vm.clone(),
                    host: m.host.clone(),
                    started_ms: m.started_ms,
                })
                .collect(),
            ended,
        }
    }

    /// Checks `decision` (accepted by its tick) again against the book, and on success
    /// books it as running; the record and the executor to run it with.
    pub fn start(
        &mut self,
        policy: &str,
        decision: &MigrateDecision,
        vm: &VmSnapshot,
        host: &PeerHost,
        now_ms: u64,
    ) -> Result<(MigrationRecord, MigrationExecutor), String> {
        let reachable = PeerSnapshot {
            name: host.name.clone(),
            addr: host.addr.clone(),
            reachable: true,
            memory_total: None,
            memory_available: None,
            memory_reserve: None,
            vms: None,
            vms_resident: None,
            age_ms: None,
            error: None,
        };
        // The host's reachability was the tick's to judge; the rest is checked live.
        if let Some(refused) = verdict(&self.snapshot(now_ms), now_ms, vm, &reachable, &[]) {
            return Err(refused);
        }
        let executor = self.executor.clone().ok_or(NOT_AVAILABLE)?;
        let record = MigrationRecord {
            id: self.next_id,
            policy: policy.to_string(),
            vm: decision.vm.clone(),
            host: host.name.clone(),
            addr: host.addr.clone(),
            reason: decision.reason.clone(),
            state: "running",
            started_ms: now_ms,
            ended_ms: None,
            report: None,
            error: None,
        };
        self.next_id += 1;
        self.running.push(record.clone());
        Ok((record, executor))
    }

    /// A migration the book started could not run (its thread did not start).
    pub fn abandon(&mut self, id: u64) {
        self.running.retain(|m| m.id != id);
    }

    /// Records how migration `id` ended.
    pub fn finish(&mut self, id: u64, outcome: Result<serde_json::Value, String>, now_ms: u64) {
        let Some(at) = self.running.iter().position(|m| m.id == id) else {
            return;
        };
        let mut record = self.running.remove(at);
        record.ended_ms = Some(now_ms);
        match outcome {
            Ok(report) => {
                record.state = "succeeded";
                record.report = Some(report);
            }
            Err(error) => {
                record.state = "failed";
                record.error = Some(error);
            }
        }
        self.last_ended.insert(record.vm.clone(), now_ms);
        if self.ended.len() == KEPT_ENDED {
            self.ended.pop_front();
        }
        self.ended.push_back(record);
    }

    /// The migrations `policy` asked for: in flight, then the ended ones, oldest first.
    pub fn of_policy(&self, policy: &str) -> Vec<MigrationRecord> {
        self.ended
            .iter()
            .chain(self.running.iter())
            .filter(|m| m.policy == policy)
            .cloned()
            .collect()
    }

    /// Every migration the book knows, ended ones first.
    pub fn all(&self) -> Vec<MigrationRecord> {
        self.ended
            .iter()
            .chain(self.running.iter())
            .cloned()
            .collect()
    }
}

/// `ctx:migration_cost(vm)`: an estimate of a pre-copy live migration.
///
/// The model: the first round sends the VM's resident memory `M` at `bandwidth` `B`;
/// while a round of `x` bytes is sent (`x / B` seconds) the guest dirties
/// `dirty_rate × x / B` bytes, which the next round sends. Rounds go on while the rest
/// would take longer than the downtime allowed, up to [`MAX_ROUNDS`]; then the VM is
/// paused and the rest is sent: that is the downtime. With `dirty_rate ≥ B` the rounds
/// do not shrink (`converges = false`) and the downtime is about `M / B`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostEstimate {
    /// Bytes of the first round: the VM's resident memory.
    pub memory: u64,
    /// Bytes per second the guest is estimated to dirty (see [`dirty_rate`]).
    pub dirty_rate: f64,
    /// Bytes per second assumed for the transfer.
    pub bandwidth: u64,
    /// Copy rounds while the VM runs.
    pub rounds: u32,
    /// All bytes sent.
    pub bytes: f64,
    /// The estimated pause at the end, in seconds.
    pub downtime_s: f64,
    /// The estimated whole migration, in seconds.
    pub total_s: f64,
    /// The rounds shrink: the migration ends with a pause near `max_downtime_s`.
    pub converges: bool,
}

/// Most pre-copy rounds the model counts (live migrations stop iterating too).
pub const MAX_ROUNDS: u32 = 30;

pub fn estimate(memory: u64, dirty_rate: f64, bandwidth: u64, max_downtime_s: f64) -> CostEstimate {
    let speed = bandwidth.max(1) as f64;
    let dirty_rate = dirty_rate.max(0.0);
    let mut remaining = memory as f64;
    let (mut rounds, mut bytes, mut elapsed) = (0u32, 0f64, 0f64);
    let mut converges = true;
    while remaining / speed > max_downtime_s && rounds < MAX_ROUNDS {
        let round_s = remaining / speed;
        elapsed += round_s;
        bytes += remaining;
        rounds += 1;
        let dirtied = (dirty_rate * round_s).min(memory as f64);
        if dirtied >= remaining {
            converges = false;
            remaining = dirtied;
            break;
        }
        remaining = dirtied;
    }
    if rounds == MAX_ROUNDS && remaining / speed > max_downtime_s {
        converges = false;
    }
    let downtime_s = remaining / speed;
    CostEstimate {
        memory,
        dirty_rate,
        bandwidth,
        rounds,
        bytes: bytes + remaining,
        downtime_s,
        total_s: elapsed + downtime_s,
        converges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::context::TickInput;

    const G: u64 = 1 << 30;

    fn peer(name: &str, reachable: bool) -> PeerSnapshot {
        PeerSnapshot {
            name: name.into(),
            addr: "127.0.0.1:7002".into(),
            reachable,
            memory_total: Some(16 * G),
            memory_available: Some(8 * G),
            memory_reserve: Some(G / 2),
            vms: Some(1),
            vms_resident: Some(G),
            age_ms: Some(100),
            error: (!reachable).then(|| "connection refused".into()),
        }
    }

    fn asked(vm: &str, refused: Option<&str>) -> MigrateDecision {
        MigrateDecision {
            vm: vm.into(),
            host: "b".into(),
            reason: "test".into(),
            refused: refused.map(String::from),
        }
    }

    #[test]
    fn the_guards_refuse_with_reasons() {
        let input = TickInput::sample();
        let (busy, quiet) = (&input.vms[0], &input.vms[1]);
        let b = peer("b", true);
        let mut snapshot = MigrationSnapshot {
            available: true,
            ..MigrationSnapshot::default()
        };
        assert_eq!(verdict(&snapshot, 0, busy, &b, &[]), None);
        fn refused(
            s: &MigrationSnapshot,
            vm: &VmSnapshot,
            host: &PeerSnapshot,
            earlier: &[MigrateDecision],
        ) -> String {
            verdict(s, 100_000, vm, host, earlier).unwrap()
        }

        // One per VM at a time: in flight, or asked earlier in the tick (a refused
        // earlier intent does not count).
        snapshot.running.push(RunningMigration {
            vm: "busy".into(),
            host: "c".into(),
            started_ms: 1,
        });
        assert!(refused(&snapshot, busy, &b, &[]).contains("vm 'busy' is already migrating to 'c'"));
        snapshot.running.clear();
        let earlier = [asked("busy", None)];
        assert!(refused(&snapshot, busy, &b, &earlier).contains("already asked this tick"));
        assert_eq!(
            verdict(&snapshot, 0, busy, &b, &[asked("busy", Some("x"))]),
            None
        );

        // The per-host limit counts migrations in flight and those accepted this tick.
        assert!(refused(&snapshot, quiet, &b, &earlier)
            .contains("the limit of 1 outgoing migration(s) at a time from this host is reached"));
        snapshot.limits.per_host = 2;
        assert_eq!(verdict(&snapshot, 0, quiet, &b, &earlier), None);
        snapshot.running.push(RunningMigration {
            vm: "other".into(),
            host: "b".into(),
            started_ms: 1,
        });
        assert!(refused(&snapshot, quiet, &b, &earlier).contains("(2 in flight)"));
        snapshot.running.clear();

        // The cooldown runs from the end of the VM's last migration.
        snapshot.ended.push(EndedMigration {
            vm: "busy".into(),
            ended_ms: 70_000,
        });
        assert_eq!(
            refused(&snapshot, busy, &b, &[]),
            "vm 'busy' is cooling down: its last migration ended 30 s ago; the cooldown is 60 s"
        );
        assert_eq!(verdict(&snapshot, 130_000, busy, &b, &[]), None);

        // The host must answer, the VM must not have ended, an executor must be set,
        // and migrations must be on.
        assert_eq!(
            refused(&snapshot, quiet, &peer("d", false), &[]),
            "host 'd' is unreachable: connection refused"
        );
        let mut stopped = quiet.clone();
        stopped.state = "stopped".into();
        assert!(refused(&snapshot, &stopped, &b, &[]).contains("is stopped"));
        snapshot.available = false;
        assert_eq!(refused(&snapshot, quiet, &b, &[]), NOT_AVAILABLE);
        snapshot.limits.per_host = 0;
        assert!(refused(&snapshot, quiet, &b, &[]).contains("policy migrations are off"));
    }

    #[test]
    fn the_book_runs_one_migration_per_vm_and_remembers_when_it_ended() {
        let input = TickInput::sample();
        let busy = &input.vms[0];
        let executor: MigrationExecutor = Arc::new(|_, _, _| Ok(serde_json::json!({})));
        let mut book = MigrationBook::new(Some(executor));
        let host = PeerHost {
            name: "b".into(),
            addr: "127.0.0.1:7002".into(),
            key_file: "key".into(),
            key: luvisor_runtime::migration::PeerKey::from_bytes(&[7; 32]),
        };
        let decision = asked("busy", None);
        let (record, _) = book.start("p", &decision, busy, &host, 10).unwrap();
        assert_eq!((record.id, record.state), (1, "running"));
        let again = book.start("p", &decision, busy, &host, 20).err().unwrap();
        assert!(again.contains("already migrating"), "{again}");
        assert_eq!(book.snapshot(20).running.len(), 1);
        book.finish(record.id, Err("boom".into()), 30);
        let snapshot = book.snapshot(40);
        assert!(snapshot.running.is_empty());
        assert_eq!(snapshot.ended[0].ended_ms, 30);
        let cooling = book.start("p", &decision, busy, &host, 40).err().unwrap();
        assert!(cooling.contains("cooling down"), "{cooling}");
        let of_policy = book.of_policy("p");
        assert_eq!(of_policy.len(), 1);
        assert_eq!(
            (of_policy[0].state, of_policy[0].error.as_deref()),
            ("failed", Some("boom"))
        );
        // Past the cooldown the VM may go again, and the book forgets the old end.
        assert!(book.snapshot(30 + DEFAULT_COOLDOWN_MS).ended.is_empty());
        assert!(book
            .start("p", &decision, busy, &host, 30 + DEFAULT_COOLDOWN_MS)
            .is_ok());
    }

    #[test]
    fn a_quiet_vm_costs_one_copy_and_a_busy_one_does_not_converge() {
        // Nothing dirtied: one round of 2 GiB at 1 GiB/s, then nothing left to pause for.
        let quiet = estimate(2 * G, 0.0, G, 0.3);
        assert_eq!(
            (quiet.rounds, quiet.downtime_s, quiet.total_s),
            (1, 0.0, 2.0)
        );
        assert!(quiet.converges);
        // A quarter of the bandwidth dirtied: rounds of 2 G, 512 M, 128 M (0.125 s < 0.3 s).
        let busy = estimate(2 * G, G as f64 / 4.0, G, 0.3);
        assert_eq!(busy.rounds, 2);
        assert!((busy.downtime_s - 0.125).abs() < 1e-9, "{busy:?}");
        assert!((busy.total_s - 2.625).abs() < 1e-9, "{busy:?}");
        assert!(busy.converges);
        // Dirtying faster than the link: the whole memory is sent paused.
        let hot = estimate(2 * G, 2.0 * G as f64, G, 0.3);
        assert!(!hot.converges);
        assert!((hot.downtime_s - 2.0).abs() < 1e-9, "{hot:?}");
        // Small enough to send paused at once.
        let tiny = estimate(64 << 20, 0.0, G, 0.3);
        assert_eq!((tiny.rounds, tiny.downtime_s), (0, 0.0625));
    }
}
