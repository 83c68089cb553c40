// A JSON request body, read whole (at most 1 MiB), for the daemon's API and the
// dashboard's: an oversized or malformed body is the request's error (a 400), never
// the server's.
import type { IncomingMessage } from 'node:http';
import { KilnError } from '../errors.js';

export const MAX_JSON_BODY_BYTES = 1024 * 1024;

/** The body parsed as JSON; an empty body is `{}`. */
export function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_JSON_BODY_BYTES) {
        reject(new KilnError(`the request body is larger than ${MAX_JSON_BODY_BYTES} bytes`));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        resolve(text ? (JSON.parse(text) as unknown) : {});
      } catch (err) {
        reject(new KilnError(`the request body is not JSON: ${(err as Error).message}`));
      }
    });
    req.on('error', reject);
  });
}
