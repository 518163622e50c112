import { useEffect, useLayoutEffect, useMemo, useRef, useState } from "preact/hooks";
import { errorSentence, gql } from "./api";
import { FilePicker } from "./files";
import { type GroupRow, groupTitle } from "./pages-browse";
import { LABEL_PATTERN, useUpload } from "./pages-upload";
import { ProgressView } from "./progress";
import { BASE, ErrorMessage, Link, PageTitle, currentLocation, formatBytes, formatDate, navigate, orDash, useQuery } from "./ui";
import { planSlices } from "./upload";

interface MaskRow {
  id: string;
  sliceIndex: number;
  labelName: string | null;
  fileSize: number;
  width: number | null;
  height: number | null;
  sopInstanceUid: string | null;
  checksum: string;
  createdAt: string;
  viewUrl: string;
}

interface GroupDetail extends GroupRow {
  description: string | null;
  maskType: string;
  missingSliceIndexes: number[];
  annotation: { id: string; studyInstanceUid: string; label: string | null };
  masks: MaskRow[];
}

const GROUP = `query Group($id: ID!) {
  maskGroup(id: $id) {
    id groupName modelName version modality status uploadedSliceCount sliceCount totalBytes
    createdBy createdAt confidence description maskType missingSliceIndexes
    annotation { id studyInstanceUid label }
    masks { id sliceIndex labelName fileSize width height sopInstanceUid checksum createdAt viewUrl }
  }
}`;

const DELETE_GROUP = `mutation Delete($id: ID!) { deleteMaskGroup(id: $id) { id deletedMaskCount } }`;

const ALL = "\u0000all";
const NO_LABEL = "\u0000none";
const TILE = 136;
const OVERSCAN_ROWS = 2;

let firstThumbnailMarked = false;

function markOnce(name: string): void {
  if (performance.getEntriesByName(name).length === 0) performance.mark(name);
}

/** Only the rows in view (and a couple around) exist in the DOM: 10,000 slices stay smooth. */
function ThumbnailGrid(props: { masks: MaskRow[]; onOpen: (mask: MaskRow) => void }) {
  const scroller = useRef<HTMLDivElement>(null);
  const [view, setView] = useState({ top: 0, width: 1000, height: 600 });
  useLayoutEffect(() => {
    const element = scroller.current!;
    const measure = () => setView({ top: element.scrollTop, width: element.clientWidth, height: element.clientHeight });
    measure();
    const observer = new ResizeObserver(measure);
    observer.observe(element);
    element.addEventListener("scroll", measure, { passive: true });
    return () => {
      observer.disconnect();
      element.removeEventListener("scroll", measure);
    };
  }, []);
  useEffect(() => markOnce("grid-interactive"), []);
  const columns = Math.max(1, Math.floor(view.width / TILE));
  const rows = Math.ceil(props.masks.length / columns);
  const firstRow = Math.max(0, Math.floor(view.top / TILE) - OVERSCAN_ROWS);
  const lastRow = Math.min(rows - 1, Math.ceil((view.top + view.height) / TILE) + OVERSCAN_ROWS);
  const tiles = [];
  for (let row = firstRow; row <= lastRow; row++) {
    for (let column = 0; column < columns; column++) {
      const mask = props.masks[row * columns + column];
      if (!mask) break;
      tiles.push(
        <button
          type="button"
          key={mask.id}
          class="tile"
          style={{ top: `${row * TILE}px`, left: `${column * TILE}px` }}
          aria-label={`Slice ${mask.sliceIndex}${mask.labelName ? ` (${mask.labelName})` : ""}`}
          onClick={() => props.onOpen(mask)}
        >
          <img
            src={mask.viewUrl}
            alt=""
            width={120}
            height={120}
            decoding="async"
            onLoad={() => {
              if (!firstThumbnailMarked) {
                firstThumbnailMarked = true;
                markOnce("first-thumbnail");
              }
            }}
          />
          <span>
            {mask.sliceIndex}
            {mask.labelName ? ` ${mask.labelName}` : ""}
          </span>
        </button>,
      );
    }
  }
  return (
    <div class="grid-scroller" ref={scroller} role="region" aria-label="Slices" tabIndex={0}>
      <div class="grid-body" style={{ height: `${rows * TILE}px` }}>
        {tiles}
      </div>
    </div>
  );
}

