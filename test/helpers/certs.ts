// Certificates made by the test, with the openssl CLI: a CA, server certificates for loopback
// (SAN localhost, 127.0.0.1) and client certificates it signs, as files and PEM buffers.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface CertFiles {
  cert: string;
  key: string;
  certPem: Buffer;
  keyPem: Buffer;
}

export interface TestPki {
  dir: string;
  ca: CertFiles;
  /** A second, unrelated CA (for "wrong CA" cases). */
  otherCa: CertFiles;
  server: CertFiles;
  client: CertFiles;
  /** A client certificate signed by the other CA. */
  strangerClient: CertFiles;
  cleanup(): void;
}

const openssl = (dir: string, args: string[]): void => {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
};

function files(dir: string, name: string): CertFiles {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}-key.pem`);
  return { cert, key, certPem: readFileSync(cert), keyPem: readFileSync(key) };
}

function makeCa(dir: string, name: string): CertFiles {
  openssl(dir, [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    `${name}-key.pem`,
    '-out',
    `${name}.pem`,
    '-days',
    '2',
    '-subj',
    `/CN=${name}`,
  ]);
  return files(dir, name);
}

function makeLeaf(dir: string, name: string, ca: CertFiles, ext: string): CertFiles {
  openssl(dir, [
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    `${name}-key.pem`,
    '-out',
    `${name}.csr`,
    '-subj',
    `/CN=${name}`,
  ]);
  writeFileSync(join(dir, `${name}.ext`), `${ext}\n`);
  openssl(dir, [
    'x509',
    '-req',
    '-in',
    `${name}.csr`,
    '-CA',
    ca.cert,
    '-CAkey',
    ca.key,
    '-CAcreateserial',
    '-out',
    `${name}.pem`,
    '-days',
    '2',
    '-extfile',
    `${name}.ext`,
  ]);
  return files(dir, name);
}

export function makeTestPki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), 'ditpipe-pki-'));
  const ca = makeCa(dir, 'test-ca');
  const otherCa = makeCa(dir, 'other-ca');
  const server = makeLeaf(dir, 'server', ca, 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth');
  const client = makeLeaf(dir, 'client', ca, 'extendedKeyUsage=clientAuth');
  const strangerClient = makeLeaf(dir, 'stranger', otherCa, 'extendedKeyUsage=clientAuth');
  return { dir, ca, otherCa, server, client, strangerClient, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}
