//! Port I/O. Works at CPL 3 because the boot path sets IOPL 3.

use crate::abi::EXIT_PORT;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects the compiler must know of;
    // the ports used are the console, the exit port and the doorbell.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
    }
}

/// 32-bit output. No `nomem`: the VMM reads guest memory on this exit, so
/// every earlier store must be done before it.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`; the asm acts as a compiler memory barrier.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter (CR4.TSD is clear).
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (hi as u64) << 32 | lo as u64
}

/// Ends the VM with `status` through the isa-debug-exit port.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    // The VMM stops us at the port write; never fall through.
    loop {
        core::hint::spin_loop();
    }
}
