// MD5 (for Content-MD5) and image size, computed off the main thread.
import SparkMD5 from "spark-md5";

export interface HashRequest {
  id: number;
  file: Blob;
}

export interface HashResult {
  id: number;
  contentMd5?: string;
  width?: number;
  height?: number;
  error?: string;
}

const CHUNK = 4 * 1024 * 1024;
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

function pngSize(head: Uint8Array): { width: number; height: number } | null {
  // The IHDR chunk always comes first: width and height sit at bytes 16..23.
  if (head.length < 24 || PNG_SIGNATURE.some((byte, i) => head[i] !== byte)) return null;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return { width: view.getUint32(16), height: view.getUint32(20) };
}

async function hash(file: Blob): Promise<Omit<HashResult, "id">> {
  const md5 = new SparkMD5.ArrayBuffer();
  let size: { width: number; height: number } | null = null;
  for (let offset = 0; offset < file.size; offset += CHUNK) {
    const chunk = new Uint8Array(await file.slice(offset, offset + CHUNK).arrayBuffer());
    if (offset === 0) size = pngSize(chunk);
    md5.append(chunk.buffer as ArrayBuffer);
  }
  const raw = md5.end(true);
  return { contentMd5: btoa(raw), ...(size ?? {}) };
}

self.onmessage = async (event: MessageEvent<HashRequest>) => {
  const { id, file } = event.data;
  try {
    (self as unknown as Worker).postMessage({ id, ...(await hash(file)) } satisfies HashResult);
  } catch (error) {
    (self as unknown as Worker).postMessage({ id, error: String(error) } satisfies HashResult);
  }
};
