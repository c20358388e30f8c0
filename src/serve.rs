//! `luvisor serve`: the long-running host process. It runs an optional config script
//! (which defines VMs with the same `hv` API as `luvisor run`), loads and watches
//! policies, optionally records a trace, optionally listens for peers (`--listen`: live
//! migrations arrive), and serves until SIGTERM or SIGINT. The first signal stops the
//! policies and every VM cleanly and exits 0; a second one exits at once.

use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luvisor_lua::interrupt::Interrupter;
use luvisor_lua::policy::{Limits, TraceFile};
use luvisor_lua::StateLimits;
use luvisor_runtime::migration::{spawn_server, Arrival, PeerKey, ServerHandle, ServerHandlers};
use luvisor_runtime::{Registry, VmState};

/// How often a recording `serve` samples the host and VMs on its own.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often `serve`'s loop runs `hv.on` handlers of queued events (at the latest).
const EVENT_POLL: Duration = Duration::from_millis(100);

/// SIGINT and SIGTERM, blocked in every thread so that only the signal thread takes them.
pub(crate) struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in this thread and in every thread it starts from now on.
    /// Call it before any other thread exists.
    pub(crate) fn block() -> StopSignals {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before any use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t we own; the calls only write into it and into
        // this thread's signal mask.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        StopSignals(set)
    }

    /// Waits for the next of the signals; its number.
    pub(crate) fn wait(&self) -> i32 {
        let mut signal = 0;
        // SAFETY: `self.0` is an initialised set and `signal` a valid place for the result.
        let rc = unsafe { libc::sigwait(&self.0, &mut signal) };
        if rc != 0 {
            // sigwait fails only for an invalid set; stop rather than spin.
            return libc::SIGTERM;
        }
        signal
    }
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// What `luvisor serve` was asked to do.
pub struct Options<'a> {
    pub config: Option<&'a Path>,
    pub policies: Option<&'a Path>,
    pub record: Option<&'a Path>,
    /// `--listen ADDR --key-file KEY`.
    pub listen: Option<(&'a str, &'a Path)>,
}

/// What the main loop waits for.
enum Event {
    /// A stop signal.
    Stop,
    /// A VM arrived by live migration and runs.
    Arrived(Arrival),
}

