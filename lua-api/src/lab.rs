//! `hv.lab{}` and the `Lab` handle: VMs from one template, brought up together.
//!
//! ```lua
//! local lab <close> = hv.lab{
//!   name = "ci", count = 8, ready = "console:hello from luvisor guest",
//!   template = { memory = "32M", disks = { { base = "base.img" } },
//!                guest = hv.guest.builtin{ cmdline = "hello; idle" } },
//! }
//! lab:start{ parallel = 4 }            -- a progress bar on a terminal
//! lab:each(function(vm) print(vm.name, vm.state) end)
//! lab:destroy()                        -- also when the handle is closed or collected
//! ```
//!
//! The handle owns the runtime's [`Lab`]: closing it (`<close>`), collecting it, or
//! closing the Lua state destroys the lab's VMs and removes its overlays. The rules
//! (names, fail-fast bring-up, what destroy removes) are the runtime's; this module reads
//! options, draws progress and turns errors into messages.
//!
//! While a state that takes Ctrl-C has made a lab or a pool, SIGINT interrupts it instead
//! of killing the process (see [`hold_ctrl_c`]), so a Ctrl-C ends the script through its
//! error path and the lab's files are removed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luvisor_runtime::lab::{DiskTemplate, Lab, LabSpec, Progress, StartOptions, Template};
use luvisor_runtime::readiness::Readiness;
use luvisor_runtime::vm::describe_outcome;
use luvisor_runtime::Registry;
use mlua::{
    Function, Lua, MetaMethod, MultiValue, Table, UserData, UserDataFields, UserDataMethods, Value,
};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{describe, Options};
use crate::vm::VmHandle;

const LAB_OPTIONS: &[&str] = &["name", "template", "count", "ready", "dir"];
const TEMPLATE_OPTIONS: &[&str] = &["vcpus", "memory", "guest", "disks", "agent"];
const DISK_TEMPLATE_OPTIONS: &[&str] = &["base", "format", "serial"];
const START_OPTIONS: &[&str] = &["parallel", "timeout", "progress"];
/// The readiness of a lab or pool that does not name one.
pub const DEFAULT_READY: &str = "kvp:ready";

/// The Lua handle on a lab.
pub struct LabHandle {
    pub lab: Arc<Lab>,
    registry: Arc<Registry>,
}

impl LabHandle {
    /// The runtime's lab, for cleanup scopes that destroy what a test made.
    pub fn lab(&self) -> &Arc<Lab> {
        &self.lab
    }

    fn describe(&self) -> String {
        format!(
            "lab<{} {} VMs, {}>",
            self.lab.name(),
            self.lab.len(),
            self.lab.state().as_str()
        )
    }

    fn vm_handle(&self, index: usize) -> Option<VmHandle> {
        self.lab
            .vm(index)
            .map(|vm| VmHandle::new(&vm, self.registry.clone()))
    }
}

fn lua_err(e: impl std::error::Error) -> mlua::Error {
    mlua::Error::runtime(error_chain(&e))
}

/// Reads a template: `{ memory, vcpus, guest, disks = { { base = PATH, format, serial }, ... } }`.
pub(crate) fn template_option(lua: &Lua, function: &str, value: Value) -> mlua::Result<Template> {
    let table = match value {
        Value::Table(t) => t,
        Value::Nil => {
            return Err(mlua::Error::runtime(format!(
                "{function}: option 'template' is required: {{ memory = \"32M\", guest = hv.guest.builtin{{ ... }}, disks = {{ {{ base = \"base.img\" }} }} }}"
            )))
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "{function}: option 'template' must be a table of VM options, got {}",
                describe(&other)
            )))
        }
    };
    let what = format!("{function}: template");
    let opts = Options::new(&what, table, TEMPLATE_OPTIONS)?;
    let config = crate::vm::machine_config(lua, &opts, String::new())?;
    let disks = match opts.raw("disks")? {
        Value::Nil => Vec::new(),
        Value::Table(list) => {
            let len = list.raw_len();
            if list.pairs::<Value, Value>().count() != len {
                return Err(opts.error(
                    "option 'disks' must be a list of disk templates: disks = { { base = \"base.img\" } }",
                ));
            }
            let mut disks = Vec::with_capacity(len);
            for item in 1..=len {
                let spec = match list.raw_get::<Value>(item)? {
                    Value::Table(spec) => spec,
                    other => {
                        return Err(opts.error(format!(
                            "disk {item} must be a disk template {{ base = PATH }} (each VM gets \
                             its own copy-on-write overlay of the base), got {}",
                            describe(&other)
                        )))
                    }
                };
                let function = format!("{what} disk {item}");
                let spec = Options::new(&function, spec, DISK_TEMPLATE_OPTIONS)?;
                let base = crate::disk::path_value(&function, "option 'base'", spec.raw("base")?)?;
                disks.push(DiskTemplate {
                    base,
                    format: crate::disk::format_option(&spec)?,
                    serial: crate::disk::serial_option(&spec)?,
                });
            }
            disks
        }
        other => {
            return Err(opts.error(format!(
                "option 'disks' must be a list of disk templates, got {}",
                describe(&other)
            )))
        }
    };
    Ok(Template { config, disks })
}

