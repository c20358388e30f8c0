//! Stopping running Lua code, per Lua state: Ctrl-C, requests from other threads, and
//! instruction budgets.
//!
//! Each Lua state made by [`crate::new_user_state_with_limits`] (or given [`install`])
//! owns a [`Control`]: its own interrupt flag and its own instruction budget, set from
//! the [`StateLimits`] it was created with. Nothing here is process-wide except the
//! Ctrl-C counter, so a policy state in the same process as the REPL is not stopped by a
//! Ctrl-C meant for the REPL, and keeps its own budget.
//!
//! - **Ctrl-C:** the process's SIGINT handler calls [`ctrl_c_pressed`], which only bumps
//!   a counter (async-signal-safe). A state created with `interrupt_on_ctrl_c` treats
//!   every press it has not seen yet as an interrupt request; other states ignore it.
//! - **Requests from Rust:** [`Interrupter::interrupt`] asks one state to stop, from any
//!   thread (a watchdog, say).
//! - **Budget:** a state with `instruction_budget = Some(n)` raises "instruction budget of
//!   n exceeded" once its Lua code has run more than `n` VM instructions since it was
//!   created or since the last [`reset_budget`]. Time spent inside `hv` calls (waits,
//!   sleeps) is not counted; use an [`Interrupter`] to bound those.
//!
//! Lua code notices a request or an exceeded budget through a count hook, installed as
//! mlua's global hook so coroutines created by scripts carry it too: every
//! [`CHECK_EVERY`] instructions, or every `n` when a budget `n` is smaller. `hv.sleep`
//! and waits on VMs poll the calling state's [`canceller`] (within 50 ms).
//!
//! A request is consumed when it stops something, so code that catches "interrupted" with
//! `pcall` goes on (and can clean up). An exceeded budget is not consumed: every later
//! check raises again until [`reset_budget`]. If Lua code catches the error and keeps
//! running anyway, the next check makes the hook fire before every instruction of that
//! coroutine, so no Lua code in it can run until the budget is reset; an `xpcall` message
//! handler caught in that then fails with Lua's "error in error handling".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use mlua::{HookTriggers, Lua, VmState};

/// How many instructions run between two checks of an unbudgeted state.
pub const CHECK_EVERY: u32 = 10_000;

/// Ctrl-C presses since the process started. Only ever incremented, by the signal
/// handler; each state remembers the count it has already acted on.
static CTRL_C_PRESSES: AtomicU64 = AtomicU64::new(0);
/// The press count some state last acted on (an interrupt it raised or a wait it ended):
/// the presses above it are unanswered so far (see [`ctrl_c_unanswered`]).
static CTRL_C_ANSWERED: AtomicU64 = AtomicU64::new(0);

/// What stops a Lua state's code, and the message it stops with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    /// Ctrl-C, or [`Interrupter::interrupt`].
    #[error("interrupted")]
    Interrupted,
    /// The state ran more VM instructions than its budget allows.
    #[error("instruction budget of {budget} exceeded")]
    BudgetExceeded { budget: u64 },
}

impl From<Stopped> for mlua::Error {
    fn from(stopped: Stopped) -> mlua::Error {
        // A plain runtime error: scripts see exactly the message.
        mlua::Error::runtime(stopped.to_string())
    }
}

/// What may stop a Lua state's code, chosen when the state is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateLimits {
    /// Ctrl-C interrupts this state's running code and waits. True for the foreground
    /// state (`luvisor run`, the REPL); false for states that run on the side, such as
    /// policies.
    pub interrupt_on_ctrl_c: bool,
    /// At most this many Lua VM instructions between two [`reset_budget`] calls (counted
    /// from creation before the first). `None`: no limit.
    pub instruction_budget: Option<u64>,
}

impl StateLimits {
    /// The state a person drives: Ctrl-C interrupts it, no budget.
    pub const FOREGROUND: StateLimits = StateLimits {
        interrupt_on_ctrl_c: true,
        instruction_budget: None,
    };
}

/// Called from the SIGINT handler: interrupts every state that takes Ctrl-C.
/// Async-signal-safe: one atomic add.
pub fn ctrl_c_pressed() {
    CTRL_C_PRESSES.fetch_add(1, Ordering::SeqCst);
}

