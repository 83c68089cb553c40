// The manager's state directory: one JSON definition per VM (written atomically: a
// temporary file, fsync, rename, fsync of the directory, so a crash leaves the old or
// the new definition, never half of one), each running VM's run directory (console
// log, API socket, VMM pid), and the host limits.
//
//   <state>/vms/<name>.json      definitions
//   <state>/run/<name>/          console.log, api.sock, vmm.pid, config.json
//   <state>/limits.json          overcommit ratios (optional)
//   <state>/kiln.sock            the daemon's API
import { existsSync, chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { KilnError } from '../errors.js';
import { TMP_MARK, writeAll, writeFileAtomically } from '../atomic-file.js';
import { NAME_RULE, parseDefinition, type VmDefinition } from './definition.js';

export interface Limits {
  /** How many vCPUs per host CPU may be allotted in all. */
  readonly cpuOvercommit: number;
  /** How much guest memory per byte of host RAM may be allotted in all. */
  readonly memoryOvercommit: number;
}

export const DEFAULT_LIMITS: Limits = { cpuOvercommit: 4, memoryOvercommit: 1 };

/** Modes of everything in the state directory, whatever the umask. */
export const PRIVATE_DIR = 0o700;
/** The state directory with a kiln group: its members may reach the socket inside, not list or read. */
export const GROUP_TRAVERSE_DIR = 0o710;
export const PRIVATE_FILE = 0o600;

export function checkName(name: string): string {
  if (!NAME_RULE.test(name))
    throw new KilnError(
      `'${name}' is not a valid VM name (lower-case letters, digits and '-', starting with a letter or digit, at most 63)`,
    );
  return name;
}

/** The state directory: $KILN_STATE_DIR, else /var/lib/kiln for root, else $XDG_STATE_HOME/kiln or ~/.local/state/kiln. */
export function stateDir(): string {
  if (process.env.KILN_STATE_DIR) return process.env.KILN_STATE_DIR;
  if (process.getuid?.() === 0) return '/var/lib/kiln';
  return join(process.env.XDG_STATE_HOME ?? join(homedir(), '.local', 'state'), 'kiln');
}

/** Writes `text` to `path` so that a crash leaves either the old file or the new one. */
export function writeAtomically(path: string, text: string): void {
  writeFileAtomically(path, (fd) => writeAll(fd, Buffer.from(text)), PRIVATE_FILE);
}

/** Temporary files of writes a crash interrupted (the daemon sweeps them at start). */
export function sweepTemporaryFiles(dir: string): string[] {
  const swept = readdirSync(dir).filter((f) => f.includes(TMP_MARK));
  for (const f of swept) rmSync(join(dir, f), { force: true });
  return swept;
}

/** A definition file that cannot be read: reported, never deleted or overwritten. */
export interface BrokenDefinition {
  readonly name: string;
  readonly file: string;
  readonly error: string;
}

export class Store {
  readonly vmsDir: string;
  readonly runRoot: string;

  constructor(readonly dir: string = stateDir()) {
    this.vmsDir = join(dir, 'vms');
    this.runRoot = join(dir, 'run');
    // Private whatever the umask: definitions hold kernel command lines, run/ the console logs.
    // With a kiln group (KILN_GROUP), the group may pass through the top directory to the
    // daemon's socket, and nothing more. Only the owner sets modes (a group member cannot).
    try {
      for (const d of [dir, this.vmsDir, this.runRoot]) {
        mkdirSync(d, { recursive: true, mode: PRIVATE_DIR });
        if (statSync(d).uid === process.geteuid?.())
          chmodSync(d, d === dir && process.env.KILN_GROUP ? GROUP_TRAVERSE_DIR : PRIVATE_DIR);
      }
    } catch (err) {
      throw new KilnError(
        `cannot use the state directory ${dir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      );
    }
  }

  get socketPath(): string {
    return join(this.dir, 'kiln.sock');
  }

  runDir(name: string): string {
    return join(this.runRoot, name);
  }

  private file(name: string): string {
    return join(this.vmsDir, `${checkName(name)}.json`);
  }

  limits(): Limits {
    const path = join(this.dir, 'limits.json');
    if (!existsSync(path)) return DEFAULT_LIMITS;
    try {
      const raw = JSON.parse(readFileSync(path, 'utf8')) as Partial<Limits>;
      return { ...DEFAULT_LIMITS, ...raw };
    } catch (err) {
      throw new KilnError(`${path} is not valid JSON: ${(err as Error).message}`);
    }
  }

  /** Reads and checks one stored definition; throws with the reason it cannot be used. */
  private read(name: string, file: string): VmDefinition {
    let json: unknown;
    try {
      json = JSON.parse(readFileSync(file, 'utf8'));
    } catch (err) {
      throw new Error(`it is not JSON: ${(err as Error).message}`, { cause: err });
    }
    const d = parseDefinition(json);
    if (d.name !== name) throw new Error(`it names VM '${d.name}'`);
    return d;
  }

  /** Every definition that checks, and the files that do not (with the reason; left untouched). */
  list(): { vms: VmDefinition[]; broken: BrokenDefinition[] } {
    const vms: VmDefinition[] = [];
    const broken: BrokenDefinition[] = [];
    for (const entry of readdirSync(this.vmsDir).sort()) {
      if (!entry.endsWith('.json')) continue;
      const name = entry.slice(0, -'.json'.length);
      const file = join(this.vmsDir, entry);
      try {
        vms.push(this.read(name, file));
      } catch (err) {
        broken.push({ name, file, error: (err as Error).message });
      }
    }
    return { vms, broken };
  }

  get(name: string): VmDefinition {
    const file = this.file(name);
    if (!existsSync(file)) throw new KilnError(`no VM named '${name}'`);
    try {
      return this.read(name, file);
    } catch (err) {
      throw new KilnError(
        `the definition of '${name}' (${file}) is broken: ${(err as Error).message}; it is left as it is (fix it, or kiln rm ${name})`,
      );
    }
  }

  exists(name: string): boolean {
    return existsSync(this.file(name));
  }

  create(spec: VmDefinition): void {
    if (this.exists(spec.name)) throw new KilnError(`a VM named '${spec.name}' already exists`);
    writeAtomically(this.file(spec.name), `${JSON.stringify(spec, null, 2)}\n`);
  }

  remove(name: string): void {
    rmSync(this.file(name), { force: true });
    rmSync(this.runDir(name), { recursive: true, force: true });
  }
}