/// Starts the peer server on `addr` with the key in `key_file`; its arrivals go to
/// `events`.
fn listen(
    registry: &Arc<Registry>,
    addr: &str,
    key_file: &Path,
    events: Sender<Event>,
) -> Result<ServerHandle, String> {
    let key = PeerKey::from_file(key_file).map_err(|e| luvisor_lua::host::error_chain(&e))?;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    // Remote control (hv.connect, repl --connect) on the same port and key.
    let handlers = ServerHandlers {
        control: Some(luvisor_lua::remote::serving_control_handler(
            registry,
            key.clone(),
        )),
    };
    let server = spawn_server(listener, key, registry.clone(), handlers)
        .map_err(|e| format!("cannot start the peer server: {e}"))?;
    let arrivals = server.arrivals();
    std::thread::Builder::new()
        .name("arrivals".into())
        .spawn(move || {
            for arrival in arrivals {
                if events.send(Event::Arrived(arrival)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the arrivals thread: {e}"))?;
    Ok(server)
}

/// `luvisor serve [CONFIG] [--policies DIR] [--record TRACE] [--listen ADDR --key-file KEY]`.
pub fn run(registry: &Arc<Registry>, options: Options<'_>) -> ExitCode {
    let Options {
        config,
        policies,
        record,
        listen: listen_on,
    } = options;
    let signals = StopSignals::block();
    let (stop, stopped) = channel::<Event>();
    let arrivals = stop.clone();
    // Interrupts the config script if a signal comes while it runs.
    let config_interrupter: Arc<Mutex<Option<Interrupter>>> = Arc::new(Mutex::new(None));
    {
        let config_interrupter = config_interrupter.clone();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let first = signals.wait();
                tracing::info!("{} received: stopping", signal_name(first));
                eprintln!(
                    "luvisor serve: {} received, stopping every VM (send it again to exit at once)",
                    signal_name(first)
                );
                if let Some(interrupter) = config_interrupter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    interrupter.interrupt();
                }
                let _ = stop.send(Event::Stop);
                let second = signals.wait();
                eprintln!(
                    "luvisor serve: {} received again, exiting without stopping VMs",
                    signal_name(second)
                );
                std::process::exit(128 + second);
            });
        if let Err(e) = spawned {
            eprintln!("luvisor serve: cannot start the signal thread: {e}");
            return ExitCode::FAILURE;
        }
    }

    let engine = luvisor_lua::policy::engine(registry);
    let finish = |code: ExitCode| {
        engine.shutdown();
        // Pools and labs take their VMs and overlay files with them.
        luvisor_runtime::pool::shutdown(registry);
        luvisor_runtime::lab::destroy_all();
        // Count only the VMs this stopped: ones that had ended or moved away already
        // are not news.
        let mut stopped = 0;
        for vm in registry.list() {
            let was_live = matches!(vm.state(), VmState::Running | VmState::Paused);
            vm.stop();
            if was_live {
                stopped += 1;
                tracing::info!(vm = vm.name(), "vm stopped");
            }
        }
        eprintln!("luvisor serve: stopped {stopped} running VM(s)");
        code
    };
    if let Some(path) = record {
        match TraceFile::create(path) {
            Ok(trace) => engine.set_recorder(Some(Arc::new(trace))),
            Err(e) => {
                eprintln!("luvisor serve: {e}");
                return finish(ExitCode::FAILURE);
            }
        }
    }

    // The config script, in a state of its own that lives as long as the process serves
    // (its VM handles and globals stay valid). No Ctrl-C handler: signals stop serve.
    let limits = StateLimits {
        interrupt_on_ctrl_c: false,
        instruction_budget: None,
    };
    let lua = match luvisor_lua::new_user_state_with_limits(registry.clone(), limits) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("luvisor serve: cannot set up Lua: {e}");
            return finish(ExitCode::FAILURE);
        }
    };
    *config_interrupter.lock().unwrap_or_else(|p| p.into_inner()) =
        luvisor_lua::interrupt::interrupter(&lua);
    if let Some(config) = config {
        if let Err(message) = luvisor_lua::script::run_file(&lua, config, &[]) {
            if matches!(stopped.try_recv(), Ok(Event::Stop)) {
                // Interrupted by the stop signal: a clean stop.
                return finish(ExitCode::SUCCESS);
            }
            eprintln!("luvisor serve: {message}");
            return finish(ExitCode::FAILURE);
        }
    }
    if let Some(dir) = policies {
        match engine.watch(dir, Limits::default()) {
            Ok(found) => {
                for status in found.iter().filter(|s| !s.running) {
                    eprintln!(
                        "luvisor serve: policy {} not loaded: {}",
                        status.file,
                        status.last_error.as_deref().unwrap_or("unknown error")
                    );
                }
            }
            Err(e) => {
                eprintln!("luvisor serve: {e}");
                return finish(ExitCode::FAILURE);
            }
        }
    }
    // Peers last: the config script's on_arrival handler is set by now.
    let _server = match listen_on {
        None => None,
        Some((addr, key_file)) => match listen(registry, addr, key_file, arrivals) {
            Ok(server) => {
                eprintln!("luvisor serve: listening on {}", server.local_addr());
                Some(server)
            }
            Err(e) => {
                eprintln!("luvisor serve: {e}");
                return finish(ExitCode::FAILURE);
            }
        },
    };
    let running = engine.status().iter().filter(|s| s.running).count();
    // Peer hosts come from `hv.hosts{...}` in the config script.
    let peers = engine.peers().len();
    let peers = if peers == 0 {
        String::new()
    } else {
        format!(" and {peers} peer host(s)")
    };
    eprintln!(
        "luvisor serve: serving {} VM(s) with {running} policy(ies){peers}; SIGTERM or SIGINT stops",
        registry.list().len()
    );
    let mut next_sample = std::time::Instant::now() + SAMPLE_EVERY;
    loop {
        // A safe point for `hv.on` handlers: events about VMs are handled here, at
        // least every EVENT_POLL.
        if let Err(e) = luvisor_lua::events::dispatch(&lua) {
            eprintln!("luvisor serve: an event handler failed: {e}");
        }
        let now = std::time::Instant::now();
        if record.is_some() && now >= next_sample {
            engine.record_sample();
            next_sample = now + SAMPLE_EVERY;
        }
        let timeout = if record.is_some() {
            next_sample.saturating_duration_since(now).min(EVENT_POLL)
        } else {
            EVENT_POLL
        };
        match stopped.recv_timeout(timeout) {
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(Event::Arrived(arrival)) => {
                eprintln!(
                    "luvisor serve: vm '{}' arrived from {} ({} bytes, {:.1} ms)",
                    arrival.vm.name(),
                    arrival.peer,
                    arrival.bytes_received,
                    arrival.total.as_secs_f64() * 1000.0
                );
                if let Err(e) =
                    luvisor_lua::migration::run_arrival_handler(&lua, registry, &arrival)
                {
                    // Also when a stop signal interrupted it: its Stop event comes next.
                    eprintln!("luvisor serve: the on_arrival handler failed: {e}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    drop(lua);
    finish(ExitCode::SUCCESS)
}
