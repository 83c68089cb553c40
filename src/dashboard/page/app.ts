// The dashboard's page: the VM list with live charts, a VM's page (configuration,
// console, log, actions, snapshots), the create form, the host's capacity. Plain DOM, no
// framework: one small bundle (esbuild) with xterm.js. Live data comes from the server
// over one WebSocket (/ws/events, a sample a second); the page never polls. Text from
// the server is always set as text (textContent), never parsed as HTML.
import '@xterm/xterm/css/xterm.css';
import './style.css';
import { Terminal } from '@xterm/xterm';
import { AttachAddon } from '@xterm/addon-attach';
import { FitAddon } from '@xterm/addon-fit';
import type { HostSample, Sample, VmSample } from '../wire.js';
import { uptimeText } from '../../duration.js';

const HISTORY = 60;
const CSRF = document.querySelector<HTMLMetaElement>('meta[name="kiln-csrf"]')?.content ?? '';
const main = document.getElementById('main') as HTMLElement;
const live = document.getElementById('live') as HTMLElement;

// ---- small DOM helpers ----

type Child = Node | string | null | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | ((e: Event) => void)> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else if (v !== false) el.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';

/** A small line chart of the last values (0..max), labelled for screen readers. */
function sparkline(label: string): { el: SVGSVGElement; set: (values: readonly number[], max: number) => void } {
  const el = document.createElementNS(SVG, 'svg');
  el.setAttribute('viewBox', `0 0 ${HISTORY} 20`);
  el.setAttribute('preserveAspectRatio', 'none');
  el.setAttribute('class', 'spark');
  el.setAttribute('role', 'img');
  el.setAttribute('aria-label', label);
  const line = document.createElementNS(SVG, 'polyline');
  el.append(line);
  return {
    el,
    set(values, max) {
      const top = Math.max(max, 1e-9);
      const start = HISTORY - values.length;
      line.setAttribute(
        'points',
        values.map((v, i) => `${start + i},${(20 - Math.min(1, v / top) * 19 - 0.5).toFixed(2)}`).join(' '),
      );
    },
  };
}

