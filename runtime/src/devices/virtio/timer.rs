//! [`DeviceTimer`]: a periodic timer a device keeps for work on its own schedule (the
//! balloon asks for statistics every period). The VM's event thread watches its fd
//! next to the device's queue notifications and, when it fires, lets the device serve
//! the queue it names ([`MmioTransport::serve_timer`](super::mmio::MmioTransport::serve_timer)).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking `CLOCK_MONOTONIC` timerfd. Every method takes `&self`: the device
/// re-arms it while the event thread reads it.
#[derive(Debug)]
pub struct DeviceTimer {
    fd: OwnedFd,
}

impl DeviceTimer {
    pub fn new() -> std::io::Result<DeviceTimer> {
        // SAFETY: plain syscall; the returned descriptor is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(DeviceTimer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires every `period` from now on; `None` (or a zero period) stops it.
    pub fn set_period(&self, period: Option<Duration>) -> std::io::Result<()> {
        let period = period.filter(|p| !p.is_zero()).unwrap_or_default();
        let spec = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let value = libc::itimerspec {
            it_interval: spec,
            it_value: spec,
        };
        // SAFETY: `value` is a valid itimerspec; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes the expirations so far (0 when none): the fd stops being readable.
    pub fn clear(&self) -> u64 {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a local u64; the fd is non-blocking.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if n == std::mem::size_of::<u64>() as isize {
            count
        } else {
            0
        }
    }
}

impl AsRawFd for DeviceTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_until_stopped() {
        let timer = DeviceTimer::new().unwrap();
        assert_eq!(timer.clear(), 0, "a new timer has not fired");
        timer.set_period(Some(Duration::from_millis(1))).unwrap();
        let mut fired = 0;
        while fired == 0 {
            std::thread::sleep(Duration::from_millis(2));
            fired = timer.clear();
        }
        timer.set_period(None).unwrap();
        timer.clear();
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(timer.clear(), 0, "a stopped timer does not fire");
    }
}
