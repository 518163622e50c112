// The upload sequence of the README, as a browser runs it: MD5 in workers, URLs requested in
// windows (so none waits long enough to expire), at most 6 PUTs at once, a fresh URL when
// storage refuses an expired one, back-off on network errors and 5xx, completion in batches.
import { ApiError, NETWORK_SENTENCE, gql } from "./api";
import type { HashRequest, HashResult } from "./md5-worker";

export type SliceState = "hashing" | "waiting" | "uploading" | "uploaded" | "done" | "failed";

export interface SliceUpload {
  sliceIndex: number;
  labelName: string | null;
  file: File;
  state: SliceState;
  sentBytes: number;
  contentMd5?: string;
  width?: number;
  height?: number;
  target?: Target;
  attempts: number;
}

interface Target {
  url: string;
  method: string;
  headers: { name: string; value: string }[];
  expiresAt: number;
  issuedAt: number;
}

export interface UploadProgress {
  totalBytes: number;
  sentBytes: number;
  totalSlices: number;
  doneSlices: number;
  bytesPerSecond: number;
  secondsLeft: number | null;
  active: SliceUpload[];
  status: string | null;
  uploadedSliceCount: number | null;
}

export interface UploadOptions {
  concurrency: number;
  urlWindow: number;
  completeBatch: number;
  maxAttempts: number;
}

export const DEFAULT_OPTIONS: UploadOptions = { concurrency: 6, urlWindow: 60, completeBatch: 100, maxAttempts: 8 };

const REQUEST_URLS = `mutation RequestUrls($groupId: ID!, $slices: [SliceUploadInput!]!) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices) {
    sliceIndex labelName url method headers { name value } expiresAt
  }
}`;

const COMPLETE = `mutation Complete($groupId: ID!, $slices: [CompletedSliceInput!]!) {
  completeMaskUpload(groupId: $groupId, slices: $slices) {
    maskGroup { id status uploadedSliceCount sliceCount }
  }
}`;

/** Slice index from a name like `liver_0007.png`, else null. */
export function indexFromName(name: string): number | null {
  const match = /(\d+)\.[A-Za-z0-9]+$/.exec(name);
  return match ? Number.parseInt(match[1], 10) : null;
}

/** Slices for the chosen files: numbered names give the index, otherwise the sorted order. */
export function planSlices(files: File[], labelName: string | null): SliceUpload[] {
  const images = files
    .filter((file) => file.type === "image/png" || /\.png$/i.test(file.name))
    .sort((a, b) => pathOf(a).localeCompare(pathOf(b), undefined, { numeric: true }));
  const indexes = images.map((file) => indexFromName(file.name));
  const numbered = indexes.every((index) => index !== null) && new Set(indexes).size === indexes.length;
  return images.map((file, position) => ({
    sliceIndex: numbered ? (indexes[position] as number) : position,
    labelName,
    file,
    state: "hashing",
    sentBytes: 0,
    attempts: 0,
  }));
}

function pathOf(file: File): string {
  return (file as File & { webkitRelativePath?: string }).webkitRelativePath || file.name;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function backoff(attempt: number): number {
  return Math.min(500 * 2 ** attempt, 15000) * (0.5 + Math.random() / 2);
}

class HashPool {
  private workers: Worker[];
  private waiting = new Map<number, (result: HashResult) => void>();
  private next = 0;

  constructor(size: number) {
    this.workers = Array.from({ length: size }, () => {
      const worker = new Worker("/viewer/md5-worker.js", { type: "module" });
      worker.onmessage = (event: MessageEvent<HashResult>) => {
        this.waiting.get(event.data.id)?.(event.data);
        this.waiting.delete(event.data.id);
      };
      return worker;
    });
  }

  hash(file: Blob): Promise<HashResult> {
    const id = this.next++;
    const worker = this.workers[id % this.workers.length];
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      worker.postMessage({ id, file } satisfies HashRequest);
    });
  }

  close(): void {
    for (const worker of this.workers) worker.terminate();
  }
}

interface PutOutcome {
  status: number;
}

function put(slice: SliceUpload, target: Target, onProgress: (sent: number) => void): Promise<PutOutcome> {
  // XMLHttpRequest: fetch reports no upload progress.
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open(target.method, target.url);
    for (const header of target.headers) request.setRequestHeader(header.name, header.value);
    request.upload.onprogress = (event) => onProgress(event.loaded);
    request.onload = () => resolve({ status: request.status });
    request.onerror = () => resolve({ status: 0 });
    request.ontimeout = () => resolve({ status: 0 });
    request.send(slice.file);
  });
}

export class Uploader {
  readonly slices: SliceUpload[];
  private readonly options: UploadOptions;
  private readonly groupId: string;
  private readonly onProgress: (progress: UploadProgress) => void;
  private needUrl: SliceUpload[] = [];
  private ready: SliceUpload[] = [];
  private hashed = 0;
  private requesting: Promise<void> | null = null;
  private wakers: (() => void)[] = [];
  private toComplete: SliceUpload[] = [];
  private completing: Promise<void> = Promise.resolve();
  private failure: Error | null = null;
  private samples: { at: number; bytes: number }[] = [];
  private status: string | null = null;
  private uploadedSliceCount: number | null = null;
  private frame = 0;

  constructor(groupId: string, slices: SliceUpload[], onProgress: (progress: UploadProgress) => void, options: Partial<UploadOptions> = {}) {
    this.groupId = groupId;
    this.slices = slices;
    this.onProgress = onProgress;
    this.options = { ...DEFAULT_OPTIONS, ...options };
  }

  async run(): Promise<UploadProgress> {
    const pool = new HashPool(Math.min(2, Math.max(1, navigator.hardwareConcurrency - 1)));
    try {
      const hashing = this.slices.map(async (slice) => {
        const result = await pool.hash(slice.file);
        if (result.error || !result.contentMd5) {
          this.fail(slice, new ApiError("FILE", `The file ${slice.file.name} cannot be read.`));
          return;
        }
        Object.assign(slice, { contentMd5: result.contentMd5, width: result.width, height: result.height, state: "waiting" });
        this.hashed++;
        this.needUrl.push(slice);
        this.wake();
      });
      const putters = Array.from({ length: this.options.concurrency }, () => this.putLoop());
      await Promise.all([...hashing, ...putters]);
      if (this.failure) throw this.failure;
      this.flushCompletion(true);
      await this.completing;
      if (this.failure) throw this.failure;
      return this.progress();
    } finally {
      pool.close();
      this.report(true);
    }
  }

  private fail(slice: SliceUpload | null, error: Error): void {
    if (slice) slice.state = "failed";
    this.failure ??= error;
    this.wake();
  }

  private wake(): void {
    const wakers = this.wakers;
    this.wakers = [];
    for (const wake of wakers) wake();
    this.report();
  }

  private async nextSlice(): Promise<SliceUpload | null> {
    for (;;) {
      if (this.failure) return null;
      while (this.ready.length) {
        const slice = this.ready.shift()!;
        if (this.isFresh(slice.target!)) return slice;
        this.needUrl.push(slice);
      }
      const busy = this.slices.some((slice) => slice.state === "hashing" || slice.state === "waiting" || slice.state === "uploading");
      if (!busy) return null;
      this.requestUrls();
      await new Promise<void>((resolve) => this.wakers.push(resolve));
    }
  }

  private isFresh(target: Target): boolean {
    // Keep a margin proportional to the URL's life so that short TTLs still get used.
    const margin = Math.min(30000, (target.expiresAt - target.issuedAt) / 4);
    return target.expiresAt - Date.now() > margin;
  }

  private requestUrls(): void {
    if (this.requesting || this.needUrl.length === 0) return;
    const batch = this.needUrl.splice(0, this.options.urlWindow);
    const issuedAt = Date.now();
    this.requesting = (async () => {
      try {
        const data = await this.withRetry(() =>
          gql<{ requestMaskUploadUrls: (Omit<Target, "expiresAt" | "issuedAt"> & { sliceIndex: number; labelName: string | null; expiresAt: string })[] }>(REQUEST_URLS, {
            groupId: this.groupId,
            slices: batch.map((slice) => ({
              sliceIndex: slice.sliceIndex,
              labelName: slice.labelName,
              contentType: "image/png",
              fileSize: slice.file.size,
              contentMd5: slice.contentMd5,
            })),
          }),
        );
        data.requestMaskUploadUrls.forEach((target, position) => {
          batch[position].target = { ...target, issuedAt, expiresAt: Date.parse(target.expiresAt) };
        });
        this.ready.push(...batch);
      } catch (error) {
        this.fail(null, error as Error);
      } finally {
        this.requesting = null;
        this.wake();
      }
    })();
  }

