//! Policy traces: JSON lines holding what each tick read and what it decided, written by
//! `luvisor serve --record` (or `hv.policy.record`), and replayed by
//! `luvisor policy simulate`.
//!
//! The first line is a [`TraceRecord::Header`]. Then, in the order they happened:
//!
//! - [`TraceRecord::Tick`]: one run of a policy's `tick`, with its whole input (the host,
//!   every VM and its statistics), the tick number, whether it ran in shadow (a new
//!   version's trial run, not applied), its decisions and its error;
//! - [`TraceRecord::Sample`]: the host and VMs sampled on their own (by `serve`, so a
//!   trace holds the stats even with no policy loaded).
//!
//! A policy's decisions depend only on its ticks' inputs, in order (its Lua state and its
//! history both come from them), so replaying a policy's own tick records through the same
//! file gives the same decisions ([`simulate`]).

use std::io::{BufRead, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::context::{Decision, History, PoolDecision, TickInput};
use super::instance::{Instance, TickResult};
use super::migrate::MigrateDecision;
use super::sandbox::Limits;

/// The trace format's name and version, in its header.
pub const FORMAT: &str = "luvisor-policy-trace";
/// Version 2 added the peer hosts and migrations to each input and the migrate decisions
/// to each tick; version 3 the warm pools to each input and the pool targets to each
/// tick. Older traces are still read (as inputs without peers, migrations or pools).
pub const VERSION: u32 = 3;
/// The oldest version this luvisor reads.
pub const OLDEST_VERSION: u32 = 1;

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TraceRecord {
    Header {
        format: String,
        version: u32,
        luvisor: String,
    },
    Tick {
        policy: String,
        file: String,
        generation: u64,
        tick: u64,
        shadow: bool,
        input: TickInput,
        decisions: Vec<Decision>,
        /// The migrate intents and their verdicts (none in version 1 traces).
        #[serde(default)]
        migrations: Vec<MigrateDecision>,
        /// The warm pool targets (none before version 3).
        #[serde(default)]
        pools: Vec<PoolDecision>,
        error: Option<String>,
    },
    Sample {
        input: TickInput,
    },
}

impl TraceRecord {
    pub fn header() -> TraceRecord {
        TraceRecord::Header {
            format: FORMAT.into(),
            version: VERSION,
            luvisor: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Where the engine sends its records.
pub trait RecordSink: Send + Sync {
    fn record(&self, record: &TraceRecord);
}

/// A JSON-lines trace file. Each record is written and flushed whole, so a trace cut
/// short by a kill holds only complete lines.
pub struct TraceFile {
    path: std::path::PathBuf,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl TraceFile {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path) -> Result<TraceFile, String> {
        let file = std::fs::File::create(path)
            .map_err(|e| format!("cannot create the trace {}: {e}", path.display()))?;
        let trace = TraceFile {
            path: path.to_path_buf(),
            file: Mutex::new(std::io::BufWriter::new(file)),
        };
        trace.write(&TraceRecord::header())?;
        Ok(trace)
    }

    fn write(&self, record: &TraceRecord) -> Result<(), String> {
        let mut line = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)
            .and_then(|()| file.flush())
            .map_err(|e| format!("cannot write the trace {}: {e}", self.path.display()))
    }
}

impl RecordSink for TraceFile {
    fn record(&self, record: &TraceRecord) {
        if let Err(e) = self.write(record) {
            tracing::warn!("{e}");
        }
    }
}

/// Reads a trace: every record, in order. A malformed line is an error naming it.
pub fn read_trace(path: &Path) -> Result<Vec<TraceRecord>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the trace {}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read the trace {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: TraceRecord = serde_json::from_str(&line).map_err(|e| {
            format!(
                "{}:{}: not a policy trace record: {e}",
                path.display(),
                i + 1
            )
        })?;
        if let TraceRecord::Header {
            format, version, ..
        } = &record
        {
            if format != FORMAT || !(OLDEST_VERSION..=VERSION).contains(version) {
                return Err(format!(
                    "{}:{}: a trace in format {format} version {version}; this luvisor reads \
                     {FORMAT} versions {OLDEST_VERSION} to {VERSION}",
                    path.display(),
                    i + 1
                ));
            }
        }
        records.push(record);
    }
    if !matches!(records.first(), Some(TraceRecord::Header { .. })) {
        return Err(format!(
            "{}: not a policy trace (no header line); record one with `luvisor serve --record`",
            path.display()
        ));
    }
    Ok(records)
}

/// Loads a policy file the way the engine does, as `file` names it.
pub fn load_file(file: &Path, limits: Limits) -> Result<Instance, String> {
    let source = super::sandbox::read_source(file)?;
    let dir = super::policy_dir(file);
    Instance::load(&file.display().to_string(), &dir, &source, limits)
}

/// `luvisor policy check`: loads `file` and runs one tick against
/// [`TickInput::sample`]. Returns the policy and the tick's result; an error when the
/// file does not load or the tick fails.
pub fn check(file: &Path, limits: Limits) -> Result<(Instance, TickResult), String> {
    let instance = load_file(file, limits)?;
    let input = Rc::new(TickInput::sample());
    let mut history = History::default();
    history.push(&input);
    let (result, _) = instance.run(&input, 1, history);
    match &result.error {
        Some(error) => Err(error.clone()),
        None => Ok((instance, result)),
    }
}

/// One replayed tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayedTick {
    pub tick: u64,
    pub shadow: bool,
    pub now_ms: u64,
    pub decisions: Vec<Decision>,
    /// The migrate intents, with the verdicts the guards give on the recorded input.
    pub migrations: Vec<MigrateDecision>,
    /// The warm pool targets.
    pub pools: Vec<PoolDecision>,
    pub error: Option<String>,
    /// How long building `ctx` and running `tick` took.
    pub duration_ms: f64,
    /// What the trace recorded for this tick, when it was a tick of this policy; `None`
    /// for inputs taken from samples or other policies' ticks.
    #[serde(skip)]
    pub recorded: Option<Recorded>,
}

/// What a trace recorded for one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub decisions: Vec<Decision>,
    pub migrations: Vec<MigrateDecision>,
    pub pools: Vec<PoolDecision>,
    pub error: Option<String>,
}

