//! The peer server of `luvisor serve --listen`: accepts TCP connections, authenticates
//! each on its own thread ([`SecureChannel::accept`]: a peer without the key, or a
//! stream that was tampered with, is refused and logged there), and dispatches on the
//! first frame's kind.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::destination::{self, Arrival, Outcomes};
use super::protocol::Fault;
use super::{
    ChannelError, PeerKey, SecureChannel, KIND_CONTROL_HELLO, KIND_ERROR, KIND_MIGRATE_HELLO,
};
use crate::registry::Registry;

/// How long a peer has to authenticate and send its first frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more are closed at once (an unauthenticated peer
/// must not make the host start threads without end).
pub const MAX_CONNECTIONS: usize = 64;

/// What the server does with the connections that are not migrations.
#[derive(Default, Clone)]
pub struct ServerHandlers {
    /// Remote control: called on the connection's thread with the authenticated
    /// channel, after its first frame ([`KIND_CONTROL_HELLO`], whose payload is not
    /// passed on). The channel still has the handshake's read timeout
    /// ([`HANDSHAKE_TIMEOUT`]); the handler sets its own.
    #[allow(clippy::type_complexity)]
    pub control: Option<Arc<dyn Fn(SecureChannel) + Send + Sync>>,
}

/// A running server. Dropping it stops accepting (connections being served finish).
pub struct ServerHandle {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    context: Arc<destination::Context>,
}

impl ServerHandle {
    /// The address the server listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The VMs that arrive from now on, each once it runs here. Asking again replaces
    /// the previous receiver.
    pub fn arrivals(&self) -> Receiver<Arrival> {
        let (tx, rx) = channel();
        *self
            .context
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Stops accepting connections.
    pub fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocked accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if thread.join().is_err() {
            tracing::error!("the peer server's accept thread panicked");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves authenticated peers on `listener` until the handle is dropped: live
/// migrations into `registry`, and remote control through `handlers`. A destination
/// fails on purpose when the environment asks for it (`protocol::FAULT_ENV`, tests
/// only).
pub fn spawn_server(
    listener: TcpListener,
    key: PeerKey,
    registry: Arc<Registry>,
    handlers: ServerHandlers,
) -> io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let context = Arc::new(destination::Context {
        registry,
        instance: super::random_u64(),
        outcomes: Arc::new(Outcomes::default()),
        fault: Fault::from_env(),
        fault_fired: AtomicBool::new(false),
        arrivals: Mutex::new(None),
    });
    let thread = {
        let stopping = stopping.clone();
        let context = context.clone();
        std::thread::Builder::new()
            .name("peer-server".into())
            .spawn(move || accept_loop(listener, key, context, handlers, stopping))?
    };
    tracing::info!(%addr, "listening for peers");
    Ok(ServerHandle {
        addr,
        stopping,
        thread: Some(thread),
        context,
    })
}

fn accept_loop(
    listener: TcpListener,
    key: PeerKey,
    context: Arc<destination::Context>,
    handlers: ServerHandlers,
    stopping: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "cannot accept a peer connection");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "too many peer connections; refused");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (key, context, handlers, done) = (
            key.clone(),
            context.clone(),
            handlers.clone(),
            active.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("peer-{peer}"))
            .spawn(move || {
                serve_connection(stream, &key, &context, &handlers);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, error = %e, "cannot start a thread for a peer");
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    key: &PeerKey,
    context: &destination::Context,
    handlers: &ServerHandlers,
) {
    let mut channel = match SecureChannel::accept(stream, key, HANDSHAKE_TIMEOUT) {
        Ok(channel) => channel,
        // Logged where it is refused.
        Err(ChannelError::ReachedItself { .. }) => return,
        Err(e @ ChannelError::Version { .. }) => {
            tracing::warn!(error = %e, "peer connection refused: it speaks another protocol version");
            return;
        }
        Err(e) => {
            // A peer with another key hangs up when our proof fails its check: that
            // shows here as a closed connection, not as a failed proof.
            tracing::warn!(error = %e, "peer connection refused: it did not authenticate");
            return;
        }
    };
    let (kind, payload) = match channel.recv() {
        Ok(frame) => frame,
        Err(e) => {
            tracing::info!(peer = channel.peer(), error = %e, "peer sent no first frame");
            return;
        }
    };
    match kind {
        KIND_MIGRATE_HELLO => destination::serve(channel, &payload, context),
        KIND_CONTROL_HELLO => match &handlers.control {
            Some(control) => control(channel),
            None => {
                let _ = channel.send(KIND_ERROR, b"this host does not serve remote control");
                channel.shutdown();
            }
        },
        other => {
            tracing::info!(
                peer = channel.peer(),
                kind = other,
                "unknown first frame; closed"
            );
            let _ = channel.send(
                KIND_ERROR,
                format!("unknown first frame kind {other}").as_bytes(),
            );
            channel.shutdown();
        }
    }
}
