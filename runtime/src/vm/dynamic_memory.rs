//! Hyper-V style memory for one VM: the knobs (startup, min, max, buffer, weight), the
//! balloon target a policy or a script sets, and guest-physical access for harnesses.
//!
//! The guest sees `max` bytes of RAM; the balloon holds it down to the target, which
//! starts at `startup` and always stays within `[min, max]`.

use serde::{Deserialize, Serialize};
use vm_memory::Bytes;

use super::{Vm, VmError};
use crate::devices::virtio::balloon::device::DEFAULT_STATS_PERIOD;
use crate::size::format_size;

/// Default `buffer`: the percentage kept above the guest's demand.
pub const DEFAULT_BUFFER_PERCENT: u32 = 20;
/// Default `weight`: the middle of 0–10000.
pub const DEFAULT_WEIGHT: u32 = 5000;
/// `buffer` must lie in this range (percent), as in Hyper-V.
pub const BUFFER_RANGE: std::ops::RangeInclusive<u32> = 5..=2000;
/// `weight` must lie in this range.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 0..=10000;

/// A VM's memory knobs, in bytes except `buffer_percent` and `weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryKnobs {
    /// What the guest gets at boot (the balloon holds the rest from the start).
    pub startup: u64,
    /// The least the guest is ever left with.
    pub min: u64,
    /// What the guest sees as its RAM; the most it can have.
    pub max: u64,
    /// Percentage of the guest's demand kept free on top of it.
    pub buffer_percent: u32,
    /// Priority when the host is short of memory, 0–10000.
    pub weight: u32,
}

impl MemoryKnobs {
    /// Knobs for a VM with a fixed memory size: everything is `size`.
    pub fn fixed(size: u64) -> MemoryKnobs {
        MemoryKnobs {
            startup: size,
            min: size,
            max: size,
            buffer_percent: DEFAULT_BUFFER_PERCENT,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// Whether memory can move at all (min < max).
    pub fn is_dynamic(&self) -> bool {
        self.min < self.max
    }

    /// Checks the combination; sizes are checked against the VM limits elsewhere.
    pub fn check(&self) -> Result<(), String> {
        let size = |v| format_size(v);
        if self.min > self.startup {
            return Err(format!(
                "memory.min ({}) is more than memory.startup ({})",
                size(self.min),
                size(self.startup)
            ));
        }
        if self.startup > self.max {
            return Err(format!(
                "memory.startup ({}) is more than memory.max ({})",
                size(self.startup),
                size(self.max)
            ));
        }
        for (name, value) in [("min", self.min), ("startup", self.startup)] {
            if !value.is_multiple_of(4096) {
                return Err(format!(
                    "memory.{name} = {value} bytes is not a multiple of 4K"
                ));
            }
        }
        if !BUFFER_RANGE.contains(&self.buffer_percent) {
            return Err(format!(
                "memory.buffer = {} is out of range: give a percentage from {} to {}",
                self.buffer_percent,
                BUFFER_RANGE.start(),
                BUFFER_RANGE.end()
            ));
        }
        if !WEIGHT_RANGE.contains(&self.weight) {
            return Err(format!(
                "memory.weight = {} is out of range: give {} to {}",
                self.weight,
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end()
            ));
        }
        Ok(())
    }

    /// `target` brought into `[min, max]`, rounded down to whole pages; and whether it
    /// had to be changed to fit.
    pub fn clamp(&self, target: u64) -> (u64, bool) {
        let clamped = target.clamp(self.min, self.max) & !4095;
        let clamped = clamped.max(self.min);
        (clamped, clamped != target)
    }
}

/// The guest's own view of its memory, as its balloon driver last reported it (virtio
/// 1.2, 5.5.6.3: every standard statistic tag). A tag the guest did not send is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    /// Bytes.
    pub free: Option<u64>,
    pub total: Option<u64>,
    pub available: Option<u64>,
    pub caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

impl MemoryStats {
    /// Each statistic with its name, in a fixed order.
    pub fn fields(&self) -> [(&'static str, Option<u64>); 10] {
        [
            ("swap_in", self.swap_in),
            ("swap_out", self.swap_out),
            ("major_faults", self.major_faults),
            ("minor_faults", self.minor_faults),
            ("free", self.free),
            ("total", self.total),
            ("available", self.available),
            ("caches", self.caches),
            ("hugetlb_allocations", self.hugetlb_allocations),
            ("hugetlb_failures", self.hugetlb_failures),
        ]
    }
}

/// Statistics with how long ago the guest sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedMemoryStats {
    pub stats: MemoryStats,
    pub age: std::time::Duration,
}

impl std::ops::Deref for TimedMemoryStats {
    type Target = MemoryStats;
    fn deref(&self) -> &MemoryStats {
        &self.stats
    }
}

/// What the balloon device and the VM share: how much memory the balloon holds now, the
/// guest's last statistics, and how often the device asks for them.
pub struct BalloonStatus {
    held_bytes: std::sync::atomic::AtomicU64,
    stats: std::sync::Mutex<Option<(MemoryStats, std::time::Instant)>>,
    /// Milliseconds; 0: the device does not ask.
    stats_period_ms: std::sync::atomic::AtomicU64,
}

impl Default for BalloonStatus {
    fn default() -> BalloonStatus {
        BalloonStatus {
            held_bytes: Default::default(),
            stats: Default::default(),
            stats_period_ms: std::sync::atomic::AtomicU64::new(
                DEFAULT_STATS_PERIOD.as_millis() as u64
            ),
        }
    }
}

impl BalloonStatus {
    /// How often the balloon asks the guest for statistics (zero: never).
    pub fn stats_period(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.stats_period_ms
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }
    pub fn set_stats_period(&self, period: std::time::Duration) {
        self.stats_period_ms.store(
            period.as_millis() as u64,
            std::sync::atomic::Ordering::Release,
        );
    }
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes.load(std::sync::atomic::Ordering::Acquire)
    }
    pub fn set_held_bytes(&self, bytes: u64) {
        self.held_bytes
            .store(bytes, std::sync::atomic::Ordering::Release);
    }
    pub fn record_stats(&self, stats: MemoryStats) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((stats, std::time::Instant::now()));
    }
    pub fn stats(&self) -> Option<TimedMemoryStats> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(stats, at)| TimedMemoryStats {
                stats: stats.clone(),
                age: at.elapsed(),
            })
    }
}

