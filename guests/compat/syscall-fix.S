/*
 * kvm_pvm's user-mode `syscall` jumps to LSTAR but leaves CS and SS at the user
 * selectors, so the kernel's first instruction faults with a user-mode instruction
 * fetch #PF at LSTAR. Kiln points IDT vector 14 here (only on kvm_pvm). If the fault is
 * exactly that one, rewrite the frame's CS/SS to the kernel's selectors, drop the error
 * code and return: the CPU resumes at LSTAR in kernel mode with the user's RSP, RCX
 * and R11, as a working `syscall` would have left it. Any other fault goes on to the
 * kernel's own #PF handler. Position-independent: Kiln fills the two slots at install.
 *
 * Frame on entry: 0 error code, 8 RIP, 16 CS, 24 RFLAGS, 32 RSP, 40 SS.
 */
#define KERNEL_CS 0x10
#define KERNEL_DS 0x18

	.globl	syscall_fix
syscall_fix:
	push	%rax
	mov	lstar(%rip), %rax
	cmp	%rax, 16(%rsp)
	jne	1f
	testb	$3, 24(%rsp)
	jz	1f
	movq	$KERNEL_CS, 24(%rsp)
	movq	$KERNEL_DS, 48(%rsp)
	pop	%rax
	add	$8, %rsp
	iretq
1:	pop	%rax
	jmp	*original_handler(%rip)

	.balign	8
lstar:
	.quad	0
original_handler:
	.quad	0
