import type { UploadProgress } from "./upload";
import { formatBytes, formatDuration } from "./ui";

export function ProgressView(props: { progress: UploadProgress }) {
  const p = props.progress;
  const percent = p.totalBytes ? Math.floor((p.sentBytes / p.totalBytes) * 100) : 0;
  const finished = p.totalSlices > 0 && p.doneSlices === p.totalSlices;
  return (
    <section class="progress" aria-label="Upload progress">
      <label for="overall-progress">Overall progress</label>
      <progress id="overall-progress" max={p.totalBytes || 1} value={p.sentBytes} />
      <p aria-live="polite" class="progress-text">
        <strong data-testid="upload-percent">{finished ? 100 : Math.min(percent, 99)} %</strong> · {p.doneSlices} of {p.totalSlices} slices
        registered · {formatBytes(p.sentBytes)} of {formatBytes(p.totalBytes)} · {formatBytes(p.bytesPerSecond)}/s · time left{" "}
        {finished ? "0 s" : formatDuration(p.secondsLeft)}
        {p.status ? ` · group ${p.status}` : ""}
      </p>
      {p.active.length > 0 && (
        <ul class="active-slices">
          {p.active.map((slice) => (
            <li key={slice.sliceIndex}>
              <label for={`slice-progress-${slice.sliceIndex}`}>Slice {slice.sliceIndex}</label>
              <progress id={`slice-progress-${slice.sliceIndex}`} max={slice.file.size} value={slice.sentBytes} />
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
