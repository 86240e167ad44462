/*
 * aout-hello.S - the smallest Multiboot v1 kernel that uses the a.out kludge
 * (header flag bit 16): a flat binary whose header gives the load addresses.
 * It loads at 2 MiB, not 1 MiB, so a loader that ignores those addresses
 * fails visibly. Prints one line on COM1 and resets through the i8042.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010000		/* bit 16: addresses below are valid */
#define COM1 0x3f8

	.code32
	.text
	.globl _start
_start:					/* file offset 0 = load_addr */
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header			/* header_addr */
	.long _start			/* load_addr */
	.long _load_end			/* load_end_addr */
	.long _bss_end			/* bss_end_addr */
	.long entry			/* entry_addr */

entry:
	cli
	cld
	mov $stack_top, %esp
	cmp $0x2BADB002, %eax
	jne bad
	mov $msg_ok, %esi
	call puts
	testl $4, (%ebx)		/* flags bit 2: cmdline present */
	jz 1f
	mov 16(%ebx), %esi
	call puts
1:	mov $msg_nl, %esi
	call puts
	jmp reset
bad:
	mov $msg_bad, %esi
	call puts

reset:
	/* let the UART drain (LSR bit 6) so the reset cannot cut the line */
	mov $COM1 + 5, %dx
2:	in %dx, %al
	test $0x40, %al
	jz 2b
	/* wait until the i8042 can take a command, then pulse reset */
3:	in $0x64, %al
	test $0x02, %al
	jnz 3b
	mov $0xFE, %al
	out %al, $0x64
4:	cli
	hlt
	jmp 4b

/* puts(esi): poll LSR bit 5 (THR empty) before every byte */
puts:
	lodsb
	test %al, %al
	jz 6f
	mov %al, %ah
	mov $COM1 + 5, %dx
5:	in %dx, %al
	test $0x20, %al
	jz 5b
	mov $COM1, %dx
	mov %ah, %al
	out %al, %dx
	jmp puts
6:	ret

msg_ok:	.asciz "aout-hello: multiboot ok, cmdline="
msg_nl:	.asciz "\n"
msg_bad: .asciz "aout-hello: bad magic\n"

	.bss
	.balign 16
	.skip 1024
stack_top:
