// Every struct Kiln passes to or reads from KVM, declared once, as in <linux/kvm.h> and
// <asm/kvm.h> for x86-64. test/kvm/structs.test.ts compiles the machine's headers with
// gcc and checks each size and each field offset below against them.
import { array, struct, union } from './struct.js';

export const kvm_userspace_memory_region = struct('kvm_userspace_memory_region', [
  ['slot', 'u32'],
  ['flags', 'u32'],
  ['guest_phys_addr', 'u64'],
  ['memory_size', 'u64'],
  ['userspace_addr', 'u64'],
]);

export const kvm_regs = struct('kvm_regs', [
  ...(['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp'] as const).map((r) => [r, 'u64'] as const),
  ...(['r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'] as const).map((r) => [r, 'u64'] as const),
]);

export const kvm_segment = struct('kvm_segment', [
  ['base', 'u64'],
  ['limit', 'u32'],
  ['selector', 'u16'],
  ['type', 'u8'],
  ['present', 'u8'],
  ['dpl', 'u8'],
  ['db', 'u8'],
  ['s', 'u8'],
  ['l', 'u8'],
  ['g', 'u8'],
  ['avl', 'u8'],
  ['unusable', 'u8'],
  ['padding', 'u8'],
]);

export const kvm_dtable = struct('kvm_dtable', [
  ['base', 'u64'],
  ['limit', 'u16'],
  ['padding', array('u16', 3)],
]);

/** KVM_NR_INTERRUPTS is 256: the pending-interrupt bitmap is four u64 words. */
export const kvm_sregs = struct('kvm_sregs', [
  ['cs', kvm_segment],
  ['ds', kvm_segment],
  ['es', kvm_segment],
  ['fs', kvm_segment],
  ['gs', kvm_segment],
  ['ss', kvm_segment],
  ['tr', kvm_segment],
  ['ldt', kvm_segment],
  ['gdt', kvm_dtable],
  ['idt', kvm_dtable],
  ['cr0', 'u64'],
  ['cr2', 'u64'],
  ['cr3', 'u64'],
  ['cr4', 'u64'],
  ['cr8', 'u64'],
  ['efer', 'u64'],
  ['apic_base', 'u64'],
  ['interrupt_bitmap', array('u64', 4)],
]);

export const kvm_fpu = struct('kvm_fpu', [
  ['fpr', array('u8', 8 * 16)],
  ['fcw', 'u16'],
  ['fsw', 'u16'],
  ['ftwx', 'u8'],
  ['pad1', 'u8'],
  ['last_opcode', 'u16'],
  ['last_ip', 'u64'],
  ['last_dp', 'u64'],
  ['xmm', array('u8', 16 * 16)],
  ['mxcsr', 'u32'],
  ['pad2', 'u32'],
]);

export const kvm_msr_entry = struct('kvm_msr_entry', [
  ['index', 'u32'],
  ['reserved', 'u32'],
  ['data', 'u64'],
]);

export const kvm_msrs = struct(
  'kvm_msrs',
  [
    ['nmsrs', 'u32'],
    ['pad', 'u32'],
  ],
  ['entries', kvm_msr_entry],
);

export const kvm_msr_list = struct('kvm_msr_list', [['nmsrs', 'u32']], ['indices', 'u32']);

export const kvm_cpuid_entry2 = struct('kvm_cpuid_entry2', [
  ['function', 'u32'],
  ['index', 'u32'],
  ['flags', 'u32'],
  ['eax', 'u32'],
  ['ebx', 'u32'],
  ['ecx', 'u32'],
  ['edx', 'u32'],
  ['padding', array('u32', 3)],
]);

export const kvm_cpuid2 = struct(
  'kvm_cpuid2',
  [
    ['nent', 'u32'],
    ['padding', 'u32'],
  ],
  ['entries', kvm_cpuid_entry2],
);

/** KVM_APIC_REG_SIZE is 0x400. */
export const kvm_lapic_state = struct('kvm_lapic_state', [['regs', array('u8', 0x400)]]);

