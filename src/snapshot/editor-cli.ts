#!/usr/bin/env node
// `kiln-snapshot-editor`: Firecracker's snapshot-editor verbs for Kiln's snapshot files, so
// a script that keeps Diff snapshots with Firecracker keeps them with Kiln:
//   edit-memory rebase --memory-path BASE --diff-path DIFF   lays a Diff's memory over its base
//   info-vmstate version --vmstate-path STATE                what a state file is
import { Command } from 'commander';
import { KilnError } from '../errors.js';
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE } from '../exit-status.js';
import { KILN_VERSION } from '../version.js';
import { readStateFile, SNAPSHOT_VERSION } from './format.js';
import { rebaseMemoryFile } from './memory-file.js';

function main(argv: readonly string[]): number {
  let status = EXIT_OK;
  const program = new Command('kiln-snapshot-editor')
    .description("Edits and inspects Kiln's snapshot files (Firecracker's snapshot-editor verbs)")
    .version(`kiln-snapshot-editor ${KILN_VERSION}`, '--version')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  const memory = program.command('edit-memory').description('edits memory files');
  memory
    .command('rebase')
    .description("lays a Diff snapshot's memory file over the memory file it was taken after, in place")
    .requiredOption('--memory-path <path>', 'the base memory file (a Full snapshot, or one already rebased)')
    .requiredOption('--diff-path <path>', "the Diff snapshot's memory file")
    .action((o: { memoryPath: string; diffPath: string }) => {
      const copied = rebaseMemoryFile(o.memoryPath, o.diffPath);
      process.stdout.write(`${o.memoryPath}: ${copied} bytes of ${o.diffPath} laid over it\n`);
    });
  const info = program.command('info-vmstate').description('tells what a state file is');
  info
    .command('version')
    .description("the state file's format version, the Kiln that wrote it and its type")
    .requiredOption('--vmstate-path <path>', 'the snapshot (state) file')
    .action((o: { vmstatePath: string }) => {
      const body = readStateFile(o.vmstatePath) as { kiln?: unknown; memoryType?: unknown };
      process.stdout.write(
        `v${SNAPSHOT_VERSION} (Kiln snapshot format; written by Kiln ${String(body.kiln ?? 'unknown')}; ${String(body.memoryType ?? 'Full')})\n`,
      );
    });
  try {
    program.parse(argv, { from: 'user' });
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'commander.helpDisplayed' || code === 'commander.version') return EXIT_OK;
    if (code?.startsWith('commander.')) return EXIT_USAGE;
    if (!(err instanceof KilnError)) throw err;
    process.stderr.write(`kiln-snapshot-editor: ${err.message}\n`);
    status = EXIT_ERROR;
  }
  return status;
}

process.exitCode = main(process.argv.slice(2));
