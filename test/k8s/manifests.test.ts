// Keeps k8s/ true to the code: every flag and environment variable a manifest gives a ditpipe
// container must be one the CLI really has (read from `ditpipe <cmd> --help`, so renaming a flag
// breaks this test), probe and metrics ports must be the ports the services listen on, shutdown
// timings must fit, model names must line up between the build Job, the replicas and the
// scheduler, and the kustomizations must render (`kubectl kustomize`). Every rendered object is
// validated against the Kubernetes API schemas and KEDA's CRDs (./schemas.ts); KEDA ScaledObjects
// must read the work queue their target's replicas create (named by the services' own code) from
// NATS's monitoring port, and on a real nats-server run with the rendered config the queues must
// fit and report the lag KEDA reads.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import { DEFAULT_SECRET, k8sAuthorization, nkeyVariable } from '../../cli/nats-config.ts';
import { UnauthenticatedError } from '../../shared/errors.ts';
import { NATS_SERVICES, type NatsService } from '../../shared/transport/nats-permissions.ts';
import type { Transport } from '../../shared/transport/types.ts';
import { queueFromFlags } from '../../cli/common.ts';
import { DecodeRequest, DecodeResponse, DecoderDefinition, DecoderInfo } from '../../shared/gen/ditpipe/v1/decoder.ts';
import { DenoiseRequest, DenoiseResponse, DenoiserDefinition, DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { SERVICE_NAMES } from '../../shared/server/grpc.ts';
import { connectNats, natsTransport } from '../../shared/transport/nats.ts';
import { methodSubject } from '../../shared/transport/rpc.ts';
import { DEFAULT_QUEUE_SETTINGS, queueSpec } from '../../shared/transport/work.ts';
import { helpSpec, type CliSpec } from '../helpers/cli-help.ts';
import { assertNoNatsServersRunning, startNatsServer } from '../helpers/nats.ts';
import { validateObject } from './schemas.ts';

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
  namespace?: string;
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
  env?: Array<{
    name: string;
    value?: string;
    valueFrom?: { configMapKeyRef?: { name: string; key: string }; secretKeyRef?: { name: string; key: string } };
  }>;
  envFrom?: Array<{ configMapRef?: { name: string }; secretRef?: { name: string } }>;
  ports?: Array<{ name?: string; containerPort: number }>;
  startupProbe?: Probe;
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] }; sleep?: { seconds: number } } };
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  securityContext?: {
    runAsNonRoot?: boolean;
    runAsUser?: number;
    readOnlyRootFilesystem?: boolean;
    allowPrivilegeEscalation?: boolean;
    capabilities?: { drop?: string[] };
  };
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
}
interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  terminationGracePeriodSeconds?: number;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; runAsGroup?: number; fsGroup?: number };
  volumes?: Array<{
    name: string;
    emptyDir?: unknown;
    persistentVolumeClaim?: { claimName: string; readOnly?: boolean };
    configMap?: { name: string };
    secret?: { secretName: string; optional?: boolean; defaultMode?: number; items?: Array<{ key: string; path: string }> };
  }>;
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
    scaleTargetRef?: { apiVersion?: string; kind?: string; name: string };
    minReplicas?: number;
    maxReplicas?: number;
    // KEDA ScaledObject
    minReplicaCount?: number;
    maxReplicaCount?: number;
    triggers?: Array<{ type: string; name?: string; metadata: Record<string, string> }>;
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
  return colon > slash
    ? { repo: ref.slice(0, colon), tag: ref.slice(colon + 1), digest: Boolean(digest) }
    : { repo: ref, tag: '', digest: Boolean(digest) };
}

const isDitpipe = (c: Container): boolean =>
  splitImage(c.image ?? '')
    .repo.split('/')
    .pop() === 'ditpipe' && !c.command;

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
const HEALTH_NAME: Record<string, string> = {
  scheduler: SERVICE_NAMES.sampler,
  denoiser: SERVICE_NAMES.denoiser,
  decoder: SERVICE_NAMES.decoder,
};

