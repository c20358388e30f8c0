//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

/// What the vCPU must do after a device handled a write. Most writes need nothing; the
/// paravirtual ports use the others to steer the vCPU's run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    None,
    /// The guest has nothing to do until this much time has passed, or an event arrives.
    Idle(Option<Duration>),
    /// The guest asked to end with this exit code (the 32-bit value it wrote).
    Exit(u32),
    /// The guest reports that it has booted.
    Ready,
}

/// A device reachable at a range of port or MMIO addresses. `offset` is relative to
/// the start of the range the device was registered at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("cannot register a device at {base:#x}+{len:#x}: the range is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps_previous = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// Dispatches a read; returns false when no device claims `addr` (data is untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, device)) = self.find(addr) else {
            return false;
        };
        // A poisoned lock means a device panicked on another vCPU; keep serving the guest
        // with whatever state the device has rather than taking the host down.
        device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
        true
    }

    /// Dispatches a write; `None` when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<IoAction> {
        let (offset, device) = self.find(addr)?;
        Some(
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> IoAction {
            self.0 = data[0];
            IoAction::None
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x20, 4, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x0c, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x30, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(bus.write(0x20, &[9]), Some(IoAction::None));
        assert!(bus.read(0x23, &mut b));
        assert_eq!(b[0], 12);
        assert_eq!(bus.write(0x24, &[9]), None);
    }
}
