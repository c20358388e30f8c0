//! An authenticated, integrity-checked message channel between two luvisor hosts over
//! TCP, keyed by a pre-shared key. Live migration and remote control both run on it.
//!
//! Everything is keyed BLAKE3 (the `blake3` crate): a keyed hash is a MAC and a PRF,
//! and one core computes it at several GB/s, so the MAC of every byte of guest memory a
//! migration sends costs a fraction of what the copies cost (HMAC-SHA256, which protocol
//! version 1 used, ran at ~1.7 GB/s and was the bottleneck of a migration).
//!
//! **Keys.** The pre-shared key, of any length, becomes a 32-byte root key
//! `R = derive_key("luvisor peer channel v3 root key", PSK)`. Every other value is
//! `keyed_hash(R, label ‖ first nonce ‖ second nonce)` with a one-byte label that says
//! what it is for, so no value can stand in for another.
//!
//! **Handshake** (mutual challenge–response):
//!
//! 1. client → server: `MAGIC`, protocol version, a fresh 32-byte client nonce `Nc`;
//! 2. server → client: a fresh 32-byte server nonce `Ns` and its proof
//!    `keyed_hash(R, SERVER_PROOF ‖ Nc ‖ Ns)`; a server that speaks another version
//!    answers `VERSION_REFUSED` and its version instead, and closes;
//! 3. the client checks that proof (the server holds the key) and answers
//!    `keyed_hash(R, CLIENT_PROOF ‖ Ns ‖ Nc)`;
//! 4. the server checks it. Both derive one session key per direction:
//!    `keyed_hash(R, CLIENT_TO_SERVER ‖ Nc ‖ Ns)` and `keyed_hash(R, SERVER_TO_CLIENT ‖
//!    Nc ‖ Ns)`.
//!
//! The key never crosses the wire, and each side's fresh nonce makes a recorded
//! handshake worthless: replaying a client's proof to a new server nonce fails.
//!
//! The handshake proves that the other end holds the key, not which host it is: any
//! host with the key, this process's own server included, can answer it. A client that
//! must not end up back at its own process (the migration source's question about a
//! migration in doubt, which someone on the path could redirect to the source's own
//! listener) connects with [`SecureChannel::connect_elsewhere`]: while its handshake
//! runs, its nonce is on a list of this process, and this process's servers refuse a
//! hello with a nonce on that list, answering `SELF_REFUSED`. Which *remote* host
//! answers is bound one level up (the migration destination's instance id,
//! `protocol.rs`).
//!
//! **Frames**: `u32` length (of kind and payload), `u8` kind, payload, then the 32-byte
//! tag `keyed_hash(direction's session key, payload ‖ sequence number ‖ length ‖ kind)`.
//! The payload comes first so that it starts on a BLAKE3 chunk boundary: a receiver that
//! hashes a payload in pieces as they land (guest pages, 4 KiB multiples) keeps whole
//! chunks, which BLAKE3 hashes in parallel. The fields after it have fixed sizes and the
//! length is the payload's, so the hashed bytes decode one way only. Sequence numbers
//! count frames in each direction and are never sent, so a frame that is altered,
//! dropped, reordered or replayed fails its check, and a frame reflected back to its
//! sender fails under the other direction's key; the channel is then dead.
//! Frames are not encrypted: the content of guest memory crosses the wire in the clear,
//! which is what a trusted migration network carries.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The first bytes a client sends.
pub const MAGIC: [u8; 8] = *b"LUVIPEER";
/// The protocol this build speaks. Version 1 MACed with HMAC-SHA256; version 2 uses
/// keyed BLAKE3 and per-direction session keys (see the module docs); version 3 has the
/// same channel, and a migration destination names its instance in ACCEPT and in its
/// answers to queries (`protocol.rs`). Peers of different versions refuse each other in
/// the handshake.
pub const PROTOCOL_VERSION: u32 = 3;
/// What a server writes instead of its challenge when the client speaks another protocol
/// version, followed by its own version (`u32`); then it closes. A version-1 client
/// reads it as a cut handshake.
pub const VERSION_REFUSED: [u8; 8] = *b"LUVIVERS";
/// The largest frame payload: a chunk of guest memory plus its header.
pub const MAX_FRAME: usize = 16 << 20;
/// Fewest bytes a key file must hold.
pub const MIN_KEY_BYTES: usize = 16;
/// Bytes of a frame's tag.
pub const TAG: usize = blake3::OUT_LEN;
/// Bytes a frame adds to its payload: length, kind and tag.
pub const FRAME_OVERHEAD: usize = 4 + 1 + TAG;
/// Largest key file read.
const MAX_KEY_BYTES: u64 = 4096;
const NONCE: usize = 32;
/// The `derive_key` context of the root key: names this protocol and its version.
const ROOT_KEY_CONTEXT: &str = "luvisor peer channel v3 root key";
/// What a server writes instead of its challenge when the client's nonce is one this
/// very process uses for a [`SecureChannel::connect_elsewhere`] handshake (the
/// connection came back to its own process), followed by 4 zero bytes; then it closes.
pub const SELF_REFUSED: [u8; 8] = *b"LUVISELF";

/// The client nonces of this process's [`SecureChannel::connect_elsewhere`]
/// handshakes in progress: this process's servers refuse them.
static OWN_NONCES: std::sync::Mutex<Vec<[u8; NONCE]>> = std::sync::Mutex::new(Vec::new());

/// A nonce on [`OWN_NONCES`] while it lives.
struct OwnNonce([u8; NONCE]);

impl OwnNonce {
    fn list() -> std::sync::MutexGuard<'static, Vec<[u8; NONCE]>> {
        OWN_NONCES.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(nonce: [u8; NONCE]) -> OwnNonce {
        OwnNonce::list().push(nonce);
        OwnNonce(nonce)
    }

    /// Whether a client of this process uses `nonce` in a handshake now.
    fn is_own(nonce: &[u8]) -> bool {
        OwnNonce::list().iter().any(|own| own[..] == *nonce)
    }
}

impl Drop for OwnNonce {
    fn drop(&mut self) {
        let mut list = OwnNonce::list();
        if let Some(at) = list.iter().position(|own| *own == self.0) {
            list.swap_remove(at);
        }
    }
}

/// What a keyed hash under the root key is for (its first byte).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Label {
    ServerProof = 1,
    ClientProof = 2,
    ClientToServer = 3,
    ServerToClient = 4,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot read key file {path}")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} can be read by other users (mode {mode:o}); make it private with \
         `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} holds {len} bytes; a key needs at least {MIN_KEY_BYTES} (e.g. `head -c 32 /dev/urandom > KEY`)")]
    KeyTooShort { path: PathBuf, len: usize },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection to {peer} failed")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{peer} closed the connection")]
    Closed { peer: String },
    #[error(
        "{peer} closed the connection during the handshake: it may be a luvisor that speaks \
         another protocol version (this one speaks {PROTOCOL_VERSION}), or not a luvisor peer"
    )]
    HandshakeClosed { peer: String },
    #[error(
        "{peer} is this very luvisor process: the connection came back to it (redirected \
         or reflected on the way), not to the host it was meant for"
    )]
    ReachedItself { peer: String },
    #[error("{peer} is not a luvisor peer (bad greeting)")]
    NotAPeer { peer: String },
    #[error("{peer} speaks protocol version {version}; this luvisor speaks {PROTOCOL_VERSION}: run the same luvisor version on both hosts")]
    Version { peer: String, version: u32 },
    #[error("{peer} failed authentication: it does not hold the same key")]
    AuthFailed { peer: String },
    #[error("a frame from {peer} failed its integrity check (tampered, replayed or out of order); the connection is dropped")]
    Tampered { peer: String },
    #[error("{peer} sent a frame of {len} bytes; the limit is {MAX_FRAME}")]
    TooLarge { peer: String, len: usize },
    #[error("a frame from {peer} is malformed: {reason}")]
    Malformed { peer: String, reason: String },
    #[error("cannot get random bytes for a nonce")]
    Random(#[source] getrandom::Error),
    #[error(
        "an earlier frame to {peer} could not be sent whole, so nothing more can follow it; \
         the connection is dropped"
    )]
    SendFailed { peer: String },
}

/// A pre-shared key, read from a file only its owner can read.
#[derive(Clone)]
pub struct PeerKey(Vec<u8>);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    /// Reads the key file: refused if group or others can read it, or if it is short.
    /// Its bytes are the key (a trailing newline is part of it: keep files binary or
    /// generate them the same way on every host).
    pub fn from_file(path: &Path) -> Result<PeerKey, ChannelError> {
        let read_error = |source| ChannelError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let mode = file.metadata().map_err(read_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(ChannelError::KeyPermissions {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let mut key = Vec::new();
        file.take(MAX_KEY_BYTES)
            .read_to_end(&mut key)
            .map_err(read_error)?;
        if key.len() < MIN_KEY_BYTES {
            return Err(ChannelError::KeyTooShort {
                path: path.to_path_buf(),
                len: key.len(),
            });
        }
        Ok(PeerKey(key))
    }

    /// A key from bytes (tests, and keys held elsewhere).
    pub fn from_bytes(bytes: &[u8]) -> PeerKey {
        PeerKey(bytes.to_vec())
    }

    fn root(&self) -> RootKey {
        RootKey(blake3::derive_key(ROOT_KEY_CONTEXT, &self.0))
    }
}

/// The 32-byte key every handshake value is derived from.
struct RootKey([u8; blake3::KEY_LEN]);

impl RootKey {
    /// `keyed_hash(R, label ‖ first ‖ second)`.
    fn derive(&self, label: Label, first: &[u8], second: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(&[label as u8]);
        hasher.update(first);
        hasher.update(second);
        hasher.finalize()
    }

    /// The two session keys: (client to server, server to client).
    fn session_keys(&self, client_nonce: &[u8], server_nonce: &[u8]) -> ([u8; 32], [u8; 32]) {
        (
            *self
                .derive(Label::ClientToServer, client_nonce, server_nonce)
                .as_bytes(),
            *self
                .derive(Label::ServerToClient, client_nonce, server_nonce)
                .as_bytes(),
        )
    }
}

fn nonce() -> Result<[u8; NONCE], ChannelError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(ChannelError::Random)?;
    Ok(n)
}

/// A frame's tag: the payload was fed to `hasher` (keyed with the direction's session
/// key) already; the fields after it finish it.
fn finish_tag(mut hasher: blake3::Hasher, seq: u64, len: u32, kind: u8) -> blake3::Hash {
    hasher.update(&seq.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(&[kind]);
    hasher.finalize()
}

/// An authenticated connection to a peer.
pub struct SecureChannel {
    stream: TcpStream,
    peer: String,
    /// The session key of the frames this side sends, and of those it receives.
    send_key: [u8; 32],
    recv_key: [u8; 32],
    send_seq: u64,
    recv_seq: u64,
    broken: bool,
    /// A send failed, perhaps part-way through a frame: whatever came after it would
    /// be read as the rest of that frame (and fail its check), so no frame may follow.
    send_broken: bool,
}

impl SecureChannel {
    /// Connects to `addr` and authenticates both ways with `key`. `timeout` bounds the
    /// connection and each read or write.
    pub fn connect(
        addr: &str,
        key: &PeerKey,
        timeout: Duration,
    ) -> Result<SecureChannel, ChannelError> {
        SecureChannel::connect_to(addr, key, timeout, false)
    }

    /// [`SecureChannel::connect`] to a host that must not be this very process: if the
    /// connection comes back to one of this process's servers (redirected or reflected
    /// on the way), that server refuses it and this fails with
    /// [`ChannelError::ReachedItself`] (module docs).
    pub fn connect_elsewhere(
        addr: &str,
        key: &PeerKey,
        timeout: Duration,
    ) -> Result<SecureChannel, ChannelError> {
        SecureChannel::connect_to(addr, key, timeout, true)
    }

    fn connect_to(
        addr: &str,
        key: &PeerKey,
        timeout: Duration,
        elsewhere: bool,
    ) -> Result<SecureChannel, ChannelError> {
        let connect_error = |source| ChannelError::Connect {
            addr: addr.to_string(),
            source,
        };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(connect_error)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| connect_error(last))?;
        SecureChannel::client_handshake(stream, addr.to_string(), key, timeout, elsewhere)
    }

    fn client_handshake(
        mut stream: TcpStream,
        peer: String,
        key: &PeerKey,
        timeout: Duration,
        elsewhere: bool,
    ) -> Result<SecureChannel, ChannelError> {
        configure(&stream, timeout, &peer)?;
        let io = |source| ChannelError::Io {
            peer: peer.clone(),
            source,
        };
        let handshake_read = |stream: &mut TcpStream, buf: &mut [u8]| {
            read_exact(stream, buf, &peer).map_err(|e| match e {
                ChannelError::Closed { peer } => ChannelError::HandshakeClosed { peer },
                other => other,
            })
        };
        let root = key.root();
        let client_nonce = nonce()?;
        // On the list until the handshake is over: a server of this process that gets
        // this hello meanwhile is this process.
        let _own = elsewhere.then(|| OwnNonce::register(client_nonce));
        let mut hello = Vec::with_capacity(8 + 4 + NONCE);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&client_nonce);
        stream.write_all(&hello).map_err(io)?;
        let mut challenge = [0u8; NONCE + TAG];
        // The first bytes tell a challenge from a refusal of this version.
        handshake_read(&mut stream, &mut challenge[..VERSION_REFUSED.len() + 4])?;
        if challenge[..VERSION_REFUSED.len()] == VERSION_REFUSED {
            let at = VERSION_REFUSED.len();
            let version = u32::from_le_bytes(challenge[at..at + 4].try_into().expect("4 bytes"));
            return Err(ChannelError::Version { peer, version });
        }
        if challenge[..SELF_REFUSED.len()] == SELF_REFUSED {
            return Err(ChannelError::ReachedItself { peer });
        }
        handshake_read(&mut stream, &mut challenge[VERSION_REFUSED.len() + 4..])?;
        let (server_nonce, server_proof) = challenge.split_at(NONCE);
        if root.derive(Label::ServerProof, &client_nonce, server_nonce) != *server_proof {
            return Err(ChannelError::AuthFailed { peer });
        }
        let proof = root.derive(Label::ClientProof, server_nonce, &client_nonce);
        stream.write_all(proof.as_bytes()).map_err(io)?;
        let (client_to_server, server_to_client) = root.session_keys(&client_nonce, server_nonce);
        Ok(SecureChannel {
            stream,
            peer,
            send_key: client_to_server,
            recv_key: server_to_client,
            send_seq: 0,
            recv_seq: 0,
            broken: false,
            send_broken: false,
        })
    }

    /// Authenticates a connection a listener accepted.
    pub fn accept(
        mut stream: TcpStream,
        key: &PeerKey,
        timeout: Duration,
    ) -> Result<SecureChannel, ChannelError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "a peer".to_string(), |a| a.to_string());
        configure(&stream, timeout, &peer)?;
        let io = |source| ChannelError::Io {
            peer: peer.clone(),
            source,
        };
        let mut hello = [0u8; 8 + 4 + NONCE];
        read_exact(&mut stream, &mut hello, &peer)?;
        if hello[..8] != MAGIC {
            return Err(ChannelError::NotAPeer { peer });
        }
        let version = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
        if version != PROTOCOL_VERSION {
            // Say why, for clients that understand it; older ones see the end.
            let mut refusal = VERSION_REFUSED.to_vec();
            refusal.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            let _ = stream.write_all(&refusal);
            return Err(ChannelError::Version { peer, version });
        }
        let client_nonce = &hello[12..];
        if OwnNonce::is_own(client_nonce) {
            // A client of this very process is in a handshake with this nonce, and it
            // asked not to reach its own process: this connection is it, come back.
            tracing::warn!(
                peer,
                "refused a connection from this very process (redirected or reflected \
                 back to it)"
            );
            let mut refusal = SELF_REFUSED.to_vec();
            refusal.extend_from_slice(&[0; 4]);
            let _ = stream.write_all(&refusal);
            return Err(ChannelError::ReachedItself { peer });
        }
        let root = key.root();
        let server_nonce = nonce()?;
        let proof = root.derive(Label::ServerProof, client_nonce, &server_nonce);
        let mut challenge = Vec::with_capacity(NONCE + TAG);
        challenge.extend_from_slice(&server_nonce);
        challenge.extend_from_slice(proof.as_bytes());
        stream.write_all(&challenge).map_err(io)?;
        let mut client_proof = [0u8; TAG];
        read_exact(&mut stream, &mut client_proof, &peer)?;
        if root.derive(Label::ClientProof, &server_nonce, client_nonce) != client_proof {
            tracing::warn!(peer, "a peer failed authentication; connection refused");
            return Err(ChannelError::AuthFailed { peer });
        }
        let (client_to_server, server_to_client) = root.session_keys(client_nonce, &server_nonce);
        Ok(SecureChannel {
            stream,
            peer,
            send_key: server_to_client,
            recv_key: client_to_server,
            send_seq: 0,
            recv_seq: 0,
            broken: false,
            send_broken: false,
        })
    }

    /// The peer's address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Changes the read timeout (`None`: wait forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|source| ChannelError::Io {
                peer: self.peer.clone(),
                source,
            })
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
        self.send_parts(kind, &[payload])
    }

    /// Sends one frame whose payload is `parts` one after the other, without copying
    /// them together first (a pages frame: its run table, then the pages).
    ///
    /// A failed send may have written part of the frame: the channel then refuses to
    /// send anything more ([`ChannelError::SendFailed`]) and closes its sending side,
    /// so the peer sees the connection end rather than a garbled frame.
    pub fn send_parts(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), ChannelError> {
        if self.send_broken {
            return Err(ChannelError::SendFailed {
                peer: self.peer.clone(),
            });
        }
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        if payload_len > MAX_FRAME {
            return Err(ChannelError::TooLarge {
                peer: "this host".into(),
                len: payload_len,
            });
        }
        let len = payload_len as u32 + 1;
        let mut hasher = blake3::Hasher::new_keyed(&self.send_key);
        for part in parts {
            hasher.update(part);
        }
        let tag = finish_tag(hasher, self.send_seq, len, kind);
        let mut header = [0u8; 5];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4] = kind;
        // Header, payload and tag in one writev: a large payload (guest memory) is not
        // copied into a frame buffer first.
        let mut slices = Vec::with_capacity(parts.len() + 2);
        slices.push(&header[..]);
        slices.extend_from_slice(parts);
        slices.push(tag.as_bytes());
        if let Err(source) = write_all_vectored(&mut self.stream, &slices) {
            self.send_broken = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            return Err(ChannelError::Io {
                peer: self.peer.clone(),
                source,
            });
        }
        self.send_seq += 1;
        Ok(())
    }

    /// Receives one frame: its kind and payload. After any error the channel refuses
    /// further frames: a stream that failed a check is not trusted again.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
        let mut payload = Vec::new();
        let kind = self.recv_into(&mut payload)?;
        Ok((kind, payload))
    }

    /// [`SecureChannel::recv`] into `payload` (its old content is replaced; its
    /// allocation is reused): the frame's kind. For a stream of large frames.
    pub fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<u8, ChannelError> {
        let mut frame = self.recv_streamed()?;
        let kind = frame.kind();
        payload.resize(frame.remaining(), 0);
        frame.read(payload)?;
        frame.finish()?;
        Ok(kind)
    }

    /// Starts receiving a frame: reads its header and returns it, for its payload to be
    /// read in pieces straight where it belongs ([`IncomingFrame`]). Nothing read
    /// through it is verified until [`IncomingFrame::finish`] checks the tag; the
    /// channel is dead unless that check passes.
    pub fn recv_streamed(&mut self) -> Result<IncomingFrame<'_>, ChannelError> {
        if self.broken {
            return Err(ChannelError::Tampered {
                peer: self.peer.clone(),
            });
        }
        // Until `finish` succeeds, the channel is not trusted: an error, or a frame
        // dropped half read, leaves it dead.
        self.broken = true;
        let mut header = [0u8; 5];
        read_exact(&mut self.stream, &mut header, &self.peer)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        if len == 0 || len as usize - 1 > MAX_FRAME {
            return Err(ChannelError::TooLarge {
                peer: self.peer.clone(),
                len: len as usize,
            });
        }
        let hasher = blake3::Hasher::new_keyed(&self.recv_key);
        Ok(IncomingFrame {
            kind: header[4],
            len,
            remaining: len as usize - 1,
            hasher,
            channel: self,
        })
    }

    /// Whether input waits to be read now, without blocking: the start of a frame
    /// (whose rest the peer wrote with it), the end of the connection, or an error.
    /// Lets a receiver skip a frame that a newer one already replaces.
    pub fn has_input(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of this function's own, for the socket `self.stream`
        // owns; a zero timeout returns at once.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        // An error from poll itself says nothing about the socket: the next read will.
        ready > 0 && poll.revents != 0
    }

    /// Closes both directions (the peer's next read sees the end).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A frame being received: its header is read, its payload is read in pieces by the
