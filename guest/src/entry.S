/*
 * entry.S - Multiboot v1 entry of the Tern test guest.
 *
 * The loader leaves us in 32-bit protected mode without paging. We build an
 * identity map of the first 4 GiB with 2 MiB pages (kmain adds more if there
 * is RAM above 4 GiB), switch to long mode and call kmain in C. Everything
 * here runs in ring 0, which PVM emulates at ~1M instructions/s: keep loops
 * few and short.
 */

#define MB_MAGIC 0x1BADB002
/* bit 1: we want mem_lower/mem_upper and the memory map. Bit 16 (a.out
   kludge) stays clear: this is an ELF kernel, loaded by its program header. */
#define MB_FLAGS 0x00000002
#define MB_BOOT_MAGIC 0x2BADB002

#define KCODE 0x08
#define KDATA 0x10
#define UDATA (0x18 | 3)
#define UCODE (0x20 | 3)

/* page-table entry bits: present, writable, user (ring 3 may touch all of
   it: this is a test guest), and PS for 2 MiB pages */
#define PTE_TABLE 0x07
#define PTE_2M 0x87

	.section .multiboot, "a"
	.balign 4
	.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

	.section .text.boot, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	mov $boot_stack_top, %esp
	mov %eax, %esi
	mov %ebx, mb_info
	rdtsc
	mov %eax, boot_tsc
	mov %edx, boot_tsc + 4
	cmp $MB_BOOT_MAGIC, %esi
	jne bad_magic

	/* The loader should zero .bss, but stale entries in these two tables
	   would map garbage, so clear them ourselves (2 pages, cheap). */
	mov $pml4, %edi
	xor %eax, %eax
	mov $2048, %ecx
	rep stosl
	movl $(pdpt + PTE_TABLE), pml4
	movl $(pd + 0 * 4096 + PTE_TABLE), pdpt + 0
	movl $(pd + 1 * 4096 + PTE_TABLE), pdpt + 8
	movl $(pd + 2 * 4096 + PTE_TABLE), pdpt + 16
	movl $(pd + 3 * 4096 + PTE_TABLE), pdpt + 24

	/* 2048 entries of 2 MiB = 4 GiB; EAX wraps to 0 at the end, harmless */
	mov $pd, %edi
	mov $PTE_2M, %eax
	mov $2048, %ecx
1:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x200000, %eax
	add $8, %edi
	dec %ecx
	jnz 1b

	lgdt gdt_ptr
	mov %cr4, %eax
	or $0x20, %eax			/* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xC0000080, %ecx		/* EFER */
	rdmsr
	or $0x100, %eax			/* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax		/* PG | PE */
	mov %eax, %cr0
	ljmp $KCODE, $long_mode

	/* No stack or IDT worth trusting yet: print with the bare UART. */
bad_magic:
	mov $bad_magic_msg, %esi
2:	lodsb
	test %al, %al
	jz 4f
	mov %al, %ah
	mov $0x3fd, %dx
3:	in %dx, %al
	test $0x20, %al
	jz 3b
	mov $0x3f8, %dx
	mov %ah, %al
	out %al, %dx
	jmp 2b
4:	cli
	hlt
	jmp 4b

	.code64
long_mode:
	mov $KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	lgdt gdt_ptr			/* again, now with a 64-bit base */
	mov $boot_stack_top, %rsp
	call kmain
5:	cli
	hlt
	jmp 5b

/* ---------------------------------------------------------------- */
	.text
	.code64

/* enter_user(rip, rsp): drop to ring 3 for good. RFLAGS = 0x2: IF stays off
   (no interrupts are used) and IOPL 0 (PVM drops an IOPL set this way). */
	.globl enter_user
enter_user:
	mov $UDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	pushq $UDATA
	pushq %rsi
	pushq $0x2
	pushq $UCODE
	pushq %rdi
	iretq

/* Exception stubs: give every vector the same frame (an error code, real or
   0, then the vector) so one C handler serves them all. */
	.macro ISR vec, has_err
isr\vec:
	.if \has_err == 0
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
	.endm

	ISR 0, 0
	ISR 1, 0
	ISR 2, 0
	ISR 3, 0
	ISR 4, 0
	ISR 5, 0
	ISR 6, 0
	ISR 7, 0
	ISR 8, 1
	ISR 9, 0
	ISR 10, 1
	ISR 11, 1
	ISR 12, 1
	ISR 13, 1
	ISR 14, 1
	ISR 15, 0
	ISR 16, 0
	ISR 17, 1
	ISR 18, 0
	ISR 19, 0
	ISR 20, 0
	ISR 21, 1
	ISR 22, 0
	ISR 23, 0
	ISR 24, 0
	ISR 25, 0
	ISR 26, 0
	ISR 27, 0
	ISR 28, 0
	ISR 29, 1
	ISR 30, 1
	ISR 31, 0

/* Saves all general registers in the order of struct frame (kernel.c); the
   handler may edit the frame (the system call moves RIP past its tag). */
isr_common:
	push %rax
	push %rcx
	push %rdx
	push %rbx
	push %rbp
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	cld
	call exception_handler
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rbp
	pop %rbx
	pop %rdx
	pop %rcx
	pop %rax
	add $16, %rsp			/* vector and error code */
	iretq

	.section .rodata
	.balign 8
	.globl isr_table
isr_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\v
	.endr

bad_magic_msg:
	.asciz "tern-guest: bad multiboot magic\n"

/* ---------------------------------------------------------------- */
	.data
	.balign 8
	.globl boot_tsc, mb_info
boot_tsc:
	.quad 0
mb_info:
	.long 0

	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF	/* 0x08 ring-0 code, 64-bit */
	.quad 0x00CF92000000FFFF	/* 0x10 ring-0 data */
	.quad 0x00CFF2000000FFFF	/* 0x18 ring-3 data */
	.quad 0x00AFFA000000FFFF	/* 0x20 ring-3 code, 64-bit */
	.quad 0, 0			/* 0x28 64-bit TSS, filled in by kmain */
gdt_end:
	.balign 8
	.word 0				/* so that gdt_ptr's base is aligned */
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

/* The status page lives at a fixed address (see guest.ld); it is part of the
   image so every loader puts zeros there. */
	.section .status, "aw"
	.globl status_page
status_page:
	.skip 4096

	.bss
	.balign 4096
	.globl pml4, pdpt, pd
pml4:	.skip 4096
pdpt:	.skip 4096			/* must follow pml4: cleared together */
pd:	.skip 16 * 4096			/* up to 16 GiB of 2 MiB pages */

	.balign 16
	.globl boot_stack_top
boot_stack:
	.skip 16384
boot_stack_top:
