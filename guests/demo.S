/*
 * Kiln's built-in demo guest. Kiln starts every vCPU in 32-bit protected mode at
 * ring 3 (IOPL 3), so it needs no boot code. %edi holds the vCPU's index and %esi
 * the vCPU count. The other vCPUs check in through a shared counter; vCPU 0 waits for
 * them, prints a greeting through the COM1 UART, reports a progress code, and asks
 * the VMM to end the VM with status 0.
 */
#define UART_LSR 5
#define UART_LSR_THRE 0x20
#define PROGRESS_DEMO_DONE 0x600d

_start:
	test	%edi, %edi
	jz	bsp
	lock incl checked_in
1:	pause
	jmp	1b

bsp:
	mov	%esi, %ebp		/* vCPU count */
	dec	%esi
2:	cmp	%esi, checked_in	/* wait for every other vCPU */
	jb	2b
	mov	$banner, %esi
	call	puts
	mov	%ebp, %eax
	call	putnum
	mov	$tail, %esi
	call	puts
	mov	$PORT_PROGRESS, %dx
	mov	$PROGRESS_DEMO_DONE, %eax
	out	%eax, %dx
	mov	$PORT_DEBUG_EXIT, %dx
	xor	%eax, %eax
	out	%al, %dx
3:	jmp	3b

/* Writes the NUL-terminated string at %esi to COM1, waiting for THRE before each byte. */
puts:
	lodsb
	test	%al, %al
	jz	5f
	call	putc
	jmp	puts
5:	ret

/* Writes %al to COM1 once the transmitter holding register is empty. */
putc:
	mov	%al, %bl
	mov	$(PORT_COM1 + UART_LSR), %dx
6:	in	%dx, %al
	test	$UART_LSR_THRE, %al
	jz	6b
	mov	$PORT_COM1, %dx
	mov	%bl, %al
	out	%al, %dx
	ret

/* Writes %eax in decimal. */
putnum:
	mov	$10, %ecx
	xor	%edx, %edx
	div	%ecx
	test	%eax, %eax
	jz	7f
	push	%edx
	call	putnum
	pop	%edx
7:	mov	%dl, %al
	add	$'0', %al
	jmp	putc

banner:
	.asciz	"Hello from the Kiln demo guest!\nRunning in 32-bit protected mode at ring 3 on "
tail:
	.asciz	" vCPU(s), talking to a 16550 UART over port I/O.\n"
	.balign	4
checked_in:
	.long	0