/// caller, and [`IncomingFrame::finish`] reads and checks its tag.
///
/// Whatever the caller does with payload bytes before `finish` acts on unverified data;
/// see where it is used (`destination.rs`, guest pages) for why that is safe there.
pub struct IncomingFrame<'c> {
    channel: &'c mut SecureChannel,
    kind: u8,
    /// The length field: kind and payload.
    len: u32,
    /// Payload bytes not read yet.
    remaining: usize,
    hasher: blake3::Hasher,
}

impl IncomingFrame<'_> {
    pub fn kind(&self) -> u8 {
        self.kind
    }

    /// Payload bytes still to read.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.channel.peer
    }

    /// An error unless `len` more payload bytes are left: for a length the frame itself
    /// announced, before anything is done for it.
    pub fn check_room(&self, len: usize) -> Result<(), ChannelError> {
        if len > self.remaining {
            return Err(ChannelError::Malformed {
                peer: self.channel.peer.clone(),
                reason: format!(
                    "it needs {len} more payload bytes, but only {} are left",
                    self.remaining
                ),
            });
        }
        Ok(())
    }

    /// Reads the next `buf.len()` payload bytes into `buf` (unverified).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.check_room(buf.len())?;
        read_exact(&mut self.channel.stream, buf, &self.channel.peer)?;
        self.hasher.update(buf);
        self.remaining -= buf.len();
        Ok(())
    }

    /// Reads the next `len` payload bytes to `dst` (unverified), with `recv` calls that
    /// write there directly.
    ///
    /// # Safety
    ///
    /// `dst` must point to `len` writable bytes whose contents nothing else reads or
    /// writes until this returns (guest RAM of a VM that does not run yet). The kernel
    /// may fault those pages in meanwhile, for this thread or another (the migration's
    /// prefaulter runs `MADV_POPULATE_WRITE` over them): that maps memory and changes no
    /// byte, so it does not count as writing them.
    pub unsafe fn read_raw(&mut self, dst: *mut u8, len: usize) -> Result<(), ChannelError> {
        self.check_room(len)?;
        let mut done = 0;
        while done < len {
            // SAFETY: `dst + done` has `len - done` writable bytes the caller vouched
            // for; recv writes at most that many.
            let n = unsafe {
                libc::recv(
                    self.channel.stream.as_raw_fd(),
                    dst.add(done).cast(),
                    len - done,
                    0,
                )
            };
            match n {
                0 => {
                    return Err(ChannelError::Closed {
                        peer: self.channel.peer.clone(),
                    })
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let error = std::io::Error::last_os_error();
                    if error.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(ChannelError::Io {
                        peer: self.channel.peer.clone(),
                        source: error,
                    });
                }
            }
        }
        // SAFETY: the `len` bytes at `dst` were just written by recv, and the caller
        // vouched that nothing else touches them meanwhile.
        self.hasher
            .update(unsafe { std::slice::from_raw_parts(dst, len) });
        self.remaining -= len;
        Ok(())
    }

    /// Reads the tag and checks the whole frame against it. Only now is what was read
    /// known to be what the peer sent, in this place of the stream.
    pub fn finish(self) -> Result<(), ChannelError> {
        let channel = self.channel;
        if self.remaining != 0 {
            return Err(ChannelError::Malformed {
                peer: channel.peer.clone(),
                reason: format!("{} payload bytes were not read", self.remaining),
            });
        }
        let mut tag = [0u8; TAG];
        read_exact(&mut channel.stream, &mut tag, &channel.peer)?;
        if finish_tag(self.hasher, channel.recv_seq, self.len, self.kind) != tag {
            tracing::warn!(
                peer = channel.peer,
                "a frame failed its integrity check; connection dropped"
            );
            return Err(ChannelError::Tampered {
                peer: channel.peer.clone(),
            });
        }
        channel.recv_seq += 1;
        channel.broken = false;
        Ok(())
    }
}

