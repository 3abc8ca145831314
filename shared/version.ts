// The ditpipe version, from package.json (one place: `ditpipe --version`, model.json's createdBy).
import { readFileSync } from 'node:fs';

export const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
