//! The agent channel protocol: framed, versioned messages between the host and an agent
//! in the guest, over one virtio-console port (a plain byte stream in each direction).
//!
//! `docs/agent.md` is the full description, written so that an agent for another guest
//! (a Linux daemon on `/dev/hvc0`) can be built from it. This module is the reference
//! implementation both sides of luvisor share: the host (`luvisor-runtime`) and the
//! built-in guest. It is `no_std` and allocates nothing.
//!
//! A frame is a 16-byte header and a payload:
//!
//! ```text
//! offset size field
//!      0    4 magic    "LVAG"
//!      4    1 version  1
//!      5    1 kind     message type (see [`kind`])
//!      6    2 flags    0 (reserved; a frame with other flags is malformed)
//!      8    4 length   payload bytes, at most MAX_PAYLOAD (little-endian)
//!     12    4 crc      CRC-32 (IEEE, as zlib's crc32) of the payload (little-endian)
//! ```
//!
//! Payload fields are little-endian integers, strings as a `u16` byte count then UTF-8
//! bytes, and byte blobs as a `u32` count then the bytes. A payload must be exactly as
//! long as its fields.

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"LVAG";
/// The protocol version this build speaks (header byte 4, and HELLO/WELCOME).
pub const VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest frame, header included.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest payload.
pub const MAX_PAYLOAD: usize = MAX_FRAME - HEADER_LEN;

/// Longest key-value pair key, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest key-value pair value, in bytes.
pub const MAX_VALUE: usize = 1024;
/// Most keys each side publishes.
pub const MAX_KEYS: usize = 256;
/// Longest command an EXEC carries, in bytes.
pub const MAX_COMMAND: usize = 1024;
/// Most output bytes an EXEC_RESULT carries (the rest is cut, and `truncated` set).
pub const MAX_OUTPUT: usize = 32 * 1024;
/// Longest agent name in a HELLO.
pub const MAX_AGENT_NAME: usize = 64;

/// EXEC_RESULT flag: the output was cut at [`MAX_OUTPUT`] bytes.
pub const EXEC_TRUNCATED: u8 = 1 << 0;
/// EXEC_RESULT flag: the command did not run, because the agent still holds another
/// exec (one it took before the host gave up on it); the host sends it again later.
/// `code` and `output` mean nothing then.
pub const EXEC_BUSY: u8 = 1 << 1;

/// Message types (header byte 5). H→G: sent by the host; G→H: sent by the guest.
pub mod kind {
    /// G→H: the agent (re)starts a session: `u32 version`, `str agent`.
    pub const HELLO: u8 = 1;
    /// H→G: the answer to HELLO: `u32 version`.
    pub const WELCOME: u8 = 2;
    /// H→G: heartbeat: `u64 seq`, `u64 host_time_us` (Unix time).
    pub const PING: u8 = 3;
    /// G→H: `u64 seq` (the PING's, or 0 for a report of its own), `u64 uptime_ms`,
    /// `u32 time_generation` (of the last TIME_SET applied, 0: none), `u64 guest_time_us`
    /// (the guest's Unix time, 0: unknown).
    pub const PONG: u8 = 4;
    /// H→G: set the guest's clock: `u32 generation`, `u64 unix_time_us`.
    pub const TIME_SET: u8 = 5;
    /// Both ways: publish a pair: `str key`, `str value`.
    pub const KVP_SET: u8 = 6;
    /// Both ways: withdraw a pair: `str key`.
    pub const KVP_DELETE: u8 = 7;
    /// H→G: run a command: `u32 id`, `str command`.
    pub const EXEC: u8 = 8;
    /// G→H: `u32 id`, `u32 code`, `u8 flags` ([`EXEC_TRUNCATED`](super::EXEC_TRUNCATED),
    /// [`EXEC_BUSY`](super::EXEC_BUSY)), `bytes output`.
    pub const EXEC_RESULT: u8 = 9;
    /// H→G: shut down now (empty payload).
    pub const SHUTDOWN: u8 = 10;
    /// G→H: the guest is shutting down (empty payload).
    pub const SHUTDOWN_ACK: u8 = 11;
}

/// Why a header is not one this build accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic,
    BadVersion(u8),
    BadFlags(u16),
    /// The length is over [`MAX_PAYLOAD`].
    Oversized(u32),
}

/// A frame header that passed [`parse_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub length: u32,
    pub crc: u32,
}

/// Checks and reads a frame header.
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
    if bytes[0..4] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(HeaderError::BadVersion(bytes[4]));
    }
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if flags != 0 {
        return Err(HeaderError::BadFlags(flags));
    }
    let length = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if length as usize > MAX_PAYLOAD {
        return Err(HeaderError::Oversized(length));
    }
    Ok(Header {
        kind: bytes[5],
        length,
        crc: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
    })
}

