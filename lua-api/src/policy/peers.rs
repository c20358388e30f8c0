//! Peer hosts: the other `luvisor serve --listen` hosts a policy may migrate VMs to.
//!
//! `hv.hosts{ { name = "b", addr = "10.0.0.2:7001", key_file = "KEY" }, ... }` declares
//! them ([`parse_hosts`]). For each peer a thread of its own ([`PeerMonitor`]) asks the
//! peer's control connection ([`RemoteHost`]) for its host report and its VMs every
//! [`POLL_INTERVAL`], with a short [`POLL_TIMEOUT`], and keeps the latest figures. A tick
//! only copies them ([`PeerMonitor::snapshot`] into `ctx.hosts`), so a slow or
//! unreachable peer never delays a tick: it shows `reachable = false` with its error,
//! and the figures of its last answer (with their age) if it ever answered.
//!
//! This is how peers advertise free memory and VM count to each other: every host that
//! declares the others polls them; nothing is pushed.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use luvisor_runtime::migration::PeerKey;
use luvisor_runtime::remote::RemoteHost;
use mlua::{Lua, Table, Value};
use serde::{Deserialize, Serialize};

use super::lock;
use crate::host::error_chain;
use crate::options::{describe, Options};

/// How often each peer is asked for its figures.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long connecting to a peer, and each of its answers, may take before the peer is
/// marked unreachable.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most peers one `hv.hosts` may declare (a thread each).
pub const MAX_PEERS: usize = 64;

/// A declared peer host: where it is and the key to authenticate with. This is what a
/// [`MigrationExecutor`](super::migrate::MigrationExecutor) gets to migrate a VM there.
#[derive(Debug, Clone)]
pub struct PeerHost {
    /// The name policies use (`ctx.hosts[i].name`, `ctx:migrate(vm, "b", ...)`).
    pub name: String,
    /// `host:port` of its `luvisor serve --listen`.
    pub addr: String,
    /// The key file as declared.
    pub key_file: PathBuf,
    /// The key read from `key_file` when the peer was declared.
    pub key: PeerKey,
}

/// One peer as a tick sees it (an entry of `ctx.hosts`). The figures are those of the
/// peer's last answer, `None` when it never answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSnapshot {
    pub name: String,
    pub addr: String,
    /// The last poll got an answer.
    pub reachable: bool,
    pub memory_total: Option<u64>,
    pub memory_available: Option<u64>,
    pub memory_reserve: Option<u64>,
    /// How many VMs the peer has, in any state.
    pub vms: Option<u64>,
    /// Guest memory resident on the peer over its VMs.
    pub vms_resident: Option<u64>,
    /// How old the figures are, in milliseconds.
    pub age_ms: Option<u64>,
    /// Why the last poll failed (`None` when it succeeded).
    pub error: Option<String>,
}

/// What one successful poll learnt.
#[derive(Debug, Clone, Copy)]
struct Figures {
    memory_total: u64,
    memory_available: u64,
    memory_reserve: u64,
    vms: u64,
    vms_resident: u64,
}

#[derive(Debug, Default)]
struct PeerState {
    /// The last answer and when it came.
    figures: Option<(Figures, Instant)>,
    reachable: bool,
    error: Option<String>,
}

struct Peer {
    host: PeerHost,
    state: Mutex<PeerState>,
}

/// Stops the poll threads of a monitor.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    signal: Condvar,
}

impl StopSignal {
    /// Waits up to `timeout`; true when stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut stopped = lock(&self.stopped);
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .signal
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn stop(&self) {
        *lock(&self.stopped) = true;
        self.signal.notify_all();
    }
}

/// Called when a peer's reachability or error changes (the engine wakes its waiters).
pub type ChangeHook = Arc<dyn Fn() + Send + Sync>;

/// The declared peers and their poll threads. Dropping it stops the threads (each ends
/// after its poll in progress, within [`POLL_TIMEOUT`]; nobody waits for them).
pub struct PeerMonitor {
    peers: Vec<Arc<Peer>>,
    stop: Arc<StopSignal>,
}