/// What `set_memory_target` applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetApplied {
    pub applied: u64,
    /// The asked value was outside `[min, max]` (or not whole pages).
    pub clamped: bool,
}

impl Vm {
    /// The VM's memory knobs (fixed-size VMs have min = startup = max).
    pub fn memory_knobs(&self) -> MemoryKnobs {
        self.config
            .dynamic_memory
            .unwrap_or_else(|| MemoryKnobs::fixed(self.config.memory))
    }

    /// Guest-visible memory now: `max` minus what the balloon holds.
    pub fn memory_size(&self) -> u64 {
        self.memory_knobs()
            .max
            .saturating_sub(self.balloon.held_bytes())
    }

    /// The guest's last memory statistics, with their age; `None` before the first
    /// report.
    pub fn memory_stats(&self) -> Option<TimedMemoryStats> {
        self.balloon.stats()
    }

    /// What the balloon device and this VM share.
    pub fn balloon_status(&self) -> &std::sync::Arc<BalloonStatus> {
        &self.balloon
    }

    /// The balloon target: what the guest is asked to have.
    pub fn memory_target(&self) -> u64 {
        *self.memory_target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the balloon target, clamped to `[min, max]`, and logs it with `reason`.
    /// Works in any state but destroyed; a VM that runs starts following it at once.
    pub fn set_memory_target(&self, target: u64, reason: &str) -> Result<TargetApplied, VmError> {
        let knobs = self.memory_knobs();
        let (applied, clamped) = knobs.clamp(target);
        let before = {
            let mut current = self.memory_target.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *current, applied)
        };
        if before != applied {
            tracing::info!(
                vm = self.name(),
                target = applied,
                asked = target,
                clamped,
                reason,
                "memory target set"
            );
        }
        // A running (or paused) VM's balloon follows at once; a VM that starts later
        // builds its balloon with the stored target.
        if let Some(devices) = self.devices() {
            devices.with_balloon(|balloon| balloon.set_target(applied));
        }
        Ok(TargetApplied { applied, clamped })
    }

