import { useEffect, useState } from "preact/hooks";
import { errorSentence, gql } from "./api";
import { subscribeGroupEvents, type LiveState } from "./live";
import { BASE, ErrorMessage, Link, PageTitle, currentLocation, formatBytes, formatDate, navigate, orDash, useQuery } from "./ui";

interface AnnotationRow {
  id: string;
  studyInstanceUid: string;
  seriesInstanceUid: string | null;
  label: string | null;
  createdBy: string | null;
  createdAt: string;
  maskGroups: { id: string }[];
}

const ANNOTATIONS = `query Annotations($study: String, $series: String) {
  annotations(studyInstanceUid: $study, seriesInstanceUid: $series, limit: 50) {
    id studyInstanceUid seriesInstanceUid label createdBy createdAt maskGroups { id }
  }
}`;

const CREATE_ANNOTATION = `mutation CreateAnnotation($input: CreateAnnotationInput!) {
  createAnnotation(input: $input) { id }
}`;

export function SearchPage() {
  const params = currentLocation().searchParams;
  const study = params.get("study") ?? "";
  const series = params.get("series") ?? "";
  const result = useQuery<{ annotations: AnnotationRow[] }>(ANNOTATIONS, { study: study || null, series: series || null }, `${study}|${series}`);
  const [createError, setCreateError] = useState<string | null>(null);
  return (
    <main>
      <PageTitle>Annotations</PageTitle>
      <form
        class="search"
        role="search"
        onSubmit={(event) => {
          event.preventDefault();
          const form = new FormData(event.currentTarget);
          const query = new URLSearchParams();
          for (const name of ["study", "series"]) {
            const value = String(form.get(name) ?? "").trim();
            if (value) query.set(name, value);
          }
          navigate(`${BASE}/?${query}`);
        }}
      >
        <div class="field">
          <label for="study">Study Instance UID</label>
          <input id="study" name="study" defaultValue={study} pattern="[0-9.]{1,64}" inputMode="decimal" />
        </div>
        <div class="field">
          <label for="series">Series Instance UID</label>
          <input id="series" name="series" defaultValue={series} pattern="[0-9.]{1,64}" inputMode="decimal" />
        </div>
        <button type="submit">Search</button>
      </form>
      <ErrorMessage error={result.error} />
      {result.data && (
        <table>
          <caption>{study || series ? `${result.data.annotations.length} matching annotations` : "Newest annotations"}</caption>
          <thead>
            <tr>
              <th scope="col">Study Instance UID</th>
              <th scope="col">Series Instance UID</th>
              <th scope="col">Label</th>
              <th scope="col">Mask groups</th>
              <th scope="col">Created by</th>
              <th scope="col">Created at</th>
            </tr>
          </thead>
          <tbody>
            {result.data.annotations.map((row) => (
              <tr key={row.id}>
                <td>
                  <Link href={`${BASE}/annotations/${row.id}`}>{row.studyInstanceUid}</Link>
                </td>
                <td>{orDash(row.seriesInstanceUid)}</td>
                <td>{orDash(row.label)}</td>
                <td>{row.maskGroups.length}</td>
                <td>{orDash(row.createdBy)}</td>
                <td>{formatDate(row.createdAt)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <details class="create">
        <summary>New annotation</summary>
        <form
          onSubmit={async (event) => {
            event.preventDefault();
            const form = new FormData(event.currentTarget);
            const text = (name: string) => String(form.get(name) ?? "").trim() || null;
            try {
              const data = await gql<{ createAnnotation: { id: string } }>(CREATE_ANNOTATION, {
                input: { studyInstanceUid: text("newStudy"), seriesInstanceUid: text("newSeries"), label: text("newLabel") },
              });
              navigate(`${BASE}/annotations/${data.createAnnotation.id}`);
            } catch (error) {
              setCreateError(errorSentence(error));
            }
          }}
        >
          <div class="field">
            <label for="new-study">Study UID (new annotation)</label>
            <input id="new-study" name="newStudy" required defaultValue={study} />
          </div>
          <div class="field">
            <label for="new-series">Series UID (new annotation)</label>
            <input id="new-series" name="newSeries" defaultValue={series} />
          </div>
          <div class="field">
            <label for="new-label">Annotation label</label>
            <input id="new-label" name="newLabel" />
          </div>
          <button type="submit">Create annotation</button>
          <ErrorMessage error={createError} />
        </form>
      </details>
    </main>
  );
}

export interface GroupRow {
  id: string;
  groupName: string | null;
  modelName: string | null;
  version: string | null;
  modality: string | null;
  status: string;
  uploadedSliceCount: number;
  sliceCount: number;
  totalBytes: number;
  createdBy: string | null;
  createdAt: string;
  confidence: number | null;
}

const ANNOTATION = `query Annotation($id: ID!) {
  annotation(id: $id) {
    id studyInstanceUid seriesInstanceUid label createdBy createdAt
    maskGroups {
      id groupName modelName version modality status uploadedSliceCount sliceCount totalBytes
      createdBy createdAt confidence
    }
  }
}`;

export function groupTitle(group: { id: string; groupName: string | null; modelName: string | null }): string {
  return group.groupName || group.modelName || `Mask group ${group.id}`;
}

export function AnnotationPage(props: { id: string }) {
  const result = useQuery<{ annotation: (Omit<AnnotationRow, "maskGroups"> & { maskGroups: GroupRow[] }) | null }>(ANNOTATION, { id: props.id }, props.id);
  const [groups, setGroups] = useState<GroupRow[] | null>(null);
  const [live, setLive] = useState<LiveState>("connecting");
  useEffect(() => setGroups(result.data?.annotation?.maskGroups ?? null), [result.data]);
  useEffect(
    () =>
      subscribeGroupEvents(props.id, setLive, (event) => {
        if (event.kind === "CREATED" || event.kind === "DELETED") {
          void result.reload();
          return;
        }
        setGroups((current) =>
          (current ?? []).map((group) =>
            group.id === event.maskGroupId ? { ...group, status: event.status, uploadedSliceCount: event.uploadedSliceCount, sliceCount: event.sliceCount } : group,
          ),
        );
      }),
    [props.id],
  );
  const annotation = result.data?.annotation;
  if (result.error) return <main><PageTitle>Annotation</PageTitle><ErrorMessage error={result.error} /></main>;
  if (result.data && !annotation) return <main><PageTitle>Annotation</PageTitle><ErrorMessage error="This annotation does not exist; it may have been deleted." /></main>;
  return (
    <main>
      <PageTitle>Annotation {annotation ? annotation.label || annotation.studyInstanceUid : "…"}</PageTitle>
      {annotation && (
        <>
          <dl class="meta">
            <dt>Study Instance UID</dt>
            <dd>{annotation.studyInstanceUid}</dd>
            <dt>Series Instance UID</dt>
            <dd>{orDash(annotation.seriesInstanceUid)}</dd>
            <dt>Created</dt>
            <dd>
              {formatDate(annotation.createdAt)} by {orDash(annotation.createdBy)}
            </dd>
          </dl>
          <p class="actions">
            <Link class="button" href={`${BASE}/annotations/${annotation.id}/upload`}>
              Upload a mask group
            </Link>
            <span class="live" role="status">
              Live updates: {live}
            </span>
          </p>
          <table>
            <caption>Mask groups</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Model</th>
                <th scope="col">Version</th>
                <th scope="col">Modality</th>
                <th scope="col">Status</th>
                <th scope="col">Slices</th>
                <th scope="col">Size</th>
                <th scope="col">Created by</th>
                <th scope="col">Created at</th>
                <th scope="col">Confidence</th>
              </tr>
            </thead>
            <tbody>
              {(groups ?? []).map((group) => (
                <tr key={group.id} data-group-id={group.id}>
                  <td>
                    <Link href={`${BASE}/groups/${group.id}`}>{groupTitle(group)}</Link>
                  </td>
                  <td>{orDash(group.modelName)}</td>
                  <td>{orDash(group.version)}</td>
                  <td>{orDash(group.modality)}</td>
                  <td class={`status ${group.status.toLowerCase()}`}>{group.status}</td>
                  <td>
                    {group.uploadedSliceCount} / {group.sliceCount}
                  </td>
                  <td>{formatBytes(group.totalBytes)}</td>
                  <td>{orDash(group.createdBy)}</td>
                  <td>{formatDate(group.createdAt)}</td>
                  <td>{group.confidence === null ? "—" : group.confidence.toFixed(2)}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {groups?.length === 0 && <p>No mask groups yet.</p>}
        </>
      )}
    </main>
  );
}
