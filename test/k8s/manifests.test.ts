// Keeps k8s/ true to the code: every flag and environment variable a manifest gives a ditpipe
// container must be one the CLI really has (read from `ditpipe <cmd> --help`, so renaming a flag
// breaks this test), probe and metrics ports must be the ports the services listen on, shutdown
// timings must fit, model names must line up between the build Job, the replicas and the
// scheduler, and the kustomizations must render (`kubectl kustomize`).
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { SERVICE_NAMES } from '../../shared/server/grpc.ts';
import { helpSpec, type CliSpec } from '../helpers/cli-help.ts';

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '../..');
const K8S = join(ROOT, 'k8s');
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

// ---------------------------------------------------------------------------------------------
// The CLI, as its --help describes it (test/helpers/cli-help.ts).

const cliSpec = (args: string[]): Promise<CliSpec> => helpSpec(args);

// ---------------------------------------------------------------------------------------------
// Kubernetes objects, loosely typed (only what the checks read).

interface Meta {
  name?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}
interface Probe {
  grpc?: { port: number; service?: string };
  httpGet?: { path: string; port: number | string };
  periodSeconds?: number;
  failureThreshold?: number;
  timeoutSeconds?: number;
}
interface Container {
  name: string;
  image?: string;
  command?: string[];
  args?: string[];
  env?: Array<{ name: string; value?: string; valueFrom?: { configMapKeyRef?: { name: string; key: string }; secretKeyRef?: unknown } }>;
  envFrom?: Array<{ configMapRef?: { name: string }; secretRef?: { name: string } }>;
  ports?: Array<{ name?: string; containerPort: number }>;
  startupProbe?: Probe;
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] }; sleep?: { seconds: number } } };
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; readOnlyRootFilesystem?: boolean; allowPrivilegeEscalation?: boolean; capabilities?: { drop?: string[] } };
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
}
interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  terminationGracePeriodSeconds?: number;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number };
  volumes?: Array<{ name: string; emptyDir?: unknown; persistentVolumeClaim?: { claimName: string; readOnly?: boolean }; configMap?: { name: string }; secret?: { secretName: string; optional?: boolean } }>;
  nodeSelector?: Record<string, string>;
  tolerations?: Array<{ key?: string; operator?: string; effect?: string }>;
}
interface K8sDoc {
  apiVersion?: string;
  kind?: string;
  metadata?: Meta;
  data?: Record<string, string>;
  spec?: {
    replicas?: number;
    selector?: { matchLabels?: Record<string, string> } | Record<string, string>;
    template?: { metadata?: Meta; spec: PodSpec };
    jobTemplate?: unknown;
    ports?: Array<{ name?: string; port: number; targetPort?: number | string }>;
    scaleTargetRef?: { kind: string; name: string };
    minReplicas?: number;
    maxReplicas?: number;
  } & Partial<PodSpec>;
}
interface Loaded {
  file: string;
  doc: K8sDoc;
}

function parseDocs(text: string, file: string): Loaded[] {
  const out: Loaded[] = [];
  for (const d of parseAllDocuments(text)) {
    if (d.errors.length) throw new Error(`${file}: ${d.errors.map((e) => e.message).join('; ')}`);
    const doc = d.toJS({ maxAliasCount: 100 }) as K8sDoc | null;
    if (doc !== null) out.push({ file, doc });
  }
  return out;
}

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/.test(e)) out.push(p);
  }
  return out.sort();
}

const isKustomization = (f: string): boolean => /^kustomization\.ya?ml$/.test(basename(f));
const rel = (f: string): string => relative(ROOT, f);
const WORKLOADS = new Set(['Deployment', 'StatefulSet', 'DaemonSet', 'Job', 'Pod']);

function podSpec(doc: K8sDoc): PodSpec | null {
  if (doc.kind === 'Pod') return doc.spec as PodSpec;
  if (doc.kind && WORKLOADS.has(doc.kind)) return doc.spec?.template?.spec ?? null;
  return null;
}

function podLabels(doc: K8sDoc): Record<string, string> {
  return (doc.kind === 'Pod' ? doc.metadata?.labels : doc.spec?.template?.metadata?.labels) ?? {};
}

function podAnnotations(doc: K8sDoc): Record<string, string> {
  return (doc.kind === 'Pod' ? doc.metadata?.annotations : doc.spec?.template?.metadata?.annotations) ?? {};
}

