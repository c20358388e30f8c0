//! [`FrameReader`]: cuts the byte stream a guest sends on its agent channel into frames.
//!
//! The guest is not trusted. Whatever it sends, the reader holds at most one frame's
//! worth of bytes ([`MAX_FRAME`]), and gets back in step after garbage: bytes before a
//! magic and a header it does not accept are dropped (one byte past the bad magic, then
//! it looks for the next one) and counted. A frame whose header it accepts but whose
//! payload's CRC does not match is dropped whole, header and announced payload: looking
//! for a magic inside that payload instead would let a guest that sends 16-byte headers
//! back to back, each announcing 64 KiB, make the host check a 64 KiB CRC for every 16
//! bytes it sends. So every byte is checked by at most one CRC, and the work stays
//! linear in what the guest sends.

use luvisor_guest_abi::agent::{crc32, parse_header, HeaderError, HEADER_LEN, MAGIC, MAX_FRAME};
use serde::{Deserialize, Serialize};

/// What the reader threw away, for `vm.agent` and the hostile-guest tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCounters {
    /// Frames with a bad version, flags or CRC.
    pub malformed: u64,
    /// Frame headers announcing a payload over the limit.
    pub oversized: u64,
    /// Bytes dropped while getting back in step (garbage, the bytes of every bad
    /// header that were skipped, and every frame with a bad CRC, whole).
    pub discarded_bytes: u64,
}

