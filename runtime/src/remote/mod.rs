//! Remote control of a `luvisor serve` host over the authenticated peer channel
//! ([`crate::migration::channel`]): a client asks about the host and its VMs and drives
//! them as `hv` does locally.
//!
//! - [`protocol`]: the frames, requests and replies, and their size limits;
//! - [`handler`]: the host side, [`control_handler`], which the host's accept loop calls
//!   with each control connection;
//! - [`client`]: the client side, [`RemoteHost`], which `hv.connect` and Rust tests use.
//!
//! **Dispatch.** A host serves migration and remote control on one port. A client opens a
//! [`SecureChannel`](crate::migration::SecureChannel) and its first frame has kind
//! [`KIND_CONTROL_HELLO`]; the accept loop hands every such channel to the control handler
//! (the server should use this constant, not its own).

pub mod client;
pub mod handler;
pub mod protocol;

pub use client::{MigrateOptions, RemoteError, RemoteHost};
pub use handler::{
    control_handler, ControlHooks, ControlServer, MigrateHook, MigrateParams, PolicyStatusProvider,
};

/// The first frame's kind of a remote-control connection (one constant with the
/// peer server's dispatch).
pub use crate::migration::KIND_CONTROL_HELLO;

/// A stand-in for `luvisor serve --listen`'s accept loop, for tests until the real one
/// lands: accepts on a loopback port, authenticates with `key`, reads the first frame and
/// hands the channel to `handler` when its kind is [`KIND_CONTROL_HELLO`] (and drops it
/// otherwise). Hidden from the API.
#[doc(hidden)]
pub mod test_listener {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    use super::KIND_CONTROL_HELLO;
    use crate::migration::{PeerKey, SecureChannel};

    /// The handshake's and first frame's time limit.
    const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Listens on `127.0.0.1:0`; returns the address. The listener lives as long as the
    /// process.
    pub fn spawn(
        key: PeerKey,
        handler: Arc<dyn Fn(SecureChannel) + Send + Sync>,
    ) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        std::thread::Builder::new()
            .name("test-listener".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let key = key.clone();
                    let handler = handler.clone();
                    let _ = std::thread::Builder::new()
                        .name("test-accept".into())
                        .spawn(move || {
                            let Ok(mut channel) =
                                SecureChannel::accept(stream, &key, ACCEPT_TIMEOUT)
                            else {
                                return;
                            };
                            match channel.recv() {
                                Ok((KIND_CONTROL_HELLO, _)) => handler(channel),
                                _ => channel.shutdown(),
                            }
                        });
                }
            })?;
        Ok(addr)
    }
}