export const kvm_vcpu_events = struct('kvm_vcpu_events', [
  [
    'exception',
    struct('kvm_vcpu_events.exception', [
      ['injected', 'u8'],
      ['nr', 'u8'],
      ['has_error_code', 'u8'],
      ['pending', 'u8'],
      ['error_code', 'u32'],
    ]),
  ],
  [
    'interrupt',
    struct('kvm_vcpu_events.interrupt', [
      ['injected', 'u8'],
      ['nr', 'u8'],
      ['soft', 'u8'],
      ['shadow', 'u8'],
    ]),
  ],
  [
    'nmi',
    struct('kvm_vcpu_events.nmi', [
      ['injected', 'u8'],
      ['pending', 'u8'],
      ['masked', 'u8'],
      ['pad', 'u8'],
    ]),
  ],
  ['sipi_vector', 'u32'],
  ['flags', 'u32'],
  [
    'smi',
    struct('kvm_vcpu_events.smi', [
      ['smm', 'u8'],
      ['pending', 'u8'],
      ['smm_inside_nmi', 'u8'],
      ['latched_init', 'u8'],
    ]),
  ],
  ['triple_fault', struct('kvm_vcpu_events.triple_fault', [['pending', 'u8']])],
  ['reserved', array('u8', 26)],
  ['exception_has_payload', 'u8'],
  ['exception_payload', 'u64'],
]);

export const kvm_mp_state = struct('kvm_mp_state', [['mp_state', 'u32']]);

export const kvm_translation = struct('kvm_translation', [
  ['linear_address', 'u64'],
  ['physical_address', 'u64'],
  ['valid', 'u8'],
  ['writeable', 'u8'],
  ['usermode', 'u8'],
  ['pad', array('u8', 5)],
]);

export const kvm_irq_level = struct('kvm_irq_level', [
  [
    '',
    union('kvm_irq_level.u', [
      ['irq', 'u32'],
      ['status', 'i32'],
    ]),
  ],
  ['level', 'u32'],
]);

export const kvm_pit_config = struct('kvm_pit_config', [
  ['flags', 'u32'],
  ['pad', array('u32', 15)],
]);

export const kvm_irqfd = struct('kvm_irqfd', [
  ['fd', 'u32'],
  ['gsi', 'u32'],
  ['flags', 'u32'],
  ['resamplefd', 'u32'],
  ['pad', array('u8', 16)],
]);

export const kvm_ioeventfd = struct('kvm_ioeventfd', [
  ['datamatch', 'u64'],
  ['addr', 'u64'],
  ['len', 'u32'],
  ['fd', 'i32'],
  ['flags', 'u32'],
  ['pad', array('u8', 36)],
]);

export const kvm_msi = struct('kvm_msi', [
  ['address_lo', 'u32'],
  ['address_hi', 'u32'],
  ['data', 'u32'],
  ['flags', 'u32'],
  ['devid', 'u32'],
  ['pad', array('u8', 12)],
]);

export const kvm_irq_routing_irqchip = struct('kvm_irq_routing_irqchip', [
  ['irqchip', 'u32'],
  ['pin', 'u32'],
]);

export const kvm_irq_routing_msi = struct('kvm_irq_routing_msi', [
  ['address_lo', 'u32'],
  ['address_hi', 'u32'],
  ['data', 'u32'],
  [
    '',
    union('kvm_irq_routing_msi.u', [
      ['pad', 'u32'],
      ['devid', 'u32'],
    ]),
  ],
]);

export const kvm_irq_routing_entry = struct('kvm_irq_routing_entry', [
  ['gsi', 'u32'],
  ['type', 'u32'],
  ['flags', 'u32'],
  ['pad', 'u32'],
  [
    'u',
    union('kvm_irq_routing_entry.u', [
      ['irqchip', kvm_irq_routing_irqchip],
      ['msi', kvm_irq_routing_msi],
      ['pad', array('u32', 8)],
    ]),
  ],
]);

export const kvm_irq_routing = struct(
  'kvm_irq_routing',
  [
    ['nr', 'u32'],
    ['flags', 'u32'],
  ],
  ['entries', kvm_irq_routing_entry],
);

