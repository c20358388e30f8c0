//! Moving a running VM to another host: the authenticated channel between hosts (also
//! used by remote control), the server that accepts peers, and on top of them the
//! live-migration protocol.
//!
//! - [`channel`]: [`SecureChannel`], PSK-authenticated frames with MACs;
//! - [`server`]: [`spawn_server`], the accept loop of `luvisor serve --listen`: each
//!   connection is authenticated on its own thread and its first frame says what it
//!   is: [`KIND_MIGRATE_HELLO`] (a migration, or a question about one) or
//!   [`KIND_CONTROL_HELLO`] (remote control, handed to [`ServerHandlers::control`]);
//! - [`source`]: [`Vm::migrate`](crate::Vm::migrate), pre-copy, convergence, and the
//!   hand-over state machine that keeps exactly one owner of the VM;
//! - [`destination`]: receiving pages, building the VM paused, running it on GO;
//! - [`protocol`]: frame kinds, messages and the page encoding.
//!
//! `docs/migration.md` describes the protocol and its guarantees for users.

pub mod channel;
pub mod destination;
pub mod protocol;
pub mod server;
pub mod source;

pub use channel::{ChannelError, PeerKey, SecureChannel};
pub use destination::Arrival;
pub use protocol::{Fault, KIND_ERROR};
pub use server::{spawn_server, ServerHandle, ServerHandlers};
pub use source::{MigrateOptions, MigrationError, MigrationProgress, MigrationReport};

/// The first frame of a live-migration connection (its payload says whether a VM is
/// offered or a past migration is asked about).
pub const KIND_MIGRATE_HELLO: u8 = 1;
/// The first frame of a remote-control connection; the server hands the channel to
/// [`ServerHandlers::control`] after it, or answers [`KIND_ERROR`] and closes when there
/// is none.
pub const KIND_CONTROL_HELLO: u8 = 2;

/// CPU time the calling thread has used, for the debug logs of where a migration's
/// time went (zero if the clock cannot be read).
pub(crate) fn thread_cpu_time() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// A random id: of a migration (chosen by its source) or of a peer server instance.
/// Ids tell migrations and server instances apart and need not be secret (an attacker
/// cannot choose another host's), so without the system's random source, time and pid
/// do.
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_le_bytes(bytes)
}