/// Writes every byte of `parts`, in order, with as few `writev` calls as the socket
/// allows.
fn write_all_vectored(stream: &mut TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut part = 0;
    let mut offset = 0;
    while part < parts.len() {
        if offset == parts[part].len() {
            part += 1;
            offset = 0;
            continue;
        }
        let mut slices = Vec::with_capacity(parts.len() - part);
        slices.push(std::io::IoSlice::new(&parts[part][offset..]));
        slices.extend(parts[part + 1..].iter().map(|p| std::io::IoSlice::new(p)));
        let mut written = match stream.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while written > 0 && part < parts.len() {
            let left = parts[part].len() - offset;
            if written >= left {
                written -= left;
                part += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}

fn configure(stream: &TcpStream, timeout: Duration, peer: &str) -> Result<(), ChannelError> {
    let io = |source| ChannelError::Io {
        peer: peer.to_string(),
        source,
    };
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8], peer: &str) -> Result<(), ChannelError> {
    stream.read_exact(buf).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            ChannelError::Closed {
                peer: peer.to_string(),
            }
        } else {
            ChannelError::Io {
                peer: peer.to_string(),
                source,
            }
        }
    })
}

#[cfg(test)]
impl SecureChannel {
    /// The bytes `send` would write for this frame, taking its sequence number (tests
    /// alter them and write them with [`SecureChannel::send_raw`]).
    pub(crate) fn frame_bytes(&mut self, kind: u8, payload: &[u8]) -> Vec<u8> {
        let bytes = raw::frame(&self.send_key, self.send_seq, kind, payload);
        self.send_seq += 1;
        bytes
    }

    /// Writes `bytes` as they are.
    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }
}

/// The protocol spelt out by hand, for tests that play a peer which tampers, replays
/// or speaks another version (here and in the remote-control handler's tests).
#[cfg(test)]
pub(crate) mod raw {
    use super::*;

    /// A client that completed the handshake on a plain `TcpStream`, and frames it
    /// builds itself.
    pub(crate) struct RawClient {
        pub stream: TcpStream,
        pub client_to_server: [u8; 32],
        pub server_to_client: [u8; 32],
        pub seq: u64,
    }