export const kvm_enable_cap = struct('kvm_enable_cap', [
  ['cap', 'u32'],
  ['flags', 'u32'],
  ['args', array('u64', 4)],
  ['pad', array('u8', 64)],
]);

/** The kernel's sigset is 8 bytes on x86-64; `len` must say so. */
export const kvm_signal_mask = struct('kvm_signal_mask', [['len', 'u32']], ['sigset', 'u8']);

/**
 * The shared vCPU page. Only the exit-union members Kiln decodes are declared; the
 * union's 256-byte padding member fixes its size as the kernel does.
 */
export const kvm_run = struct('kvm_run', [
  ['request_interrupt_window', 'u8'],
  ['immediate_exit', 'u8'],
  ['padding1', array('u8', 6)],
  ['exit_reason', 'u32'],
  ['ready_for_interrupt_injection', 'u8'],
  ['if_flag', 'u8'],
  ['flags', 'u16'],
  ['cr8', 'u64'],
  ['apic_base', 'u64'],
  [
    '',
    union('kvm_run.exit', [
      ['hw', struct('kvm_run.hw', [['hardware_exit_reason', 'u64']])],
      [
        'fail_entry',
        struct('kvm_run.fail_entry', [
          ['hardware_entry_failure_reason', 'u64'],
          ['cpu', 'u32'],
        ]),
      ],
      [
        'ex',
        struct('kvm_run.ex', [
          ['exception', 'u32'],
          ['error_code', 'u32'],
        ]),
      ],
      [
        'io',
        struct('kvm_run.io', [
          ['direction', 'u8'],
          ['size', 'u8'],
          ['port', 'u16'],
          ['count', 'u32'],
          ['data_offset', 'u64'],
        ]),
      ],
      [
        'mmio',
        struct('kvm_run.mmio', [
          ['phys_addr', 'u64'],
          ['data', array('u8', 8)],
          ['len', 'u32'],
          ['is_write', 'u8'],
        ]),
      ],
      [
        'internal',
        struct('kvm_run.internal', [
          ['suberror', 'u32'],
          ['ndata', 'u32'],
          ['data', array('u64', 16)],
        ]),
      ],
      [
        'emulation_failure',
        struct('kvm_run.emulation_failure', [
          ['suberror', 'u32'],
          ['ndata', 'u32'],
          ['flags', 'u64'],
          [
            '',
            union('kvm_run.emulation_failure.u', [
              [
                '',
                struct('kvm_run.emulation_failure.insn', [
                  ['insn_size', 'u8'],
                  ['insn_bytes', array('u8', 15)],
                ]),
              ],
            ]),
          ],
        ]),
      ],
      [
        'system_event',
        struct('kvm_run.system_event', [
          ['type', 'u32'],
          ['ndata', 'u32'],
          [
            '',
            union('kvm_run.system_event.u', [
              ['flags', 'u64'],
              ['data', array('u64', 16)],
            ]),
          ],
        ]),
      ],
      ['padding', array('u8', 256)],
    ]),
  ],
  ['kvm_valid_regs', 'u64'],
  ['kvm_dirty_regs', 'u64'],
  ['s', union('kvm_run.s', [['padding', array('u8', 2048)]])],
]);

/** Every top-level struct, by its C name, for the layout check against the headers. */
export const allStructs = [
  kvm_userspace_memory_region,
  kvm_regs,
  kvm_segment,
  kvm_dtable,
  kvm_sregs,
  kvm_fpu,
  kvm_msr_entry,
  kvm_msrs,
  kvm_msr_list,
  kvm_cpuid_entry2,
  kvm_cpuid2,
  kvm_lapic_state,
  kvm_vcpu_events,
  kvm_mp_state,
  kvm_translation,
  kvm_irq_level,
  kvm_pit_config,
  kvm_irqfd,
  kvm_ioeventfd,
  kvm_msi,
  kvm_irq_routing_irqchip,
  kvm_irq_routing_msi,
  kvm_irq_routing_entry,
  kvm_irq_routing,
  kvm_enable_cap,
  kvm_signal_mask,
  kvm_run,
];