/// Reads the `ready` option (default [`DEFAULT_READY`]).
pub(crate) fn readiness_option(opts: &Options) -> mlua::Result<Readiness> {
    let text = opts
        .string("ready")?
        .unwrap_or_else(|| DEFAULT_READY.to_string());
    Readiness::parse(&text).map_err(|e| opts.error(format!("option 'ready': {e}")))
}

// ---- Ctrl-C while labs and pools exist ------------------------------------------------

/// How many holds are alive, and whether the handler is ours to remove.
static HOLDS: Mutex<(usize, bool)> = Mutex::new((0, false));
/// The unanswered press that kills the process anyway, for a script that never looks.
/// Presses the script acted on (an interrupt raised, even one it caught) do not count.
const PRESSES_TO_KILL: u64 = 3;

extern "C" fn on_sigint(_: libc::c_int) {
    crate::interrupt::ctrl_c_pressed();
    if crate::interrupt::ctrl_c_unanswered() >= PRESSES_TO_KILL {
        // SAFETY: signal(2) and raise(3) are async-signal-safe; the default action then
        // ends the process as a plain Ctrl-C would have.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::raise(libc::SIGINT);
        }
    }
}

/// While alive, SIGINT interrupts the Lua states that take Ctrl-C instead of killing the
/// process, if nothing else handles SIGINT (the REPL has its own handler; `serve` blocks
/// it). The third press in a row that the script has not acted on (it is stuck where
/// nothing polls) kills the process as usual; a press the script acted on starts the
/// count again, so a script that catches interrupts and goes on is never one press from
/// a kill without cleanup.
struct CtrlCHold;

impl CtrlCHold {
    fn new() -> CtrlCHold {
        let mut holds = HOLDS.lock().unwrap_or_else(|p| p.into_inner());
        if holds.0 == 0 {
            // SAFETY: sigaction with a null new action only reads the current one into
            // `current`, which we own; the handler we install only touches atomics.
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current);
                if current.sa_sigaction == libc::SIG_DFL {
                    crate::interrupt::forget_unanswered_ctrl_c();
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = on_sigint as *const () as usize;
                    libc::sigemptyset(&mut action.sa_mask);
                    action.sa_flags = libc::SA_RESTART;
                    holds.1 = libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) == 0;
                }
            }
        }
        holds.0 += 1;
        CtrlCHold
    }
}

impl Drop for CtrlCHold {
    fn drop(&mut self) {
        let mut holds = HOLDS.lock().unwrap_or_else(|p| p.into_inner());
        holds.0 -= 1;
        if holds.0 == 0 && holds.1 {
            holds.1 = false;
            // SAFETY: reads the current action into `current`, which we own, and puts the
            // default action back only while our handler is the one installed (something
            // installed since, such as the REPL's, stays).
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current);
                if current.sa_sigaction == on_sigint as *const () as usize {
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                }
            }
        }
    }
}

/// Makes Ctrl-C interrupt `lua` (rather than kill the process) from now until the state
/// is closed, when `lua` takes Ctrl-C (`luvisor run`): labs and pools then clean up on
/// the script's error path. Called when a script makes its first lab or pool.
pub(crate) fn hold_ctrl_c(lua: &Lua) {
    let takes = crate::interrupt::limits(lua).is_some_and(|l| l.interrupt_on_ctrl_c);
    if takes && lua.app_data_ref::<CtrlCHold>().is_none() {
        lua.set_app_data(CtrlCHold::new());
    }
}

