// Offline validation of Kubernetes objects: the Kubernetes API schemas (kubernetes-models, generated
// from Kubernetes 1.27's OpenAPI) and KEDA's CRDs (@kubernetes-models/keda), plus one thing those
// validators let through: fields the schema does not define (a typo such as `minReplicas` in a
// ScaledObject, or `replica` in a Deployment), which kubectl's strict field validation refuses at
// apply time and nothing here would notice otherwise.
//
//   validateObject(doc)   // → [] or ["Deployment/x: /spec/replicas must be integer", ...]
//
// The unknown-field check watches the schema's compiled validator read the object: the validator
// reads every property its schema defines (and enumerates the keys of maps such as labels), so a
// key it never looked at is one the schema does not know.
import * as keda from '@kubernetes-models/keda';
import * as k8s from 'kubernetes-models';

interface ModelClass {
  apiVersion: string;
  kind: string;
  prototype: { validate(this: unknown): void };
}

function isModelClass(v: unknown): v is ModelClass {
  return (
    typeof v === 'function' &&
    typeof (v as Partial<ModelClass>).apiVersion === 'string' &&
    typeof (v as Partial<ModelClass>).kind === 'string'
  );
}

/** "apiVersion kind" → model class, from every group and version the two packages export. */
const MODELS = new Map<string, ModelClass>();
(function collect(mod: unknown, depth: number): void {
  if (depth > 3 || mod === null || typeof mod !== 'object') return;
  for (const v of Object.values(mod as Record<string, unknown>)) {
    if (isModelClass(v)) MODELS.set(`${v.apiVersion} ${v.kind}`, v);
    else collect(v, depth + 1);
  }
})({ k8s, keda }, 0);

interface Watched {
  path: string;
  target: Record<string, unknown>;
  read: Set<string>;
  enumerated: boolean;
}

/** A deep proxy of `value` that records which keys of each object were read or enumerated. */
function watch(value: unknown, path: string, out: Watched[]): unknown {
  if (Array.isArray(value)) return value.map((v, i) => watch(v, `${path}/${i}`, out));
  if (value === null || typeof value !== 'object') return value;
  const target = value as Record<string, unknown>;
  const w: Watched = { path, target, read: new Set(), enumerated: false };
  out.push(w);
  const children = new Map<string, unknown>(Object.entries(target).map(([k, v]) => [k, watch(v, `${path}/${k}`, out)]));
  return new Proxy(target, {
    get(t, key) {
      if (typeof key !== 'string') return Reflect.get(t, key);
      w.read.add(key);
      return children.has(key) ? children.get(key) : Reflect.get(t, key);
    },
    has(t, key) {
      if (typeof key === 'string') w.read.add(key);
      return Reflect.has(t, key);
    },
    getOwnPropertyDescriptor(t, key) {
      if (typeof key === 'string') w.read.add(key);
      const d = Reflect.getOwnPropertyDescriptor(t, key);
      return d && typeof key === 'string' && children.has(key) ? { ...d, value: children.get(key) } : d;
    },
    ownKeys(t) {
      w.enumerated = true;
      return Reflect.ownKeys(t);
    },
  });
}

function describe(doc: Record<string, unknown>): string {
  const meta = doc.metadata as { name?: string } | undefined;
  return `${String(doc.kind)}/${meta?.name ?? '?'}`;
}

/** Problems of one object: no schema for its apiVersion and kind, schema violations, unknown fields. */
export function validateObject(doc: unknown): string[] {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) return ['not a Kubernetes object (a YAML mapping)'];
  const obj = doc as Record<string, unknown>;
  const where = describe(obj);
  const model = MODELS.get(`${String(obj.apiVersion)} ${String(obj.kind)}`);
  if (!model)
    return [`${where}: no schema for apiVersion ${String(obj.apiVersion)} kind ${String(obj.kind)} (neither Kubernetes 1.27 nor KEDA)`];
  const watched: Watched[] = [];
  const proxy = watch(structuredClone(obj), '', watched);
  const problems: string[] = [];
  try {
    model.prototype.validate.call(proxy);
  } catch (err) {
    const e = err as Error & { errors?: Array<{ instancePath: string; message?: string }> };
    if (!e.errors) throw err;
    for (const x of e.errors) problems.push(`${where}: ${x.instancePath || '/'} ${x.message ?? 'is invalid'}`);
  }
  for (const w of watched) {
    if (w.enumerated) continue; // a map (labels, data, trigger metadata): any key goes
    for (const key of Object.keys(w.target)) {
      if (!w.read.has(key)) problems.push(`${where}: ${w.path}/${key} is not a field of ${String(obj.apiVersion)} ${String(obj.kind)}`);
    }
  }
  return problems;
}
