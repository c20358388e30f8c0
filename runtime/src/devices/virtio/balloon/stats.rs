//! The statistics a balloon driver sends (virtio 1.2, 5.5.6.3): an array of
//! `{ le16 tag; le64 val; }`, packed, 10 bytes each.

use crate::vm::dynamic_memory::MemoryStats;

/// Statistic tags (virtio 1.2, 5.5.6.3). `virtio-bindings` has no balloon module.
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJOR_FAULTS: u16 = 2;
    pub const MINOR_FAULTS: u16 = 3;
    pub const FREE_MEMORY: u16 = 4;
    pub const TOTAL_MEMORY: u16 = 5;
    pub const AVAILABLE_MEMORY: u16 = 6;
    pub const DISK_CACHES: u16 = 7;
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// Bytes of one statistic.
pub const ENTRY_BYTES: usize = 10;
/// The most statistics read from one buffer: every standard tag a few times over. A
/// longer buffer is read this far and the rest ignored.
pub const MAX_ENTRIES: usize = 32;

/// Reads the statistics in `bytes` (a trailing partial entry is ignored). Unknown tags
/// are skipped; a tag sent twice keeps its last value.
pub fn parse(bytes: &[u8]) -> MemoryStats {
    let mut stats = MemoryStats::default();
    for entry in bytes.chunks_exact(ENTRY_BYTES).take(MAX_ENTRIES) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let value = u64::from_le_bytes(entry[2..10].try_into().expect("8 bytes"));
        let field = match tag {
            tag::SWAP_IN => &mut stats.swap_in,
            tag::SWAP_OUT => &mut stats.swap_out,
            tag::MAJOR_FAULTS => &mut stats.major_faults,
            tag::MINOR_FAULTS => &mut stats.minor_faults,
            tag::FREE_MEMORY => &mut stats.free,
            tag::TOTAL_MEMORY => &mut stats.total,
            tag::AVAILABLE_MEMORY => &mut stats.available,
            tag::DISK_CACHES => &mut stats.caches,
            tag::HUGETLB_ALLOCATIONS => &mut stats.hugetlb_allocations,
            tag::HUGETLB_FAILURES => &mut stats.hugetlb_failures,
            _ => continue,
        };
        *field = Some(value);
    }
    stats
}

#[cfg(test)]
pub(crate) fn encode(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_standard_tag_is_read() {
        let bytes = encode(&[
            (tag::SWAP_IN, 1),
            (tag::SWAP_OUT, 2),
            (tag::MAJOR_FAULTS, 3),
            (tag::MINOR_FAULTS, 4),
            (tag::FREE_MEMORY, 5 << 20),
            (tag::TOTAL_MEMORY, 64 << 20),
            (tag::AVAILABLE_MEMORY, 6 << 20),
            (tag::DISK_CACHES, 7),
            (tag::HUGETLB_ALLOCATIONS, 8),
            (tag::HUGETLB_FAILURES, 9),
        ]);
        let stats = parse(&bytes);
        assert_eq!(
            stats,
            MemoryStats {
                swap_in: Some(1),
                swap_out: Some(2),
                major_faults: Some(3),
                minor_faults: Some(4),
                free: Some(5 << 20),
                total: Some(64 << 20),
                available: Some(6 << 20),
                caches: Some(7),
                hugetlb_allocations: Some(8),
                hugetlb_failures: Some(9),
            }
        );
    }

    #[test]
    fn odd_buffers_read_what_they_can() {
        assert_eq!(parse(&[]), MemoryStats::default());
        // Unknown tags are skipped, a repeated tag keeps its last value, and a trailing
        // partial entry is ignored.
        let mut bytes = encode(&[(0xbeef, 1), (tag::FREE_MEMORY, 1), (tag::FREE_MEMORY, 2)]);
        bytes.extend_from_slice(&[5, 0, 1]);
        let stats = parse(&bytes);
        assert_eq!(stats.free, Some(2));
        assert_eq!(stats.total, None);
        // Entries past MAX_ENTRIES are not read.
        let mut many = encode(&vec![(0xbeef, 0); MAX_ENTRIES]);
        many.extend(encode(&[(tag::TOTAL_MEMORY, 9)]));
        assert_eq!(parse(&many).total, None);
    }
}
