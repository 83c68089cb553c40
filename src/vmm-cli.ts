#!/usr/bin/env node
// `kiln-vmm`'s entry: a vCPU thread starts before anything else is evaluated, so its
// isolate boots on another core while this one evaluates the VMM (bundled into this file by
// scripts/bundle.mjs; vmm-main.ts is evaluated only when imported below). The rest is
// vmm-main.ts.
import { setFlagsFromString } from 'node:v8';
import { prewarm } from './warm-workers.js';

const argv = process.argv.slice(2);
const quick = ['--version', '--print-seccomp-filter', '--help', '-h'];
const configured = argv.some((a) => /^--(config-file|kiln-config)(=|$)/.test(a));
// A VMM that waits for its API (a pool process, one started ahead): V8 sized for a small
// resident set, ~6 MiB less per VMM. Not for a cold start, where it costs ~35 ms of
// compiling (both measured: bench/RESULTS.md, launch).
if (!configured) setFlagsFromString('--optimize-for-size');
if (!argv.some((a) => quick.includes(a))) prewarm('vcpu');
const { runVmm } = await import('./vmm-main.js');
await runVmm(argv);