const mib = (n: number) => (n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)} GiB` : `${n} MiB`);
function bytes(n: number | null): string {
  if (n === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}
const rate = (n: number | null) => (n === null ? '–' : `${bytes(n)}/s`);
const sum = (a: number | null, b: number | null) => (a === null && b === null ? null : (a ?? 0) + (b ?? 0));

const uptime = (startedAt: string | null, now: number) => uptimeText(startedAt, now, 2);

// ---- the server's API ----

class ApiError extends Error {
  constructor(
    message: string,
    readonly field: string | undefined,
  ) {
    super(message);
  }
}

async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(`/api${path}`, {
    method,
    headers: {
      ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}),
      ...(method !== 'GET' ? { 'X-Kiln-CSRF': CSRF } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    credentials: 'same-origin',
  });
  let payload: unknown = null;
  try {
    payload = await res.json();
  } catch {
    // Not JSON: say what came back.
  }
  if (!res.ok) {
    const e = payload as { error?: string; field?: string } | null;
    throw new ApiError(e?.error ?? `${res.status} ${res.statusText}`, e?.field);
  }
  return payload as T;
}

// ---- live samples ----

interface History {
  cpu: number[];
  memory: number[];
  disk: number[];
  net: number[];
}

const state = {
  sample: null as Sample | null,
  history: new Map<string, History>(),
  listeners: new Set<(s: Sample) => void>(),
};

function remember(s: Sample): void {
  for (const vm of s.vms) {
    let hist = state.history.get(vm.name);
    if (!hist) state.history.set(vm.name, (hist = { cpu: [], memory: [], disk: [], net: [] }));
    const push = (a: number[], v: number | null) => {
      a.push(v ?? 0);
      if (a.length > HISTORY) a.shift();
    };
    push(hist.cpu, vm.cpuPercent);
    push(hist.memory, vm.memoryBytes);
    push(hist.disk, sum(vm.diskReadBps, vm.diskWriteBps));
    push(hist.net, sum(vm.netRxBps, vm.netTxBps));
  }
  for (const name of state.history.keys()) if (!s.vms.some((v) => v.name === name)) state.history.delete(name);
}

const socketUrl = (path: string) => `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}`;

function watch(): void {
  let backoff = 500;
  const connect = () => {
    const ws = new WebSocket(socketUrl('/ws/events'));
    ws.onopen = () => {
      backoff = 500;
      live.textContent = 'live';
      live.className = 'live on';
    };
    ws.onmessage = (e) => {
      const s = JSON.parse(String(e.data)) as Sample;
      if (s.type !== 'sample') return;
      state.sample = s;
      remember(s);
      for (const l of state.listeners) l(s);
    };
    ws.onclose = (e) => {
      live.textContent = e.code === 1006 && backoff > 4000 ? 'disconnected (is the daemon running?)' : 'reconnecting…';
      live.className = 'live off';
      // Reconnects after a daemon restart; waits longer each time, up to 10 s.
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10_000);
    };
  };
  connect();
}

/** Calls `fn` with every sample while `el` is on the page. */
function onSample(el: HTMLElement, fn: (s: Sample) => void): void {
  const listener = (s: Sample) => {
    if (!el.isConnected) state.listeners.delete(listener);
    else fn(s);
  };
  state.listeners.add(listener);
  if (state.sample) fn(state.sample);
}

// ---- the notices line ----

function notice(region: HTMLElement, text: string, kind: 'ok' | 'error' = 'ok'): void {
  region.textContent = text;
  region.className = `notice ${kind}`;
}

// ---- the VM list ----

function hostCard(): HTMLElement {
  const cpu = h('dd');
  const mem = h('dd');
  const hostLine = h('dd');
  const card = h(
    'section',
    { class: 'card host', 'aria-labelledby': 'host-h' },
    h('h2', { id: 'host-h' }, 'Host capacity'),
    h('dl', {}, h('dt', {}, 'vCPUs in use'), cpu, h('dt', {}, 'Memory in use'), mem, h('dt', {}, 'Host'), hostLine),
  );
  onSample(card, ({ host }: { host: HostSample }) => {
    cpu.textContent = `${host.vcpusUsed} of ${host.vcpuLimit} (${host.cpus} CPUs × ${host.cpuOvercommit}); ${Math.max(0, host.vcpuLimit - host.vcpusUsed)} left`;
    mem.textContent = `${mib(host.memoryUsedMiB)} of ${mib(host.memoryLimitMiB)} (RAM × ${host.memoryOvercommit}); ${mib(Math.max(0, host.memoryLimitMiB - host.memoryUsedMiB))} left`;
    hostLine.textContent = `${host.cpus} CPUs, ${mib(host.memoryMiB)} RAM, ${mib(host.freeMemoryMiB)} free`;
  });
  return card;
}

interface Row {
  tr: HTMLTableRowElement;
  set: (vm: VmSample, now: number) => void;
}

function vmRow(name: string): Row {
  const badge = h('span', { class: 'state' });
  const cells = {
    cpus: h('td', { 'data-label': 'vCPUs' }),
    memory: h('td', { 'data-label': 'Memory' }),
    uptime: h('td', { 'data-label': 'Uptime' }),
    cpu: h('span', { class: 'value' }),
    mem: h('span', { class: 'value' }),
    disk: h('span', { class: 'value' }),
    net: h('span', { class: 'value' }),
  };
  const sparks = {
    cpu: sparkline(`CPU of ${name}, last minute`),
    mem: sparkline(`memory of ${name}, last minute`),
    disk: sparkline(`disk throughput of ${name}, last minute`),
    net: sparkline(`network throughput of ${name}, last minute`),
  };
  const chart = (label: string, key: keyof typeof sparks) =>
    h('td', { 'data-label': label, class: 'chart' }, sparks[key].el, cells[key]);
  const tr = h(
    'tr',
    { 'data-vm': name },
    h('th', { scope: 'row', 'data-label': 'Name' }, h('a', { href: `#/vm/${name}` }, name)),
    h('td', { 'data-label': 'State' }, badge),
    cells.cpus,
    cells.memory,
    cells.uptime,
    chart('CPU', 'cpu'),
    chart('Memory used', 'mem'),
    chart('Disk', 'disk'),
    chart('Network', 'net'),
  );
  return {
    tr,
    set(vm, now) {
      badge.textContent = vm.state;
      badge.className = `state ${vm.state}`;
      cells.cpus.textContent = String(vm.cpus);
      cells.memory.textContent = mib(vm.memoryMiB);
      cells.uptime.textContent = uptime(vm.startedAt, now);
      cells.cpu.textContent = vm.cpuPercent === null ? '–' : `${vm.cpuPercent.toFixed(1)}%`;
      cells.mem.textContent = bytes(vm.memoryBytes);
      cells.disk.textContent = rate(sum(vm.diskReadBps, vm.diskWriteBps));
      cells.net.textContent = rate(sum(vm.netRxBps, vm.netTxBps));
      const hist = state.history.get(vm.name) ?? { cpu: [], memory: [], disk: [], net: [] };
      sparks.cpu.set(hist.cpu, Math.max(100, ...hist.cpu));
      sparks.mem.set(hist.memory, vm.memoryMiB * 1024 * 1024);
      sparks.disk.set(hist.disk, Math.max(...hist.disk));
      sparks.net.set(hist.net, Math.max(...hist.net));
    },
  };
}