/// Ctrl-C presses no state has acted on yet: a script that is not looking (stuck in a
/// call that does not poll) lets them pile up, while one that catches each interrupt
/// and goes on answers them. Async-signal-safe: two atomic loads.
pub fn ctrl_c_unanswered() -> u64 {
    CTRL_C_PRESSES
        .load(Ordering::SeqCst)
        .saturating_sub(CTRL_C_ANSWERED.load(Ordering::SeqCst))
}

/// Counts every press so far as answered (a new Ctrl-C handler starts counting afresh).
pub fn forget_unanswered_ctrl_c() {
    CTRL_C_ANSWERED.fetch_max(CTRL_C_PRESSES.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// One state's interrupt flag and budget, shared by its hook, its `hv` waits and its
/// [`Interrupter`]s.
#[derive(Debug)]
pub struct Control {
    limits: StateLimits,
    /// Set by [`Interrupter::interrupt`].
    requested: AtomicBool,
    /// Set by [`Interrupter::cancel`]: every check stops the code from now on.
    cancelled: AtomicBool,
    /// The Ctrl-C count this state has already acted on (or that was current when it was
    /// created, or last cleared).
    ctrl_c_seen: AtomicU64,
    /// Instructions counted against the budget since the last reset (in steps of the hook
    /// period, so at most one period more than really ran).
    used: AtomicU64,
    /// The budget error (or, once cancelled, "interrupted") has been raised since the
    /// last reset.
    budget_error_raised: AtomicBool,
    /// The hook of some coroutine fires before every instruction (see the module
    /// documentation); reset puts the normal period back.
    tightened: AtomicBool,
}

impl Control {
    fn new(limits: StateLimits) -> Control {
        Control {
            limits,
            requested: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            ctrl_c_seen: AtomicU64::new(CTRL_C_PRESSES.load(Ordering::SeqCst)),
            used: AtomicU64::new(0),
            budget_error_raised: AtomicBool::new(false),
            tightened: AtomicBool::new(false),
        }
    }

    /// Takes a pending interrupt request: one from an [`Interrupter`], or a Ctrl-C press
    /// this state has not acted on yet if it takes Ctrl-C.
    fn take_request(&self) -> bool {
        if self.cancelled.load(Ordering::SeqCst) {
            return true;
        }
        let requested = self.requested.swap(false, Ordering::SeqCst);
        let pressed = self.limits.interrupt_on_ctrl_c && {
            let presses = CTRL_C_PRESSES.load(Ordering::SeqCst);
            let new = self.ctrl_c_seen.swap(presses, Ordering::SeqCst) != presses;
            if new {
                CTRL_C_ANSWERED.fetch_max(presses, Ordering::SeqCst);
            }
            new
        };
        requested || pressed
    }

    /// Forgets pending requests, Ctrl-C presses included.
    fn clear(&self) {
        self.requested.store(false, Ordering::SeqCst);
        self.ctrl_c_seen
            .store(CTRL_C_PRESSES.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Hook period: how many instructions run between two checks.
    fn period(&self) -> u32 {
        match self.limits.instruction_budget {
            Some(budget) => budget.clamp(1, u64::from(CHECK_EVERY)) as u32,
            None => CHECK_EVERY,
        }
    }

    /// One check, `counted` instructions after the previous one.
    fn check(&self, counted: u64) -> Result<(), Stopped> {
        if self.take_request() {
            return Err(Stopped::Interrupted);
        }
        if let Some(budget) = self.limits.instruction_budget {
            let used = self.used.fetch_add(counted, Ordering::SeqCst) + counted;
            if used > budget {
                return Err(Stopped::BudgetExceeded { budget });
            }
        }
        Ok(())
    }
}

/// A handle that interrupts one Lua state's code from any thread.
#[derive(Debug, Clone)]
pub struct Interrupter(Arc<Control>);

impl Interrupter {
    /// Asks the state's running code (or its next run) to stop with "interrupted". Running
    /// Lua code stops at its next check; `hv.sleep` and waits on VMs within 50 ms.
    pub fn interrupt(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
    }

    /// Stops the state's code for good: like [`Interrupter::interrupt`], but the request
    /// is never consumed, so code that catches "interrupted" with `pcall` is stopped
    /// again, at every instruction once it has caught it (as for an exceeded budget).
    /// For a run that is being abandoned (`luvisor test` on Ctrl-C); the state is of no
    /// further use for running Lua code.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
    }
}

/// Installs [`hook`] as the global hook of `lua`, firing every `every` instructions on the
/// running coroutine and on coroutines created later. Each firing counts as a full check
/// period against the budget; only coroutines that must stop anyway fire more often.
fn set_hook(lua: &Lua, control: &Arc<Control>, every: u32) -> mlua::Result<()> {
    let triggers = HookTriggers {
        every_nth_instruction: Some(every),
        ..HookTriggers::new()
    };
    let hooked = control.clone();
    lua.set_global_hook(triggers, move |lua, _| hook(lua, &hooked))
}

/// The count hook: stops the code on a request or an exceeded budget.
fn hook(lua: &Lua, control: &Arc<Control>) -> mlua::Result<VmState> {
    match control.check(u64::from(control.period())) {
        Ok(()) => Ok(VmState::Continue),
        Err(stopped @ Stopped::Interrupted) if !control.cancelled.load(Ordering::SeqCst) => {
            Err(stopped.into())
        }
        Err(stopped) => {
            // The first error goes out at the normal period, so message handlers can run.
            // A coroutine still running Lua code at a later check caught it and carried
            // on: from now on it checks before every instruction. Inside a hook, mlua sets
            // the hook of the coroutine that is running.
            if control.budget_error_raised.swap(true, Ordering::SeqCst) {
                control.tightened.store(true, Ordering::SeqCst);
                set_hook(lua, control, 1)?;
            }
            Err(stopped.into())
        }
    }
}

/// Gives `lua` its own [`Control`] with `limits` and the hook that enforces them.
/// Replaces what an earlier call installed; a Lua script calling `debug.sethook` replaces
/// the hook, as in the stock interpreter.
pub fn install(lua: &Lua, limits: StateLimits) -> mlua::Result<()> {
    let control = Arc::new(Control::new(limits));
    set_hook(lua, &control, control.period())?;
    lua.set_app_data(control);
    Ok(())
}

fn control(lua: &Lua) -> Option<Arc<Control>> {
    lua.app_data_ref::<Arc<Control>>().map(|c| Arc::clone(&c))
}

/// The limits `lua` was given, or `None` when it has no [`Control`].
pub fn limits(lua: &Lua) -> Option<StateLimits> {
    control(lua).map(|c| c.limits)
}

/// A handle that interrupts `lua`'s code from any thread, or `None` when it has no
/// [`Control`].
pub fn interrupter(lua: &Lua) -> Option<Interrupter> {
    control(lua).map(Interrupter)
}

/// Takes a pending interrupt request of `lua`, if any. A state without a [`Control`]
/// is never interrupted.
pub fn take(lua: &Lua) -> bool {
    control(lua).is_some_and(|c| c.take_request())
}

/// The cancel check for waits inside `hv` calls: true once `lua` has a pending interrupt
/// request (which it takes).
pub fn canceller(lua: &Lua) -> impl Fn() -> bool {
    let control = control(lua);
    move || control.as_ref().is_some_and(|c| c.take_request())
}

/// Forgets `lua`'s pending interrupt requests (a Ctrl-C pressed between two REPL chunks
/// must not stop the next one).
pub fn clear(lua: &Lua) {
    if let Some(control) = control(lua) {
        control.clear();
    }
}

/// Starts a new budget period for `lua`: nothing counted, no error raised. Call it before
/// each run that gets a full budget. Must not be called while `lua` runs Lua code.
pub fn reset_budget(lua: &Lua) -> mlua::Result<()> {
    let Some(control) = control(lua) else {
        return Ok(());
    };
    control.used.store(0, Ordering::SeqCst);
    control.budget_error_raised.store(false, Ordering::SeqCst);
    if control.tightened.swap(false, Ordering::SeqCst) {
        set_hook(lua, &control, control.period())?;
    }
    Ok(())
}

/// Instructions counted against `lua`'s budget since the last reset, in steps of the hook
/// period; 0 for a state without a budget.
pub fn instructions_used(lua: &Lua) -> u64 {
    control(lua).map_or(0, |c| c.used.load(Ordering::SeqCst))
}

/// The error an interrupted `hv` call raises.
pub fn error() -> mlua::Error {
    Stopped::Interrupted.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use luvisor_runtime::Registry;

    fn state(limits: StateLimits) -> Lua {
        crate::new_user_state_with_limits(Arc::new(Registry::new()), limits).unwrap()
    }

    fn budgeted(budget: u64) -> Lua {
        state(StateLimits {
            interrupt_on_ctrl_c: false,
            instruction_budget: Some(budget),
        })
    }

    fn run(lua: &Lua, code: &str) -> Result<(), String> {
        lua.load(code)
            .exec()
            .map_err(|e| crate::script::error_message(&e))
    }

    #[test]
    fn interrupting_one_state_leaves_the_other_running() {
        let first = state(StateLimits::default());
        let second = state(StateLimits::default());
        interrupter(&first).unwrap().interrupt();
        assert_eq!(run(&first, "while true do end"), Err("interrupted".into()));
        // The request was consumed by the state it was for, and only by it.
        assert_eq!(run(&second, "for i = 1, 100000 do end"), Ok(()));
        assert_eq!(run(&first, "for i = 1, 100000 do end"), Ok(()));
        // Waits inside hv calls check their own state too.
        interrupter(&second).unwrap().interrupt();
        assert_eq!(run(&first, "hv.sleep(0.01)"), Ok(()));
        assert_eq!(run(&second, "hv.sleep(600)"), Err("interrupted".into()));
    }

    /// The tests that press Ctrl-C (the counter is process-wide) run one at a time.
    static PRESSING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn ctrl_c_reaches_only_the_states_that_take_it() {
        let _pressing = PRESSING.lock().unwrap_or_else(|p| p.into_inner());
        let foreground = state(StateLimits::FOREGROUND);
        let policy = budgeted(1_000_000_000);
        ctrl_c_pressed();
        assert_eq!(run(&policy, "for i = 1, 100000 do end"), Ok(()));
        assert_eq!(run(&policy, "hv.sleep(0.01)"), Ok(()));
        assert_eq!(run(&foreground, "hv.sleep(600)"), Err("interrupted".into()));
        // One press stops one run.
        assert_eq!(run(&foreground, "for i = 1, 100000 do end"), Ok(()));
        // A press made before clear() is forgotten.
        ctrl_c_pressed();
        clear(&foreground);
        assert_eq!(run(&foreground, "for i = 1, 100000 do end"), Ok(()));
    }

    #[test]
    fn an_acted_on_press_is_answered() {
        let _pressing = PRESSING.lock().unwrap_or_else(|p| p.into_inner());
        let foreground = state(StateLimits::FOREGROUND);
        // A script that catches each interrupt and goes on answers every press: two
        // handled presses do not bring a third one closer to a kill.
        for _ in 0..2 {
            ctrl_c_pressed();
            let caught: bool = foreground
                .load("return not pcall(hv.sleep, 600)")
                .eval()
                .unwrap();
            assert!(caught);
            assert_eq!(ctrl_c_unanswered(), 0);
        }
        // (Another test's foreground state may answer this press too; never more.)
        ctrl_c_pressed();
        assert!(ctrl_c_unanswered() <= 1);
        forget_unanswered_ctrl_c();
        assert_eq!(ctrl_c_unanswered(), 0);
        clear(&foreground);
    }

    #[test]
    fn a_budget_stops_an_endless_loop_and_nothing_else() {
        let policy = budgeted(50_000);
        let user = state(StateLimits::default());
        assert_eq!(
            run(&policy, "while true do end"),
            Err("instruction budget of 50000 exceeded".into())
        );
        // The other state has no budget: a million instructions are fine.
        assert_eq!(run(&user, "for i = 1, 1000000 do end"), Ok(()));
        // Coroutines run under the same budget.
        reset_budget(&policy).unwrap();
        assert_eq!(
            run(
                &policy,
                "coroutine.wrap(function() while true do end end)()"
            ),
            Err("instruction budget of 50000 exceeded".into())
        );
    }

    #[test]
    fn resetting_the_budget_starts_a_new_count() {
        let policy = budgeted(50_000);
        // About 30,000 instructions each: one run fits, two do not.
        let chunk = "for i = 1, 30000 do end";
        assert_eq!(run(&policy, chunk), Ok(()));
        assert!(instructions_used(&policy) >= 20_000);
        assert_eq!(
            run(&policy, chunk),
            Err("instruction budget of 50000 exceeded".into())
        );
        // Exceeded stays exceeded until reset, at the next check.
        assert_eq!(
            run(&policy, "for i = 1, 20000 do end"),
            Err("instruction budget of 50000 exceeded".into())
        );
        for _ in 0..3 {
            reset_budget(&policy).unwrap();
            assert_eq!(instructions_used(&policy), 0);
            assert_eq!(run(&policy, chunk), Ok(()));
        }
    }

    #[test]
    fn catching_the_budget_error_does_not_escape_the_budget() {
        let policy = budgeted(20_000);
        // Each loop catches the error wherever a check lands and tries again. The loops
        // are bounded so that an escape ends in a failed assertion rather than a hang:
        // 20,000 tries are far more than a stop needs (the main coroutine checks every
        // 10,000 of its own instructions, and an outer iteration takes under 10).
        for (what, code) in [
            ("pcall", "for _ = 1, 20000 do pcall(spin) end"),
            (
                "coroutines",
                "for _ = 1, 20000 do coroutine.resume(coroutine.create(spin)) end",
            ),
            (
                // Coroutines that caught it first do not spare the main one.
                "coroutines, then pcall",
                "coroutine.resume(coroutine.create(spin))\n\
                 coroutine.resume(coroutine.create(spin))\n\
                 for _ = 1, 20000 do pcall(spin) end",
            ),
        ] {
            reset_budget(&policy).unwrap();
            let code = format!("local function spin() while true do end end\n{code}");
            assert_eq!(
                run(&policy, &code),
                Err("instruction budget of 20000 exceeded".into()),
                "{what}"
            );
        }
        // After a reset the state runs normally again, at the normal check period.
        reset_budget(&policy).unwrap();
        assert_eq!(run(&policy, "for i = 1, 15000 do end"), Ok(()));
        // A first error caught by pcall is an ordinary error with the clear message.
        reset_budget(&policy).unwrap();
        let (ok, message): (bool, String) = policy
            .load("return pcall(function() while true do end end)")
            .eval()
            .unwrap();
        assert!(!ok);
        assert_eq!(message, "instruction budget of 20000 exceeded");
    }

    #[test]
    fn a_budget_error_reaches_the_script_runner_with_its_message() {
        let policy = budgeted(10_000);
        let chunk = policy.load("while true do end").into_function().unwrap();
        let message = crate::script::call_traced(&policy, chunk, ()).unwrap_err();
        assert!(
            message.starts_with("instruction budget of 10000 exceeded\n"),
            "{message}"
        );
    }

    #[test]
    fn a_cancelled_state_cannot_catch_its_way_out() {
        let lua = state(StateLimits::default());
        let other = state(StateLimits::default());
        interrupter(&lua).unwrap().cancel();
        // Loops that catch "interrupted" and go on are stopped all the same; bounded so
        // that an escape is a failed assertion rather than a hang.
        for code in [
            "for _ = 1, 100000 do pcall(function() while true do end end) end",
            "for _ = 1, 100000 do pcall(hv.sleep, 600) end",
        ] {
            assert_eq!(run(&lua, code), Err("interrupted".into()), "{code}");
        }
        assert!(take(&lua), "a cancel is never consumed");
        assert_eq!(run(&other, "for i = 1, 100000 do end"), Ok(()));
    }

    #[test]
    fn a_state_without_limits_is_never_interrupted() {
        let lua = Lua::new();
        crate::register(&lua, Arc::new(Registry::new())).unwrap();
        assert!(interrupter(&lua).is_none());
        assert!(!take(&lua));
        assert_eq!(run(&lua, "hv.sleep(0.001)"), Ok(()));
    }
}