/// Writes a header for a payload of `kind` into `out[..HEADER_LEN]`.
pub fn write_header(out: &mut [u8], kind: u8, payload: &[u8]) {
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = kind;
    out[6..8].copy_from_slice(&0u16.to_le_bytes());
    out[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[12..16].copy_from_slice(&crc32(payload).to_le_bytes());
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Why a payload does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ends inside a field.
    Truncated,
    /// Bytes are left after the last field.
    TrailingBytes,
    /// A string is not UTF-8.
    NotUtf8,
    /// A message type this version does not know.
    UnknownKind(u8),
}

/// One message, borrowing its strings from the payload it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        version: u32,
        agent: &'a str,
    },
    Welcome {
        version: u32,
    },
    Ping {
        seq: u64,
        host_time_us: u64,
    },
    Pong {
        seq: u64,
        uptime_ms: u64,
        time_generation: u32,
        guest_time_us: u64,
    },
    TimeSet {
        generation: u32,
        unix_time_us: u64,
    },
    KvpSet {
        key: &'a str,
        value: &'a str,
    },
    KvpDelete {
        key: &'a str,
    },
    Exec {
        id: u32,
        command: &'a str,
    },
    ExecResult {
        id: u32,
        code: u32,
        /// [`EXEC_TRUNCATED`].
        truncated: bool,
        /// [`EXEC_BUSY`].
        busy: bool,
        output: &'a [u8],
    },
    Shutdown,
    ShutdownAck,
}

impl<'a> Message<'a> {
    /// The message type (header byte 5).
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Welcome { .. } => kind::WELCOME,
            Message::Ping { .. } => kind::PING,
            Message::Pong { .. } => kind::PONG,
            Message::TimeSet { .. } => kind::TIME_SET,
            Message::KvpSet { .. } => kind::KVP_SET,
            Message::KvpDelete { .. } => kind::KVP_DELETE,
            Message::Exec { .. } => kind::EXEC,
            Message::ExecResult { .. } => kind::EXEC_RESULT,
            Message::Shutdown => kind::SHUTDOWN,
            Message::ShutdownAck => kind::SHUTDOWN_ACK,
        }
    }

    /// Decodes the payload of a frame of type `kind`.
    pub fn decode(kind: u8, payload: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let mut r = Reader { bytes: payload };
        let message = match kind {
            kind::HELLO => Message::Hello {
                version: r.u32()?,
                agent: r.str()?,
            },
            kind::WELCOME => Message::Welcome { version: r.u32()? },
            kind::PING => Message::Ping {
                seq: r.u64()?,
                host_time_us: r.u64()?,
            },
            kind::PONG => Message::Pong {
                seq: r.u64()?,
                uptime_ms: r.u64()?,
                time_generation: r.u32()?,
                guest_time_us: r.u64()?,
            },
            kind::TIME_SET => Message::TimeSet {
                generation: r.u32()?,
                unix_time_us: r.u64()?,
            },
            kind::KVP_SET => Message::KvpSet {
                key: r.str()?,
                value: r.str()?,
            },
            kind::KVP_DELETE => Message::KvpDelete { key: r.str()? },
            kind::EXEC => Message::Exec {
                id: r.u32()?,
                command: r.str()?,
            },
            kind::EXEC_RESULT => {
                let id = r.u32()?;
                let code = r.u32()?;
                // Bits other than the two defined are ignored (reserved).
                let flags = r.u8()?;
                Message::ExecResult {
                    id,
                    code,
                    truncated: flags & EXEC_TRUNCATED != 0,
                    busy: flags & EXEC_BUSY != 0,
                    output: r.blob()?,
                }
            }
            kind::SHUTDOWN => Message::Shutdown,
            kind::SHUTDOWN_ACK => Message::ShutdownAck,
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if !r.bytes.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(message)
    }

    /// Bytes of the payload [`Message::encode_payload`] writes.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Hello { agent, .. } => 4 + 2 + agent.len(),
            Message::Welcome { .. } => 4,
            Message::Ping { .. } => 16,
            Message::Pong { .. } => 28,
            Message::TimeSet { .. } => 12,
            Message::KvpSet { key, value } => 2 + key.len() + 2 + value.len(),
            Message::KvpDelete { key } => 2 + key.len(),
            Message::Exec { command, .. } => 4 + 2 + command.len(),
            Message::ExecResult { output, .. } => 4 + 4 + 1 + 4 + output.len(),
            Message::Shutdown | Message::ShutdownAck => 0,
        }
    }

    /// Writes the payload into `out`; returns its length, or `None` when `out` is too
    /// small or a string is longer than a `u16` count can say.
    pub fn encode_payload(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer { out, at: 0 };
        match *self {
            Message::Hello { version, agent } => {
                w.u32(version)?;
                w.str(agent)?;
            }
            Message::Welcome { version } => w.u32(version)?,
            Message::Ping { seq, host_time_us } => {
                w.u64(seq)?;
                w.u64(host_time_us)?;
            }
            Message::Pong {
                seq,
                uptime_ms,
                time_generation,
                guest_time_us,
            } => {
                w.u64(seq)?;
                w.u64(uptime_ms)?;
                w.u32(time_generation)?;
                w.u64(guest_time_us)?;
            }
            Message::TimeSet {
                generation,
                unix_time_us,
            } => {
                w.u32(generation)?;
                w.u64(unix_time_us)?;
            }
            Message::KvpSet { key, value } => {
                w.str(key)?;
                w.str(value)?;
            }
            Message::KvpDelete { key } => w.str(key)?,
            Message::Exec { id, command } => {
                w.u32(id)?;
                w.str(command)?;
            }
            Message::ExecResult {
                id,
                code,
                truncated,
                busy,
                output,
            } => {
                w.u32(id)?;
                w.u32(code)?;
                let flags =
                    if truncated { EXEC_TRUNCATED } else { 0 } | if busy { EXEC_BUSY } else { 0 };
                w.put(&[flags])?;
                w.u32(u32::try_from(output.len()).ok()?)?;
                w.put(output)?;
            }
            Message::Shutdown | Message::ShutdownAck => {}
        }
        Some(w.at)
    }

    /// Writes the whole frame (header and payload) into `out`; returns its length, or
    /// `None` when it does not fit `out` or is larger than [`MAX_FRAME`].
    pub fn encode_frame(&self, out: &mut [u8]) -> Option<usize> {
        let room = out.len().min(MAX_FRAME);
        if room < HEADER_LEN {
            return None;
        }
        let (header, rest) = out[..room].split_at_mut(HEADER_LEN);
        let len = self.encode_payload(rest)?;
        write_header(header, self.kind(), &rest[..len]);
        Some(HEADER_LEN + len)
    }
}

