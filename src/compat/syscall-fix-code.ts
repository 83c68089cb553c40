// guests/compat/syscall-fix.S assembled at address 0 (it is position-independent), kept as
// bytes so the VMM never runs an assembler (a jailed VMM has none). test/compat checks
// these bytes against a fresh assembly of the source.
export const SYSCALL_FIX_HEX = [
  '50488b053000000048394424107520f644241803741948c74424181000000048c744243018000000584883c40848cf58',
  'ff250a000000669000000000000000000000000000000000',
].join('');
