//! A hand-made guest for the memory tests: a few x86-64 instructions run at CPL3 in the
//! built-in guest's address space (its GDT, TSS and identity page tables, written by
//! `builtin::load` or restored from a snapshot), on a real vCPU.

use kvm_ioctls::VcpuExit;
use luvisor_guest_abi::ports::EXIT;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::builtin::{self, BuiltinEntry};
use crate::vstate::kvm;
use crate::vstate::prepared::PreparedVm;

/// Machine code, built an instruction at a time.
#[derive(Default)]
pub(crate) struct Code(Vec<u8>);

impl Code {
    /// `mov byte [addr], value`
    pub(crate) fn store_byte(mut self, addr: u32, value: u8) -> Code {
        self.0.extend_from_slice(&[0xC6, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.push(value);
        self
    }

    /// `mov al, [addr]`
    pub(crate) fn load_al(mut self, addr: u32) -> Code {
        self.0.extend_from_slice(&[0x8A, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// `add al, value`
    pub(crate) fn add_al(mut self, value: u8) -> Code {
        self.0.extend_from_slice(&[0x04, value]);
        self
    }

    /// `mov [addr], al`
    pub(crate) fn store_al(mut self, addr: u32) -> Code {
        self.0.extend_from_slice(&[0x88, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// `movzx eax, al; mov dx, EXIT; out dx, eax; jmp $`: exits with AL.
    pub(crate) fn exit_with_al(mut self) -> Code {
        self.0.extend_from_slice(&[0x0F, 0xB6, 0xC0, 0x66, 0xBA]);
        self.0.extend_from_slice(&EXIT.to_le_bytes());
        self.0.extend_from_slice(&[0xEF, 0xEB, 0xFE]);
        self
    }

    /// `mov al, value` then [`Code::exit_with_al`].
    pub(crate) fn exit_with(mut self, value: u8) -> Code {
        self.0.extend_from_slice(&[0xB0, value]);
        self.exit_with_al()
    }
}

/// Writes `code` at `at`, runs one vCPU from there and returns the value it wrote to
/// the exit port.
pub(crate) fn run(vm: &PreparedVm, code: Code, at: u64) -> u32 {
    vm.memory.write_slice(&code.0, GuestAddress(at)).unwrap();
    let mut vcpu = vm.vm_fd.create_vcpu(0).unwrap();
    let cpuid = kvm()
        .unwrap()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    builtin::setup_vcpu(&vcpu, 0, BuiltinEntry { rip: at }).unwrap();
    // Other exits (a signal, an interrupt window) just run again; the bound only stops a
    // broken guest from looping forever.
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) if port == EXIT => {
                return u32::from_le_bytes(data.try_into().expect("a 32-bit port write"));
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("the guest did not reach its exit port write");
}
