/**
 * The S3 store the S3 suites run against: `infra/s3-local.sh` (OpenStack Swift's s3api on
 * 127.0.0.1), whose `env` command names it. A machine where it does not answer skips those suites
 * with the reason printed; with CI set (`.ci/run` starts the store) they fail instead.
 */
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import {
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { S3Store, type S3StoreOptions } from '@sfh/storage/s3';
import { nanoid } from 'nanoid';
import { onTestFinished } from 'vitest';
import { skipUnless } from './skip.ts';

const SCRIPT = fileURLToPath(new URL('../../infra/s3-local.sh', import.meta.url));

/** KEY=VALUE lines of `infra/s3-local.sh env`. */
const settings: Record<string, string> = Object.fromEntries(
  execFileSync('bash', [SCRIPT, 'env'], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
);

const endpoint = settings.AWS_ENDPOINT_URL_S3 as string;
/** The store's host:port, and its port on 127.0.0.1 (for a TcpGate in front of it). */
export const S3_HOST = new URL(endpoint).host;
export const S3_PORT = Number(new URL(endpoint).port);
const region = settings.AWS_REGION as string;
export const S3_BUCKET = settings.S3_BUCKET as string;

/** A's credentials (read, write, delete, multipart) and B's (read only). */
const credentials = {
  writer: {
    accessKeyId: settings.AWS_ACCESS_KEY_ID as string,
    secretAccessKey: settings.AWS_SECRET_ACCESS_KEY as string,
  },
  reader: {
    accessKeyId: settings.S3_READ_ACCESS_KEY_ID as string,
    secretAccessKey: settings.S3_READ_SECRET_ACCESS_KEY as string,
  },
};

const clientConfig = (who: keyof typeof credentials): S3ClientConfig => ({
  endpoint,
  region,
  credentials: credentials[who],
});

/** Options for an `S3Store` on `prefix` with `who`'s credentials. */
export function s3StoreOptions(
  prefix: string,
  who: keyof typeof credentials = 'writer',
  overrides: Partial<S3StoreOptions> = {},
): S3StoreOptions {
  return {
    bucket: S3_BUCKET,
    prefix,
    forcePathStyle: true,
    timeoutMs: 5_000,
    client: clientConfig(who),
    ...overrides,
  };
}

/** The environment that points a server at the bucket, under `prefix`, as `who`. */
export function s3Env(
  prefix: string,
  who: keyof typeof credentials = 'writer',
  via = endpoint,
): Record<string, string> {
  return {
    S3_BUCKET,
    S3_PREFIX: prefix,
    S3_FORCE_PATH_STYLE: 'true',
    S3_TIMEOUT_MS: '3000',
    AWS_ENDPOINT_URL_S3: via,
    AWS_REGION: region,
    AWS_ACCESS_KEY_ID: credentials[who].accessKeyId,
    AWS_SECRET_ACCESS_KEY: credentials[who].secretAccessKey,
  };
}

/** A fresh key prefix: each test sees only its own objects. */
export const freshPrefix = () => `test/${nanoid()}/`;

const admin = new S3Client({ ...clientConfig('writer'), forcePathStyle: true, maxAttempts: 1 });

/** Every key under `prefix`, and every incomplete multipart upload there (as `upload:<key>`). */
export async function bucketContents(prefix: string): Promise<string[]> {
  const [objects, uploads] = await Promise.all([
    admin.send(new ListObjectsV2Command({ Bucket: S3_BUCKET, Prefix: prefix })),
    admin.send(new ListMultipartUploadsCommand({ Bucket: S3_BUCKET, Prefix: prefix })),
  ]);
  return [
    ...(objects.Contents ?? []).map((object) => (object.Key ?? '').slice(prefix.length)),
    ...(uploads.Uploads ?? []).map((upload) => `upload:${(upload.Key ?? '').slice(prefix.length)}`),
  ].sort();
}

/** An S3Store on a fresh prefix, closed when the test finishes. */
export function openS3Store(
  who: keyof typeof credentials = 'writer',
  overrides: Partial<S3StoreOptions> = {},
  prefix = freshPrefix(),
): { store: S3Store; prefix: string } {
  const store = new S3Store(s3StoreOptions(prefix, who, overrides));
  onTestFinished(() => store.close());
  return { store, prefix };
}

async function answers(): Promise<boolean> {
  const store = new S3Store(s3StoreOptions('', 'writer', { timeoutMs: 2_000 }));
  try {
    await store.check();
    return true;
  } catch {
    return false;
  } finally {
    await store.close();
  }
}

export const S3_AVAILABLE = await answers();
/** CI needs the S3 suites; elsewhere they skip, saying why. */
export const S3_SKIP = skipUnless(
  'the S3 suites',
  !S3_AVAILABLE &&
    `no S3 store answers at ${endpoint} (bucket ${S3_BUCKET}); start one with \`infra/s3-local.sh start\``,
).skip;

/** For a suite's beforeAll: in CI, a missing store fails the suite. */
export function requireS3(): void {
  if (!S3_AVAILABLE)
    throw new Error(`No S3 store answers at ${endpoint}; CI needs \`infra/s3-local.sh start\``);
}
