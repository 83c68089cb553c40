// A stand-in for a running kiln-vmm, for the dashboard's console tests on hosts without
// /dev/kvm: it answers the few API calls the manager makes of a VMM (GET /, PATCH /vm,
// PUT /actions, GET /kiln/counters) on <run>/api.sock, and plays a guest's serial
// console on <run>/serial.sock, as kiln-vmm's serial socket does (output to every
// client, dropped for a client whose socket is full; input from any): it echoes what is
// typed and answers each line with `fake-guest: <line>`; the line `flood N` sends N
// bytes of output at once. Its file name ends in vmm-cli.js and it takes --id NAME, so
// the manager recognises it as that VM's VMM.
//
//   node fake-vmm-cli.js --id NAME --run DIR
import { rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';

const arg = (flag: string) => process.argv[process.argv.indexOf(flag) + 1] ?? '';
const id = arg('--id');
const run = arg('--run');
let state = 'Running';
let sent = 0;
const clients = new Set<Socket>();

function broadcast(bytes: Buffer): void {
  sent += bytes.length;
  for (const c of clients) if (c.writableLength < 256 * 1024) c.write(bytes);
}

let line = '';
const serial = createServer((client) => {
  clients.add(client);
  // What a guest's console shows whoever attaches: a line, then its prompt.
  client.write('fake-guest: up\r\n$ ');
  client.on('close', () => clients.delete(client));
  client.on('error', () => client.destroy());
  client.on('data', (data: Buffer) => {
    for (const byte of data) {
      if (byte === 0x0d || byte === 0x0a) {
        const typed = line;
        line = '';
        const flood = /^flood (\d+)$/.exec(typed);
        broadcast(Buffer.from(`\r\nfake-guest: ${typed}\r\n`));
        if (flood) broadcast(Buffer.alloc(Number(flood[1]), 'x'));
        broadcast(Buffer.from('$ '));
      } else {
        line += String.fromCharCode(byte);
        broadcast(Buffer.from([byte]));
      }
    }
  });
});

const api = createHttpServer((req, res) => {
  let body = '';
  req.setEncoding('utf8').on('data', (c: string) => (body += c));
  req.on('end', () => {
    const send = (status: number, doc?: unknown) => {
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(doc === undefined ? '' : JSON.stringify(doc));
    };
    if (req.method === 'GET' && req.url === '/') return send(200, { app_name: 'Firecracker', id, state });
    if (req.method === 'GET' && req.url === '/kiln/counters')
      return send(200, { block: { readBytes: sent * 2, writeBytes: sent }, net: { rxBytes: sent, txBytes: 0 } });
    if (req.method === 'PATCH' && req.url === '/vm') {
      state = (JSON.parse(body) as { state: string }).state === 'Paused' ? 'Paused' : 'Running';
      return send(204);
    }
    if (req.method === 'PUT' && req.url === '/actions') {
      send(204);
      broadcast(Buffer.from('\r\nfake-guest: powering off\r\n'));
      setTimeout(() => process.exit(0), 200);
      return;
    }
    send(400, { fault_message: `the fake VMM has no ${req.method} ${req.url}` });
  });
});

for (const s of ['api.sock', 'serial.sock']) rmSync(join(run, s), { force: true });
serial.listen(join(run, 'serial.sock'), () =>
  api.listen(join(run, 'api.sock'), () => {
    writeFileSync(join(run, 'vmm.pid'), String(process.pid));
  }),
);
process.on('SIGTERM', () => process.exit(0));