function matches(selector: Record<string, string>, labels: Record<string, string>): boolean {
  const keys = Object.keys(selector);
  return keys.length > 0 && keys.every((k) => labels[k] === selector[k]);
}

/** Image reference → repository and tag ("" when none). */
function splitImage(image: string): { repo: string; tag: string; digest: boolean } {
  const [ref, digest] = image.split('@');
  const slash = ref.lastIndexOf('/');
  const colon = ref.lastIndexOf(':');
  return colon > slash ? { repo: ref.slice(0, colon), tag: ref.slice(colon + 1), digest: Boolean(digest) } : { repo: ref, tag: '', digest: Boolean(digest) };
}

const isDitpipe = (c: Container): boolean => splitImage(c.image ?? '').repo.split('/').pop() === 'ditpipe' && !c.command;

// ---------------------------------------------------------------------------------------------
// One container as the CLI will see it.

interface Resolved {
  spec: CliSpec;
  /** Flag → value from args (flags without a value map to ""). */
  args: Map<string, string>;
  positionals: string[];
  /** Environment as the process gets it: envFrom ConfigMaps, then env (env wins). */
  env: Map<string, string>;
  problems: string[];
}

async function resolveContainer(c: Container, docs: K8sDoc[], where: string): Promise<Resolved> {
  const problems: string[] = [];
  const argv = c.args ?? [];
  const spec = await cliSpec(argv);
  const given = argv.slice(0, spec.path.length);
  if (spec.path.length === 0 || given.join(' ') !== spec.path.join(' ')) {
    problems.push(`${where}: args ${JSON.stringify(argv)} do not start with a ditpipe command (help says "${spec.path.join(' ')}")`);
  }
  const args = new Map<string, string>();
  const positionals: string[] = [];
  for (let i = spec.path.length; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('-')) {
      positionals.push(a);
      continue;
    }
    const [flag, inline] = a.split(/=(.*)/s, 2);
    const opt = spec.options.get(flag);
    if (!opt) {
      problems.push(`${where}: \`ditpipe ${spec.path.join(' ')}\` has no flag ${flag}`);
      continue;
    }
    let value = inline ?? '';
    if (opt.takesValue && inline === undefined) value = argv[++i] ?? '';
    args.set(flag, value);
  }
  if (positionals.length > spec.positionals) problems.push(`${where}: unexpected arguments ${JSON.stringify(positionals)}`);
  const env = new Map<string, string>();
  for (const from of c.envFrom ?? []) {
    if (from.secretRef) continue; // keys unknown here; a Secret's keys are the operator's
    const cmName = from.configMapRef?.name;
    const cm = docs.find((d) => d.kind === 'ConfigMap' && d.metadata?.name === cmName);
    if (!cm) {
      problems.push(`${where}: envFrom ConfigMap ${cmName} is not defined`);
      continue;
    }
    for (const [k, v] of Object.entries(cm.data ?? {})) env.set(k, String(v));
  }
  for (const e of c.env ?? []) {
    const ref = e.valueFrom?.configMapKeyRef;
    if (ref) {
      const cm = docs.find((d) => d.kind === 'ConfigMap' && d.metadata?.name === ref.name);
      const v = cm?.data?.[ref.key];
      if (v === undefined) problems.push(`${where}: env ${e.name} refers to missing ConfigMap key ${ref.name}/${ref.key}`);
      env.set(e.name, v ?? '');
    } else {
      env.set(e.name, e.value ?? '');
    }
  }
  for (const [name, value] of env) {
    const opt = spec.byEnv.get(name);
    if (!opt) {
      problems.push(`${where}: \`ditpipe ${spec.path.join(' ')}\` reads no environment variable ${name}`);
      continue;
    }
    if (opt.choices && !opt.choices.includes(value)) problems.push(`${where}: ${name}=${value} is not one of ${opt.choices.join(', ')}`);
    if (opt.default !== undefined && /^-?\d+(\.\d+)?$/.test(opt.default) && !/^-?\d+(\.\d+)?$/.test(value)) {
      problems.push(`${where}: ${name}=${JSON.stringify(value)} must be a number like its default ${opt.default}`);
    }
  }
  for (const [flag, value] of args) {
    const opt = spec.options.get(flag);
    if (opt?.choices && !opt.choices.includes(value)) problems.push(`${where}: ${flag} ${value} is not one of ${opt.choices.join(', ')}`);
  }
  return { spec, args, positionals, env, problems };
}

