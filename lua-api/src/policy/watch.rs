//! Reloading a directory's policies when their files change (`hv.policy.watch`,
//! `luvisor serve --policies`).
//!
//! The directory itself is watched (with `notify`: inotify on Linux), not each file:
//! editors save by writing a new file and renaming it over the old one, which a watch on
//! the old file would miss. Events for one file are debounced: the file is handled
//! [`DEBOUNCE`] after its last event, so a save that takes several steps loads once,
//! complete. Then:
//!
//! - a policy file (`*.lua` directly in the directory, not hidden) that exists is loaded,
//!   or reloaded if it is loaded;
//! - a policy file that no longer exists is unloaded;
//! - a `.lua` file in a subdirectory (a module for `require`) reloads every policy of the
//!   directory, since any of them may use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Weak;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use super::{Limits, PolicyEngine};

/// How long a file must be quiet before it is handled.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Whether `name` is a policy file's name: `*.lua`, not hidden, not an editor's temporary
/// (`.x.lua.swp`, `#x.lua#`, `x.lua~` all fail).
pub fn is_policy_file(name: &str) -> bool {
    name.len() > 4 && name.ends_with(".lua") && !name.starts_with('.') && !name.starts_with('#')
}

/// The policy files of `dir`, as paths under `dir` as given.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let is_file = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if is_file && name.to_str().is_some_and(is_policy_file) {
            files.push(dir.join(name));
        }
    }
    Ok(files)
}

/// Whether an event only says that a file was read (opened, closed after reading,
/// accessed), which changes nothing.
fn is_read(kind: &notify::EventKind) -> bool {
    use notify::event::{MetadataKind, ModifyKind};
    matches!(
        kind,
        notify::EventKind::Access(_)
            | notify::EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime))
    )
}

enum Message {
    Changed(PathBuf),
    Stop,
}

/// A watched directory: the `notify` watcher and the thread that debounces its events.
pub struct DirWatcher {
    real: PathBuf,
    watcher: Option<notify::RecommendedWatcher>,
    messages: Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl DirWatcher {
    /// Watches `dir` (canonical path `real`) for `engine`, loading with `limits`.
    pub(crate) fn start(
        engine: Weak<PolicyEngine>,
        dir: &Path,
        real: &Path,
        limits: Limits,
    ) -> Result<DirWatcher, String> {
        let (messages, inbox) = channel();
        let events = messages.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                // Reading a file (as loading it does) is no change; it would reload the
                // policy over and over.
                Ok(event) if is_read(&event.kind) => {}
                Ok(event) => {
                    for path in event.paths {
                        let _ = events.send(Message::Changed(path));
                    }
                }
                Err(e) => tracing::warn!("policy watch: {e}"),
            })
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        watcher
            .watch(real, RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        let debouncer = Debouncer {
            engine,
            dir: dir.to_path_buf(),
            real: real.to_path_buf(),
            limits,
        };
        let thread = std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || debouncer.run(inbox))
            .map_err(|e| format!("cannot start the watch thread for {}: {e}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "watching policies");
        Ok(DirWatcher {
            real: real.to_path_buf(),
            watcher: Some(watcher),
            messages,
            thread: Some(thread),
        })
    }

    /// The watched directory's canonical path.
    pub fn dir(&self) -> &Path {
        &self.real
    }
}

impl Drop for DirWatcher {
    fn drop(&mut self) {
        // No more events, then the thread ends.
        self.watcher.take();
        let _ = self.messages.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Debouncer {
    engine: Weak<PolicyEngine>,
    /// The directory as the user named it (policy files are named under it).
    dir: PathBuf,
    real: PathBuf,
    limits: Limits,
}

impl Debouncer {
    fn run(self, inbox: std::sync::mpsc::Receiver<Message>) {
        let mut due: HashMap<PathBuf, Instant> = HashMap::new();
        loop {
            let wait = due
                .values()
                .min()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let message = match wait {
                Some(wait) => inbox.recv_timeout(wait),
                None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match message {
                Ok(Message::Changed(path)) => {
                    due.insert(path, Instant::now() + DEBOUNCE);
                }
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            let ready: Vec<PathBuf> = due
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(p, _)| p.clone())
                .collect();
            for path in ready {
                due.remove(&path);
                let Some(engine) = self.engine.upgrade() else {
                    return;
                };
                self.handle(&engine, &path);
            }
        }
    }

    fn handle(&self, engine: &std::sync::Arc<PolicyEngine>, path: &Path) {
        let Ok(relative) = path.strip_prefix(&self.real) else {
            return;
        };
        let mut parts = relative.components();
        let (Some(first), rest) = (parts.next(), parts.next()) else {
            return;
        };
        let is_lua = path.extension().is_some_and(|e| e == "lua");
        if rest.is_none() {
            let Some(name) = first.as_os_str().to_str().filter(|n| is_policy_file(n)) else {
                return;
            };
            if path.is_file() {
                engine.load_in_background(&self.dir.join(name), self.limits);
            } else if !path.exists() {
                engine.unload_key(&self.real.join(name));
            }
        } else if is_lua {
            // A module changed: every policy of the directory may use it.
            tracing::info!(module = %relative.display(), "policy module changed; reloading the directory's policies");
            match policy_files(&self.dir) {
                Ok(files) => {
                    for file in files {
                        engine.load_in_background(&file, self.limits);
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_file_names() {
        for name in ["dynamic_memory.lua", "a.lua"] {
            assert!(is_policy_file(name), "{name}");
        }
        for name in [
            ".a.lua",
            "#a.lua#",
            "a.lua~",
            "a.lua.swp",
            ".lua",
            "a.txt",
            "4913",
        ] {
            assert!(!is_policy_file(name), "{name}");
        }
    }
}