    /// The VM's device manager while it has a machine.
    pub(crate) fn devices(&self) -> Option<std::sync::Arc<crate::devices::manager::DeviceManager>> {
        self.lock().machine.as_ref().map(|m| m.devices.clone())
    }

    /// How often the balloon asks the guest for memory statistics.
    pub fn memory_stats_period(&self) -> std::time::Duration {
        self.balloon.stats_period()
    }

    /// Sets how often the balloon asks the guest for memory statistics: zero stops it,
    /// otherwise from 100 ms to 24 h. Applies at once to a running VM's balloon, and to
    /// the balloon a VM gets when it starts.
    pub fn set_memory_stats_period(&self, period: std::time::Duration) -> Result<(), VmError> {
        crate::devices::virtio::balloon::device::check_stats_period(period).map_err(|reason| {
            VmError::Balloon {
                name: self.name().to_string(),
                reason,
            }
        })?;
        self.balloon.set_stats_period(period);
        if let Some(devices) = self.devices() {
            devices.with_balloon(|balloon| balloon.set_stats_period(period));
        }
        Ok(())
    }

    /// Reads guest-physical memory at `gpa` into `buf`. The VM must have a machine
    /// (running or paused); the whole range must be RAM.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let len = buf.len();
        self.with_memory(|mem| mem.read_slice(buf, vm_memory::GuestAddress(gpa)))
            .ok_or_else(|| self.invalid("read the memory of", self.state()))?
            .map_err(|_| VmError::GuestRange {
                name: self.name().to_string(),
                gpa,
                len: len as u64,
            })
    }

    /// Writes `data` into guest-physical memory at `gpa` (marked as written by the VMM,
    /// so diff snapshots see it). Same rules as [`Vm::read_memory`].
    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.with_memory(|mem| mem.write_slice(data, vm_memory::GuestAddress(gpa)))
            .ok_or_else(|| self.invalid("write the memory of", self.state()))?
            .map_err(|_| VmError::GuestRange {
                name: self.name().to_string(),
                gpa,
                len: data.len() as u64,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(startup: u64, min: u64, max: u64) -> MemoryKnobs {
        MemoryKnobs {
            startup,
            min,
            max,
            buffer_percent: 20,
            weight: 5000,
        }
    }

    #[test]
    fn invalid_combinations_say_what_is_wrong() {
        assert!(knobs(256 << 20, 64 << 20, 1 << 30).check().is_ok());
        let err = knobs(64 << 20, 128 << 20, 1 << 30).check().unwrap_err();
        assert!(
            err.contains("memory.min (128M) is more than memory.startup (64M)"),
            "{err}"
        );
        let err = knobs(2 << 30, 64 << 20, 1 << 30).check().unwrap_err();
        assert!(
            err.contains("memory.startup (2G) is more than memory.max (1G)"),
            "{err}"
        );
        let mut k = knobs(256 << 20, 64 << 20, 1 << 30);
        k.buffer_percent = 4;
        assert!(k.check().unwrap_err().contains("5 to 2000"));
        k.buffer_percent = 20;
        k.weight = 10001;
        assert!(k.check().unwrap_err().contains("0 to 10000"));
    }

    #[test]
    fn targets_are_clamped_to_min_and_max_in_whole_pages() {
        let k = knobs(256 << 20, 64 << 20, 1 << 30);
        assert_eq!(k.clamp(384 << 20), (384 << 20, false));
        assert_eq!(k.clamp(1 << 20), (64 << 20, true));
        assert_eq!(k.clamp(8 << 30), (1 << 30, true));
        assert_eq!(k.clamp((384 << 20) + 5), (384 << 20, true));
        assert!(!MemoryKnobs::fixed(128 << 20).is_dynamic());
    }
}