/// Reassembles frames from the guest's byte stream.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes received and not yet consumed are `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    counters: StreamCounters,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader {
            buf: Vec::with_capacity(MAX_FRAME),
            start: 0,
            counters: StreamCounters::default(),
        }
    }

    /// A reader that goes on from a saved partial frame.
    pub fn with_pending(pending: &[u8], counters: StreamCounters) -> Result<FrameReader, String> {
        if pending.len() > MAX_FRAME {
            return Err(format!(
                "{} bytes of a partial frame saved; a frame has at most {MAX_FRAME}",
                pending.len()
            ));
        }
        let mut reader = FrameReader::new();
        reader.buf.extend_from_slice(pending);
        reader.counters = counters;
        Ok(reader)
    }

    /// Bytes of an incomplete frame (saved with the device).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn counters(&self) -> StreamCounters {
        self.counters
    }

    /// Forgets everything buffered (the driver reset the device).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Feeds `bytes`; calls `on_frame(kind, payload)` for every complete, valid frame.
    pub fn push(&mut self, mut bytes: &[u8], on_frame: &mut dyn FnMut(u8, &[u8])) {
        while !bytes.is_empty() {
            if self.buf.len() == MAX_FRAME || self.buf.len() + bytes.len() > MAX_FRAME {
                self.compact();
            }
            let room = MAX_FRAME - self.buf.len();
            let take = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            self.drain(on_frame);
        }
    }

    /// Moves the unconsumed bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Drops `n` unconsumed bytes as garbage.
    fn discard(&mut self, n: usize) {
        self.start += n;
        self.counters.discarded_bytes += n as u64;
    }

    /// Skips to the next place a frame could start: a full magic, or a prefix of one at
    /// the end of what arrived so far.
    fn resync(&mut self) {
        let data = &self.buf[self.start..];
        let skip = (1..data.len())
            .find(|&i| {
                let rest = &data[i..];
                let n = rest.len().min(MAGIC.len());
                rest[..n] == MAGIC[..n]
            })
            .unwrap_or(data.len());
        self.discard(skip);
    }

    fn drain(&mut self, on_frame: &mut dyn FnMut(u8, &[u8])) {
        loop {
            let data = &self.buf[self.start..];
            if data.is_empty() {
                self.buf.clear();
                self.start = 0;
                return;
            }
            let n = data.len().min(MAGIC.len());
            if data[..n] != MAGIC[..n] {
                self.resync();
                continue;
            }
            if data.len() < HEADER_LEN {
                return;
            }
            let header: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("length checked");
            let header = match parse_header(header) {
                Ok(h) => h,
                Err(e) => {
                    match e {
                        HeaderError::Oversized(_) => self.counters.oversized += 1,
                        _ => self.counters.malformed += 1,
                    }
                    self.resync();
                    continue;
                }
            };
            let total = HEADER_LEN + header.length as usize;
            if data.len() < total {
                return;
            }
            let payload = &data[HEADER_LEN..total];
            if crc32(payload) != header.crc {
                // The header was accepted, so the frame's bounds are taken as given: the
                // whole frame goes (see the module's comment for why not one byte).
                self.counters.malformed += 1;
                self.discard(total);
                continue;
            }
            on_frame(header.kind, payload);
            self.start += total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvisor_guest_abi::agent::{Message, MAX_PAYLOAD};

    fn frame(m: Message) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_FRAME];
        let n = m.encode_frame(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn collect(reader: &mut FrameReader, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        reader.push(bytes, &mut |kind, payload| {
            frames.push((kind, payload.to_vec()))
        });
        frames
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let a = frame(Message::KvpSet {
            key: "k",
            value: "v",
        });
        let b = frame(Message::ShutdownAck);
        let stream: Vec<u8> = a.iter().chain(&b).copied().collect();
        for cut in 0..stream.len() {
            let mut reader = FrameReader::new();
            let mut frames = collect(&mut reader, &stream[..cut]);
            frames.extend(collect(&mut reader, &stream[cut..]));
            assert_eq!(frames.len(), 2, "cut at {cut}");
            assert_eq!(reader.counters(), StreamCounters::default());
            assert!(reader.pending().is_empty());
        }
    }

    #[test]
    fn garbage_bad_crcs_and_oversized_headers_are_skipped_and_counted() {
        let good = frame(Message::Welcome { version: 1 });
        let mut bad_crc = good.clone();
        bad_crc[HEADER_LEN] ^= 1;
        let mut oversized = good.clone();
        oversized[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let mut bad_version = good.clone();
        bad_version[4] = 99;
        let mut stream = b"noise LV LVA".to_vec();
        for part in [&good, &bad_crc, &good, &oversized, &bad_version, &good] {
            stream.extend_from_slice(part);
        }
        let mut reader = FrameReader::new();
        let frames = collect(&mut reader, &stream);
        assert_eq!(frames.len(), 3);
        let c = reader.counters();
        assert_eq!((c.malformed, c.oversized), (2, 1));
        assert!(c.discarded_bytes >= 12);
    }

    #[test]
    fn a_flood_of_garbage_keeps_the_buffer_bounded() {
        let mut reader = FrameReader::new();
        let junk = vec![b'L'; 3 * MAX_FRAME + 5];
        assert!(collect(&mut reader, &junk).is_empty());
        assert!(reader.pending().len() < MAGIC.len());
        // A header that promises the largest payload, never completed, holds at most one
        // frame's worth.
        let mut header = frame(Message::Shutdown);
        header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        collect(&mut reader, &header);
        collect(&mut reader, &vec![0u8; MAX_PAYLOAD - 1]);
        assert!(reader.pending().len() <= MAX_FRAME);
        // ... and when it completes with a wrong CRC, the reader gets back in step.
        collect(&mut reader, &[0]);
        let good = frame(Message::ShutdownAck);
        assert_eq!(collect(&mut reader, &good).len(), 1);
    }

    #[test]
    fn back_to_back_headers_with_bad_crcs_cost_one_crc_per_frame_announced() {
        // A hostile guest's stream: 16-byte headers back to back, each accepted and each
        // announcing the largest payload, so every one's "payload" is the headers after
        // it, whose CRC does not match. Dropping one byte per bad CRC would check a
        // 64 KiB CRC for every 16 bytes (thousands here); dropping each frame whole
        // checks one per 64 KiB.
        let mut header = frame(Message::Shutdown);
        header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        assert_eq!(header.len(), HEADER_LEN);
        let frames_announced = 4;
        let stream: Vec<u8> = header
            .iter()
            .copied()
            .cycle()
            .take(frames_announced * MAX_FRAME)
            .collect();
        let mut reader = FrameReader::new();
        let mut delivered = 0;
        // In 16 KiB pieces, as the device reads guest memory.
        for piece in stream.chunks(16 * 1024) {
            delivered += collect(&mut reader, piece).len();
        }
        assert_eq!(delivered, 0);
        let c = reader.counters();
        assert_eq!(c.malformed, frames_announced as u64);
        assert_eq!(c.discarded_bytes, stream.len() as u64);
        assert!(reader.pending().is_empty());
        // Back in step at once.
        let good = frame(Message::ShutdownAck);
        assert_eq!(collect(&mut reader, &good).len(), 1);
    }

    #[test]
    fn a_saved_partial_frame_is_completed_after_a_restore() {
        let good = frame(Message::Shutdown);
        let mut reader = FrameReader::new();
        collect(&mut reader, &good[..5]);
        let mut restored = FrameReader::with_pending(reader.pending(), reader.counters()).unwrap();
        assert_eq!(collect(&mut restored, &good[5..]).len(), 1);
        assert!(
            FrameReader::with_pending(&vec![0; MAX_FRAME + 1], StreamCounters::default()).is_err()
        );
    }
}