impl PeerMonitor {
    /// Starts polling `hosts`, one thread per peer; `changed` is called when a peer's
    /// reachability or error changes.
    pub fn start(hosts: Vec<PeerHost>, changed: ChangeHook) -> Result<PeerMonitor, String> {
        let stop = Arc::new(StopSignal::default());
        let peers: Vec<Arc<Peer>> = hosts
            .into_iter()
            .map(|host| {
                Arc::new(Peer {
                    host,
                    state: Mutex::new(PeerState {
                        error: Some("not polled yet".into()),
                        ..PeerState::default()
                    }),
                })
            })
            .collect();
        let monitor = PeerMonitor {
            peers: peers.clone(),
            stop: stop.clone(),
        };
        for peer in peers {
            let stop = stop.clone();
            let changed = changed.clone();
            let name = format!("peer-{}", peer.host.name);
            let weak = Arc::downgrade(&peer);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || poll_loop(weak, &stop, &changed))
                .map_err(|e| {
                    format!(
                        "cannot start a thread to poll host '{}': {e}",
                        peer.host.name
                    )
                })?;
        }
        Ok(monitor)
    }

    /// The declared peers, in declaration order.
    pub fn hosts(&self) -> Vec<PeerHost> {
        self.peers.iter().map(|p| p.host.clone()).collect()
    }

    /// The peer named `name`.
    pub fn host(&self, name: &str) -> Option<PeerHost> {
        self.peers
            .iter()
            .find(|p| p.host.name == name)
            .map(|p| p.host.clone())
    }

    /// Every peer as it stands now, in declaration order.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        let now = Instant::now();
        self.peers
            .iter()
            .map(|peer| {
                let state = lock(&peer.state);
                let figures = state.figures.map(|(f, _)| f);
                PeerSnapshot {
                    name: peer.host.name.clone(),
                    addr: peer.host.addr.clone(),
                    reachable: state.reachable,
                    memory_total: figures.map(|f| f.memory_total),
                    memory_available: figures.map(|f| f.memory_available),
                    memory_reserve: figures.map(|f| f.memory_reserve),
                    vms: figures.map(|f| f.vms),
                    vms_resident: figures.map(|f| f.vms_resident),
                    age_ms: state
                        .figures
                        .map(|(_, at)| now.saturating_duration_since(at).as_millis() as u64),
                    error: state.error.clone(),
                }
            })
            .collect()
    }
}