// ---- progress ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgressMode {
    /// One line redrawn in place (stderr is a terminal).
    Bar,
    /// A line per event.
    Lines,
    Off,
}

fn stderr_is_terminal() -> bool {
    // SAFETY: isatty only inspects file descriptor 2.
    unsafe { libc::isatty(2) == 1 }
}

/// `progress = "auto"` (default: a bar on a terminal, nothing otherwise), `true` (a bar
/// on a terminal, lines otherwise), `"lines"` or `false`.
fn progress_mode(opts: &Options) -> mlua::Result<ProgressMode> {
    let terminal = stderr_is_terminal();
    Ok(match opts.raw("progress")? {
        Value::Nil => {
            if terminal {
                ProgressMode::Bar
            } else {
                ProgressMode::Off
            }
        }
        Value::String(s) if s.as_bytes() == b"auto" => {
            if terminal {
                ProgressMode::Bar
            } else {
                ProgressMode::Off
            }
        }
        Value::String(s) if s.as_bytes() == b"lines" => ProgressMode::Lines,
        Value::Boolean(true) => {
            if terminal {
                ProgressMode::Bar
            } else {
                ProgressMode::Lines
            }
        }
        Value::Boolean(false) => ProgressMode::Off,
        other => {
            return Err(opts.error(format!(
                "option 'progress' must be \"auto\", true, false or \"lines\", got {}",
                describe(&other)
            )))
        }
    })
}

/// Draws a lab's bring-up on stderr.
struct ProgressDisplay {
    mode: ProgressMode,
    lab: String,
    total: usize,
    ready: usize,
    booting: usize,
    drew: bool,
}

impl ProgressDisplay {
    fn event(&mut self, event: &Progress) {
        let mut err = std::io::stderr().lock();
        match event {
            Progress::Booting { vm, booting } => {
                self.booting = *booting;
                if self.mode == ProgressMode::Lines {
                    let _ = writeln!(err, "lab {}: {vm} booting", self.lab);
                }
            }
            Progress::Ready { vm, ready, total } => {
                self.ready = *ready;
                self.booting = self.booting.saturating_sub(1);
                if self.mode == ProgressMode::Lines {
                    let _ = writeln!(err, "lab {}: {vm} ready ({ready}/{total})", self.lab);
                }
            }
        }
        if self.mode == ProgressMode::Bar {
            const WIDTH: usize = 30;
            let filled = WIDTH * self.ready / self.total.max(1);
            let _ = write!(
                err,
                "\r\x1b[Klab {} [{}{}] {}/{} ready, {} booting",
                self.lab,
                "#".repeat(filled),
                ".".repeat(WIDTH - filled),
                self.ready,
                self.total,
                self.booting
            );
            let _ = err.flush();
            self.drew = true;
        }
    }

    fn finish(&mut self, outcome: &str) {
        let mut err = std::io::stderr().lock();
        match self.mode {
            ProgressMode::Bar if self.drew => {
                let _ = writeln!(err, "\r\x1b[Klab {}: {outcome}", self.lab);
            }
            ProgressMode::Lines => {
                let _ = writeln!(err, "lab {}: {outcome}", self.lab);
            }
            _ => {}
        }
    }
}

// ---- the handle --------------------------------------------------------------------------