/** Every check on a set of objects that is applied together (a rendered kustomization). */
async function checkSet(label: string, docs: K8sDoc[]): Promise<string[]> {
  const problems: string[] = [];
  const queueSettings = new Map<string, string>();
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
        if (claim && !docs.some((d) => d.kind === 'PersistentVolumeClaim' && d.metadata?.name === claim))
          problems.push(`${where}: PVC ${claim} is not defined`);
      }
      if (!isDitpipe(c)) continue;
      if (img.tag !== VERSION && img.tag !== `${VERSION}-cuda`)
        problems.push(`${where}: ditpipe image tag ${img.tag} is not the package version ${VERSION} (or ${VERSION}-cuda)`);
      // tsx writes its transpile cache under $TMPDIR: a read-only root needs a writable /tmp.
      if (sc.readOnlyRootFilesystem !== true) problems.push(`${where}: root filesystem not read-only`);
      const tmp = c.volumeMounts?.find((m) => m.mountPath === '/tmp');
      if (!tmp || !pod.volumes?.find((v) => v.name === tmp.name)?.emptyDir) problems.push(`${where}: no emptyDir at /tmp (tsx cache)`);
      const r = await resolveContainer(c, docs, where);
      problems.push(...r.problems);
      const svc = r.spec.path.join(' ');
      if (!(svc in GRPC_PORT)) continue;

      // Whichever service starts first creates the work queues and later ones update them, so
      // every service must see the same queue settings.
      queueSettings.set(where, QUEUE_FLAGS.map((f) => `${f} ${effective(r, f)}`).join(', '));

      // A long-running service: ports, probes, metrics, shutdown.
      const help = r.spec.options.get('--grpc-port')?.default;
      if (Number(help) !== GRPC_PORT[svc])
        problems.push(`${where}: ditpipe ${svc} --grpc-port default is ${help}, expected ${GRPC_PORT[svc]}`);
      const grpcPort = effectiveInt(r, '--grpc-port');
      const healthPort = effectiveInt(r, '--health-port');
      const metricsPort = effectiveInt(r, '--metrics-port');
      const graceMs = effectiveInt(r, '--shutdown-grace');
      const ports = new Map((c.ports ?? []).map((p) => [p.name, p.containerPort]));
      if (grpcPort >= 0 && ports.get('grpc') !== grpcPort)
        problems.push(`${where}: containerPort "grpc" is ${ports.get('grpc')}, the service listens on ${grpcPort}`);
      if (grpcPort < 0 && ports.has('grpc'))
        problems.push(`${where}: containerPort "grpc" declared, but the gRPC API is off (--grpc-port -1)`);
      if (healthPort >= 0 && ports.get('health') !== healthPort)
        problems.push(`${where}: containerPort "health" is ${ports.get('health')}, the health port is ${healthPort}`);
      if (ports.get('metrics') !== metricsPort)
        problems.push(`${where}: containerPort "metrics" is ${ports.get('metrics')}, metrics are on ${metricsPort}`);
      // Pods are reached on their pod IP: a service bound to loopback would answer nothing.
      for (const flag of ['--host', '--metrics-host']) {
        if (effective(r, flag) !== '0.0.0.0')
          problems.push(
            `${where}: ${flag} is ${effective(r, flag)}; probes and scrapes come from outside the pod (the image sets 0.0.0.0)`,
          );
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
        if (probe.grpc.port !== probePort)
          problems.push(`${where}: ${kind} probes port ${probe.grpc.port}, health answers in plaintext on ${probePort}`);
        const name = probe.grpc.service ?? '';
        if (name !== '' && name !== HEALTH_NAME[svc])
          problems.push(`${where}: ${kind} asks health of "${name}", the server reports "" and "${HEALTH_NAME[svc]}"`);
      }
      const window = (p: Probe | undefined): number => (p?.periodSeconds ?? 10) * (p?.failureThreshold ?? 3);
      if (svc !== 'scheduler' && window(c.startupProbe) < 120)
        problems.push(`${where}: startup probe allows ${window(c.startupProbe)} s to load a model`);
      if (window(c.livenessProbe) < 30) problems.push(`${where}: liveness probe restarts after ${window(c.livenessProbe)} s`);
      const ann = podAnnotations(w);
      if (
        ann['prometheus.io/scrape'] !== 'true' ||
        ann['prometheus.io/path'] !== '/metrics' ||
        Number(ann['prometheus.io/port']) !== metricsPort
      ) {
        problems.push(`${where}: prometheus annotations ${JSON.stringify(ann)} do not point at :${metricsPort}/metrics`);
      }
      // Shutdown: the service drains for up to the grace, then the NATS connection drains for up
      // to the grace (cli/common.ts serveUntilSignal), gRPC closes within 1 s; preStop comes first.
      const needMs = preStopMs(c) + 2 * graceMs + 1000;
      const tgps = pod.terminationGracePeriodSeconds ?? 30;
      if (tgps * 1000 <= needMs)
        problems.push(`${where}: terminationGracePeriodSeconds ${tgps} s ≤ preStop + 2 × shutdown grace + 1 s = ${needMs / 1000} s`);
      const natsUrl = effective(r, '--nats-url');
      if (!natsUrl) problems.push(`${where}: no NATS_URL`);
      else {
        for (const u of natsUrl.split(',')) {
          const m = /^nats:\/\/([^:/]+):(\d+)$/.exec(u.trim());
          const svcDoc = m && docs.find((d) => d.kind === 'Service' && d.metadata?.name === m[1]);
          if (m && !svcDoc?.spec?.ports?.some((p) => p.port === Number(m[2])))
            problems.push(`${where}: NATS_URL ${u} names no Service port here`);
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
        const ok = pods.some((w) =>
          podSpec(w)!.containers.some((c) =>
            (c.ports ?? []).some((cp) => (typeof target === 'string' ? cp.name === target : cp.containerPort === target)),
          ),
        );
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
      else if (target.spec?.replicas !== undefined)
        problems.push(`${where}: ${ref?.name} sets replicas, which fights the autoscaler on every apply`);
    }
    if (d.kind === 'ScaledObject') problems.push(...(await checkScaledObject(label, d, docs)));
  }
  // One autoscaler per workload: KEDA makes its own HPA for a ScaledObject, and two HPAs on one
  // Deployment set its replicas in turn.
  const scalers = new Map<string, string[]>();
  for (const d of docs) {
    const ref = d.spec?.scaleTargetRef;
    if (!ref || (d.kind !== 'HorizontalPodAutoscaler' && d.kind !== 'ScaledObject')) continue;
    const key = `${ref.kind ?? 'Deployment'}/${ref.name}`;
    scalers.set(key, [...(scalers.get(key) ?? []), `${d.kind}/${d.metadata?.name}`]);
  }
  for (const [target, by] of scalers)
    if (by.length > 1) problems.push(`${label}: ${target} is scaled by ${by.join(' and ')}, which fight over its replicas`);
  if (new Set(queueSettings.values()).size > 1) {
    problems.push(
      `${label}: the services get different work-queue settings:\n${[...queueSettings].map(([w, q]) => `  ${w}: ${q}`).join('\n')}`,
    );
  }
  // The scheduler's models are served by denoisers, their VAEs by decoders (names = model.json
  // names, i.e. the build Job's --name; checked against the Job separately).
  return problems;
}

// ---------------------------------------------------------------------------------------------
// KEDA: ScaledObjects on the lag of the services' work queues.

/** What k8s/jobs builds: --out directory → the model's kind, name and (DiT) VAE. Filled in beforeAll. */
const built = new Map<string, { kind: 'dit' | 'vae'; name: string; vae?: string }>();

async function readBuilt(jobs: K8sDoc[]): Promise<void> {
  for (const job of jobs) {
    const pod = podSpec(job);
    for (const c of [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])].filter(isDitpipe)) {
      const r = await resolveContainer(c, [], `${job.metadata?.name}/${c.name}`);
      const kind = r.spec.path.join(' ');
      const out = r.args.get('--out');
      if ((kind === 'model build dit' || kind === 'model build vae') && out) {
        built.set(out, {
          kind: kind === 'model build dit' ? 'dit' : 'vae',
          name: r.args.get('--name') ?? basename(out),
          vae: r.args.get('--vae'),
        });
      }
    }
  }
}

const QUEUE_FLAGS = ['--queue-ack-wait', '--queue-max-deliver', '--queue-max-messages', '--queue-max-bytes', '--queue-max-age'];

/** The work queue of a replica serving `scope`, named by the code the services run. */
function workQueueOf(svc: 'denoiser' | 'decoder', scope: string): { stream: string; consumer: string; subject: string } {
  const definition = svc === 'denoiser' ? DenoiserDefinition : DecoderDefinition;
  const method = svc === 'denoiser' ? DenoiserDefinition.methods.denoise : DecoderDefinition.methods.decode;
  const spec = queueSpec(methodSubject(definition, method, { scope }), definition, { scope }, DEFAULT_QUEUE_SETTINGS);
  return { stream: spec.stream, consumer: spec.consumer, subject: spec.subject };
}

/** The model (denoiser) or VAE (decoder) a replica container serves: its --name, else the built directory's name. */
function servedName(r: Resolved): string | undefined {
  return effective(r, '--name') ?? built.get(effective(r, '--model-dir') ?? '')?.name;
}

/** The ditpipe service a workload runs, resolved, and the name it serves under. */
async function replicaOf(w: K8sDoc, docs: K8sDoc[]): Promise<{ svc: string; r: Resolved; scope: string | undefined } | undefined> {
  const c = podSpec(w)?.containers.find(isDitpipe);
  if (!c) return undefined;
  const r = await resolveContainer(c, docs, `${w.kind}/${w.metadata?.name}`);
  const svc = r.spec.path.join(' ');
  return { svc, r, scope: svc === 'denoiser' || svc === 'decoder' ? servedName(r) : undefined };
}

