//! The VM's running-time clock: it advances only while the VM runs, so a paused guest
//! sees no time pass (like QEMU's virtual clock). The guest reads it through the clock
//! port.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct ClockState {
    accumulated: Duration,
    running_since: Option<Instant>,
}

#[derive(Default)]
pub struct RunClock {
    state: Mutex<ClockState>,
}

impl RunClock {
    pub fn new() -> RunClock {
        RunClock::default()
    }

    /// Starts or resumes the clock; a no-op when it already runs.
    pub fn start(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.running_since.get_or_insert_with(Instant::now);
    }

    /// Stops the clock, keeping the time accumulated so far.
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.running_since.take() {
            s.accumulated += since.elapsed();
        }
    }

    /// Sets the time accumulated so far (a restored VM goes on from its snapshot's
    /// running time); the clock is left stopped.
    pub fn set_elapsed(&self, elapsed: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.accumulated = elapsed;
        s.running_since = None;
    }

    pub fn elapsed(&self) -> Duration {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.accumulated + s.running_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn does_not_advance_while_stopped() {
        let c = RunClock::new();
        c.start();
        std::thread::sleep(Duration::from_millis(5));
        c.stop();
        let frozen = c.elapsed();
        assert!(frozen >= Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.elapsed(), frozen);
        c.start();
        std::thread::sleep(Duration::from_millis(1));
        assert!(c.elapsed() > frozen);
    }
}