    /// The client's hello with `nonce`.
    pub(crate) fn hello(version: u32, nonce: &[u8; NONCE]) -> Vec<u8> {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&version.to_le_bytes());
        hello.extend_from_slice(nonce);
        hello
    }

    /// The proof a client with `key` gives for this pair of nonces.
    pub(crate) fn client_proof(
        key: &PeerKey,
        server_nonce: &[u8],
        client_nonce: &[u8],
    ) -> [u8; 32] {
        *key.root()
            .derive(Label::ClientProof, server_nonce, client_nonce)
            .as_bytes()
    }

    /// Two ends of a channel over loopback, authenticated with one key: (client, server).
    pub(crate) fn loopback_pair() -> (SecureChannel, SecureChannel) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let key = PeerKey::from_bytes(b"a loopback test key 0123456789");
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            SecureChannel::accept(stream, &server_key, Duration::from_secs(10)).unwrap()
        });
        let client = SecureChannel::connect(&addr, &key, Duration::from_secs(10)).unwrap();
        (client, server.join().unwrap())
    }

    /// A frame as `SecureChannel` sends it, under `session` key with sequence `seq`.
    pub(crate) fn frame(session: &[u8; 32], seq: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32 + 1;
        let mut hasher = blake3::Hasher::new_keyed(session);
        hasher.update(payload);
        let tag = finish_tag(hasher, seq, len, kind);
        let mut f = len.to_le_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(payload);
        f.extend_from_slice(tag.as_bytes());
        f
    }

    impl RawClient {
        /// Connects and authenticates with `key` and a fixed client nonce.
        pub(crate) fn connect(addr: &str, key: &PeerKey) -> RawClient {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let client_nonce = [3u8; NONCE];
            stream
                .write_all(&hello(PROTOCOL_VERSION, &client_nonce))
                .unwrap();
            let mut challenge = [0u8; NONCE + TAG];
            stream.read_exact(&mut challenge).unwrap();
            let server_nonce = &challenge[..NONCE];
            stream
                .write_all(&client_proof(key, server_nonce, &client_nonce))
                .unwrap();
            let (client_to_server, server_to_client) =
                key.root().session_keys(&client_nonce, server_nonce);
            RawClient {
                stream,
                client_to_server,
                server_to_client,
                seq: 0,
            }
        }

        /// Sends a well-formed frame (the next in sequence).
        pub(crate) fn send(&mut self, kind: u8, payload: &[u8]) {
            let f = frame(&self.client_to_server, self.seq, kind, payload);
            self.seq += 1;
            self.stream.write_all(&f).unwrap();
        }

        /// Reads one frame's kind and payload (its tag unchecked).
        pub(crate) fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
            let mut len = [0u8; 4];
            self.stream.read_exact(&mut len).ok()?;
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize + TAG];
            self.stream.read_exact(&mut body).ok()?;
            Some((body[0], body[1..body.len() - TAG].to_vec()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::raw::{client_proof, frame, hello, RawClient};
    use super::*;
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    fn pair(
        client_key: &[u8],
        server_key: &[u8],
    ) -> (
        Result<SecureChannel, ChannelError>,
        Result<SecureChannel, ChannelError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_key = PeerKey::from_bytes(server_key);
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            SecureChannel::accept(stream, &server_key, T)
        });
        let client = SecureChannel::connect(&addr, &PeerKey::from_bytes(client_key), T);
        (client, server.join().unwrap())
    }

    #[test]
    fn peers_with_one_key_exchange_frames_both_ways() {
        let (client, server) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.send(7, b"hello").unwrap();
        client.send(8, &vec![0xAB; 1 << 20]).unwrap();
        client
            .send_parts(9, &[b"table", &[0xCD; 3 << 12], b""])
            .unwrap();
        assert_eq!(server.recv().unwrap(), (7, b"hello".to_vec()));
        assert_eq!(server.recv().unwrap(), (8, vec![0xAB; 1 << 20]));
        let mut expected = b"table".to_vec();
        expected.extend_from_slice(&[0xCD; 3 << 12]);
        assert_eq!(server.recv().unwrap(), (9, expected));
        server.send(9, b"").unwrap();
        assert_eq!(client.recv().unwrap(), (9, Vec::new()));
    }

    /// Shrinks a socket buffer (`SO_SNDBUF` or `SO_RCVBUF`), which also stops the
    /// kernel growing it, so that a peer that does not read soon stops a writer.
    fn shrink_buffer(stream: &TcpStream, option: libc::c_int) {
        let size: libc::c_int = 4096;
        // SAFETY: the descriptor is the open socket `stream` owns; the value is a
        // c_int of the size given, and the call only reads it.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_send_that_fails_part_way_ends_the_sending_side() {
        let (client, server) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        shrink_buffer(&client.stream, libc::SO_SNDBUF);
        shrink_buffer(&server.stream, libc::SO_RCVBUF);
        // The server does not read yet: the largest frame fills both buffers and the
        // write times out part-way through it.
        client
            .stream
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let err = client.send(7, &vec![0xAB; MAX_FRAME]).unwrap_err();
        assert!(matches!(err, ChannelError::Io { .. }), "{err}");
        // Nothing may follow the part of a frame: a later frame would arrive as its
        // rest and fail the peer's check.
        let err = client.send(8, b"the response").unwrap_err();
        assert!(matches!(err, ChannelError::SendFailed { .. }), "{err}");
        // The peer sees the connection end after the part that went, not a frame that
        // fails its integrity check.
        let err = server.recv().unwrap_err();
        assert!(matches!(err, ChannelError::Closed { .. }), "{err}");
        // The other direction still works: the failed side can read what came.
        server.send(9, b"").ok();
        assert_eq!(client.recv().ok(), Some((9, Vec::new())));
    }

    #[test]
    fn a_streamed_frame_lands_in_pieces_and_is_checked_at_its_end() {
        let (client, server) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let payload: Vec<u8> = (0..3 * 4096 + 13).map(|i| i as u8).collect();
        client.send(11, &payload).unwrap();
        client.send(12, b"next").unwrap();
        let mut frame = server.recv_streamed().unwrap();
        assert_eq!((frame.kind(), frame.remaining()), (11, payload.len()));
        let mut head = [0u8; 13];
        frame.read(&mut head).unwrap();
        let mut pages = vec![0u8; 3 * 4096];
        // SAFETY: `pages` is this test's own buffer of that length.
        unsafe { frame.read_raw(pages.as_mut_ptr(), pages.len()) }.unwrap();
        frame.finish().unwrap();
        assert_eq!(&head[..], &payload[..13]);
        assert_eq!(&pages[..], &payload[13..]);
        assert_eq!(server.recv().unwrap(), (12, b"next".to_vec()));

        // A frame not read to its end is an error, and the channel is dead after it.
        client.send(13, b"half read").unwrap();
        let mut frame = server.recv_streamed().unwrap();
        let mut half = [0u8; 4];
        frame.read(&mut half).unwrap();
        let mut too_much = [0u8; 64];
        assert!(matches!(
            frame.read(&mut too_much),
            Err(ChannelError::Malformed { .. })
        ));
        assert!(matches!(
            frame.finish(),
            Err(ChannelError::Malformed { .. })
        ));
        assert!(matches!(server.recv(), Err(ChannelError::Tampered { .. })));
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (client, server) = pair(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(client, Err(ChannelError::AuthFailed { .. })));
        // The server never got a proof (the client stopped): it sees the end.
        assert!(server.is_err());
    }

    /// What each connection to [`recording_server`] gave: its first frame and whether a
    /// second one checked out, or the error.
    type Recorded = Vec<Result<((u8, Vec<u8>), bool), String>>;

    /// A server on a loopback port that accepts `connections` connections and, on each,
    /// authenticates and reads two frames; returns what each connection gave.
    fn recording_server(
        key: &PeerKey,
        connections: usize,
    ) -> (String, std::thread::JoinHandle<Recorded>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                let result = SecureChannel::accept(stream, &server_key, T).and_then(|mut ch| {
                    let first = ch.recv()?;
                    let second = ch.recv().map(|_| ());
                    Ok((first, second.is_ok()))
                });
                results.push(result.map_err(|e| e.to_string()));
            }
            results
        });
        (addr, server)
    }

    #[test]
    fn tampered_replayed_reordered_and_reflected_frames_and_replayed_handshakes_are_refused() {
        let key = PeerKey::from_bytes(b"0123456789abcdef");
        let (addr, server) = recording_server(&key, 6);
        // 1: a good frame, then the same frame again (replayed): the second fails.
        let mut raw = RawClient::connect(&addr, &key);
        let good = frame(&raw.client_to_server, 0, 1, b"state");
        raw.stream.write_all(&good).unwrap();
        raw.stream.write_all(&good).unwrap();
        drop(raw);
        // 2: a tampered payload.
        let mut raw = RawClient::connect(&addr, &key);
        let mut tampered = frame(&raw.client_to_server, 0, 1, b"state");
        tampered[5 + 2] ^= 0x20;
        raw.stream.write_all(&tampered).unwrap();
        drop(raw);
        // 3: two frames swapped: the first to arrive carries the wrong sequence number.
        let mut raw = RawClient::connect(&addr, &key);
        let first = frame(&raw.client_to_server, 0, 1, b"first");
        let second = frame(&raw.client_to_server, 1, 1, b"second");
        raw.stream.write_all(&second).unwrap();
        raw.stream.write_all(&first).unwrap();
        drop(raw);
        // 4: a frame the server would send, reflected back to it: the other direction's
        // key does not check.
        let mut raw = RawClient::connect(&addr, &key);
        let reflected = frame(&raw.server_to_client, 0, 1, b"state");
        raw.stream.write_all(&reflected).unwrap();
        drop(raw);
        // 5: a good frame, then one whose length field was changed (the tag covers it).
        let mut raw = RawClient::connect(&addr, &key);
        raw.send(1, b"state");
        let mut longer = frame(&raw.client_to_server, 1, 1, b"state!");
        let shorter_len = 6u32.to_le_bytes();
        longer[..4].copy_from_slice(&shorter_len);
        longer.remove(5 + 5);
        raw.stream.write_all(&longer).unwrap();
        drop(raw);
        // 6: a handshake replayed: the recorded proof of an earlier connection does not
        // answer a new server nonce.
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&hello(PROTOCOL_VERSION, &[3u8; NONCE]))
            .unwrap();
        let mut challenge = [0u8; NONCE + TAG];
        s.read_exact(&mut challenge).unwrap();
        let old_proof = client_proof(&key, &[9u8; NONCE], &[3u8; NONCE]);
        s.write_all(&old_proof).unwrap();
        drop(s);

        let results = server.join().unwrap();
        let (first, second_ok) = results[0].as_ref().unwrap();
        assert_eq!(first, &(1, b"state".to_vec()));
        assert!(!second_ok, "a replayed frame is refused");
        for (i, what) in [(1, "tampered"), (2, "reordered"), (3, "reflected")] {
            assert!(
                results[i].as_ref().unwrap_err().contains("integrity"),
                "a {what} frame: {:?}",
                results[i]
            );
        }
        let (first, second_ok) = results[4].as_ref().unwrap();
        assert_eq!(first, &(1, b"state".to_vec()));
        assert!(!second_ok, "a frame with a changed length is refused");
        assert!(
            results[5].as_ref().unwrap_err().contains("authentication"),
            "{:?}",
            results[5]
        );
    }

    #[test]
    fn peers_of_another_protocol_version_are_refused_with_a_clear_error() {
        let key = PeerKey::from_bytes(b"0123456789abcdef");
        // A version-1 or version-2 client at this server: refused, and told which
        // version it speaks.
        for old_version in [1, 2] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let server_key = key.clone();
            let server = std::thread::spawn(move || {
                let (stream, _) = listener.accept().unwrap();
                SecureChannel::accept(stream, &server_key, T).map(|_| ())
            });
            let mut old = TcpStream::connect(&addr).unwrap();
            old.write_all(&hello(old_version, &[5u8; NONCE])).unwrap();
            let mut answer = Vec::new();
            old.read_to_end(&mut answer).unwrap();
            let mut expected = VERSION_REFUSED.to_vec();
            expected.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            assert_eq!(answer, expected);
            let err = server.join().unwrap().unwrap_err();
            assert!(
                matches!(err, ChannelError::Version { version, .. } if version == old_version),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("protocol version {old_version}")),
                "{err}"
            );
        }

        // This client at a server that refuses its version (a later luvisor) ...
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let newer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; 8 + 4 + NONCE];
            stream.read_exact(&mut hello).unwrap();
            let mut refusal = VERSION_REFUSED.to_vec();
            refusal.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
            stream.write_all(&refusal).unwrap();
        });
        let err = SecureChannel::connect(&addr, &key, T)
            .err()
            .expect("refused");
        newer.join().unwrap();
        assert!(
            matches!(err, ChannelError::Version { version, .. } if version == PROTOCOL_VERSION + 1),
            "{err}"
        );
        // ... and at one that just closes (version 1 did): the error says what may be
        // wrong.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let older = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; 8 + 4 + NONCE];
            stream.read_exact(&mut hello).unwrap();
        });
        let err = SecureChannel::connect(&addr, &key, T)
            .err()
            .expect("refused");
        older.join().unwrap();
        assert!(matches!(err, ChannelError::HandshakeClosed { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("speaks {PROTOCOL_VERSION}")),
            "{err}"
        );
    }

    /// Forwards the first connection `listener` accepts to `target`, both ways.
    fn forward_once(listener: TcpListener, target: String) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let server = TcpStream::connect(&target).unwrap();
            let pump = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                })
            };
            let up = pump(client.try_clone().unwrap(), server.try_clone().unwrap());
            let down = pump(server, client);
            up.join().unwrap();
            down.join().unwrap();
        })
    }

    #[test]
    fn a_connection_that_must_go_elsewhere_is_refused_when_it_comes_back_to_its_process() {
        let key = PeerKey::from_bytes(b"0123456789abcdef");
        // This process's server.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            (0..3)
                .map(|_| {
                    let (stream, _) = listener.accept().unwrap();
                    SecureChannel::accept(stream, &server_key, T).map(|_| ())
                })
                .collect::<Vec<_>>()
        });
        // Straight to it: refused, and both sides say why.
        let err = SecureChannel::connect_elsewhere(&addr, &key, T)
            .err()
            .expect("refused");
        assert!(matches!(err, ChannelError::ReachedItself { .. }), "{err}");
        assert!(
            err.to_string().contains("this very luvisor process"),
            "{err}"
        );
        // Through someone on the path who forwards it there (the hello, and so its
        // nonce, copied to a connection of its own): refused too.
        let path = TcpListener::bind("127.0.0.1:0").unwrap();
        let path_addr = path.local_addr().unwrap().to_string();
        let forwarder = forward_once(path, addr.clone());
        let err = SecureChannel::connect_elsewhere(&path_addr, &key, T)
            .err()
            .expect("refused");
        assert!(matches!(err, ChannelError::ReachedItself { .. }), "{err}");
        forwarder.join().unwrap();
        // A plain connection to its own process is fine (remote control of itself).
        SecureChannel::connect(&addr, &key, T).unwrap();
        let results = server.join().unwrap();
        assert!(matches!(
            results[0],
            Err(ChannelError::ReachedItself { .. })
        ));
        assert!(matches!(
            results[1],
            Err(ChannelError::ReachedItself { .. })
        ));
        assert!(results[2].is_ok(), "{:?}", results[2].as_ref().err());
        // A nonce is on the list while its handshake runs, and only then.
        let own = OwnNonce::register([0xA5; NONCE]);
        assert!(OwnNonce::is_own(&[0xA5; NONCE]));
        drop(own);
        assert!(!OwnNonce::is_own(&[0xA5; NONCE]));
    }

    #[test]
    fn session_keys_differ_by_direction_and_by_connection() {
        let root = PeerKey::from_bytes(b"0123456789abcdef").root();
        let (a_c2s, a_s2c) = root.session_keys(&[1; NONCE], &[2; NONCE]);
        let (b_c2s, _) = root.session_keys(&[1; NONCE], &[3; NONCE]);
        assert_ne!(a_c2s, a_s2c);
        assert_ne!(a_c2s, b_c2s);
        let other = PeerKey::from_bytes(b"0123456789abcdeF").root();
        assert_ne!(other.session_keys(&[1; NONCE], &[2; NONCE]).0, a_c2s);
    }

    #[test]
    fn key_files_must_be_private_and_long_enough() {
        let dir = std::env::temp_dir().join(format!("luvisor-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, b"0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PeerKey::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        PeerKey::from_file(&path).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(PeerKey::from_file(&path)
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