impl ReplayedTick {
    /// The replay decided what the live run decided (and failed the same way). A
    /// migration refused live only because another policy took the last slot in the same
    /// instant differs here: the replay sees only this policy's input.
    pub fn matches(&self) -> Option<bool> {
        self.recorded.as_ref().map(|r| {
            r.decisions == self.decisions
                && r.migrations == self.migrations
                && r.pools == self.pools
                && r.error == self.error
        })
    }
}

/// `luvisor policy simulate`: replays `records` through `instance`.
///
/// When the trace holds ticks of a policy with the same name, exactly those are replayed,
/// shadow runs included, in order, so the Lua state and the history evolve as they did
/// live; each replayed tick carries what was recorded. Otherwise every sample and every
/// other policy's tick is replayed as a tick (an input recorded by several policies at
/// the same moment once).
pub fn simulate(instance: &Instance, records: &[TraceRecord]) -> Vec<ReplayedTick> {
    let own = records
        .iter()
        .any(|r| matches!(r, TraceRecord::Tick { policy, .. } if *policy == instance.name));
    let mut history = History::default();
    let mut replayed: Vec<ReplayedTick> = Vec::new();
    let mut last_now: Option<u64> = None;
    let mut count = 0;
    for record in records {
        let (input, tick, shadow, recorded) = match record {
            TraceRecord::Tick {
                policy,
                input,
                tick,
                shadow,
                decisions,
                migrations,
                pools,
                error,
                ..
            } if own => {
                if *policy != instance.name {
                    continue;
                }
                (
                    input,
                    *tick,
                    *shadow,
                    Some(Recorded {
                        decisions: decisions.clone(),
                        migrations: migrations.clone(),
                        pools: pools.clone(),
                        error: error.clone(),
                    }),
                )
            }
            TraceRecord::Tick { input, .. } | TraceRecord::Sample { input } if !own => {
                if last_now == Some(input.now_ms) {
                    continue;
                }
                last_now = Some(input.now_ms);
                count += 1;
                (input, count, false, None)
            }
            _ => continue,
        };
        let input = Rc::new(input.clone());
        let result = if shadow {
            // A shadow run sees the history with its input, but leaves it as it was.
            let mut trial = history.clone();
            trial.push(&input);
            instance.run(&input, tick, trial).0
        } else {
            history.push(&input);
            let (result, back) = instance.run(&input, tick, std::mem::take(&mut history));
            history = back;
            result
        };
        replayed.push(ReplayedTick {
            tick,
            shadow,
            now_ms: input.now_ms,
            decisions: result.decisions,
            migrations: result.migrations,
            pools: result.pools,
            error: result.error,
            duration_ms: result.duration.as_secs_f64() * 1000.0,
            recorded,
        });
    }
    replayed
}