/** The value the process ends up with: flag, else environment variable, else the default. */
function effective(r: Resolved, flag: string): string | undefined {
  const opt = r.spec.options.get(flag);
  if (!opt) throw new Error(`\`ditpipe ${r.spec.path.join(' ')}\` has no ${flag} (the test expects it)`);
  return r.args.get(flag) ?? (opt.env ? r.env.get(opt.env) : undefined) ?? opt.default;
}

function effectiveInt(r: Resolved, flag: string): number {
  const v = Number(effective(r, flag));
  if (!Number.isInteger(v)) throw new Error(`${flag} has no integer value`);
  return v;
}

function preStopMs(c: Container): number {
  const p = c.lifecycle?.preStop;
  if (p?.sleep) return p.sleep.seconds * 1000;
  const cmd = p?.exec?.command ?? [];
  if (cmd[0] === 'sleep') return Number(cmd[1]) * 1000;
  return 0;
}

// The services' gRPC health ports as the brief and DESIGN fix them; the CLI defaults must agree.
const GRPC_PORT: Record<string, number> = { scheduler: 50051, denoiser: 50052, decoder: 50053 };
const HEALTH_NAME: Record<string, string> = { scheduler: SERVICE_NAMES.sampler, denoiser: SERVICE_NAMES.denoiser, decoder: SERVICE_NAMES.decoder };