impl UserData for LabHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("name", |_, this| Ok(this.lab.name().to_string()));
        fields.add_field_method_get("count", |_, this| Ok(this.lab.len()));
        fields.add_field_method_get("state", |_, this| Ok(this.lab.state().as_str()));
        fields.add_field_method_get("dir", |_, this| Ok(this.lab.dir().display().to_string()));
        fields.add_field_method_get("ready", |_, this| Ok(this.lab.readiness().describe()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("start", |lua, this, opts: Value| {
            let opts = Options::from_value(lua, "lab:start", opts, START_OPTIONS)?;
            let defaults = StartOptions::default();
            let parallel = opts
                .integer("parallel", 1, luvisor_runtime::lab::MAX_PARALLEL as i64)?
                .map_or(defaults.parallel, |n| n as usize);
            let ready_timeout = opts.seconds("timeout")?.unwrap_or(defaults.ready_timeout);
            let mut display = ProgressDisplay {
                mode: progress_mode(&opts)?,
                lab: this.lab.name().to_string(),
                total: this.lab.len(),
                ready: 0,
                booting: 0,
                drew: false,
            };
            let cancel = crate::interrupt::canceller(lua);
            let result = this.lab.start(
                StartOptions {
                    parallel,
                    ready_timeout,
                },
                &mut |event| display.event(event),
                &cancel,
            );
            match result {
                Ok(report) => {
                    display.finish(&format!(
                        "{} VMs ready in {:.2} s",
                        this.lab.len(),
                        report.elapsed.as_secs_f64()
                    ));
                    let t = lua.create_table()?;
                    t.set("elapsed_ms", report.elapsed.as_secs_f64() * 1000.0)?;
                    let vms = lua.create_table()?;
                    for (i, (name, after)) in report.ready_after.iter().enumerate() {
                        let vm = lua.create_table()?;
                        vm.set("name", name.as_str())?;
                        vm.set("ready_ms", after.as_secs_f64() * 1000.0)?;
                        vms.raw_set(i + 1, vm)?;
                    }
                    t.set("vms", vms)?;
                    Ok(t)
                }
                Err(e) => {
                    display.finish("failed");
                    Err(lua_err(e))
                }
            }
        });
        methods.add_method("each", |lua, this, f: Value| {
            let Value::Function(f) = f else {
                return Err(mlua::Error::runtime(format!(
                    "lab:each: expected a function(vm), got {}",
                    describe(&f)
                )));
            };
            each(lua, this, &f)
        });
        methods.add_method("vms", |_, this, ()| {
            Ok((0..this.lab.len())
                .filter_map(|i| this.vm_handle(i))
                .collect::<Vec<_>>())
        });
        methods.add_method("vm", |_, this, which: Value| match which {
            Value::Integer(i) if i >= 1 => Ok(this.vm_handle(i as usize - 1)),
            Value::Number(f) if f >= 1.0 && f.fract() == 0.0 => Ok(this.vm_handle(f as usize - 1)),
            Value::String(s) => {
                let name = s.to_str()?.to_string();
                Ok(this
                    .lab
                    .find(&name)
                    .map(|vm| VmHandle::new(&vm, this.registry.clone())))
            }
            other => Err(mlua::Error::runtime(format!(
                "lab:vm: expected an index from 1 to {} or a VM name, got {}",
                this.lab.len(),
                describe(&other)
            ))),
        });
        methods.add_method("overlays", |_, this, ()| {
            Ok(this
                .lab
                .overlays()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>())
        });
        methods.add_method("shutdown", |lua, this, opts: Value| {
            let (timeout, _) = crate::vm::wait_timeout(lua, "shutdown", opts, &[])?;
            let cancel = crate::interrupt::canceller(lua);
            let outcomes = this
                .lab
                .shutdown(timeout.min(Duration::from_secs(3600)), &cancel)
                .map_err(lua_err)?;
            let list = lua.create_table()?;
            for (i, (name, how, outcome)) in outcomes.iter().enumerate() {
                let t = lua.create_table()?;
                t.set("name", name.as_str())?;
                t.set("how", how.as_str())?;
                t.set("outcome", describe_outcome(Some(outcome)))?;
                list.raw_set(i + 1, t)?;
            }
            Ok(list)
        });
        methods.add_method("destroy", |_, this, ()| {
            this.lab.destroy();
            Ok(())
        });
        methods.add_meta_method(MetaMethod::Len, |_, this, ()| Ok(this.lab.len()));
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.describe()));
        // `local lab <close> = hv.lab{...}`: destroyed when the variable goes out of scope,
        // error or not.
        methods.add_meta_method(MetaMethod::Close, |_, this, _: MultiValue| {
            this.lab.destroy();
            Ok(())
        });
    }
}

