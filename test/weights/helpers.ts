// Shared helpers for the weight-reader tests.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const FIXTURES = join(process.cwd(), 'test/fixtures/weights');
export const GOLDEN_DIT = join(process.cwd(), '../shared/golden/dit');

export function fixture(name: string): string {
  return join(FIXTURES, name);
}

export function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'ditpipe-weights-'));
}

/** Builds a safetensors file from a raw header object and data bytes (for malformed-header cases). */
export function rawSafetensors(dir: string, name: string, header: unknown, data: Uint8Array, headerLenOverride?: bigint): string {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLenOverride ?? BigInt(json.length));
  const p = join(dir, name);
  writeFileSync(p, Buffer.concat([len, json, data]));
  return p;
}
