//! An authenticated, integrity-checked message channel between two luvisor hosts over
//! TCP, keyed by a pre-shared key. Live migration and remote control both run on it.
//!
//! **Handshake** (mutual challenge–response; HMAC-SHA256 throughout, from the RustCrypto
//! `hmac` and `sha2` crates):
//!
//! 1. client → server: `MAGIC`, protocol version, a fresh 32-byte client nonce;
//! 2. server → client: a fresh 32-byte server nonce and
//!    `HMAC(key, "luvisor server" ‖ client nonce ‖ server nonce)`;
//! 3. the client checks that proof (the server knows the key) and answers
//!    `HMAC(key, "luvisor client" ‖ server nonce ‖ client nonce)`;
//! 4. the server checks it. Both derive the session key
//!    `HMAC(key, "luvisor session" ‖ client nonce ‖ server nonce)`.
//!
//! The key never crosses the wire, and each side's fresh nonce makes a recorded
//! handshake worthless: replaying a client's proof to a new server nonce fails.
//!
//! **Frames**: `u32` length (of kind and payload), `u8` kind, payload, then
//! `HMAC(session key, direction ‖ sequence number ‖ length ‖ kind ‖ payload)`. Sequence
//! numbers count frames in each direction and are never sent, so a frame that is
//! altered, dropped, reordered or replayed fails its check; the channel is then dead.
//! Frames are not encrypted: the content of guest memory crosses the wire in the clear,
//! which is what a trusted migration network carries.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The first bytes a client sends.
pub const MAGIC: [u8; 8] = *b"LUVIPEER";
/// The protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame payload: a chunk of guest memory plus its header.
pub const MAX_FRAME: usize = 16 << 20;
/// Fewest bytes a key file must hold.
pub const MIN_KEY_BYTES: usize = 16;
/// Largest key file read.
const MAX_KEY_BYTES: u64 = 4096;
const NONCE: usize = 32;
const TAG: usize = 32;

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
    #[error("{peer} is not a luvisor peer (bad greeting)")]
    NotAPeer { peer: String },
    #[error("{peer} speaks protocol version {version}; this luvisor speaks {PROTOCOL_VERSION}")]
    Version { peer: String, version: u32 },
    #[error("{peer} failed authentication: it does not hold the same key")]
    AuthFailed { peer: String },
    #[error("a frame from {peer} failed its integrity check (tampered, replayed or out of order); the connection is dropped")]
    Tampered { peer: String },
    #[error("{peer} sent a frame of {len} bytes; the limit is {MAX_FRAME}")]
    TooLarge { peer: String, len: usize },
    #[error("cannot get random bytes for a nonce")]
    Random(#[source] getrandom::Error),
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

    fn mac(&self, parts: &[&[u8]]) -> [u8; TAG] {
        mac_with(&self.0, parts)
    }
}