/** The models the render's schedulers serve, and the VAEs those models decode with. */
async function scheduled(docs: K8sDoc[]): Promise<{ models: Set<string>; vaes: Set<string> }> {
  const models = new Set<string>();
  const vaes = new Set<string>();
  for (const w of docs.filter((d) => d.kind === 'Deployment')) {
    const rep = await replicaOf(w, docs);
    if (rep?.svc !== 'scheduler') continue;
    const names = (effective(rep.r, '--models') ?? '')
      .split(',')
      .map((x) => x.trim())
      .filter(Boolean);
    const fallback = Object.fromEntries(
      (effective(rep.r, '--vae') ?? '')
        .split(',')
        .filter(Boolean)
        .map((kv) => kv.split('=').map((x) => x.trim())),
    );
    for (const m of names) {
      models.add(m);
      const vae = [...built.values()].find((b) => b.kind === 'dit' && b.name === m)?.vae ?? fallback[m];
      if (vae) vaes.add(vae);
    }
  }
  return { models, vaes };
}

/** The nats-server config file of the pods a Service selects (from their ConfigMap volumes). */
function natsConfOf(pods: K8sDoc[], docs: K8sDoc[]): string | undefined {
  for (const p of pods) {
    for (const v of podSpec(p)?.volumes ?? []) {
      const cm = v.configMap && docs.find((d) => d.kind === 'ConfigMap' && d.metadata?.name === v.configMap?.name);
      const conf = cm && Object.entries(cm.data ?? {}).find(([k]) => k.endsWith('.conf'))?.[1];
      if (conf) return conf;
    }
  }
  return undefined;
}

/**
 * Fresh credentials from `ditpipe nats-config --secret` (run for real), laid out as the render
 * uses them: the NATS pod's environment (its secretKeyRefs resolved) and, per service, the seed
 * file its pod mounts (written under dir).
 */
async function natsSecrets(
  docs: K8sDoc[],
  dir: string,
): Promise<{ env: Record<string, string>; seedOf: (docs: K8sDoc[], svc: NatsService) => string }> {
  const { stdout } = await run(process.execPath, [join(ROOT, 'bin/ditpipe.js'), 'nats-config', '--secret'], { timeout: 60_000 });
  const secret = parseYaml(stdout) as { metadata: { name: string }; stringData: Record<string, string> };
  expect(secret.metadata.name).toBe(DEFAULT_SECRET);
  const nats = docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'nats');
  const env: Record<string, string> = {};
  for (const e of podSpec(nats!)?.containers[0].env ?? []) {
    const ref = e.valueFrom?.secretKeyRef;
    if (ref?.name === secret.metadata.name) env[e.name] = secret.stringData[ref.key];
    else if (e.value !== undefined) env[e.name] = e.value;
  }
  const { writeFileSync, mkdirSync } = await import('node:fs');
  const seedOf = (all: K8sDoc[], svc: NatsService): string => {
    const m = seedMountOf(all, svc);
    expect(m, `${svc}: seed from the Secret`).toBeDefined();
    const file = join(dir, 'seeds', svc, m!.key);
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, secret.stringData[m!.key], { mode: 0o600 });
    return file;
  };
  return { env, seedOf };
}

/** Where a service's pod finds its NATS seed: NATS_NKEY → the Secret volume mounted there, and its one key. */
function seedMountOf(
  docs: K8sDoc[],
  svc: NatsService,
): { deployment: K8sDoc; path: string; secret: string; key: string; items: Array<{ key: string; path: string }> } | undefined {
  for (const d of docs.filter((x) => x.kind === 'Deployment' && podLabels(x)['app.kubernetes.io/component'] === svc)) {
    const pod = podSpec(d)!;
    const c = pod.containers.find(isDitpipe);
    const path = c?.env?.find((e) => e.name === 'NATS_NKEY')?.value;
    if (!c || !path) continue;
    const mount = c.volumeMounts?.find((m) => m.mountPath === dirname(path));
    const vol = pod.volumes?.find((v) => v.name === mount?.name);
    const item = vol?.secret?.items?.find((i) => i.path === basename(path));
    if (vol?.secret && item) return { deployment: d, path, secret: vol.secret.secretName, key: item.key, items: vol.secret.items ?? [] };
  }
  return undefined;
}

/** Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) selects these labels. */
function selects(
  sel: { matchLabels?: Record<string, string>; matchExpressions?: Array<{ key: string; operator: string; values?: string[] }> } | undefined,
  labels: Record<string, string>,
): boolean {
  if (!sel) return false;
  for (const [k, v] of Object.entries(sel.matchLabels ?? {})) if (labels[k] !== v) return false;
  for (const e of sel.matchExpressions ?? []) {
    const has = e.key in labels;
    if (e.operator === 'In' && !(has && e.values?.includes(labels[e.key]))) return false;
    if (e.operator === 'NotIn' && has && e.values?.includes(labels[e.key])) return false;
    if (e.operator === 'Exists' && !has) return false;
    if (e.operator === 'DoesNotExist' && has) return false;
  }
  return true;
}

interface PolicyPeer {
  podSelector?: Parameters<typeof selects>[0];
  namespaceSelector?: Parameters<typeof selects>[0];
  ipBlock?: unknown;
}
interface PolicyRule {
  ports?: Array<{ port?: number | string; protocol?: string }>;
  from?: PolicyPeer[];
}

/** The ingress rules of every NetworkPolicy that selects a pod with these labels. */
function ingressFor(docs: K8sDoc[], labels: Record<string, string>): PolicyRule[] | undefined {
  const policies = docs.filter(
    (d) => d.kind === 'NetworkPolicy' && selects((d.spec as { podSelector?: Parameters<typeof selects>[0] }).podSelector, labels),
  );
  if (policies.length === 0) return undefined;
  return policies.flatMap((p) => (p.spec as { ingress?: PolicyRule[] }).ingress ?? []);
}

function monitorPortOf(conf: string): number | undefined {
  const m = /^\s*http_port\s*[:=]\s*(\d+)/m.exec(conf) ?? /^\s*http\s*[:=]\s*"?(?:[^\s":]*:)?(\d+)"?\s*$/m.exec(conf);
  return m ? Number(m[1]) : undefined;
}