impl Drop for PeerMonitor {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

/// One peer's thread: poll, then wait for the next round or the stop. It keeps its
/// connection between polls and opens a new one after a failure.
fn poll_loop(peer: Weak<Peer>, stop: &StopSignal, changed: &ChangeHook) {
    let mut connection: Option<RemoteHost> = None;
    loop {
        let Some(peer) = peer.upgrade() else { return };
        let result = poll(&peer.host, &mut connection);
        let notify = {
            let mut state = lock(&peer.state);
            let before = (state.reachable, state.error.clone());
            match result {
                Ok(figures) => {
                    state.figures = Some((figures, Instant::now()));
                    state.reachable = true;
                    state.error = None;
                }
                Err(error) => {
                    connection = None;
                    state.reachable = false;
                    state.error = Some(error);
                }
            }
            before != (state.reachable, state.error.clone())
        };
        if notify {
            match lock(&peer.state).error.as_deref() {
                None => tracing::info!(host = peer.host.name.as_str(), "peer host reachable"),
                Some(error) => {
                    tracing::warn!(
                        host = peer.host.name.as_str(),
                        "peer host unreachable: {error}"
                    )
                }
            }
            changed();
        }
        drop(peer);
        if stop.wait(POLL_INTERVAL) {
            return;
        }
    }
}

fn poll(host: &PeerHost, connection: &mut Option<RemoteHost>) -> Result<Figures, String> {
    if connection.is_none() {
        *connection = Some(
            RemoteHost::connect(&host.addr, host.key.clone(), POLL_TIMEOUT)
                .map_err(|e| error_chain(&e))?,
        );
    }
    let Some(remote) = connection.as_mut() else {
        return Err("no connection".into());
    };
    let report = remote.host_info().map_err(|e| error_chain(&e))?;
    let vms = remote.list_vms().map_err(|e| error_chain(&e))?;
    Ok(Figures {
        memory_total: report.memory_total,
        memory_available: report.memory_available,
        memory_reserve: report.memory_reserve,
        vms: vms.len() as u64,
        vms_resident: report.vms_resident,
    })
}

/// Whether `name` can name a peer: 1 to 64 letters, digits, `_`, `.` or `-`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Whether `addr` looks like `host:port` (the host is resolved when polled, not here).
fn valid_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty()
        && !host.contains(char::is_whitespace)
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Reads `hv.hosts`'s list: every entry `{ name, addr, key_file }`, names and addresses
/// unique, each key file readable, private and long enough.
pub fn parse_hosts(lua: &Lua, list: Value) -> mlua::Result<Vec<PeerHost>> {
    const FUNCTION: &str = "hv.hosts";
    let list = match list {
        Value::Table(t) => t,
        other => {
            return Err(mlua::Error::runtime(format!(
            "{FUNCTION}: expected a list of hosts {{ {{ name = \"b\", addr = \"10.0.0.2:7001\", \
                 key_file = \"KEY\" }}, ... }}, got {}",
            describe(&other)
        )))
        }
    };
    let count = list.raw_len();
    if list.clone().pairs::<Value, Value>().count() != count {
        return Err(mlua::Error::runtime(format!(
            "{FUNCTION}: expected a list of hosts (keys 1 to n), got a table with other keys"
        )));
    }
    if count > MAX_PEERS {
        return Err(mlua::Error::runtime(format!(
            "{FUNCTION}: {count} hosts declared; at most {MAX_PEERS} may be"
        )));
    }
    let mut hosts: Vec<PeerHost> = Vec::with_capacity(count);
    for i in 1..=count {
        let entry: Value = list.raw_get(i)?;
        let function = format!("{FUNCTION}: host {i}");
        let opts = Options::from_value(lua, &function, entry, &["name", "addr", "key_file"])?;
        let name = opts
            .string("name")?
            .ok_or_else(|| opts.error("option 'name' is required"))?;
        if !valid_name(&name) {
            return Err(opts.error(format!(
                "the name {name:?} must be 1 to 64 letters, digits, '_', '.' or '-'"
            )));
        }
        let function = format!("{FUNCTION}: host '{name}'");
        let opts = Options::from_value(
            lua,
            &function,
            list.raw_get(i)?,
            &["name", "addr", "key_file"],
        )?;
        let addr = opts
            .string("addr")?
            .ok_or_else(|| opts.error("option 'addr' is required (\"host:port\")"))?;
        if !valid_addr(&addr) {
            return Err(opts.error(format!(
                "option 'addr' must be \"host:port\" with a port from 1 to 65535, got {addr:?}"
            )));
        }
        let key_file = opts.string("key_file")?.ok_or_else(|| {
            opts.error("option 'key_file' is required: the key file that host serves with")
        })?;
        if let Some(other) = hosts.iter().find(|h| h.name == name) {
            return Err(mlua::Error::runtime(format!(
                "{FUNCTION}: two hosts are named '{name}' (at {} and {addr}); names must be unique",
                other.addr
            )));
        }
        if let Some(other) = hosts.iter().find(|h| h.addr == addr) {
            return Err(mlua::Error::runtime(format!(
                "{FUNCTION}: hosts '{}' and '{name}' have the same address {addr}",
                other.name
            )));
        }
        let key_file = PathBuf::from(key_file);
        let key = PeerKey::from_file(&key_file)
            .map_err(|e| opts.error(format!("option 'key_file': {}", error_chain(&e))))?;
        hosts.push(PeerHost {
            name,
            addr,
            key_file,
            key,
        });
    }
    Ok(hosts)
}

/// The table `hv.hosts` returns for one peer: the declaration and the latest figures.
pub fn host_table(lua: &Lua, host: &PeerHost, seen: Option<&PeerSnapshot>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("name", host.name.as_str())?;
    t.set("addr", host.addr.as_str())?;
    t.set("key_file", host.key_file.display().to_string())?;
    if let Some(seen) = seen {
        t.set("reachable", seen.reachable)?;
        t.set("memory_total", seen.memory_total)?;
        t.set("memory_available", seen.memory_available)?;
        t.set("memory_reserve", seen.memory_reserve)?;
        t.set("vms", seen.vms)?;
        t.set("vms_resident", seen.vms_resident)?;
        t.set("age_ms", seen.age_ms)?;
        t.set("error", seen.error.as_deref())?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        for good in ["127.0.0.1:7002", "lab-2:1", "[::1]:7001", "a.example:65535"] {
            assert!(valid_addr(good), "{good}");
        }
        for bad in [
            "",
            "7001",
            ":7001",
            "host:",
            "host:0",
            "host:70000",
            "a b:1",
            "[]:1",
        ] {
            assert!(!valid_addr(bad), "{bad}");
        }
    }
}