function SliceViewer(props: { masks: MaskRow[]; position: number; onMove: (position: number) => void; onClose: () => void }) {
  const mask = props.masks[props.position];
  // Start at about 480 px on screen whatever the slice's size.
  const [zoom, setZoom] = useState(() => Math.max(0.25, Math.round((480 / Math.max(mask?.width ?? 256, mask?.height ?? 256)) * 4) / 4));
  const [opacity, setOpacity] = useState(0.6);
  const heading = useRef<HTMLHeadingElement>(null);
  useEffect(() => heading.current?.focus(), []);
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      if (event.target instanceof HTMLInputElement && event.target.type !== "range") return;
      if (event.key === "ArrowRight" || event.key === "PageDown") props.onMove(Math.min(props.masks.length - 1, props.position + 1));
      else if (event.key === "ArrowLeft" || event.key === "PageUp") props.onMove(Math.max(0, props.position - 1));
      else if (event.key === "+" || event.key === "=") setZoom((value) => Math.min(16, value * 1.25));
      else if (event.key === "-") setZoom((value) => Math.max(0.25, value / 1.25));
      else if (event.key === "Escape") props.onClose();
      else return;
      event.preventDefault();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [props.position, props.masks]);
  if (!mask) return null;
  const width = (mask.width ?? 256) * zoom;
  const height = (mask.height ?? 256) * zoom;
  return (
    <section class="slice-viewer" aria-label="Slice viewer">
      <div class="viewer-bar">
        <h2 tabIndex={-1} ref={heading}>
          Slice {mask.sliceIndex}
          {mask.labelName ? ` · ${mask.labelName}` : ""}
        </h2>
        <button type="button" onClick={() => props.onMove(Math.max(0, props.position - 1))} disabled={props.position === 0}>
          Previous slice
        </button>
        <button type="button" onClick={() => props.onMove(Math.min(props.masks.length - 1, props.position + 1))} disabled={props.position === props.masks.length - 1}>
          Next slice
        </button>
        <label for="zoom">Zoom</label>
        <input id="zoom" type="range" min="0.25" max="16" step="0.25" value={zoom} onInput={(event) => setZoom(Number(event.currentTarget.value))} />
        <output for="zoom">{Math.round(zoom * 100)} %</output>
        <label for="opacity">Mask opacity</label>
        <input id="opacity" type="range" min="0" max="1" step="0.05" value={opacity} onInput={(event) => setOpacity(Number(event.currentTarget.value))} />
        <output for="opacity">{Math.round(opacity * 100)} %</output>
        <button type="button" onClick={props.onClose}>
          Close viewer
        </button>
      </div>
      <div class="viewer-body">
        <div class="stage" aria-label="Mask image (arrow keys: previous and next slice; + and -: zoom)">
          <div class="canvas" style={{ width: `${width}px`, height: `${height}px` }}>
            <img src={mask.viewUrl} alt={`Mask of slice ${mask.sliceIndex}`} width={width} height={height} />
            {/* The mask's bright pixels, in colour: the PNG itself is the luminance mask. */}
            <div class="overlay" style={{ opacity, maskImage: `url("${mask.viewUrl}")`, WebkitMaskImage: `url("${mask.viewUrl}")` }} />
          </div>
        </div>
        <dl class="meta">
          <dt>Slice index</dt>
          <dd>{mask.sliceIndex}</dd>
          <dt>Label</dt>
          <dd>{orDash(mask.labelName)}</dd>
          <dt>Size</dt>
          <dd>{formatBytes(mask.fileSize)}</dd>
          <dt>Dimensions</dt>
          <dd>{mask.width && mask.height ? `${mask.width} × ${mask.height}` : "—"}</dd>
          <dt>SOP Instance UID</dt>
          <dd>{orDash(mask.sopInstanceUid)}</dd>
          <dt>Checksum</dt>
          <dd class="mono">{mask.checksum}</dd>
          <dt>Registered</dt>
          <dd>{formatDate(mask.createdAt)}</dd>
        </dl>
      </div>
    </section>
  );
}

function ResumeUpload(props: { group: GroupDetail; onDone: () => void }) {
  const [files, setFiles] = useState<File[]>([]);
  const upload = useUpload();
  const labels = props.group.masks.map((mask) => mask.labelName).filter((label): label is string => !!label);
  const missing = new Set(props.group.missingSliceIndexes);
  return (
    <section class="resume" aria-labelledby="resume-title">
      <h2 id="resume-title">Resume the upload</h2>
      <p>
        {missing.size} of {props.group.sliceCount} slices are missing. Choose the files again: only the missing slices are sent.
      </p>
      <form
        onSubmit={async (event) => {
          event.preventDefault();
          const label = String(new FormData(event.currentTarget).get("labelName") ?? "").trim() || null;
          const slices = planSlices(files, label).filter((slice) => missing.has(slice.sliceIndex));
          if (slices.length === 0) {
            upload.setError("None of the chosen files is a missing slice. Choose the files of this group again.");
            return;
          }
          if (await upload.start(props.group.id, slices)) props.onDone();
        }}
      >
        <fieldset disabled={upload.running}>
          <legend>Files</legend>
          <FilePicker idPrefix="resume" onFiles={setFiles} />
          <div class="field">
            <label for="resume-label">Label</label>
            <input id="resume-label" name="labelName" pattern={LABEL_PATTERN} defaultValue={labels[0] ?? ""} />
          </div>
        </fieldset>
        <button type="submit" disabled={upload.running}>
          Resume
        </button>
      </form>
      <ErrorMessage error={upload.error} />
      {upload.progress && <ProgressView progress={upload.progress} />}
    </section>
  );
}

