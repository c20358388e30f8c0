//! [`RamBitmap`]: the VMM's dirty bitmap of one RAM region, and what must live as long
//! as the region's mapping.

use std::ops::Deref;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, WithBitmapSlice, BS};

/// `vm-memory`'s [`AtomicBitmap`] of the pages the VMM wrote, which every region of
/// [`GuestRam`](super::GuestRam) carries. It may also keep something alive for as long as
/// the region exists: a region mapped over memory another value owns (a restore maps its
/// snapshot file over a prepared VM's RAM, whose slots KVM already has) keeps that owner
/// here, so the mapping is unmapped only once every user of the region is gone.
#[derive(Default)]
pub struct RamBitmap {
    bits: AtomicBitmap,
    keep_alive: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl RamBitmap {
    /// A bitmap for `len` bytes of RAM that keeps `owner` alive as long as itself.
    pub fn keeping(len: usize, owner: Arc<dyn std::any::Any + Send + Sync>) -> RamBitmap {
        RamBitmap {
            bits: AtomicBitmap::with_len(len),
            keep_alive: Some(owner),
        }
    }
}

impl std::fmt::Debug for RamBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBitmap")
            .field("bits", &self.bits)
            .field("keeps_an_owner", &self.keep_alive.is_some())
            .finish()
    }
}

impl Deref for RamBitmap {
    type Target = AtomicBitmap;
    fn deref(&self) -> &AtomicBitmap {
        &self.bits
    }
}

impl<'a> WithBitmapSlice<'a> for RamBitmap {
    type S = BS<'a, AtomicBitmap>;
}

impl Bitmap for RamBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.bits.mark_dirty(offset, len)
    }
    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.dirty_at(offset)
    }
    fn slice_at(&self, offset: usize) -> BS<'_, AtomicBitmap> {
        self.bits.slice_at(offset)
    }
}

impl NewBitmap for RamBitmap {
    fn with_len(len: usize) -> RamBitmap {
        RamBitmap {
            bits: AtomicBitmap::with_len(len),
            keep_alive: None,
        }
    }
}
