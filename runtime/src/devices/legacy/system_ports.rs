//! The paravirtual ports of the built-in guest ABI (`luvisor_guest_abi::ports`): exit,
//! ready, idle and clock. They occupy one 16-port range.

use std::sync::Arc;
use std::time::Duration;

use luvisor_guest_abi::ports;

use crate::devices::bus::{BusDevice, IoAction};
use crate::vstate::clock::RunClock;

/// First port of the range.
pub const BASE: u16 = ports::EXIT;
/// Length of the range.
pub const LEN: u64 = 16;

pub struct SystemPorts {
    clock: Arc<RunClock>,
}

impl SystemPorts {
    pub fn new(clock: Arc<RunClock>) -> SystemPorts {
        SystemPorts { clock }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

impl BusDevice for SystemPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset + BASE as u64 {
            p if p == ports::CLOCK_MS as u64 => self.clock.elapsed().as_millis() as u32,
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        let value = le_u32(data);
        match (offset + BASE as u64) as u16 {
            ports::EXIT => IoAction::Exit(value),
            ports::READY => IoAction::Ready,
            ports::IDLE if value == u32::MAX => IoAction::Idle(None),
            ports::IDLE => IoAction::Idle(Some(Duration::from_micros(value as u64))),
            _ => IoAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_port_writes() {
        let mut dev = SystemPorts::new(Arc::new(RunClock::new()));
        let off = |p: u16| (p - BASE) as u64;
        assert_eq!(
            dev.write(off(ports::EXIT), &3u32.to_le_bytes()),
            IoAction::Exit(3)
        );
        assert_eq!(
            dev.write(off(ports::EXIT), &u32::MAX.to_le_bytes()),
            IoAction::Exit(u32::MAX),
            "exit codes are unsigned 32-bit values"
        );
        assert_eq!(dev.write(off(ports::READY), &[1]), IoAction::Ready);
        assert_eq!(
            dev.write(off(ports::IDLE), &1500u32.to_le_bytes()),
            IoAction::Idle(Some(Duration::from_micros(1500)))
        );
        assert_eq!(
            dev.write(off(ports::IDLE), &u32::MAX.to_le_bytes()),
            IoAction::Idle(None)
        );
        let mut buf = [0u8; 4];
        dev.read(off(ports::CLOCK_MS), &mut buf);
        assert_eq!(
            u32::from_le_bytes(buf),
            0,
            "a clock that never started reads 0"
        );
    }
}