  private async withRetry<T>(call: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call();
      } catch (error) {
        const transient = error instanceof ApiError && (error.code === "NETWORK" || error.code === "STORAGE_UNAVAILABLE");
        if (!transient || attempt + 1 >= this.options.maxAttempts) throw error;
        await sleep(backoff(attempt));
      }
    }
  }

  private async putLoop(): Promise<void> {
    for (;;) {
      const slice = await this.nextSlice();
      if (!slice) return;
      slice.state = "uploading";
      slice.attempts++;
      const { status } = await put(slice, slice.target!, (sent) => {
        slice.sentBytes = sent;
        this.report();
      });
      if (status >= 200 && status < 300) {
        slice.sentBytes = slice.file.size;
        slice.state = "uploaded";
        this.toComplete.push(slice);
        this.flushCompletion(false);
        this.wake();
        continue;
      }
      slice.sentBytes = 0;
      if (slice.attempts >= this.options.maxAttempts) {
        this.fail(slice, new ApiError("STORAGE", status ? `Storage refused slice ${slice.sliceIndex} (HTTP ${status}) after ${slice.attempts} attempts.` : NETWORK_SENTENCE));
        return;
      }
      slice.state = "waiting";
      if (status === 400 || status === 403) {
        // An expired (or otherwise refused) signature: ask for a fresh URL.
        slice.target = undefined;
        this.needUrl.push(slice);
      } else {
        await sleep(backoff(slice.attempts - 1));
        this.ready.unshift(slice);
      }
      this.wake();
    }
  }

  private flushCompletion(final: boolean): void {
    while (this.toComplete.length >= this.options.completeBatch || (final && this.toComplete.length)) {
      const batch = this.toComplete.splice(0, this.options.completeBatch);
      this.completing = this.completing.then(async () => {
        if (this.failure) return;
        try {
          const data = await this.withRetry(() =>
            gql<{ completeMaskUpload: { maskGroup: { status: string; uploadedSliceCount: number } } }>(COMPLETE, {
              groupId: this.groupId,
              slices: batch.map((slice) => ({
                sliceIndex: slice.sliceIndex,
                labelName: slice.labelName,
                width: slice.width ?? null,
                height: slice.height ?? null,
              })),
            }),
          );
          for (const slice of batch) slice.state = "done";
          this.status = data.completeMaskUpload.maskGroup.status;
          this.uploadedSliceCount = data.completeMaskUpload.maskGroup.uploadedSliceCount;
        } catch (error) {
          this.fail(null, error as Error);
        }
        this.report();
      });
    }
  }

  private report(now = false): void {
    if (now) {
      cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.onProgress(this.progress());
      return;
    }
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.onProgress(this.progress());
    });
  }

  progress(): UploadProgress {
    let totalBytes = 0;
    let sentBytes = 0;
    let doneSlices = 0;
    const active: SliceUpload[] = [];
    for (const slice of this.slices) {
      totalBytes += slice.file.size;
      sentBytes += slice.state === "uploaded" || slice.state === "done" ? slice.file.size : slice.sentBytes;
      if (slice.state === "done") doneSlices++;
      if (slice.state === "uploading") active.push(slice);
    }
    const now = performance.now();
    this.samples.push({ at: now, bytes: sentBytes });
    while (this.samples.length > 2 && now - this.samples[0].at > 5000) this.samples.shift();
    const first = this.samples[0];
    const elapsed = (now - first.at) / 1000;
    const bytesPerSecond = elapsed > 0.2 ? (sentBytes - first.bytes) / elapsed : 0;
    const secondsLeft = bytesPerSecond > 0 ? (totalBytes - sentBytes) / bytesPerSecond : null;
    return {
      totalBytes,
      sentBytes,
      totalSlices: this.slices.length,
      doneSlices,
      bytesPerSecond,
      secondsLeft,
      active,
      status: this.status,
      uploadedSliceCount: this.uploadedSliceCount,
    };
  }
}
