// Driving the `kiln` command as a user does, for the manager's end-to-end tests: one
// run of the CLI against a state directory, and a question typed on a VM's console.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../src/cli.cjs', import.meta.url));

/** One `kiln ARGS` against state directory `stateDir` (with `input` on its stdin). */
export function kiln(stateDir: string, args: string[], input?: string) {
  return spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    env: { ...process.env, KILN_STATE_DIR: stateDir },
    timeout: 10 * 60_000,
    ...(input !== undefined ? { input } : {}),
  });
}

/** `kiln` run asynchronously (for concurrent calls). */
export function kilnAsync(
  stateDir: string,
  args: string[],
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, KILN_STATE_DIR: stateDir } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    child.on('exit', (status) => resolve({ status, stdout, stderr }));
  });
}

/**
 * Types `command` on VM `name`'s console until `answer` comes back after it, waiting
 * `linger` seconds each time (a busy guest answers slowly); returns the match.
 */
export function ask(
  dir: string,
  name: string,
  command: string,
  answer: RegExp,
  tries = 20,
  linger = 5,
): RegExpExecArray {
  let seen = '';
  for (let i = 0; i < tries; i++) {
    const r = kiln(dir, ['console', name, '--linger', String(linger)], `${command}\n`);
    seen = r.stdout;
    const m = answer.exec(seen.split(command).at(-1) ?? '');
    if (m) return m;
  }
  assert.fail(`'${name}' did not answer ${answer} to ${command}; its console ended with:\n${seen.slice(-1500)}`);
}

/** The kiln daemons serving `stateDir` (their environment names it). */
export function daemonsOf(stateDir: string): number[] {
  return spawnSync('pgrep', ['-f', `${CLI} daemon`], { encoding: 'utf8' })
    .stdout.split('\n')
    .filter(Boolean)
    .map(Number)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`KILN_STATE_DIR=${stateDir}`);
      } catch {
        return false;
      }
    });
}