function listView(): HTMLElement {
  const body = h('tbody');
  const empty = h('p', { class: 'empty', hidden: true }, 'No VMs yet. ', h('a', { href: '#/new' }, 'Create one'), '.');
  const rows = new Map<string, Row>();
  const table = h(
    'table',
    { class: 'vms' },
    h('caption', { class: 'visually-hidden' }, 'Virtual machines'),
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        ...['Name', 'State', 'vCPUs', 'Memory', 'Uptime', 'CPU', 'Memory used', 'Disk', 'Network'].map((c) =>
          h('th', { scope: 'col' }, c),
        ),
      ),
    ),
    body,
  );
  const view = h(
    'div',
    { class: 'list' },
    h(
      'div',
      { class: 'heading' },
      h('h1', {}, 'Machines'),
      h('a', { class: 'button primary', href: '#/new' }, 'New VM'),
    ),
    h('section', { class: 'card', 'aria-label': 'Virtual machines' }, table, empty),
    hostCard(),
  );
  onSample(view, (s) => {
    for (const [name, row] of rows)
      if (!s.vms.some((v) => v.name === name)) {
        row.tr.remove();
        rows.delete(name);
      }
    for (const vm of s.vms) {
      let row = rows.get(vm.name);
      if (!row) {
        rows.set(vm.name, (row = vmRow(vm.name)));
        body.append(row.tr);
      }
      row.set(vm, s.at);
    }
    empty.hidden = s.vms.length > 0;
  });
  return view;
}

// ---- a VM's page ----

interface Definition {
  readonly [key: string]: unknown;
}

interface InfoReply extends VmSample {
  readonly definition: Definition;
  readonly snapshots?: readonly string[];
  readonly jail: { jailed: boolean } | null;
}

