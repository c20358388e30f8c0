//! Recognising image formats from their first sector.
//!
//! Probing is only a convenience for images whose owner did not say what they are. A
//! guest controls every byte of a raw disk, so whatever probing finds must never let a
//! guest choose how the host opens a file: see [`would_change_format`], which the raw
//! backend uses to refuse guest writes that would make a probed raw image look like
//! something else.

/// How many bytes at the start of an image decide its format.
pub const PROBE_BYTES: usize = 512;

/// What the first sector of an image says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbedFormat {
    /// No known magic: the bytes are the disk.
    Raw,
    Qcow2,
    /// A format luvisor recognises but does not read; the name is for messages.
    Other(&'static str),
}

impl ProbedFormat {
    pub fn name(self) -> &'static str {
        match self {
            ProbedFormat::Raw => "raw",
            ProbedFormat::Qcow2 => "qcow2",
            ProbedFormat::Other(name) => name,
        }
    }
}

/// Magic bytes at a fixed offset, and the format they announce.
struct Magic {
    offset: usize,
    bytes: &'static [u8],
    format: ProbedFormat,
}

const fn magic(offset: usize, bytes: &'static [u8], format: ProbedFormat) -> Magic {
    Magic {
        offset,
        bytes,
        format,
    }
}

/// The signatures QEMU's format drivers probe for, for the formats people meet. The
/// qcow2 magic also covers the old qcow (version 1), which the qcow2 reader refuses by
/// version.
const MAGICS: &[Magic] = &[
    magic(0, b"QFI\xfb", ProbedFormat::Qcow2),
    magic(0, b"QED\0", ProbedFormat::Other("qed")),
    magic(0, b"KDMV", ProbedFormat::Other("vmdk")),
    magic(0, b"COWD", ProbedFormat::Other("vmdk")),
    magic(0, b"# Disk DescriptorFile", ProbedFormat::Other("vmdk")),
    magic(0, b"conectix", ProbedFormat::Other("vhd")),
    magic(0, b"vhdxfile", ProbedFormat::Other("vhdx")),
    // VDI: the signature 0xbeda107f, little-endian, at offset 64.
    magic(64, b"\x7f\x10\xda\xbe", ProbedFormat::Other("vdi")),
    magic(0, b"LUKS\xba\xbe", ProbedFormat::Other("luks")),
    magic(0, b"WithoutFreeSpace", ProbedFormat::Other("parallels")),
    magic(0, b"WithouFreSpacExt", ProbedFormat::Other("parallels")),
    magic(0, b"Bochs Virtual HD Image", ProbedFormat::Other("bochs")),
];

/// The format `head` (the first bytes of an image, up to [`PROBE_BYTES`]) announces.
pub fn probe(head: &[u8]) -> ProbedFormat {
    MAGICS
        .iter()
        .find(|m| {
            head.get(m.offset..m.offset + m.bytes.len())
                .is_some_and(|b| b == m.bytes)
        })
        .map_or(ProbedFormat::Raw, |m| m.format)
}

/// Whether writing `data` at byte `offset` of a raw image whose first sector is now
/// `current` would make the image probe as something other than raw.
///
/// `current` is the first [`PROBE_BYTES`] of the image (shorter if the image is). Only the
/// resulting first sector matters, so writes that start past it never change the format.
pub fn would_change_format(current: &[u8], data: &[u8], offset: u64) -> bool {
    if offset >= PROBE_BYTES as u64 || data.is_empty() {
        return false;
    }
    let mut head = [0u8; PROBE_BYTES];
    head[..current.len().min(PROBE_BYTES)]
        .copy_from_slice(&current[..current.len().min(PROBE_BYTES)]);
    let start = offset as usize;
    let n = data.len().min(PROBE_BYTES - start);
    head[start..start + n].copy_from_slice(&data[..n]);
    probe(&head) != ProbedFormat::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector_with(offset: usize, bytes: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; PROBE_BYTES];
        s[offset..offset + bytes.len()].copy_from_slice(bytes);
        s
    }

    #[test]
    fn recognises_every_magic() {
        for m in MAGICS {
            assert_eq!(probe(&sector_with(m.offset, m.bytes)), m.format);
        }
        assert_eq!(probe(&[0u8; PROBE_BYTES]), ProbedFormat::Raw);
        assert_eq!(probe(b"QFI"), ProbedFormat::Raw, "a short file is raw");
        assert_eq!(probe(b""), ProbedFormat::Raw);
    }

    #[test]
    fn guards_only_the_first_sector() {
        let zero = [0u8; PROBE_BYTES];
        assert!(would_change_format(&zero, b"QFI\xfb", 0));
        assert!(!would_change_format(&zero, b"QFI\xfb", 512));
        assert!(!would_change_format(&zero, &[0xAA; 4096], 0));
        // A write that completes a magic the sector already half holds.
        let half = sector_with(0, b"QF");
        assert!(would_change_format(&half, b"I\xfb", 2));
        // The VDI signature sits at 64: a write covering it counts.
        assert!(would_change_format(&zero, b"\x7f\x10\xda\xbe", 64));
        // Overwriting a magic with data that is raw is allowed (it makes the image raw).
        let q = sector_with(0, b"QFI\xfb");
        assert!(!would_change_format(&q, &[0u8; 512], 0));
    }
}
