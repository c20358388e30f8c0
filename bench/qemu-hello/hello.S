/*
 * The smallest guest QEMU can boot for the boot-time comparison: a PVH entry point
 * (32-bit protected mode, paging off) that prints a line on COM1 and ends QEMU through
 * the isa-debug-exit device. It does what `hello; exit 0` does in luvisor's guest.
 */
    .section .note.Xen, "a"
    .align 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .align 4
    .long _start

    .text
    .code32
    .globl _start
_start:
    mov $message, %esi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, (%dx)
    jmp 1b
2:  mov $0xf4, %dx          /* isa-debug-exit: QEMU exits with (value << 1) | 1 */
    xor %eax, %eax
    out %eax, (%dx)
3:  hlt
    jmp 3b

message:
    .asciz "hello from qemu guest\n"