function consolePanel(name: string): { el: HTMLElement; attach: () => void; dispose: () => void } {
  const screen = h('div', { class: 'terminal', 'aria-label': `serial console of ${name}` });
  const status = h('span', { class: 'console-status', role: 'status' }, 'detached');
  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    scrollback: 5000,
    fontSize: 14,
    theme: { background: '#16181d', foreground: '#e8e6e3', cyan: '#7fd3e6' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  let ws: WebSocket | null = null;
  let attach: AttachAddon | null = null;
  let opened = false;
  const refit = () => {
    if (opened && screen.isConnected) fit.fit();
  };
  const observer = new ResizeObserver(refit);
  const detach = () => {
    attach?.dispose();
    attach = null;
    ws?.close();
    ws = null;
    status.textContent = 'detached';
  };
  const connect = () => {
    if (!opened) {
      term.open(screen);
      opened = true;
      observer.observe(screen);
      refit();
    }
    if (ws) return;
    term.reset();
    const socket = new WebSocket(socketUrl(`/ws/console/${encodeURIComponent(name)}`));
    socket.binaryType = 'arraybuffer';
    ws = socket;
    status.textContent = 'connecting…';
    socket.onopen = () => {
      status.textContent = 'attached';
      attach = new AttachAddon(socket);
      term.loadAddon(attach);
      term.focus();
    };
    socket.onclose = () => {
      if (ws === socket) {
        ws = null;
        attach?.dispose();
        attach = null;
        status.textContent = 'detached';
      }
    };
  };
  const send = (bytes: number[]) => ws?.readyState === WebSocket.OPEN && ws.send(new Uint8Array(bytes));
  const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Console commands' });
  const power = h('button', { type: 'button', title: 'Ctrl-A p' }, 'Power button (Ctrl-A p)');
  power.addEventListener('click', () => {
    power.disabled = true;
    api('POST', `/vms/${encodeURIComponent(name)}/stop`, {})
      .then(() => (status.textContent = 'the guest was asked to power off'))
      .catch((e: Error) => (status.textContent = e.message))
      .finally(() => (power.disabled = false));
  });
  actions.append(
    h('button', { type: 'button', onclick: () => connect() }, 'Attach'),
    h('button', { type: 'button', title: 'Ctrl-A x', onclick: () => detach() }, 'Detach (Ctrl-A x)'),
    h('button', { type: 'button', title: 'Ctrl-A Ctrl-A', onclick: () => send([1]) }, 'Send Ctrl-A'),
    power,
    status,
  );
  const el = h(
    'section',
    { class: 'card console', 'aria-labelledby': 'console-h' },
    h('h2', { id: 'console-h' }, 'Console'),
    actions,
    screen,
  );
  window.addEventListener('resize', refit);
  return {
    el,
    attach: connect,
    dispose() {
      detach();
      observer.disconnect();
      window.removeEventListener('resize', refit);
      term.dispose();
    },
  };
}

function definitionList(d: Definition): HTMLElement {
  const dl = h('dl', { class: 'config' });
  for (const [k, v] of Object.entries(d)) {
    if (v === undefined || (Array.isArray(v) && v.length === 0)) continue;
    dl.append(h('dt', {}, k), h('dd', {}, typeof v === 'object' ? JSON.stringify(v) : String(v)));
  }
  return dl;
}

let disposeView: (() => void) | null = null;

function vmView(name: string): HTMLElement {
  const message = h('p', { class: 'notice', role: 'status', 'aria-live': 'polite' });
  const stateBadge = h('span', { class: 'state' }, '…');
  const stats = h('p', { class: 'stats' });
  const config = h('div', {}, 'loading…');
  const log = h('pre', { class: 'log', tabindex: '0', 'aria-label': 'console log' });
  const snapList = h('ul', { class: 'snapshots' });
  const consoleBox = consolePanel(name);
  disposeView = consoleBox.dispose;
  const path = `/vms/${encodeURIComponent(name)}`;

  /** Runs one request, saying so in the notice line: `label…`, then `done`'s text or the error; resolves to whether it worked. */
  const run = async <T>(label: string, method: string, route: string, body: unknown, done: (r: T) => string) => {
    notice(message, `${label}…`);
    try {
      notice(message, done(await api<T>(method, route, body)));
      return true;
    } catch (e) {
      notice(message, `${label}: ${(e as Error).message}`, 'error');
      return false;
    }
  };
  const buttons: Record<string, HTMLButtonElement> = {};
  const act = (
    label: string,
    verb: string,
    method: string,
    route: string,
    body: unknown = {},
    confirmText?: string,
  ) => {
    const b = h('button', { type: 'button', class: verb === 'delete' ? 'danger' : '' }, label);
    b.addEventListener('click', () => {
      if (confirmText && !confirm(confirmText)) return;
      b.disabled = true;
      void run(label, method, route, body, () => `${label}: done`)
        .then((ok) => {
          if (ok && verb === 'delete') location.hash = '#/';
          if (ok && verb === 'snapshot') void refresh();
        })
        .finally(() => (b.disabled = false));
    });
    buttons[verb] = b;
    return b;
  };
  const tagInput = h('input', { id: 'restore-tag', name: 'tag', autocomplete: 'off' });
  const cloneInput = h('input', { id: 'clone-name', name: 'clone', autocomplete: 'off', placeholder: `${name}-2` });
  const migrateTo = h('input', { id: 'migrate-to', name: 'to', autocomplete: 'off', placeholder: '192.0.2.7:7077' });
  const migrateToken = h('input', { id: 'migrate-token', name: 'token', type: 'password', autocomplete: 'off' });
  const restore = h('button', { type: 'button' }, 'Restore');
  restore.addEventListener('click', () => {
    const tag = tagInput.value;
    void run('Restore', 'POST', `${path}/restore`, { tag }, () => `restored from '${tag}'`).then((ok) => {
      if (ok) void refresh();
    });
  });
  const clone = h('button', { type: 'button' }, 'Clone');
  clone.addEventListener('click', () => {
    const newName = cloneInput.value;
    void run<{ name?: string }>(
      'Clone',
      'POST',
      `${path}/clone`,
      { name: newName },
      (r) => `cloned into '${r.name ?? newName}'`,
    );
  });
  const migrate = h('button', { type: 'button' }, 'Migrate');
  migrate.addEventListener('click', () => {
    const to = migrateTo.value;
    void run('Migrate', 'POST', `${path}/migrate`, { to, token: migrateToken.value }, () => `moved to ${to}`);
  });

  const refresh = async () => {
    try {
      const info = await api<InfoReply>('GET', path);
      config.replaceChildren(definitionList(info.definition));
      snapList.replaceChildren(
        ...(info.snapshots?.length
          ? info.snapshots.map((t) => h('li', {}, h('code', {}, t)))
          : [h('li', {}, 'none yet')]),
      );
      if (!tagInput.value && info.snapshots?.length) tagInput.value = info.snapshots.at(-1)!;
      const { log: text } = await api<{ log: string }>('GET', `${path}/logs?bytes=16384`);
      log.textContent = text;
      log.scrollTop = log.scrollHeight;
    } catch (e) {
      notice(message, (e as Error).message, 'error');
    }
  };

  const view = h(
    'div',
    { class: 'vm' },
    h('div', { class: 'heading' }, h('h1', {}, name, ' ', stateBadge), h('a', { href: '#/' }, '← all machines')),
    h(
      'div',
      { class: 'actions', role: 'group', 'aria-label': 'Actions' },
      act('Start', 'start', 'POST', `${path}/start`),
      act('Stop', 'stop', 'POST', `${path}/stop`),
      act('Force stop', 'force', 'POST', `${path}/stop`, { force: true }),
      act('Pause', 'pause', 'POST', `${path}/pause`),
      act('Resume', 'resume', 'POST', `${path}/resume`),
      act('Restart', 'restart', 'POST', `${path}/restart`),
      act('Snapshot', 'snapshot', 'POST', `${path}/snapshots`),
      act('Delete', 'delete', 'DELETE', path, undefined, `Delete '${name}' and its snapshots?`),
    ),
    message,
    stats,
    consoleBox.el,
    h(
      'div',
      { class: 'columns' },
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'config-h' },
        h('h2', { id: 'config-h' }, 'Configuration'),
        config,
      ),
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'snap-h' },
        h('h2', { id: 'snap-h' }, 'Snapshots'),
        snapList,
        h('div', { class: 'inline' }, h('label', { for: 'restore-tag' }, 'Snapshot tag'), tagInput, restore),
        h('div', { class: 'inline' }, h('label', { for: 'clone-name' }, 'Clone as'), cloneInput, clone),
        h(
          'div',
          { class: 'inline' },
          h('label', { for: 'migrate-to' }, 'Migrate to'),
          migrateTo,
          h('label', { for: 'migrate-token' }, 'Token'),
          migrateToken,
          migrate,
        ),
      ),
    ),
    h(
      'section',
      { class: 'card', 'aria-labelledby': 'log-h' },
      h(
        'h2',
        { id: 'log-h' },
        'Log ',
        h('button', { type: 'button', class: 'small', onclick: () => void refresh() }, 'Refresh'),
      ),
      log,
    ),
  );

  let lastState: string | null = null;
  onSample(view, (s) => {
    const vm = s.vms.find((v) => v.name === name);
    if (!vm) {
      stateBadge.textContent = 'deleted';
      stateBadge.className = 'state stopped';
      notice(message, `'${name}' no longer exists.`, 'error');
      for (const b of Object.values(buttons)) b.disabled = true;
      return;
    }
    stateBadge.textContent = vm.state;
    stateBadge.className = `state ${vm.state}`;
    const up = vm.state === 'running' || vm.state === 'paused';
    const enabled: Record<string, boolean> = {
      start: vm.state === 'stopped',
      stop: up,
      force: vm.state !== 'stopped',
      pause: vm.state === 'running',
      resume: vm.state === 'paused',
      restart: up,
      snapshot: up,
      delete: true,
    };
    for (const [verb, b] of Object.entries(buttons)) if (!b.textContent?.endsWith('…')) b.disabled = !enabled[verb];
    stats.textContent = up
      ? `${vm.cpus} vCPUs, ${mib(vm.memoryMiB)} · up ${uptime(vm.startedAt, s.at)} · CPU ${vm.cpuPercent === null ? '–' : `${vm.cpuPercent.toFixed(1)}%`} · memory ${bytes(vm.memoryBytes)} · disk ${rate(sum(vm.diskReadBps, vm.diskWriteBps))} · network ${rate(sum(vm.netRxBps, vm.netTxBps))}`
      : `${vm.cpus} vCPUs, ${mib(vm.memoryMiB)} · stopped`;
    // (Re)attach the console when the VM comes up; its page shows the log while it is down.
    if (vm.state !== lastState && (vm.state === 'running' || lastState === null)) consoleBox.attach();
    lastState = vm.state;
  });
  void refresh();
  return view;
}

