// Kiln's version: package.json's, the one place it is written.
import { readFileSync } from 'node:fs';

export const KILN_VERSION: string = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