fn mac_with(key: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares two tags in constant time (through `hmac`'s own check).
fn tags_match(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(tag).is_ok()
}

fn nonce() -> Result<[u8; NONCE], ChannelError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(ChannelError::Random)?;
    Ok(n)
}

/// Which way a frame goes, mixed into its MAC so a frame cannot be reflected back.
const CLIENT_TO_SERVER: u8 = 1;
const SERVER_TO_CLIENT: u8 = 2;

/// An authenticated connection to a peer.
pub struct SecureChannel {
    stream: TcpStream,
    peer: String,
    session: [u8; TAG],
    send_direction: u8,
    send_seq: u64,
    recv_seq: u64,
    broken: bool,
}

impl SecureChannel {
    /// Connects to `addr` and authenticates both ways with `key`. `timeout` bounds the
    /// connection and each read or write.
    pub fn connect(
        addr: &str,
        key: &PeerKey,
        timeout: Duration,
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
        SecureChannel::client_handshake(stream, addr.to_string(), key, timeout)
    }

    fn client_handshake(
        mut stream: TcpStream,
        peer: String,
        key: &PeerKey,
        timeout: Duration,
    ) -> Result<SecureChannel, ChannelError> {
        configure(&stream, timeout, &peer)?;
        let io = |source| ChannelError::Io {
            peer: peer.clone(),
            source,
        };
        let client_nonce = nonce()?;
        let mut hello = Vec::with_capacity(8 + 4 + NONCE);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&client_nonce);
        stream.write_all(&hello).map_err(io)?;
        let mut challenge = [0u8; NONCE + TAG];
        read_exact(&mut stream, &mut challenge, &peer)?;
        let (server_nonce, server_proof) = challenge.split_at(NONCE);
        if !tags_match(
            &key.0,
            &[b"luvisor server", &client_nonce, server_nonce],
            server_proof,
        ) {
            return Err(ChannelError::AuthFailed { peer });
        }
        let proof = key.mac(&[b"luvisor client", server_nonce, &client_nonce]);
        stream.write_all(&proof).map_err(io)?;
        let session = key.mac(&[b"luvisor session", &client_nonce, server_nonce]);
        Ok(SecureChannel {
            stream,
            peer,
            session,
            send_direction: CLIENT_TO_SERVER,
            send_seq: 0,
            recv_seq: 0,
            broken: false,
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
            return Err(ChannelError::Version { peer, version });
        }
        let client_nonce = &hello[12..];
        let server_nonce = nonce()?;
        let proof = key.mac(&[b"luvisor server", client_nonce, &server_nonce]);
        let mut challenge = Vec::with_capacity(NONCE + TAG);
        challenge.extend_from_slice(&server_nonce);
        challenge.extend_from_slice(&proof);
        stream.write_all(&challenge).map_err(io)?;
        let mut client_proof = [0u8; TAG];
        read_exact(&mut stream, &mut client_proof, &peer)?;
        if !tags_match(
            &key.0,
            &[b"luvisor client", &server_nonce, client_nonce],
            &client_proof,
        ) {
            tracing::warn!(peer, "a peer failed authentication; connection refused");
            return Err(ChannelError::AuthFailed { peer });
        }
        let session = key.mac(&[b"luvisor session", client_nonce, &server_nonce]);
        Ok(SecureChannel {
            stream,
            peer,
            session,
            send_direction: SERVER_TO_CLIENT,
            send_seq: 0,
            recv_seq: 0,
            broken: false,
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

    fn frame_tag(&self, direction: u8, seq: u64, kind: u8, payload: &[u8]) -> [u8; TAG] {
        let len = (payload.len() as u32 + 1).to_le_bytes();
        mac_with(
            &self.session,
            &[&[direction], &seq.to_le_bytes(), &len, &[kind], payload],
        )
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > MAX_FRAME {
            return Err(ChannelError::TooLarge {
                peer: "this host".into(),
                len: payload.len(),
            });
        }
        let tag = self.frame_tag(self.send_direction, self.send_seq, kind, payload);
        let mut header = [0u8; 5];
        header[..4].copy_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
        header[4] = kind;
        // Header, payload and tag in one writev: a large payload (guest memory) is not
        // copied into a frame buffer first.
        write_all_vectored(&mut self.stream, &[&header, payload, &tag]).map_err(|source| {
            ChannelError::Io {
                peer: self.peer.clone(),
                source,
            }
        })?;
        self.send_seq += 1;
        Ok(())
    }

    /// Receives one frame: its kind and payload. After any error the channel refuses
    /// further frames: a stream that failed a check is not trusted again.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
        if self.broken {
            return Err(ChannelError::Tampered {
                peer: self.peer.clone(),
            });
        }
        let result = self.recv_frame();
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn recv_frame(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
        let mut payload = Vec::new();
        let kind = self.recv_frame_into(&mut payload)?;
        Ok((kind, payload))
    }

    /// [`SecureChannel::recv`] into `payload` (its old content is replaced; its
    /// allocation is reused): the frame's kind. For a stream of large frames.
    pub fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<u8, ChannelError> {
        if self.broken {
            return Err(ChannelError::Tampered {
                peer: self.peer.clone(),
            });
        }
        let result = self.recv_frame_into(payload);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn recv_frame_into(&mut self, payload: &mut Vec<u8>) -> Result<u8, ChannelError> {
        let mut header = [0u8; 5];
        read_exact(&mut self.stream, &mut header[..4], &self.peer)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len - 1 > MAX_FRAME {
            return Err(ChannelError::TooLarge {
                peer: self.peer.clone(),
                len,
            });
        }
        read_exact(&mut self.stream, &mut header[4..], &self.peer)?;
        let kind = header[4];
        payload.resize(len - 1 + TAG, 0);
        read_exact(&mut self.stream, payload, &self.peer)?;
        let (content, tag) = payload.split_at(len - 1);
        let direction = if self.send_direction == CLIENT_TO_SERVER {
            SERVER_TO_CLIENT
        } else {
            CLIENT_TO_SERVER
        };
        if !tags_match(
            &self.session,
            &[
                &[direction],
                &self.recv_seq.to_le_bytes(),
                &header[..4],
                &[kind],
                content,
            ],
            tag,
        ) {
            tracing::warn!(
                peer = self.peer,
                "a frame failed its integrity check; connection dropped"
            );
            return Err(ChannelError::Tampered {
                peer: self.peer.clone(),
            });
        }
        self.recv_seq += 1;
        payload.truncate(len - 1);
        Ok(kind)
    }

    /// Closes both directions (the peer's next read sees the end).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
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
mod tests {
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
        assert_eq!(server.recv().unwrap(), (7, b"hello".to_vec()));
        assert_eq!(server.recv().unwrap(), (8, vec![0xAB; 1 << 20]));
        server.send(9, b"").unwrap();
        assert_eq!(client.recv().unwrap(), (9, Vec::new()));
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (client, server) = pair(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(client, Err(ChannelError::AuthFailed { .. })));
        // The server never got a proof (the client stopped): it sees the end.
        assert!(server.is_err());
    }

    /// A raw TCP client that speaks the protocol by hand, to tamper and replay.
    fn raw_handshake(addr: &str, key: &PeerKey) -> (TcpStream, [u8; TAG]) {
        let mut s = TcpStream::connect(addr).unwrap();
        let client_nonce = [3u8; NONCE];
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&client_nonce);
        s.write_all(&hello).unwrap();
        let mut challenge = [0u8; NONCE + TAG];
        s.read_exact(&mut challenge).unwrap();
        let server_nonce = &challenge[..NONCE];
        let proof = key.mac(&[b"luvisor client", server_nonce, &client_nonce]);
        s.write_all(&proof).unwrap();
        (
            s,
            key.mac(&[b"luvisor session", &client_nonce, server_nonce]),
        )
    }

    #[test]
    fn tampered_and_replayed_frames_and_handshakes_are_refused() {
        let key = PeerKey::from_bytes(b"0123456789abcdef");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..3 {
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
        // 1: a good frame, then the same frame again (replayed): the second fails.
        let (mut s, session) = raw_handshake(&addr, &key);
        let frame = |seq: u64, kind: u8, payload: &[u8]| {
            let len = (payload.len() as u32 + 1).to_le_bytes();
            let tag = mac_with(
                &session,
                &[
                    &[CLIENT_TO_SERVER],
                    &seq.to_le_bytes(),
                    &len,
                    &[kind],
                    payload,
                ],
            );
            let mut f = len.to_vec();
            f.push(kind);
            f.extend_from_slice(payload);
            f.extend_from_slice(&tag);
            f
        };
        let good = frame(0, 1, b"state");
        s.write_all(&good).unwrap();
        s.write_all(&good).unwrap();
        drop(s);
        // 2: a tampered payload.
        let (mut s, session2) = raw_handshake(&addr, &key);
        let len = 6u32.to_le_bytes();
        let tag = mac_with(
            &session2,
            &[
                &[CLIENT_TO_SERVER],
                &0u64.to_le_bytes(),
                &len,
                &[1],
                b"state",
            ],
        );
        let mut f = len.to_vec();
        f.push(1);
        f.extend_from_slice(b"stAte");
        f.extend_from_slice(&tag);
        s.write_all(&f).unwrap();
        drop(s);
        // 3: a handshake replayed: the recorded proof of connection 1 does not answer a
        // new server nonce.
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&[3u8; NONCE]);
        s.write_all(&hello).unwrap();
        let mut challenge = [0u8; NONCE + TAG];
        s.read_exact(&mut challenge).unwrap();
        let old_proof = key.mac(&[b"luvisor client", &[9u8; NONCE], &[3u8; NONCE]]);
        s.write_all(&old_proof).unwrap();
        drop(s);

        let results = server.join().unwrap();
        let (first, second_ok) = results[0].as_ref().unwrap();
        assert_eq!(first, &(1, b"state".to_vec()));
        assert!(!second_ok, "a replayed frame is refused");
        assert!(
            results[1].as_ref().unwrap_err().contains("integrity"),
            "{:?}",
            results[1]
        );
        assert!(
            results[2].as_ref().unwrap_err().contains("authentication"),
            "{:?}",
            results[2]
        );
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