// ---- the create form ----

const FIELDS: ReadonlyArray<{ id: string; label: string; hint: string; kind?: 'list' | 'check' }> = [
  { id: 'name', label: 'Name', hint: "lower-case letters, digits and '-'" },
  { id: 'kernel', label: 'Kernel', hint: "absolute path; empty: the kit's minimal Linux" },
  { id: 'initrd', label: 'Initrd', hint: 'absolute path (optional)' },
  { id: 'cmdline', label: 'Kernel command line', hint: 'added to what Kiln sets' },
  { id: 'cpus', label: 'vCPUs', hint: 'default 1' },
  { id: 'memory', label: 'Memory', hint: 'e.g. 256M, 1G (default 128M)' },
  { id: 'disk', label: 'Disks', hint: 'one per line: PATH[,ro][,root][,serial=ID][,id=ID]', kind: 'list' },
  { id: 'net', label: 'Network interfaces', hint: 'one per line: tap=NAME or passt=SOCKET[,mac=MAC]', kind: 'list' },
  { id: 'rng', label: 'Entropy device (virtio-rng)', hint: '', kind: 'check' },
  { id: 'balloon', label: 'Balloon', hint: 'initial target, e.g. 64M (optional)' },
  { id: 'cpuTemplate', label: 'CPU template', hint: 'host, pvm or baseline (optional)' },
  { id: 'vsock', label: 'vsock', hint: 'CID,SOCKET, e.g. 3,/run/web.vsock (optional)' },
  { id: 'consoleSocket', label: 'Console socket', hint: 'a virtio console (hvc0) on this Unix socket (optional)' },
  { id: 'cpuWeight', label: 'CPU weight', hint: '1–10000, default 100' },
  { id: 'cpuQuota', label: 'CPU quota (%)', hint: 'of one host CPU; empty: none' },
  { id: 'pin', label: 'Pin to host CPUs', hint: 'e.g. 0,1' },
];