async function checkScaledObject(label: string, so: K8sDoc, docs: K8sDoc[]): Promise<string[]> {
  const problems: string[] = [];
  const where = `${label}: ScaledObject/${so.metadata?.name}`;
  const ref = so.spec?.scaleTargetRef;
  const kind = ref?.kind ?? 'Deployment';
  const target = docs.find((t) => t.kind === kind && t.apiVersion === (ref?.apiVersion ?? 'apps/v1') && t.metadata?.name === ref?.name);
  if (!target) return [`${where}: scale target ${kind}/${ref?.name} is not defined here`];
  if (target.metadata?.namespace !== so.metadata?.namespace)
    problems.push(`${where}: in namespace ${so.metadata?.namespace}, its target in ${target.metadata?.namespace}`);
  if (target.spec?.replicas !== undefined)
    problems.push(`${where}: ${ref?.name} sets replicas, which fights the autoscaler on every apply`);
  const min = so.spec?.minReplicaCount ?? 0; // KEDA's defaults
  const max = so.spec?.maxReplicaCount ?? 100;
  if (min < 1) {
    problems.push(
      `${where}: minReplicaCount ${min}: with no replica, new requests fail UNAVAILABLE (queueing nothing that would wake one) or wait out their deadline in the queue`,
    );
  }
  if (max < min) problems.push(`${where}: maxReplicaCount ${max} < minReplicaCount ${min}`);
  const rep = await replicaOf(target, docs);
  if (!rep || (rep.svc !== 'denoiser' && rep.svc !== 'decoder'))
    return [...problems, `${where}: ${kind}/${ref?.name} runs no denoiser or decoder, the services with work queues`];
  if (!rep.scope)
    return [
      ...problems,
      `${where}: no model name for ${ref?.name}'s --model-dir ${effective(rep.r, '--model-dir')} (k8s/jobs builds nothing there)`,
    ];
  const want = workQueueOf(rep.svc, rep.scope);
  const { models, vaes } = await scheduled(docs);
  if (rep.svc === 'denoiser' && !models.has(rep.scope))
    problems.push(`${where}: ${ref?.name} serves ${rep.scope}, which no scheduler lists in DITPIPE_MODELS (${[...models].join(', ')})`);
  if (rep.svc === 'decoder' && !vaes.has(rep.scope))
    problems.push(`${where}: ${ref?.name} serves ${rep.scope}, the VAE of none of the schedulers' models (${[...vaes].join(', ')})`);
  const triggers = so.spec?.triggers ?? [];
  if (triggers.length === 0) problems.push(`${where}: no triggers`);
  for (const [i, t] of triggers.entries()) {
    const tw = `${where} trigger ${t.name ?? i}`;
    if (t.type !== 'nats-jetstream') {
      problems.push(`${tw}: type ${t.type}; ditpipe's replicas scale on the lag of their work queue (nats-jetstream)`);
      continue;
    }
    const md = t.metadata ?? {};
    if (md.stream !== want.stream)
      problems.push(`${tw}: stream ${md.stream}, but ${ref?.name} serves ${rep.scope}, whose work queue is stream ${want.stream}`);
    if (md.consumer !== want.consumer)
      problems.push(`${tw}: consumer ${md.consumer}, but the replicas pull from consumer ${want.consumer}`);
    if (!/^[1-9]\d*$/.test(md.lagThreshold ?? '')) problems.push(`${tw}: lagThreshold ${md.lagThreshold} is not a positive integer`);
    if (md.activationLagThreshold !== undefined && !/^\d+$/.test(md.activationLagThreshold))
      problems.push(`${tw}: activationLagThreshold ${md.activationLagThreshold} is not an integer`);
    // KEDA's scaler runs in KEDA's namespace: the Service needs its namespace in the name.
    const ep = md.natsServerMonitoringEndpoint ?? '';
    const m = /^([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.svc(?:\.cluster\.local)?:(\d+)$/.exec(ep);
    if (!m) {
      problems.push(
        `${tw}: natsServerMonitoringEndpoint "${ep}" is not <service>.<namespace>.svc:<port> (KEDA reads it from its own namespace)`,
      );
      continue;
    }
    const [, svcName, ns, port] = m;
    const svc = docs.find((d) => d.kind === 'Service' && d.metadata?.name === svcName);
    if (!svc) {
      problems.push(`${tw}: natsServerMonitoringEndpoint names Service ${svcName}, which is not defined here`);
      continue;
    }
    if (svc.metadata?.namespace !== ns)
      problems.push(
        `${tw}: natsServerMonitoringEndpoint says namespace ${ns}, Service ${svcName} is in ${svc.metadata?.namespace ?? '(none set by the render)'}`,
      );
    const pods = docs.filter((w) => podSpec(w) && matches((svc.spec?.selector ?? {}) as Record<string, string>, podLabels(w)));
    const conf = natsConfOf(pods, docs);
    if (!conf) {
      problems.push(`${tw}: Service ${svcName} selects no pod with a nats-server config`);
      continue;
    }
    const sp = svc.spec?.ports?.find((p) => p.port === Number(port));
    const target = sp?.targetPort ?? sp?.port;
    const cports = pods.flatMap((p) => podSpec(p)!.containers.flatMap((c) => c.ports ?? []));
    const cport = typeof target === 'string' ? cports.find((p) => p.name === target)?.containerPort : target;
    const monitor = monitorPortOf(conf);
    if (!sp) problems.push(`${tw}: port ${port} is no port of Service ${svcName}`);
    else if (cport === undefined || cport !== monitor)
      problems.push(
        `${tw}: ${svcName}:${port} leads to container port ${cport}, but nats-server's monitoring endpoint (http_port) is on ${monitor}`,
      );
    // Without an accounts block every client is in the global account $G; https only with https_port.
    if (!/^\s*accounts\s*[:={]/m.test(conf) && md.account !== '$G')
      problems.push(`${tw}: account ${md.account}; nats-server has no accounts configured, so the queues are in $G`);
    const https = /^\s*https_port\s*[:=]/m.test(conf);
    if ((md.useHttps ?? 'false') !== String(https))
      problems.push(`${tw}: useHttps ${md.useHttps ?? 'false'}, but nats-server's monitoring is ${https ? 'https' : 'plain http'}`);
  }
  return problems;
}

async function render(dir: string): Promise<K8sDoc[]> {
  try {
    const r = await run('kubectl', ['kustomize', dir], { cwd: ROOT, timeout: 60_000, maxBuffer: 16 << 20 });
    return parseDocs(r.stdout, `kubectl kustomize ${rel(dir)}`).map((l) => l.doc);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT')
      throw new Error('kubectl is not on PATH: these tests render the kustomizations with `kubectl kustomize` (kubectl >= 1.27)', {
        cause: err,
      });
    throw new Error(`kubectl kustomize ${rel(dir)} failed: ${e.stderr ?? e.message}`, { cause: err });
  }
}

// ---------------------------------------------------------------------------------------------

const files = yamlFiles(K8S);
const raw: Loaded[] = files.flatMap((f) => parseDocs(readFileSync(f, 'utf8'), rel(f)));
const kustomizations = files.filter(isKustomization);
// A kustomize Component (k8s/components/*) renders only as part of the overlays that use it.
const renderable = kustomizations.filter((k) => parseDocs(readFileSync(k, 'utf8'), rel(k))[0]?.doc.kind === 'Kustomization');
const rendered = new Map<string, K8sDoc[]>();
/** JSON patches (RFC 6902) are YAML lists of operations, not objects. */
const isJsonPatch = (doc: unknown): boolean => Array.isArray(doc);

beforeAll(async () => {
  await Promise.all(renderable.map(async (k) => rendered.set(rel(dirname(k)), await render(dirname(k)))));
  // Ask the CLI for the help of every command the manifests run, all at once (each is a process).
  const all = [...rendered.values()].flat().concat(raw.map((l) => l.doc));
  const containers = all.flatMap((d) => {
    const pod = podSpec(d);
    return pod ? [...(pod.initContainers ?? []), ...(pod.containers ?? [])] : [];
  });
  await Promise.all(containers.filter((c) => c.image && isDitpipe(c)).map((c) => cliSpec(c.args ?? [])));
  await readBuilt(raw.filter((l) => l.file.startsWith('k8s/jobs/')).map((l) => l.doc));
});

describe('k8s manifests', () => {
  it('every YAML document is a Kubernetes object with apiVersion, kind and metadata.name', () => {
    expect(files.length).toBeGreaterThan(5);
    for (const { file, doc } of raw) {
      if (isJsonPatch(doc)) {
        // Only as a kustomization's patch with a target (a JSON patch names no object itself).
        for (const op of doc as unknown as Array<{ op?: string; path?: string }>) {
          expect(op.op, file).toMatch(/^(add|remove|replace|move|copy|test)$/);
          expect(op.path, file).toMatch(/^\//);
        }
        const users = kustomizations.filter((k) =>
          (parseDocs(readFileSync(k, 'utf8'), rel(k))[0].doc as { patches?: Array<{ path?: string; target?: unknown }> }).patches?.some(
            (p) => p.path && resolve(dirname(k), p.path) === join(ROOT, file) && p.target,
          ),
        );
        expect(users.length, `${file} is a JSON patch that no kustomization applies with a target`).toBeGreaterThan(0);
        continue;
      }
      expect(doc.apiVersion, file).toMatch(/^[a-z0-9.\-/]*v\d/);
      expect(doc.kind, file).toMatch(/^[A-Z]\w+$/);
      if (isKustomization(file)) expect(doc.kind, file).toMatch(/^(Kustomization|Component)$/);
      else expect(doc.metadata?.name, `${file} ${doc.kind}`).toMatch(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/);
    }
  });

  it("every rendered object, and every object in k8s/jobs, is valid against the Kubernetes 1.27 API schemas or KEDA's CRDs", () => {
    expect([...rendered.keys()].sort()).toEqual(['k8s/base', 'k8s/overlays/gpu', 'k8s/overlays/gpu-keda', 'k8s/overlays/keda']);
    const problems: string[] = [];
    let n = 0;
    for (const [dir, docs] of rendered) {
      for (const d of docs) {
        n++;
        problems.push(...validateObject(d).map((p) => `${dir}: ${p}`));
      }
    }
    for (const { file, doc } of raw.filter((l) => l.file.startsWith('k8s/jobs/'))) {
      n++;
      problems.push(...validateObject(doc).map((p) => `${file}: ${p}`));
    }
    expect(problems).toEqual([]);
    expect(n).toBeGreaterThan(60);
  });

  it('schema validation catches wrong types, missing required fields, unknown fields and unknown kinds', () => {
    const docs = structuredClone(rendered.get('k8s/overlays/keda')!);
    const so = docs.find((d) => d.kind === 'ScaledObject' && d.metadata?.name === 'ditpipe-denoiser')!;
    const spec = so.spec as Record<string, unknown> & {
      scaleTargetRef: Record<string, unknown>;
      triggers: Array<{ metadata: Record<string, unknown> }>;
    };
    spec.minReplicas = 1; // the HPA's name for KEDA's minReplicaCount
    delete spec.scaleTargetRef.name;
    spec.triggers[0].metadata.lagThreshold = 8; // KEDA takes strings only
    const so2 = validateObject(so).join('\n');
    expect(so2).toMatch(/\/spec\/minReplicas is not a field of keda\.sh\/v1alpha1 ScaledObject/);
    expect(so2).toMatch(/\/spec\/scaleTargetRef must have required property name/);
    expect(so2).toMatch(/\/spec\/triggers\/0\/metadata\/lagThreshold must be string/);
    const den = docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-denoiser')!;
    (den.spec as Record<string, unknown>).replica = 2;
    const c = podSpec(den)!.containers[0] as Container & Record<string, unknown>;
    c.imagePullPolice = 'Always';
    c.resources!.limits!.memory = 'eight gigs';
    (c.ports![0] as Record<string, unknown>).containerPort = '50052';
    const d2 = validateObject(den).join('\n');
    expect(d2).toMatch(/\/spec\/replica is not a field of apps\/v1 Deployment/);
    expect(d2).toMatch(/\/spec\/template\/spec\/containers\/0\/imagePullPolice is not a field/);
    expect(d2).toMatch(/\/spec\/template\/spec\/containers\/0\/resources\/limits\/memory must match format "quantity"/);
    expect(d2).toMatch(/\/spec\/template\/spec\/containers\/0\/ports\/0\/containerPort must be integer/);
    // Maps take any key: labels, ConfigMap data, trigger metadata.
    const cm = docs.find((d) => d.kind === 'ConfigMap')!;
    cm.data = { ...cm.data, ANY_KEY: 'x' };
    cm.metadata!.labels = { ...cm.metadata?.labels, 'example.com/any': 'y' };
    expect(validateObject(cm)).toEqual([]);
    expect(validateObject({ apiVersion: 'keda.sh/v1', kind: 'ScaledObject', metadata: { name: 'x' } })).toEqual([
      'ScaledObject/x: no schema for apiVersion keda.sh/v1 kind ScaledObject (neither Kubernetes 1.27 nor KEDA)',
    ]);
  });

  it('kustomizations list files that exist, and every file beside one is listed in it', () => {
    expect(kustomizations.map(rel)).toEqual(
      expect.arrayContaining([
        'k8s/base/kustomization.yaml',
        'k8s/overlays/gpu/kustomization.yaml',
        'k8s/overlays/keda/kustomization.yaml',
        'k8s/overlays/gpu-keda/kustomization.yaml',
        'k8s/components/keda/kustomization.yaml',
      ]),
    );
    for (const k of kustomizations) {
      const doc = parseDocs(readFileSync(k, 'utf8'), rel(k))[0].doc as {
        resources?: string[];
        patches?: Array<{ path?: string }>;
        components?: string[];
      };
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
    for (const want of [
      'Deployment/ditpipe-scheduler',
      'Deployment/ditpipe-denoiser',
      'Deployment/ditpipe-decoder',
      'Service/ditpipe-scheduler',
      'HorizontalPodAutoscaler/ditpipe-decoder',
      'PodDisruptionBudget/ditpipe-denoiser',
      'PodDisruptionBudget/ditpipe-decoder',
      'Service/nats',
    ]) {
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

  it("the KEDA overlays scale denoisers and decoders on their work queues' lag, with no other autoscaler, in one namespace", async () => {
    for (const dir of ['k8s/overlays/keda', 'k8s/overlays/gpu-keda']) {
      const docs = rendered.get(dir)!;
      expect(await checkSet(dir, docs)).toEqual([]);
      const kinds = docs.map((d) => `${d.kind}/${d.metadata?.name}`);
      expect(kinds).toEqual(expect.arrayContaining(['ScaledObject/ditpipe-denoiser', 'ScaledObject/ditpipe-decoder', 'Namespace/ditpipe']));
      expect(
        kinds.filter((k) => k.startsWith('HorizontalPodAutoscaler/')),
        dir,
      ).toEqual([]);
      // The overlay sets the namespace the ScaledObjects' monitoring endpoint names.
      const namespaces = new Set(docs.filter((d) => d.kind !== 'Namespace').map((d) => d.metadata?.namespace));
      expect([...namespaces], dir).toEqual([docs.find((d) => d.kind === 'Namespace')?.metadata?.name]);
      for (const so of docs.filter((d) => d.kind === 'ScaledObject')) {
        expect(so.spec?.triggers?.map((t) => t.metadata.natsServerMonitoringEndpoint)).toEqual(['nats.ditpipe.svc:8222']);
      }
    }
  });

  it('lag thresholds are one pass of a replica in messages; GPU denoisers are bounded by the GPUs of the GPU overlay', async () => {
    // docs/kubernetes.md sizes a step message for a 4-image request with guidance: 4 × 2 rows.
    const ROWS_PER_STEP_MESSAGE = 8;
    const so = (docs: K8sDoc[], name: string): K8sDoc => docs.find((d) => d.kind === 'ScaledObject' && d.metadata?.name === name)!;
    const threshold = (docs: K8sDoc[], name: string): number => Number(so(docs, name).spec?.triggers?.[0].metadata.lagThreshold);
    const replica = async (docs: K8sDoc[], name: string): Promise<Resolved> =>
      (await replicaOf(
        docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === name)!,
        docs,
      ))!.r;
    for (const dir of ['k8s/overlays/keda', 'k8s/overlays/gpu-keda']) {
      const docs = rendered.get(dir)!;
      expect(threshold(docs, 'ditpipe-denoiser'), dir).toBe(
        effectiveInt(await replica(docs, 'ditpipe-denoiser'), '--max-batch-rows') / ROWS_PER_STEP_MESSAGE,
      );
      // A decode message is one image; a decoder pass takes --max-batch images.
      expect(threshold(docs, 'ditpipe-decoder'), dir).toBe(effectiveInt(await replica(docs, 'ditpipe-decoder'), '--max-batch'));
    }
    const cpu = rendered.get('k8s/overlays/keda')!;
    const gpu = rendered.get('k8s/overlays/gpu-keda')!;
    expect(threshold(cpu, 'ditpipe-denoiser')).toBe(8);
    expect(threshold(gpu, 'ditpipe-denoiser')).toBe(32);
    // One replica per GPU: KEDA may go up to the GPUs k8s/overlays/gpu runs on, no further.
    const gpuReplicas = rendered.get('k8s/overlays/gpu')!.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-denoiser')!
      .spec?.replicas;
    expect(so(gpu, 'ditpipe-denoiser').spec?.maxReplicaCount).toBe(gpuReplicas);
    const gpuPod = podSpec(gpu.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-denoiser')!)!;
    expect(String(gpuPod.containers[0].resources?.limits?.['nvidia.com/gpu'])).toBe('1');
    // The decoders stay on CPUs, scaled alike in both.
    expect(so(gpu, 'ditpipe-decoder').spec).toEqual(so(cpu, 'ditpipe-decoder').spec);
  });

  it('a ScaledObject out of step with the services, NATS or the other autoscalers would be caught', async () => {
    const base = rendered.get('k8s/overlays/keda')!;
    const mutated = async (change: (docs: K8sDoc[], so: (name: string) => K8sDoc) => void): Promise<string> => {
      const docs = structuredClone(base);
      change(docs, (name) => docs.find((d) => d.kind === 'ScaledObject' && d.metadata?.name === name)!);
      return (await checkSet('mutated', docs)).join('\n');
    };
    const trigger = (so: K8sDoc): Record<string, string> => so.spec!.triggers![0].metadata;
    // A model renamed everywhere but in the ScaledObject: the lag read is of a stream nobody uses.
    expect(await mutated((_, so) => (trigger(so('ditpipe-denoiser')).stream = 'ditpipe_v1_denoiser_dit-xl-2-512'))).toMatch(
      /stream ditpipe_v1_denoiser_dit-xl-2-512, but ditpipe-denoiser serves dit-xl-2-256, whose work queue is stream ditpipe_v1_denoiser_dit-xl-2-256/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).consumer = 'decoders'))).toMatch(
      /consumer decoders, but the replicas pull from consumer decoder/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).natsServerMonitoringEndpoint = 'nats.ditpipe.svc:4222'))).toMatch(
      /nats:4222 leads to container port 4222, but nats-server's monitoring endpoint \(http_port\) is on 8222/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).natsServerMonitoringEndpoint = 'nats:8222'))).toMatch(
      /"nats:8222" is not <service>\.<namespace>\.svc:<port>/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).natsServerMonitoringEndpoint = 'nats.default.svc:8222'))).toMatch(
      /says namespace default, Service nats is in ditpipe/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).account = 'DITPIPE'))).toMatch(
      /account DITPIPE; nats-server has no accounts configured/,
    );
    expect(await mutated((_, so) => (trigger(so('ditpipe-decoder')).lagThreshold = '0'))).toMatch(
      /lagThreshold 0 is not a positive integer/,
    );
    expect(await mutated((_, so) => (so('ditpipe-denoiser').spec!.scaleTargetRef!.name = 'ditpipe-denoisers'))).toMatch(
      /scale target Deployment\/ditpipe-denoisers is not defined here/,
    );
    expect(await mutated((_, so) => (so('ditpipe-denoiser').spec!.scaleTargetRef!.name = 'ditpipe-scheduler'))).toMatch(
      /runs no denoiser or decoder/,
    );
    expect(await mutated((_, so) => (so('ditpipe-denoiser').spec!.minReplicaCount = 0))).toMatch(/minReplicaCount 0: with no replica/);
    // The base's CPU autoscaler back in, a fixed count back in: both fight KEDA's HPA.
    const hpa = rendered.get('k8s/base')!.find((d) => d.kind === 'HorizontalPodAutoscaler')!;
    expect(await mutated((docs) => docs.push({ ...structuredClone(hpa), metadata: { ...hpa.metadata, namespace: 'ditpipe' } }))).toMatch(
      /Deployment\/ditpipe-decoder is scaled by ScaledObject\/ditpipe-decoder and HorizontalPodAutoscaler\/ditpipe-decoder|Deployment\/ditpipe-decoder is scaled by HorizontalPodAutoscaler\/ditpipe-decoder and ScaledObject\/ditpipe-decoder/,
    );
    expect(
      await mutated((docs) => (docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-denoiser')!.spec!.replicas = 3)),
    ).toMatch(/ScaledObject\/ditpipe-denoiser: ditpipe-denoiser sets replicas, which fights the autoscaler/);
    // Queue settings that differ between services (the queues would flip between them).
    expect(
      await mutated((docs) => {
        const c = podSpec(docs.find((d) => d.kind === 'Deployment' && d.metadata?.name === 'ditpipe-decoder')!)!.containers[0];
        c.env = [...(c.env ?? []), { name: 'DITPIPE_QUEUE_ACK_WAIT_MS', value: '5000' }];
      }),
    ).toMatch(/the services get different work-queue settings:[\s\S]*--queue-ack-wait 5000/);
    // Unchanged, it passes (the mutations above are what fails).
    expect(await checkSet('unchanged', structuredClone(base))).toEqual([]);
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
    const vaeMap = Object.fromEntries(
      (effective(sch, '--vae') ?? '')
        .split(',')
        .filter(Boolean)
        .map((kv) => kv.split('=')),
    );
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
      const { env } = await natsSecrets(rendered.get('k8s/base')!, dir);
      const r = await run('nats-server', ['-c', join(dir, 'nats.conf'), '-t'], { timeout: 20_000, env: { ...process.env, ...env } });
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
    sch.env = [
      ...(sch.env ?? []).filter((e) => e.name !== 'DITPIPE_TLS_KEY'),
      { name: 'DITPIPE_TLS_KEY', value: '/tmp/tls.key' },
      { name: 'DITPIPE_HOST', value: '127.0.0.1' },
    ];
    const problems = (await checkSet('mutated', docs)).join('\n');
    expect(problems).toMatch(/--tls-key \/tmp\/tls\.key is not on a mounted Secret/);
    expect(problems).toMatch(/ditpipe-scheduler container scheduler: --host is 127\.0\.0\.1/);
    expect(problems).toMatch(/has no flag --model-directory/);
    expect(problems).toMatch(/reads no environment variable DITPIPE_EXECUTION_PROVIDERS/);
    expect(problems).toMatch(/readinessProbe probes port 50051, health answers in plaintext on 50052/);
  });
});

