//! Boot path, at CPL 0 and as short as possible: on this machine's KVM
//! every CPL 0 instruction is emulated (~0.65 µs each), so everything that
//! can be data is data (page tables, GDT, TSS), and the rest runs at CPL 3.
//!
//! PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
//! `%ebx` = start_info. We enable PAE + long mode with an identity map of
//! the first 4 GiB in 2 MiB pages (user-accessible), load the GDT and TSS,
//! load an IDT whose gates the CPL 3 runtime fills in, and `iretq` to
//! `guest_user_entry(start_info)` at CPL 3 with IOPL 3 and an all-open
//! I/O permission bitmap in the TSS, so that port I/O (console, hypercall
//! doorbell, exit port) works from user mode (some KVMs, this machine's
//! included under QEMU, do not let the guest keep IOPL 3).

use crate::abi::EXIT_FATAL;
use crate::console::Serial;
use crate::io;
use core::fmt::Write;

core::arch::global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl $boot_kstack_top, %esp
    movl %ebx, %edi
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    pushl $0x08
    pushl $boot_long_mode
    lret

    .code64
boot_long_mode:
    movl %edi, %edi
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_kstack_top, %rsp
    movq $boot_tss, %rax
    movw %ax, boot_gdt_tss + 2
    shrq $16, %rax
    movb %al, boot_gdt_tss + 4
    movb %ah, boot_gdt_tss + 7
    shrq $16, %rax
    movl %eax, boot_gdt_tss + 8
    movw $0x28, %ax
    ltr %ax
    lidt boot_idt_ptr
    pushq $0x1b
    pushq $boot_ustack_top
    pushq $0x3002
    pushq $0x23
    pushq $guest_user_entry
    iretq

    .macro ISR_NOERR n
    boot_isr\n:
    pushq $0
    pushq $\n
    jmp boot_isr_common
    .endm
    .macro ISR_ERR n
    boot_isr\n:
    pushq $\n
    jmp boot_isr_common
    .endm
    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31
boot_isr_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call guest_exception
    ud2

    .section .data.boot, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set boot_pd_i, 0
    .rept 2048
    .quad (boot_pd_i << 21) | 0x87
    .set boot_pd_i, boot_pd_i + 1
    .endr

    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00209a0000000000
    .quad 0x0000920000000000
    .quad 0x0000f20000000000
    .quad 0x0020fa0000000000
boot_gdt_tss:
    .quad 0x0000890000002068
    .quad 0
boot_gdt_end:
    .balign 8
    .word 0
    .word 0
    .word 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .balign 16
boot_tss:
    .long 0
    .quad boot_kstack_top
    .fill 11, 8, 0
    .word 0
    .word 0x68
    .fill 8192, 1, 0
    .byte 0xff

    .balign 8
    .word 0
    .word 0
    .word 0
boot_idt_ptr:
    .word 32 * 16 - 1
    .quad boot_idt

    .global boot_isr_table
boot_isr_table:
    .quad boot_isr0, boot_isr1, boot_isr2, boot_isr3
    .quad boot_isr4, boot_isr5, boot_isr6, boot_isr7
    .quad boot_isr8, boot_isr9, boot_isr10, boot_isr11
    .quad boot_isr12, boot_isr13, boot_isr14, boot_isr15
    .quad boot_isr16, boot_isr17, boot_isr18, boot_isr19
    .quad boot_isr20, boot_isr21, boot_isr22, boot_isr23
    .quad boot_isr24, boot_isr25, boot_isr26, boot_isr27
    .quad boot_isr28, boot_isr29, boot_isr30, boot_isr31

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_idt
boot_idt:
    .skip 32 * 16
    .balign 4096
    .skip 16384
boot_kstack_top:
    .skip 131072
boot_ustack_top:
    "#,
    options(att_syntax)
);

extern "C" {
    static boot_isr_table: [u64; 32];
    static mut boot_idt: [u64; 64];
}

/// Fills the IDT gates (vectors 0–31, interrupt gates to the CPL 0 stubs).
/// Runs at CPL 3: the IDT page is user-writable and filling it here costs
/// nothing, where the same loop at CPL 0 is emulated.
pub fn install_exception_gates() {
    for v in 0..32 {
        // SAFETY: boot_isr_table is a 32-entry table of addresses defined in
        // the boot assembly above; it is only read.
        let handler = unsafe { core::ptr::addr_of!(boot_isr_table[v]).read() };
        let low = (handler & 0xffff)
            | (0x08 << 16)
            | (0x8e00u64 << 32)
            | (((handler >> 16) & 0xffff) << 48);
        let high = handler >> 32;
        // SAFETY: boot_idt is the 512-byte IDT reserved above; only this
        // single-threaded boot path writes it, before any exception is
        // expected.
        unsafe {
            core::ptr::addr_of_mut!(boot_idt[2 * v]).write_volatile(low);
            core::ptr::addr_of_mut!(boot_idt[2 * v + 1]).write_volatile(high);
        }
    }
}

/// What the stubs push, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Reports a CPU exception on the console and ends the VM. Runs at CPL 0.
#[no_mangle]
extern "C" fn guest_exception(frame: *const ExceptionFrame) -> ! {
    // SAFETY: the stub passes the address of the frame it just pushed.
    let f = unsafe { &*frame };
    let _ = writeln!(
        Serial,
        "zone: fatal: exception vector={} error={:#x} rip={:#x} rsp={:#x} cs={:#x} rflags={:#x} ss={:#x}",
        f.vector, f.error, f.rip, f.rsp, f.cs, f.rflags, f.ss
    );
    io::exit(EXIT_FATAL)
}