/** Every check on a set of objects that is applied together (a rendered kustomization). */
async function checkSet(label: string, docs: K8sDoc[]): Promise<string[]> {
  const problems: string[] = [];
  const workloads = docs.filter((d) => podSpec(d));
  for (const w of workloads) {
    const pod = podSpec(w)!;
    const wname = `${label}: ${w.kind}/${w.metadata?.name}`;
    for (const c of [...(pod.initContainers ?? []), ...pod.containers]) {
      const where = `${wname} container ${c.name}`;
      if (!c.image) {
        problems.push(`${where}: no image`);
        continue;
      }
      const img = splitImage(c.image);
      if (!img.digest && (img.tag === '' || img.tag === 'latest')) problems.push(`${where}: image ${c.image} is not pinned`);
      const sc = c.securityContext ?? {};
      if (!(sc.runAsNonRoot ?? pod.securityContext?.runAsNonRoot)) problems.push(`${where}: not runAsNonRoot`);
      if (sc.allowPrivilegeEscalation !== false) problems.push(`${where}: allowPrivilegeEscalation is not false`);
      if (!sc.capabilities?.drop?.includes('ALL')) problems.push(`${where}: capabilities not dropped`);
      if (!c.resources?.requests?.memory || !c.resources?.limits?.memory) problems.push(`${where}: memory request/limit missing`);
      for (const m of c.volumeMounts ?? []) {
        if (!pod.volumes?.some((v) => v.name === m.name)) problems.push(`${where}: mounts undefined volume ${m.name}`);
      }
      for (const v of pod.volumes ?? []) {
        const claim = v.persistentVolumeClaim?.claimName;
        if (claim && !docs.some((d) => d.kind === 'PersistentVolumeClaim' && d.metadata?.name === claim)) problems.push(`${where}: PVC ${claim} is not defined`);
      }
      if (!isDitpipe(c)) continue;
      if (img.tag !== VERSION && img.tag !== `${VERSION}-cuda`) problems.push(`${where}: ditpipe image tag ${img.tag} is not the package version ${VERSION} (or ${VERSION}-cuda)`);
      // tsx writes its transpile cache under $TMPDIR: a read-only root needs a writable /tmp.
      if (sc.readOnlyRootFilesystem !== true) problems.push(`${where}: root filesystem not read-only`);
      const tmp = c.volumeMounts?.find((m) => m.mountPath === '/tmp');
      if (!tmp || !pod.volumes?.find((v) => v.name === tmp.name)?.emptyDir) problems.push(`${where}: no emptyDir at /tmp (tsx cache)`);
      const r = await resolveContainer(c, docs, where);
      problems.push(...r.problems);
      const svc = r.spec.path.join(' ');
      if (!(svc in GRPC_PORT)) continue;

      // A long-running service: ports, probes, metrics, shutdown.
      const help = r.spec.options.get('--grpc-port')?.default;
      if (Number(help) !== GRPC_PORT[svc]) problems.push(`${where}: ditpipe ${svc} --grpc-port default is ${help}, expected ${GRPC_PORT[svc]}`);
      const grpcPort = effectiveInt(r, '--grpc-port');
      const healthPort = effectiveInt(r, '--health-port');
      const metricsPort = effectiveInt(r, '--metrics-port');
      const graceMs = effectiveInt(r, '--shutdown-grace');
      const ports = new Map((c.ports ?? []).map((p) => [p.name, p.containerPort]));
      if (grpcPort >= 0 && ports.get('grpc') !== grpcPort) problems.push(`${where}: containerPort "grpc" is ${ports.get('grpc')}, the service listens on ${grpcPort}`);
      if (grpcPort < 0 && ports.has('grpc')) problems.push(`${where}: containerPort "grpc" declared, but the gRPC API is off (--grpc-port -1)`);
      if (healthPort >= 0 && ports.get('health') !== healthPort) problems.push(`${where}: containerPort "health" is ${ports.get('health')}, the health port is ${healthPort}`);
      if (ports.get('metrics') !== metricsPort) problems.push(`${where}: containerPort "metrics" is ${ports.get('metrics')}, metrics are on ${metricsPort}`);
      // Pods are reached on their pod IP: a service bound to loopback would answer nothing.
      for (const flag of ['--host', '--metrics-host']) {
        if (effective(r, flag) !== '0.0.0.0') problems.push(`${where}: ${flag} is ${effective(r, flag)}; probes and scrapes come from outside the pod (the image sets 0.0.0.0)`);
      }
      // TLS material comes from a mounted Secret.
      for (const flag of ['--tls-cert', '--tls-key', '--tls-client-ca', '--auth-tokens-file']) {
        const file = effective(r, flag);
        if (!file) continue;
        const mount = c.volumeMounts?.find((m) => file.startsWith(`${m.mountPath}/`));
        const vol = mount && pod.volumes?.find((v) => v.name === mount.name);
        if (!vol?.secret) problems.push(`${where}: ${flag} ${file} is not on a mounted Secret`);
      }
      const tls = Boolean(effective(r, '--tls-cert'));
      // kubelet's gRPC probes speak neither TLS nor tokens: with either, they need the plaintext health port.
      const probePort = tls || effective(r, '--auth-tokens-file') ? healthPort : grpcPort >= 0 ? grpcPort : healthPort;
      if ((tls || grpcPort < 0) && healthPort < 0) problems.push(`${where}: TLS or no gRPC API, but no --health-port for the probes`);
      for (const kind of ['startupProbe', 'readinessProbe', 'livenessProbe'] as const) {
        const probe = c[kind];
        if (!probe?.grpc) {
          problems.push(`${where}: no gRPC ${kind}`);
          continue;
        }
        if (probe.grpc.port !== probePort) problems.push(`${where}: ${kind} probes port ${probe.grpc.port}, health answers in plaintext on ${probePort}`);
        const name = probe.grpc.service ?? '';
        if (name !== '' && name !== HEALTH_NAME[svc]) problems.push(`${where}: ${kind} asks health of "${name}", the server reports "" and "${HEALTH_NAME[svc]}"`);
      }
      const window = (p: Probe | undefined): number => (p?.periodSeconds ?? 10) * (p?.failureThreshold ?? 3);
      if (svc !== 'scheduler' && window(c.startupProbe) < 120) problems.push(`${where}: startup probe allows ${window(c.startupProbe)} s to load a model`);
      if (window(c.livenessProbe) < 30) problems.push(`${where}: liveness probe restarts after ${window(c.livenessProbe)} s`);
      const ann = podAnnotations(w);
      if (ann['prometheus.io/scrape'] !== 'true' || ann['prometheus.io/path'] !== '/metrics' || Number(ann['prometheus.io/port']) !== metricsPort) {
        problems.push(`${where}: prometheus annotations ${JSON.stringify(ann)} do not point at :${metricsPort}/metrics`);
      }
      // Shutdown: the service drains for up to the grace, then the NATS connection drains for up
      // to the grace (cli/common.ts serveUntilSignal), gRPC closes within 1 s; preStop comes first.
      const needMs = preStopMs(c) + 2 * graceMs + 1000;
      const tgps = pod.terminationGracePeriodSeconds ?? 30;
      if (tgps * 1000 <= needMs) problems.push(`${where}: terminationGracePeriodSeconds ${tgps} s ≤ preStop + 2 × shutdown grace + 1 s = ${needMs / 1000} s`);
      const natsUrl = effective(r, '--nats-url');
      if (!natsUrl) problems.push(`${where}: no NATS_URL`);
      else {
        for (const u of natsUrl.split(',')) {
          const m = /^nats:\/\/([^:/]+):(\d+)$/.exec(u.trim());
          const svcDoc = m && docs.find((d) => d.kind === 'Service' && d.metadata?.name === m[1]);
          if (m && !svcDoc?.spec?.ports?.some((p) => p.port === Number(m[2]))) problems.push(`${where}: NATS_URL ${u} names no Service port here`);
        }
      }
      if (svc !== 'scheduler') {
        const dir = r.args.get('--model-dir') ?? '';
        const mount = c.volumeMounts?.find((m) => dir.startsWith(`${m.mountPath}/`));
        const vol = mount && pod.volumes?.find((v) => v.name === mount.name);
        if (!vol?.persistentVolumeClaim) problems.push(`${where}: --model-dir ${dir} is not on a mounted PVC`);
        else if (!mount?.readOnly) problems.push(`${where}: model volume should be mounted read-only`);
      }
    }
  }
  // Services, budgets and autoscalers point at pods that exist, on ports those pods declare.
  for (const d of docs) {
    const where = `${label}: ${d.kind}/${d.metadata?.name}`;
    if (d.kind === 'Service') {
      const sel = (d.spec?.selector ?? {}) as Record<string, string>;
      const pods = workloads.filter((w) => matches(sel, podLabels(w)));
      if (!pods.length) problems.push(`${where}: selector matches no pods`);
      for (const p of d.spec?.ports ?? []) {
        const target = p.targetPort ?? p.port;
        const ok = pods.some((w) => podSpec(w)!.containers.some((c) => (c.ports ?? []).some((cp) => (typeof target === 'string' ? cp.name === target : cp.containerPort === target))));
        if (!ok) problems.push(`${where}: targetPort ${target} is no container port of its pods`);
      }
    }
    if (d.kind === 'PodDisruptionBudget') {
      const sel = (d.spec?.selector as { matchLabels?: Record<string, string> } | undefined)?.matchLabels ?? {};
      if (!workloads.some((w) => matches(sel, podLabels(w)))) problems.push(`${where}: selector matches no pods`);
    }
    if (d.kind === 'HorizontalPodAutoscaler') {
      const ref = d.spec?.scaleTargetRef;
      const target = docs.find((t) => t.kind === ref?.kind && t.metadata?.name === ref?.name);
      if (!target) problems.push(`${where}: scale target ${ref?.kind}/${ref?.name} not defined`);
      else if (target.spec?.replicas !== undefined) problems.push(`${where}: ${ref?.name} sets replicas, which fights the autoscaler on every apply`);
    }
  }
  // The scheduler's models are served by denoisers, their VAEs by decoders (names = model.json
  // names, i.e. the build Job's --name; checked against the Job separately).
  return problems;
}

