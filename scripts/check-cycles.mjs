#!/usr/bin/env node
// Fails when src/ has an import cycle (type-only imports included: a cycle of types is
// still two modules that cannot be understood one without the other). Run by `npm run lint`.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const root = resolve(process.argv[2] ?? 'src');
const files = [];
const walk = (dir) => {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) walk(path);
    else if (path.endsWith('.ts')) files.push(path);
  }
};
walk(root);

const graph = new Map();
const IMPORT = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s+['"](\.[^'"]+)['"]|import\(\s*['"](\.[^'"]+)['"]\s*\)/g;
for (const file of files) {
  const text = readFileSync(file, 'utf8');
  const deps = new Set();
  for (const m of text.matchAll(IMPORT)) {
    const spec = m[1] ?? m[2];
    deps.add(resolve(dirname(file), spec).replace(/\.js$/, '.ts'));
  }
  graph.set(file, [...deps].filter((d) => graph.has(d) || files.includes(d)));
}

// Tarjan's strongly connected components: every component with more than one module is a cycle.
let index = 0;
const stack = [];
const info = new Map();
const cycles = [];
const connect = (v) => {
  info.set(v, { index, low: index, onStack: true });
  index++;
  stack.push(v);
  for (const w of graph.get(v) ?? []) {
    if (!info.has(w)) {
      connect(w);
      info.get(v).low = Math.min(info.get(v).low, info.get(w).low);
    } else if (info.get(w).onStack) info.get(v).low = Math.min(info.get(v).low, info.get(w).index);
  }
  if (info.get(v).low === info.get(v).index) {
    const component = [];
    let w;
    do {
      w = stack.pop();
      info.get(w).onStack = false;
      component.push(w);
    } while (w !== v);
    if (component.length > 1) cycles.push(component);
  }
};
for (const file of files) if (!info.has(file)) connect(file);

if (cycles.length > 0) {
  for (const c of cycles) process.stderr.write(`import cycle: ${c.map((f) => relative(process.cwd(), f)).sort().join(' <-> ')}\n`);
  process.exit(1);
}
process.stdout.write(`no import cycles among ${files.length} modules\n`);