function DeleteGroup(props: { group: GroupDetail }) {
  const dialog = useRef<HTMLDialogElement>(null);
  const [error, setError] = useState<string | null>(null);
  const title = groupTitle(props.group);
  return (
    <>
      <button type="button" class="danger" onClick={() => dialog.current?.showModal()}>
        Delete this group…
      </button>
      <dialog ref={dialog} aria-labelledby="delete-title">
        <h2 id="delete-title">Delete “{title}”?</h2>
        <p>
          The mask group “{title}” and its {props.group.uploadedSliceCount} registered slices ({formatBytes(props.group.totalBytes)}) are deleted from the database and from
          storage. This cannot be undone.
        </p>
        <ErrorMessage error={error} />
        <form method="dialog" class="actions">
          <button type="submit">Cancel</button>
          <button
            type="button"
            class="danger"
            onClick={async () => {
              try {
                await gql(DELETE_GROUP, { id: props.group.id });
                dialog.current?.close();
                navigate(`${BASE}/annotations/${props.group.annotation.id}`);
              } catch (failure) {
                setError(errorSentence(failure));
              }
            }}
          >
            Delete “{title}”
          </button>
        </form>
      </dialog>
    </>
  );
}

export function GroupPage(props: { id: string }) {
  const result = useQuery<{ maskGroup: GroupDetail | null }>(GROUP, { id: props.id }, props.id);
  const params = currentLocation().searchParams;
  const label = params.get("label") ?? ALL;
  const openMaskId = params.get("mask");
  const group = result.data?.maskGroup;
  const labels = useMemo(() => [...new Set((group?.masks ?? []).map((mask) => mask.labelName ?? NO_LABEL))].sort(), [group]);
  const masks = useMemo(
    () => (group?.masks ?? []).filter((mask) => label === ALL || (mask.labelName ?? NO_LABEL) === label),
    [group, label],
  );
  const position = openMaskId ? masks.findIndex((mask) => mask.id === openMaskId) : -1;
  // viewUrls are signed for a few minutes: ask for fresh ones before they lapse, so that
  // thumbnails scrolled to later still load.
  useEffect(() => {
    const first = group?.masks[0]?.viewUrl;
    const expires = first ? Number(new URL(first, window.location.href).searchParams.get("expires")) : 0;
    if (!expires) return;
    const timer = setTimeout(() => void result.reload(), Math.max(5000, expires * 1000 - Date.now() - 30000));
    return () => clearTimeout(timer);
  }, [group]);
  const go = (changes: Record<string, string | null>) => {
    const url = currentLocation();
    for (const [name, value] of Object.entries(changes)) {
      if (value === null) url.searchParams.delete(name);
      else url.searchParams.set(name, value);
    }
    navigate(`${url.pathname}${url.search}`, true);
  };
  if (result.error) return <main><PageTitle>Mask group</PageTitle><ErrorMessage error={result.error} /></main>;
  if (result.data && !group) return <main><PageTitle>Mask group</PageTitle><ErrorMessage error="This mask group does not exist; it may have been deleted." /></main>;
  if (!group) return <main><PageTitle>Mask group …</PageTitle></main>;
  return (
    <main class="group-page">
      <PageTitle>{groupTitle(group)}</PageTitle>
      <p>
        In annotation <Link href={`${BASE}/annotations/${group.annotation.id}`}>{group.annotation.label || group.annotation.studyInstanceUid}</Link>
      </p>
      <dl class="meta inline">
        <dt>Status</dt>
        <dd class={`status ${group.status.toLowerCase()}`} data-testid="group-status">
          {group.status}
        </dd>
        <dt>Slices</dt>
        <dd>
          {group.uploadedSliceCount} / {group.sliceCount}
        </dd>
        <dt>Size</dt>
        <dd>{formatBytes(group.totalBytes)}</dd>
        <dt>Model</dt>
        <dd>
          {orDash(group.modelName)} {group.version ?? ""}
        </dd>
        <dt>Modality</dt>
        <dd>{orDash(group.modality)}</dd>
        <dt>Confidence</dt>
        <dd>{group.confidence === null ? "—" : group.confidence.toFixed(2)}</dd>
        <dt>Created</dt>
        <dd>
          {formatDate(group.createdAt)} by {orDash(group.createdBy)}
        </dd>
      </dl>
      {group.status !== "COMPLETE" && <ResumeUpload group={group} onDone={() => void result.reload()} />}
      <div class="toolbar">
        <label for="label-filter">Label filter</label>
        <select id="label-filter" value={label} onChange={(event) => go({ label: event.currentTarget.value === ALL ? null : event.currentTarget.value, mask: null })}>
          <option value={ALL}>All labels ({group.masks.length})</option>
          {labels.map((name) => (
            <option key={name} value={name}>
              {name === NO_LABEL ? "No label" : name}
            </option>
          ))}
        </select>
        <span aria-live="polite">{masks.length} slices shown</span>
        <DeleteGroup group={group} />
      </div>
      {position >= 0 && <SliceViewer masks={masks} position={position} onMove={(next) => go({ mask: masks[next].id })} onClose={() => go({ mask: null })} />}
      <ThumbnailGrid masks={masks} onOpen={(mask) => go({ mask: mask.id })} />
    </main>
  );
}
