// What the net and netdev benchmarks share: bench/c/net-host.c, the host's own frames
// timed inside the C program ("frames=<n> bytes=<b> ns=<elapsed>"), and their run inside
// a network namespace of their own.
import { execFileSync, spawn } from 'node:child_process';

export interface NetCount {
  readonly frames: number;
  readonly bytes: number;
  readonly ns: number;
}

function parse(out: string): NetCount {
  const m = /frames=(\d+) bytes=(\d+) ns=(\d+)/.exec(out);
  if (!m) throw new Error(`net-host printed: ${out}`);
  return { frames: Number(m[1]), bytes: Number(m[2]), ns: Number(m[3]) };
}

/** Runs net-host (`exe`) with `args`, and the TAP as its fd 3 when one is given. */
export function runNetHost(exe: string, args: string[], tapFd: number | null): Promise<NetCount> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, args, { stdio: ['ignore', 'pipe', 'inherit', ...(tapFd === null ? [] : [tapFd])] });
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    child.on('error', reject);
    child.on('exit', (code) =>
      code === 0 ? resolve(parse(out)) : reject(new Error(`net-host ${args.join(' ')} exited ${code}: ${out}`)),
    );
  });
}

/**
 * Runs `node SCRIPT child DIR` inside a network namespace made for it (deleted after);
 * returns what it printed, by line (the benchmark's summary last).
 */
export async function runInNetns(name: string, script: string, dir: string): Promise<string[]> {
  execFileSync('ip', ['netns', 'add', name]);
  try {
    const out = await new Promise<string>((resolve, reject) => {
      const p = spawn('ip', ['netns', 'exec', name, process.execPath, script, 'child', dir], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      let text = '';
      p.stdout.on('data', (c: Buffer) => (text += c.toString()));
      p.on('exit', (code) =>
        code === 0 ? resolve(text) : reject(new Error(`the namespace run failed (${code}): ${text}`)),
      );
    });
    return out.trim().split('\n');
  } finally {
    execFileSync('ip', ['netns', 'del', name]);
  }
}
