#!/usr/bin/env node
// `kiln-vmm`'s entry: a vCPU thread starts before anything else is evaluated, so its
// isolate boots on another core while this one evaluates the VMM (bundled into this file by
// scripts/bundle.mjs; vmm-main.ts is evaluated only when imported below). The rest is
// vmm-main.ts.
import { prewarm } from './warm-workers.js';

const argv = process.argv.slice(2);
const quick = ['--version', '--print-seccomp-filter', '--snapshot-version', '--describe-snapshot', '--help', '-h'];
if (!argv.some((a) => quick.includes(a))) prewarm('vcpu');
const { runVmm } = await import('./vmm-main.js');
await runVmm(argv);