// The queues of each render on a real nats-server run with the render's own NATS config: the
// server must hold them all (each reserves DITPIPE_QUEUE_MAX_BYTES of its memory store), and
// the lag KEDA reads from the monitoring endpoint for each ScaledObject must be the work in that
// model's queue.
describe('k8s NATS security', () => {
  const dirs = ['k8s/base', 'k8s/overlays/gpu', 'k8s/overlays/keda', 'k8s/overlays/gpu-keda'];

  it.each(dirs)('%s: NATS admits only the three ditpipe nkeys, with the permissions the code defines, from the Secret', (dir) => {
    const docs = rendered.get(dir)!;
    const nats = docs.filter((d) => d.kind === 'Deployment' && d.metadata?.name === 'nats');
    const conf = natsConfOf(nats, docs) ?? '';
    const flat = (t: string): string =>
      t
        .split('\n')
        .map((l) => l.trim())
        .filter((l) => l && !l.startsWith('#'))
        .join('\n');
    // The block is `ditpipe nats-config`'s output: regenerate it into nats.yaml when the permissions change.
    expect(flat(conf)).toContain(flat(k8sAuthorization()));
    expect(conf.match(/^\s*authorization\s*\{/gm)).toHaveLength(1);
    const env = podSpec(nats[0])!.containers[0].env ?? [];
    for (const svc of NATS_SERVICES) {
      expect(env.find((e) => e.name === nkeyVariable(svc))?.valueFrom?.secretKeyRef, svc).toEqual({
        name: DEFAULT_SECRET,
        key: `${svc}.pub`,
      });
    }
  });

  it.each(dirs)("%s: each service reads only its own seed from the Secret, a file its pod's user can read", (dir) => {
    const docs = rendered.get(dir)!;
    for (const svc of NATS_SERVICES) {
      const m = seedMountOf(docs, svc);
      expect(m, `${svc} mounts its seed and points NATS_NKEY at it`).toBeDefined();
      expect(m!.secret).toBe(DEFAULT_SECRET);
      expect(m!.items, svc).toEqual([{ key: `${svc}.nk`, path: `${svc}.nk` }]);
      const pod = podSpec(m!.deployment)!;
      const vol = pod.volumes!.find((v) => v.secret?.secretName === DEFAULT_SECRET)!;
      // Group-readable (0440) by the pod's group: not world-readable, yet readable by a non-root user.
      expect(vol.secret!.defaultMode).toBe(0o440);
      expect(pod.securityContext?.fsGroup).toBe(pod.securityContext?.runAsGroup);
    }
    // Every ditpipe service pod has one: none is left without a credential.
    const services = docs.filter((d) => d.kind === 'Deployment' && podSpec(d)?.containers.some(isDitpipe));
    for (const d of services)
      expect(
        podSpec(d)!
          .containers.find(isDitpipe)!
          .env?.some((e) => e.name === 'NATS_NKEY'),
        d.metadata?.name,
      ).toBe(true);
  });

  it.each(dirs)("%s: NetworkPolicies admit only ditpipe's service pods to NATS, nothing but scrapes to replicas", (dir) => {
    const docs = rendered.get(dir)!;
    const workloads = docs.filter((d) => d.kind === 'Deployment');
    const nats = workloads.find((d) => d.metadata?.name === 'nats')!;
    const natsRules = ingressFor(docs, podLabels(nats));
    expect(natsRules, 'a NetworkPolicy selects the NATS pod').toBeDefined();
    const clientPort = 4222;
    const clientRules = natsRules!.filter((r) => !r.ports || r.ports.some((p) => p.port === clientPort || p.port === 'client'));
    expect(clientRules.length).toBeGreaterThan(0);
    for (const r of clientRules) {
      // Only pods of this namespace, by label: no namespace or IP range, no rule open to all.
      expect(r.from?.length, 'NATS client port open to everyone').toBeGreaterThan(0);
      for (const peer of r.from!) expect(peer.namespaceSelector ?? peer.ipBlock, JSON.stringify(peer)).toBeUndefined();
    }
    const admitted = workloads.filter((w) => clientRules.some((r) => r.from!.some((peer) => selects(peer.podSelector, podLabels(w)))));
    expect(admitted.map((w) => podLabels(w)['app.kubernetes.io/component']).sort()).toEqual(['decoder', 'denoiser', 'scheduler']);
    // Other pods with the ditpipe image (e.g. the model build Job's) are not admitted.
    expect(
      selects(clientRules[0].from![0].podSelector, { 'app.kubernetes.io/name': 'ditpipe', 'app.kubernetes.io/component': 'model-build' }),
    ).toBe(false);
    for (const w of workloads.filter((x) => ['denoiser', 'decoder'].includes(podLabels(x)['app.kubernetes.io/component'] ?? ''))) {
      const rules = ingressFor(docs, podLabels(w));
      expect(rules, `${w.metadata?.name}: selected by a NetworkPolicy`).toBeDefined();
      const metrics = podSpec(w)!
        .containers.find(isDitpipe)!
        .ports!.find((p) => p.name === 'metrics')!.containerPort;
      for (const r of rules!) {
        expect(
          r.ports?.map((p) => p.port),
          `${w.metadata?.name} admits only its metrics port`,
        ).toEqual([metrics]);
        expect(r.from?.length, `${w.metadata?.name}: metrics open to everyone`).toBeGreaterThan(0);
      }
    }
    const scheduler = workloads.find((x) => podLabels(x)['app.kubernetes.io/component'] === 'scheduler')!;
    expect(ingressFor(docs, podLabels(scheduler)), 'the scheduler is selected by a NetworkPolicy').toBeDefined();
  });
});

describe('k8s work queues on a real nats-server', () => {
  afterAll(() => assertNoNatsServersRunning());

  /** The rendered nats.conf on free local ports, with a store directory of the test's own. */
  function localConf(conf: string, storeDir: string): string {
    const kept = conf.split('\n').filter((l) => !/^\s*(port|listen|http_port|https_port|http|https)\s*[:=]/.test(l));
    return kept.join('\n').replace(/^(\s*store_dir\s*[:=]\s*).*$/m, `$1${JSON.stringify(storeDir)}`);
  }

  interface Jsz {
    account_details?: Array<{
      name: string;
      stream_detail?: Array<{
        name: string;
        config?: { max_bytes?: number; subjects?: string[] };
        consumer_detail?: Array<{ name: string; num_pending: number; num_ack_pending: number }>;
      }>;
    }>;
  }

  it.each(['k8s/base', 'k8s/overlays/gpu', 'k8s/overlays/keda', 'k8s/overlays/gpu-keda'])(
    "%s: nats-server holds every work queue, and each ScaledObject reads its model's lag (waiting + taken)",
    async (dir) => {
      const docs = rendered.get(dir)!;
      const natsPods = docs.filter((d) => d.kind === 'Deployment' && d.metadata?.name === 'nats');
      const conf = natsConfOf(natsPods, docs);
      expect(conf, 'nats-server config').toBeDefined();
      const replicas: Array<{ svc: 'denoiser' | 'decoder'; scope: string; r: Resolved; deployment: string }> = [];
      for (const w of docs.filter((d) => d.kind === 'Deployment')) {
        const rep = await replicaOf(w, docs);
        if ((rep?.svc === 'denoiser' || rep?.svc === 'decoder') && rep.scope)
          replicas.push({ svc: rep.svc, scope: rep.scope, r: rep.r, deployment: w.metadata!.name! });
      }
      expect(replicas.map((x) => x.svc).sort()).toEqual(['decoder', 'denoiser']);
      const n = (r: Resolved, f: string): number => effectiveInt(r, f);
      const settings = queueFromFlags({
        queueAckWait: n(replicas[0].r, '--queue-ack-wait'),
        queueMaxDeliver: n(replicas[0].r, '--queue-max-deliver'),
        queueMaxMessages: n(replicas[0].r, '--queue-max-messages'),
        queueMaxBytes: n(replicas[0].r, '--queue-max-bytes'),
        queueMaxAge: n(replicas[0].r, '--queue-max-age'),
      });
      const store = mkdtempSync(join(tmpdir(), 'ditpipe-k8s-js-'));
      // Credentials as a platform team makes them (`ditpipe nats-config --secret`), each service
      // with the seed its pod mounts.
      const secrets = await natsSecrets(docs, store);
      const server = await startNatsServer({ jetstream: false, monitorPort: 0, extraConfig: localConf(conf!, store), env: secrets.env });
      await expect(connectNats({ servers: server.url })).rejects.toBeInstanceOf(UnauthenticatedError);
      const as = async (svc: 'scheduler' | 'denoiser' | 'decoder'): Promise<Transport> =>
        natsTransport(
          await connectNats({ servers: server.url, name: `k8s-test ${dir} ${svc}`, service: svc, nkeyFile: secrets.seedOf(docs, svc) }),
        );
      const transport = await as('scheduler');
      const replicaTransports = { denoiser: await as('denoiser'), decoder: await as('decoder') };
      let open = (): void => undefined;
      const gate = { promise: new Promise<void>((r) => (open = r)), resolve: () => open() };
      const ac = new AbortController();
      const calls: Array<Promise<unknown>> = [];
      try {
        // The replicas start first, as the services may, and wait for the scheduler's queues (settings from the render).
        for (const { svc, scope } of replicas) {
          if (svc === 'denoiser') {
            await replicaTransports.denoiser.serve(
              DenoiserDefinition,
              { denoise: async () => (await gate.promise, DenoiseResponse.create({})), info: () => DenoiserInfo.create({ model: scope }) },
              { scope, queueSettings: settings },
            );
          } else {
            await replicaTransports.decoder.serve(
              DecoderDefinition,
              { decode: async () => (await gate.promise, DecodeResponse.create({})), info: () => DecoderInfo.create({ model: scope }) },
              { scope, queueSettings: settings },
            );
          }
        }
        // Each replica holds one message (it serves one call at a time here) and 2 wait for it.
        const queues = [];
        for (const { svc, scope } of replicas) {
          if (svc === 'denoiser') {
            const client = transport.client(DenoiserDefinition, { scope, queueSettings: settings, timeoutMs: 60_000 });
            for (let i = 0; i < 3; i++)
              calls.push(
                client.denoise(DenoiseRequest.create({ model: scope, t: [1n], y: [0] }), { signal: ac.signal }).catch(() => undefined),
              );
            queues.push({ svc, scope, queue: client.queueOf('denoise') });
          } else {
            const client = transport.client(DecoderDefinition, { scope, queueSettings: settings, timeoutMs: 60_000 });
            for (let i = 0; i < 3; i++)
              calls.push(client.decode(DecodeRequest.create({ model: scope }), { signal: ac.signal }).catch(() => undefined));
            queues.push({ svc, scope, queue: client.queueOf('decode') });
          }
        }
        for (const q of queues) await expect.poll(() => q.queue.info(), { timeout: 10_000 }).toMatchObject({ pending: 2, ackPending: 1 });
        // Read the monitoring endpoint as KEDA's nats-jetstream scaler does.
        const account = '$G';
        const res = await fetch(`${server.monitorUrl}/jsz?acc=${encodeURIComponent(account)}&consumers=true&config=true`);
        const jsz = (await res.json()) as Jsz;
        const streams = jsz.account_details?.find((a) => a.name === account)?.stream_detail ?? [];
        // Every queue reserved its full max_bytes, and the server took them all.
        for (const q of queues) {
          const st = streams.find((x) => x.name === q.queue.stream);
          expect(st?.config?.max_bytes, q.queue.stream).toBe(settings.maxBytes);
          expect(st?.config?.subjects).toEqual([q.queue.subject]);
        }
        const scaled = docs.filter((d) => d.kind === 'ScaledObject');
        expect(scaled.length).toBe(dir.endsWith('keda') ? 2 : 0);
        for (const so of scaled) {
          const rep = replicas.find((x) => x.deployment === so.spec?.scaleTargetRef?.name)!;
          const md = so.spec!.triggers![0].metadata;
          expect(md.account).toBe(account);
          const consumer = streams.find((x) => x.name === md.stream)?.consumer_detail?.find((c) => c.name === md.consumer);
          expect(consumer, `${so.metadata?.name}: ${md.stream}/${md.consumer} on the server`).toBeDefined();
          // KEDA's lag: waiting for a replica + taken and not yet answered = the 3 calls outstanding.
          expect(consumer!.num_pending + consumer!.num_ack_pending, `${so.metadata?.name} (${rep.scope})`).toBe(3);
          expect(md.stream).toBe(queues.find((q) => q.scope === rep.scope && q.svc === rep.svc)?.queue.stream);
        }
      } finally {
        ac.abort();
        gate.resolve();
        await Promise.all(calls);
        await Promise.all([transport, ...Object.values(replicaTransports)].map((t) => t.close({ graceMs: 1_000 })));
        expect(server.log(), 'permission violations').not.toMatch(/Violation/);
        await server.stop();
        rmSync(store, { recursive: true, force: true });
      }
    },
    60_000,
  );
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
      if (pod?.containers.some(isDitpipe))
        expect(pod.securityContext?.runAsUser, `${doc.kind}/${doc.metadata?.name}`).toBe(Number(user?.[1]));
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
    const ignore = readFileSync(join(K8S, 'Dockerfile.dockerignore'), 'utf8')
      .split('\n')
      .map((l) => l.trim());
    expect(ignore).toContain('node_modules');
    // Nothing the image copies is ignored.
    for (const l of lines.filter((l) => l.startsWith('COPY ') && !l.includes('--from='))) {
      for (const s of l.split(/\s+/).slice(1, -1)) expect(ignore, `COPY ${s} is dockerignored`).not.toContain(s.replace(/\/$/, ''));
    }
  });
});