/// Whether `key` may name a key-value pair: 1 to [`MAX_KEY`] bytes of ASCII letters,
/// digits, `_`, `-`, `.` and `:`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u16()? as usize;
        core::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::NotUtf8)
    }

    fn blob(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.at.checked_add(bytes.len())?;
        self.out.get_mut(self.at..end)?.copy_from_slice(bytes);
        self.at = end;
        Some(())
    }

    fn u32(&mut self, v: u32) -> Option<()> {
        self.put(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> Option<()> {
        self.put(&v.to_le_bytes())
    }

    fn str(&mut self, s: &str) -> Option<()> {
        self.put(&u16::try_from(s.len()).ok()?.to_le_bytes())?;
        self.put(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn frames_round_trip() {
        let messages = [
            Message::Hello {
                version: 1,
                agent: "luvisor-guest",
            },
            Message::Pong {
                seq: 7,
                uptime_ms: 1234,
                time_generation: 2,
                guest_time_us: 99,
            },
            Message::KvpSet {
                key: "ready",
                value: "1",
            },
            Message::ExecResult {
                id: 3,
                code: 2,
                truncated: true,
                busy: false,
                output: b"error: x",
            },
            Message::ExecResult {
                id: 4,
                code: 2,
                truncated: false,
                busy: true,
                output: b"",
            },
            Message::Shutdown,
        ];
        for m in messages {
            let mut buf = [0u8; 256];
            let n = m.encode_frame(&mut buf).unwrap();
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&buf[..HEADER_LEN]);
            let h = parse_header(&header).unwrap();
            assert_eq!(h.length as usize, n - HEADER_LEN);
            assert_eq!(h.crc, crc32(&buf[HEADER_LEN..n]));
            assert_eq!(Message::decode(h.kind, &buf[HEADER_LEN..n]), Ok(m));
        }
    }

    #[test]
    fn exec_result_flags_are_bits_and_reserved_ones_are_ignored() {
        let decode = |flags: u8| {
            let mut payload = [0u8; 13];
            payload[8] = flags;
            match Message::decode(kind::EXEC_RESULT, &payload) {
                Ok(Message::ExecResult {
                    truncated, busy, ..
                }) => (truncated, busy),
                other => panic!("{other:?}"),
            }
        };
        // 0 and 1 are what an agent that knows only `truncated` sends.
        assert_eq!(decode(0), (false, false));
        assert_eq!(decode(EXEC_TRUNCATED), (true, false));
        assert_eq!(decode(EXEC_BUSY), (false, true));
        assert_eq!(decode(0xfc), (false, false));
    }

    #[test]
    fn bad_payloads_do_not_decode() {
        assert_eq!(
            Message::decode(kind::PING, &[0; 15]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Message::decode(kind::PING, &[0; 17]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            Message::decode(kind::KVP_DELETE, &[2, 0, 0xff, 0xfe]),
            Err(DecodeError::NotUtf8)
        );
        assert_eq!(
            Message::decode(200, &[]),
            Err(DecodeError::UnknownKind(200))
        );
    }
}