/// `lab:each(fn)`: calls `fn(vm)` for each VM in order; the list of the first values it
/// returned. An error names the lab and the VM.
fn each(lua: &Lua, this: &LabHandle, f: &Function) -> mlua::Result<Table> {
    let results = lua.create_table()?;
    for (i, member) in this.lab.members().iter().enumerate() {
        let vm = this.vm_handle(i).ok_or_else(|| {
            mlua::Error::runtime(format!(
                "lab '{}': {}: vm '{}' no longer exists",
                this.lab.name(),
                member.name,
                member.name
            ))
        })?;
        match f.call::<Value>(vm) {
            Ok(value) => results.raw_set(i + 1, value)?,
            Err(e) => {
                return Err(mlua::Error::runtime(format!(
                    "lab '{}': {}: {}",
                    this.lab.name(),
                    member.name,
                    // The message only, as a caught error is: if nothing catches this
                    // one, the script's runner adds one traceback.
                    crate::script::message_without_traceback(&e)
                )));
            }
        }
    }
    Ok(results)
}

/// Registers `hv.lab`.
pub const NAMESPACE: Namespace = Namespace {
    name: "lab",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let registry = context.registry.clone();
    hv.set(
        "lab",
        lua.create_function(move |lua, opts: Value| create_lab(lua, opts, &registry))?,
    )
}

fn create_lab(lua: &Lua, opts: Value, registry: &Arc<Registry>) -> mlua::Result<LabHandle> {
    const F: &str = "hv.lab";
    let opts = Options::from_value(lua, F, opts, LAB_OPTIONS)?;
    let name = opts
        .string("name")?
        .ok_or_else(|| opts.error("option 'name' is required: its VMs are NAME-1 .. NAME-count"))?;
    let count = opts
        .integer("count", 1, luvisor_runtime::lab::MAX_LAB_VMS as i64)?
        .ok_or_else(|| opts.error("option 'count' is required: how many VMs"))?
        as usize;
    let template = template_option(lua, F, opts.raw("template")?)?;
    let readiness = readiness_option(&opts)?;
    let dir = opts.string("dir")?.map(PathBuf::from);
    hold_ctrl_c(lua);
    let lab = Lab::create(
        registry,
        LabSpec {
            name,
            template,
            count,
            readiness,
            dir,
        },
    )
    .map_err(|e| opts.error(error_chain(&e)))?;
    // Under `luvisor test`, the lab goes when the test that made it ends, pass or fail.
    // Weak, so that a collected handle still destroys the lab at once (Lab's Drop).
    let for_cleanup = Arc::downgrade(&lab);
    crate::cleanup::register(lua, format!("lab '{}'", lab.name()), move || {
        if let Some(lab) = for_cleanup.upgrade() {
            lab.destroy();
        }
        Ok(())
    });
    Ok(LabHandle {
        lab,
        registry: registry.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // No KVM needed: the VMs stay in state `created`, which `each` does not mind.
    #[test]
    fn an_error_in_each_is_its_message_when_caught_and_has_one_traceback_when_not() {
        let registry = Arc::new(Registry::new());
        let lua = crate::new_user_state_with_limits(registry.clone(), Default::default()).unwrap();
        lua.load(
            r#"lab = hv.lab{ name = "each-err", count = 2, ready = "console:x",
                            template = { memory = "16M", guest = hv.guest.builtin{} } }"#,
        )
        .exec()
        .unwrap();
        let caught: String = lua
            .load(
                "local ok, err = pcall(lab.each, lab, function(vm)\n\
                   if vm.name == 'each-err-2' then error('bad thing') end\n\
                 end)\n\
                 return err",
            )
            .set_name("=caught")
            .eval()
            .unwrap();
        assert_eq!(caught, "lab 'each-err': each-err-2: caught:2: bad thing");
        let chunk = lua
            .load("lab:each(function(vm) error('bad thing') end)")
            .set_name("=uncaught")
            .into_function()
            .unwrap();
        let uncaught = crate::script::call_traced(&lua, chunk, ()).unwrap_err();
        assert!(
            uncaught.starts_with(
                "lab 'each-err': each-err-1: uncaught:1: bad thing\nstack traceback:\n"
            ),
            "{uncaught}"
        );
        assert_eq!(
            uncaught.matches("stack traceback:").count(),
            1,
            "{uncaught}"
        );
        lua.load("lab:destroy()").exec().unwrap();
        assert!(registry.list().is_empty());
    }
}
