//! `luvisor policy check` and `luvisor policy simulate`: trying a policy without VMs.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use luvisor_lua::policy::record::{self, ReplayedTick};
use luvisor_lua::policy::{Decision, Limits, MigrateDecision, PoolDecision};
use luvisor_runtime::size::format_size;

/// A size for people: exact when it is whole MiB or more, else MiB with a decimal.
fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(MIB) || bytes < MIB {
        format_size(bytes)
    } else {
        format!("{:.1}M", bytes as f64 / MIB as f64)
    }
}

fn describe(decision: &Decision) -> String {
    let mut text = format!(
        "{}: {} -> {}",
        decision.vm,
        human(decision.previous),
        human(decision.target)
    );
    if decision.clamped {
        text.push_str(&format!(
            " (asked {}, clamped to the vm's min/max)",
            human(decision.asked)
        ));
    }
    text.push_str(&format!(": {}", decision.reason));
    text
}

fn describe_migration(decision: &MigrateDecision) -> String {
    let verdict = match &decision.refused {
        None => String::new(),
        Some(why) => format!(" [refused: {why}]"),
    };
    format!(
        "migrate {} to {}: {}{verdict}",
        decision.vm, decision.host, decision.reason
    )
}

fn describe_pool(decision: &PoolDecision) -> String {
    let mut text = format!(
        "pool {}: {} -> {} ready",
        decision.pool, decision.previous, decision.target
    );
    if decision.clamped {
        text.push_str(&format!(
            " (asked {}, clamped to the pool's min/max and the host's free memory)",
            decision.asked
        ));
    }
    text.push_str(&format!(": {}", decision.reason));
    text
}

/// "nothing", "2 targets", "1 target and 1 migration", "1 target, 1 migration and 1
/// pool target".
fn decided(targets: usize, migrations: usize, pools: usize) -> String {
    let count = |n: usize, what: &str| match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    };
    let parts: Vec<String> = [
        (targets, "target"),
        (migrations, "migration"),
        (pools, "pool target"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| count(n, what))
    .collect();
    match parts.as_slice() {
        [] => "nothing".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `luvisor policy check FILE`: load it and run one tick against a sample host.
pub fn check(file: &Path) -> ExitCode {
    match record::check(file, Limits::default()) {
        Ok((policy, result)) => {
            println!(
                "{}: policy '{}' (every {} ms) loads; one tick against a sample host with 3 VMs and a pool \
                 took {:.3} ms and decided {}:",
                file.display(),
                policy.name,
                policy.interval_ms,
                result.duration.as_secs_f64() * 1000.0,
                decided(
                    result.decisions.len(),
                    result.migrations.len(),
                    result.pools.len()
                )
            );
            for decision in &result.decisions {
                println!("  {}", describe(decision));
            }
            for decision in &result.migrations {
                println!("  {}", describe_migration(decision));
            }
            for decision in &result.pools {
                println!("  {}", describe_pool(decision));
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("luvisor: policy check: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `luvisor policy simulate FILE --trace TRACE [--json] [--check]`.
pub fn simulate(file: &Path, trace: &Path, json: bool, check: bool) -> ExitCode {
    let records = match record::read_trace(trace) {
        Ok(records) => records,
        Err(message) => {
            eprintln!("luvisor: policy simulate: {message}");
            return ExitCode::FAILURE;
        }
    };
    let policy = match record::load_file(file, Limits::default()) {
        Ok(policy) => policy,
        Err(message) => {
            eprintln!("luvisor: policy simulate: {message}");
            return ExitCode::FAILURE;
        }
    };
    let replayed = record::simulate(&policy, &records);
    let mut out = std::io::stdout().lock();
    for tick in &replayed {
        let written = if json {
            serde_json::to_string(&JsonTick::from(tick))
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(out, "{line}"))
        } else {
            write_tick(&mut out, tick)
        };
        if written.is_err() {
            // A closed pipe (`| head`): stop quietly.
            return ExitCode::SUCCESS;
        }
    }
    let differing: Vec<&ReplayedTick> = replayed
        .iter()
        .filter(|t| t.matches() == Some(false))
        .collect();
    let compared = replayed.iter().filter(|t| t.matches().is_some()).count();
    let decisions: usize = replayed.iter().map(|t| t.decisions.len()).sum();
    let failed = replayed.iter().filter(|t| t.error.is_some()).count();
    let mut costs: Vec<f64> = replayed.iter().map(|t| t.duration_ms).collect();
    costs.sort_by(f64::total_cmp);
    let summary = format!(
        "replayed {} tick(s) of '{}' from {}: {decisions} decision(s), {failed} failed tick(s)",
        replayed.len(),
        policy.name,
        trace.display()
    );
    eprintln!("{summary}");
    if !costs.is_empty() {
        let mean = costs.iter().sum::<f64>() / costs.len() as f64;
        let at = |q: f64| costs[((costs.len() - 1) as f64 * q).round() as usize];
        eprintln!(
            "tick cost: mean {mean:.3} ms, median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    if compared == 0 {
        eprintln!(
            "the trace holds no ticks of '{}': nothing to compare",
            policy.name
        );
    } else if differing.is_empty() {
        eprintln!("all {compared} recorded tick(s) decided the same as the recording");
    } else {
        eprintln!(
            "{} of {compared} recorded tick(s) decided differently from the recording (first: tick {})",
            differing.len(),
            differing[0].tick
        );
        if check {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn write_tick(out: &mut impl Write, tick: &ReplayedTick) -> std::io::Result<()> {
    let shadow = if tick.shadow { " (shadow)" } else { "" };
    let differs = if tick.matches() == Some(false) {
        "  [differs from the recording]"
    } else {
        ""
    };
    match &tick.error {
        Some(error) => writeln!(
            out,
            "tick {}{shadow} at {} ms: failed: {error}{differs}",
            tick.tick, tick.now_ms
        ),
        None if tick.decisions.is_empty()
            && tick.migrations.is_empty()
            && tick.pools.is_empty() =>
        {
            writeln!(
                out,
                "tick {}{shadow} at {} ms: no change{differs}",
                tick.tick, tick.now_ms
            )
        }
        None => {
            writeln!(
                out,
                "tick {}{shadow} at {} ms:{differs}",
                tick.tick, tick.now_ms
            )?;
            for decision in &tick.decisions {
                writeln!(out, "  {}", describe(decision))?;
            }
            for decision in &tick.migrations {
                writeln!(out, "  {}", describe_migration(decision))?;
            }
            for decision in &tick.pools {
                writeln!(out, "  {}", describe_pool(decision))?;
            }
            Ok(())
        }
    }
}

/// One replayed tick as a JSON line.
#[derive(serde::Serialize)]
struct JsonTick<'a> {
    tick: u64,
    shadow: bool,
    now_ms: u64,
    decisions: &'a [Decision],
    migrations: &'a [MigrateDecision],
    pools: &'a [PoolDecision],
    error: Option<&'a str>,
    /// Whether it decided what the recording did; null for inputs not recorded as ticks
    /// of this policy.
    matches_recording: Option<bool>,
    duration_ms: f64,
}

impl<'a> From<&'a ReplayedTick> for JsonTick<'a> {
    fn from(tick: &'a ReplayedTick) -> JsonTick<'a> {
        JsonTick {
            tick: tick.tick,
            shadow: tick.shadow,
            now_ms: tick.now_ms,
            decisions: &tick.decisions,
            migrations: &tick.migrations,
            pools: &tick.pools,
            error: tick.error.as_deref(),
            matches_recording: tick.matches(),
            duration_ms: tick.duration_ms,
        }
    }
}