async function render(dir: string): Promise<K8sDoc[]> {
  try {
    const r = await run('kubectl', ['kustomize', dir], { cwd: ROOT, timeout: 60_000, maxBuffer: 16 << 20 });
    return parseDocs(r.stdout, `kubectl kustomize ${rel(dir)}`).map((l) => l.doc);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') throw new Error('kubectl is not on PATH: these tests render the kustomizations with `kubectl kustomize` (kubectl >= 1.27)');
    throw new Error(`kubectl kustomize ${rel(dir)} failed: ${e.stderr ?? e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------

const files = yamlFiles(K8S);
const raw: Loaded[] = files.flatMap((f) => parseDocs(readFileSync(f, 'utf8'), rel(f)));
const kustomizations = files.filter(isKustomization);
const rendered = new Map<string, K8sDoc[]>();

beforeAll(async () => {
  await Promise.all(kustomizations.map(async (k) => rendered.set(rel(dirname(k)), await render(dirname(k)))));
  // Ask the CLI for the help of every command the manifests run, all at once (each is a process).
  const all = [...rendered.values()].flat().concat(raw.map((l) => l.doc));
  const containers = all.flatMap((d) => {
    const pod = podSpec(d);
    return pod ? [...(pod.initContainers ?? []), ...(pod.containers ?? [])] : [];
  });
  await Promise.all(containers.filter((c) => c.image && isDitpipe(c)).map((c) => cliSpec(c.args ?? [])));
});

describe('k8s manifests', () => {
  it('every YAML document is a Kubernetes object with apiVersion, kind and metadata.name', () => {
    expect(files.length).toBeGreaterThan(5);
    for (const { file, doc } of raw) {
      expect(doc.apiVersion, file).toMatch(/^[a-z0-9.\-/]*v\d/);
      expect(doc.kind, file).toMatch(/^[A-Z]\w+$/);
      if (isKustomization(file)) expect(doc.kind, file).toBe('Kustomization');
      else expect(doc.metadata?.name, `${file} ${doc.kind}`).toMatch(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/);
    }
  });

  it('kustomizations list files that exist, and every file beside one is listed in it', () => {
    expect(kustomizations.map(rel)).toEqual(expect.arrayContaining(['k8s/base/kustomization.yaml', 'k8s/overlays/gpu/kustomization.yaml']));
    for (const k of kustomizations) {
      const doc = parseDocs(readFileSync(k, 'utf8'), rel(k))[0].doc as { resources?: string[]; patches?: Array<{ path?: string }>; components?: string[] };
      const listed = [...(doc.resources ?? []), ...(doc.components ?? []), ...(doc.patches ?? []).flatMap((p) => (p.path ? [p.path] : []))];
      expect(listed.length, rel(k)).toBeGreaterThan(0);
      for (const entry of listed) {
        const p = resolve(dirname(k), entry);
        const ok = existsSync(p) && (statSync(p).isFile() || existsSync(join(p, 'kustomization.yaml')));
        expect(ok, `${rel(k)} lists ${entry}, which is not a file or a kustomization directory`).toBe(true);
      }
      for (const f of readdirSync(dirname(k)).filter((f) => /\.ya?ml$/.test(f) && !isKustomization(f))) {
        expect(listed, `${rel(join(dirname(k), f))} is not in ${rel(k)}`).toContain(f);
      }
    }
  });

  it('the base renders, and every container in it is true to the CLI, its ports, probes and shutdown', async () => {
    const docs = rendered.get('k8s/base')!;
    const kinds = docs.map((d) => `${d.kind}/${d.metadata?.name}`);
    for (const want of ['Deployment/ditpipe-scheduler', 'Deployment/ditpipe-denoiser', 'Deployment/ditpipe-decoder', 'Service/ditpipe-scheduler', 'HorizontalPodAutoscaler/ditpipe-decoder', 'PodDisruptionBudget/ditpipe-denoiser', 'PodDisruptionBudget/ditpipe-decoder', 'Service/nats']) {
      expect(kinds).toContain(want);
    }
    expect(await checkSet('k8s/base', docs)).toEqual([]);
  });

  it('the GPU overlay renders to CUDA denoisers, one GPU each, on GPU nodes, and stays true to the CLI', async () => {
    const docs = rendered.get('k8s/overlays/gpu')!;
    expect(await checkSet('k8s/overlays/gpu', docs)).toEqual([]);
    const den = docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-denoiser')!;
    const pod = podSpec(den)!;
    const c = pod.containers.find((x) => x.name === 'denoiser')!;
    const r = await resolveContainer(c, docs, 'gpu denoiser');
    expect(effective(r, '--execution-provider')).toBe('cuda');
    expect(String(c.resources?.limits?.['nvidia.com/gpu'])).toBe('1');
    expect(splitImage(c.image!).tag).toBe(`${VERSION}-cuda`);
    expect(Object.keys(pod.nodeSelector ?? {}).length).toBeGreaterThan(0);
    expect(pod.tolerations?.some((t) => t.key === 'nvidia.com/gpu')).toBe(true);
    // The other services keep the CPU image and provider.
    const dec = docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-decoder')!;
    const dc = podSpec(dec)!.containers[0];
    expect(effective(await resolveContainer(dc, docs, 'gpu decoder'), '--execution-provider')).toBe('cpu');
    expect(dc.resources?.limits?.['nvidia.com/gpu']).toBeUndefined();
  });

  it('the model build Job and upload pod use real CLI flags, and build exactly the models the services serve', async () => {
    const base = rendered.get('k8s/base')!;
    const jobs = raw.filter((l) => l.file.startsWith('k8s/jobs/')).map((l) => l.doc);
    expect(jobs.map((d) => d.kind)).toEqual(expect.arrayContaining(['Job', 'Pod']));
    expect(await checkSet('k8s/jobs', [...base, ...jobs])).toEqual([]);

    const built = { dit: new Map<string, string>(), vae: new Map<string, string>() }; // --out → --name
    const pairedVae = new Map<string, string>(); // DiT name → its --vae
    for (const job of jobs) {
      const pod = podSpec(job)!;
      for (const c of [...(pod.initContainers ?? []), ...pod.containers].filter(isDitpipe)) {
        const r = await resolveContainer(c, base, `${job.metadata?.name}/${c.name}`);
        const kind = r.spec.path.join(' ');
        if (kind === 'model build dit' || kind === 'model build vae') {
          const out = r.args.get('--out')!;
          const name = r.args.get('--name') ?? basename(out);
          built[kind === 'model build dit' ? 'dit' : 'vae'].set(out, name);
          const vae = r.args.get('--vae');
          if (kind === 'model build dit' && vae) pairedVae.set(name, vae);
          expect(r.args.get('--weights'), `${c.name} --weights`).toMatch(/^\/models\//);
        }
      }
    }
    const byName = (n: string): K8sDoc => base.find((d) => d.kind === 'Deployment' && d.metadata?.name === n)!;
    const main = async (n: string): Promise<Resolved> => resolveContainer(podSpec(byName(n))!.containers[0], base, n);
    const den = await main('ditpipe-denoiser');
    const dec = await main('ditpipe-decoder');
    const sch = await main('ditpipe-scheduler');
    const ditName = built.dit.get(den.args.get('--model-dir')!);
    const vaeName = built.vae.get(dec.args.get('--model-dir')!);
    expect(ditName, `the Job builds no DiT into the denoiser's --model-dir ${den.args.get('--model-dir')}`).toBeDefined();
    expect(vaeName, `the Job builds no VAE into the decoder's --model-dir ${dec.args.get('--model-dir')}`).toBeDefined();
    const models = (effective(sch, '--models') ?? '').split(',').map((s) => s.trim());
    expect(models).toContain(den.args.get('--name') ?? ditName);
    const vaeMap = Object.fromEntries((effective(sch, '--vae') ?? '').split(',').filter(Boolean).map((kv) => kv.split('=')));
    for (const m of Object.keys(vaeMap)) expect(models, `DITPIPE_VAE names model ${m}`).toContain(m);
    // The scheduler pairs a model with model.json's VAE, else DITPIPE_VAE: either way, the decoder's.
    const served = dec.args.get('--name') ?? vaeName;
    expect(pairedVae.get(ditName!) ?? vaeMap[ditName!], `VAE of ${ditName}`).toBe(served);
    if (vaeMap[ditName!] !== undefined) expect(vaeMap[ditName!]).toBe(served);
  });

  it('NATS gets an explicit max_payload that nats-server accepts', async () => {
    const cm = rendered.get('k8s/base')!.find((d) => d.kind === 'ConfigMap' && d.metadata?.name === 'nats-config')!;
    const conf = cm.data?.['nats.conf'] ?? '';
    expect(conf).toMatch(/^max_payload:\s*\S+/m);
    const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(join(tmpdir(), 'ditpipe-k8s-'));
    try {
      writeFileSync(join(dir, 'nats.conf'), conf);
      const r = await run('nats-server', ['-c', join(dir, 'nats.conf'), '-t'], { timeout: 20_000 });
      expect(`${r.stdout}${r.stderr}`).toMatch(/valid/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a renamed flag or environment variable would be caught', async () => {
    // The checks above pass only because the CLI has these names; show they fail otherwise.
    const docs = structuredClone(rendered.get('k8s/base')!);
    const den = podSpec(docs.find((d) => d.metadata?.name === 'ditpipe-denoiser')!)!.containers[0];
    den.args = [...(den.args ?? []), '--model-directory', '/x'];
    den.env = [...(den.env ?? []), { name: 'DITPIPE_EXECUTION_PROVIDERS', value: 'cpu' }];
    den.readinessProbe!.grpc!.port = 50051;
    // TLS without a Secret behind it, and a scheduler bound to loopback inside its pod.
    const sch = podSpec(docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-scheduler')!)!.containers[0];
    sch.env = [...(sch.env ?? []).filter((e) => e.name !== 'DITPIPE_TLS_KEY'), { name: 'DITPIPE_TLS_KEY', value: '/tmp/tls.key' }, { name: 'DITPIPE_HOST', value: '127.0.0.1' }];
    const problems = (await checkSet('mutated', docs)).join('\n');
    expect(problems).toMatch(/--tls-key \/tmp\/tls\.key is not on a mounted Secret/);
    expect(problems).toMatch(/ditpipe-scheduler container scheduler: --host is 127\.0\.0\.1/);
    expect(problems).toMatch(/has no flag --model-directory/);
    expect(problems).toMatch(/reads no environment variable DITPIPE_EXECUTION_PROVIDERS/);
    expect(problems).toMatch(/readinessProbe probes port 50051, health answers in plaintext on 50052/);
  });
});

describe('k8s/Dockerfile', () => {
  const text = readFileSync(join(K8S, 'Dockerfile'), 'utf8');
  const lines = text.split('\n').filter((l) => l.trim() && !l.trimStart().startsWith('#'));

  it('builds on a pinned Node 20 slim image, installs with the CUDA download skipped, runs the CLI as non-root', () => {
    const base = /^ARG BASE_IMAGE=(\S+)$/m.exec(text)?.[1] ?? '';
    expect(base).toMatch(/^node:20(\.\d+)*-(\w+-)?slim$/);
    expect(lines.filter((l) => l.startsWith('FROM ')).every((l) => /^FROM \$\{BASE_IMAGE\}/.test(l))).toBe(true);
    expect(text).toMatch(/^ARG ONNXRUNTIME_NODE_INSTALL=skip$/m);
    expect(text).toMatch(/ONNXRUNTIME_NODE_INSTALL=\$\{ONNXRUNTIME_NODE_INSTALL\} npm ci\b/);
    expect(text).toMatch(/^ENTRYPOINT \["node", "bin\/ditpipe\.js"\]$/m);
    expect(existsSync(join(ROOT, 'bin/ditpipe.js'))).toBe(true);
    const user = /^USER (\d+)(?::(\d+))?$/m.exec(text);
    expect(Number(user?.[1])).toBeGreaterThan(0);
    // The pods' runAsUser is the image's user.
    const applied = [...rendered.values()].flat().concat(raw.filter((l) => l.file.startsWith('k8s/jobs/')).map((l) => l.doc));
    for (const doc of applied) {
      const pod = podSpec(doc);
      if (pod?.containers.some(isDitpipe)) expect(pod.securityContext?.runAsUser, `${doc.kind}/${doc.metadata?.name}`).toBe(Number(user?.[1]));
    }
  });

  it('copies every directory the CLI imports from, and nothing it copies is missing', () => {
    const copied = new Set<string>();
    for (const l of lines.filter((l) => l.startsWith('COPY ') && !l.includes('--from='))) {
      const srcs = l.split(/\s+/).slice(1, -1);
      for (const s of srcs) {
        expect(existsSync(join(ROOT, s)), `COPY ${s}`).toBe(true);
        copied.add(s.replace(/\/$/, ''));
      }
    }
    // Walk the import graph from the entry point (static, dynamic and new URL(...) assets).
    const seen = new Set<string>();
    const todo = [join(ROOT, 'bin/ditpipe.js')];
    while (todo.length) {
      const f = todo.pop()!;
      if (seen.has(f)) continue;
      seen.add(f);
      if (!/\.(ts|mjs|js)$/.test(f)) continue;
      const src = readFileSync(f, 'utf8');
      for (const m of src.matchAll(/(?:from\s+|import\s*\(\s*|import\s+|new URL\(\s*)'(\.\.?\/[^']+)'/g)) {
        const target = resolve(dirname(f), m[1]);
        expect(existsSync(target), `${rel(f)} imports ${m[1]}`).toBe(true);
        todo.push(target);
      }
    }
    const tops = new Set([...seen].map((f) => rel(f).split('/')[0]));
    expect(tops.size).toBeGreaterThan(2);
    for (const t of tops) expect(copied, `the image lacks ${t}/, which the CLI imports`).toContain(t);
    expect(copied).toContain('package-lock.json');
  });

  it('keeps the host node_modules out of the build context', () => {
    const ignore = readFileSync(join(K8S, 'Dockerfile.dockerignore'), 'utf8').split('\n').map((l) => l.trim());
    expect(ignore).toContain('node_modules');
    // Nothing the image copies is ignored.
    for (const l of lines.filter((l) => l.startsWith('COPY ') && !l.includes('--from='))) {
      for (const s of l.split(/\s+/).slice(1, -1)) expect(ignore, `COPY ${s} is dockerignored`).not.toContain(s.replace(/\/$/, ''));
    }
  });
});