/** The form field a daemon's ConfigError names ('--memory', 'memoryMiB', 'disks[0].path' ...). */
function fieldOf(field: string | undefined): string | null {
  if (field === undefined || field === '') return null;
  const base = field.replace(/^--/, '').split(/[[.]/)[0] ?? '';
  const alias: Record<string, string> = {
    memoryMiB: 'memory',
    disks: 'disk',
    nets: 'net',
    cpuQuotaPercent: 'cpuQuota',
    pinCpus: 'pin',
    'cpu-weight': 'cpuWeight',
    'cpu-quota': 'cpuQuota',
    'console-socket': 'consoleSocket',
    'cpu-template': 'cpuTemplate',
  };
  const id = alias[base] ?? base;
  return FIELDS.some((f) => f.id === id) ? id : null;
}

function createView(): HTMLElement {
  const inputs = new Map<string, HTMLInputElement | HTMLTextAreaElement>();
  const errors = new Map<string, HTMLElement>();
  const summary = h('p', { class: 'notice', role: 'alert' });
  const form = h('form', { class: 'card create', novalidate: true, 'aria-labelledby': 'create-h' });
  for (const f of FIELDS) {
    const error = h('span', { class: 'field-error', id: `${f.id}-error` });
    const hint = h('span', { class: 'hint', id: `${f.id}-hint` }, f.hint);
    const described = `${f.id}-hint ${f.id}-error`;
    const input =
      f.kind === 'list'
        ? h('textarea', { id: f.id, name: f.id, rows: '2', 'aria-describedby': described, spellcheck: 'false' })
        : h('input', {
            id: f.id,
            name: f.id,
            type: f.kind === 'check' ? 'checkbox' : 'text',
            autocomplete: 'off',
            'aria-describedby': described,
            ...(f.id === 'name' ? { required: true } : {}),
          });
    inputs.set(f.id, input);
    errors.set(f.id, error);
    form.append(
      h(
        'div',
        { class: `field${f.kind === 'check' ? ' check' : ''}` },
        h('label', { for: f.id }, f.label),
        input,
        hint,
        error,
      ),
    );
  }
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create');
  form.append(h('div', { class: 'actions' }, submit), summary);

  const values = () => {
    const out: Record<string, unknown> = {};
    for (const f of FIELDS) {
      const input = inputs.get(f.id)!;
      if (f.kind === 'check') out[f.id] = (input as HTMLInputElement).checked;
      else if (f.kind === 'list') out[f.id] = input.value.split('\n');
      else out[f.id] = input.value;
    }
    return out;
  };
  const clear = () => {
    for (const [id, e] of errors) {
      e.textContent = '';
      inputs.get(id)!.removeAttribute('aria-invalid');
    }
    summary.textContent = '';
    summary.className = 'notice';
  };
  const show = (e: ApiError, focus: boolean) => {
    const id = fieldOf(e.field);
    summary.textContent = e.message;
    summary.className = 'notice error';
    if (id) {
      errors.get(id)!.textContent = e.message;
      const input = inputs.get(id)!;
      input.setAttribute('aria-invalid', 'true');
      if (focus) input.focus();
    }
  };
  // Checked as it is filled in, by the daemon's own rules (nothing is created).
  let checking = 0;
  form.addEventListener('change', () => {
    const mine = ++checking;
    api('POST', '/create?check=1', values())
      .then(() => mine === checking && clear())
      .catch((e: ApiError) => {
        if (mine !== checking) return;
        clear();
        // An empty name is only an error once the form is sent.
        if (!(fieldOf(e.field) === 'name' || /needs a VM name/.test(e.message)) || inputs.get('name')!.value)
          show(e, false);
      });
  });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    checking++;
    api<VmSample>('POST', '/create', values())
      .then((vm) => {
        location.hash = `#/vm/${vm.name}`;
      })
      .catch((e: ApiError) => {
        clear();
        show(e, true);
      })
      .finally(() => (submit.disabled = false));
  });
  return h(
    'div',
    { class: 'new' },
    h('div', { class: 'heading' }, h('h1', { id: 'create-h' }, 'New VM'), h('a', { href: '#/' }, '← all machines')),
    h('p', { class: 'lead' }, 'The same fields and checks as ', h('code', {}, 'kiln create'), '.'),
    form,
  );
}

// ---- routing ----

function route(): void {
  disposeView?.();
  disposeView = null;
  const hash = decodeURIComponent(location.hash.replace(/^#/, ''));
  const vm = /^\/vm\/([a-z0-9][a-z0-9-]{0,62})$/.exec(hash)?.[1];
  let view: HTMLElement;
  let title: string;
  if (vm !== undefined) {
    view = vmView(vm);
    title = `${vm} · Kiln`;
  } else if (hash === '/new') {
    view = createView();
    title = 'New VM · Kiln';
  } else {
    view = listView();
    title = 'Machines · Kiln';
  }
  document.title = title;
  main.replaceChildren(view);
  const current = vm !== undefined ? null : hash === '/new' ? '#/new' : '#/';
  for (const a of document.querySelectorAll<HTMLAnchorElement>('nav a'))
    if (a.getAttribute('href') === current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
}

window.addEventListener('hashchange', route);
watch();
route();
