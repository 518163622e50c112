import { useState } from "preact/hooks";
import { errorSentence, gql } from "./api";
import { FilePicker } from "./files";
import { ProgressView } from "./progress";
import { BASE, ErrorMessage, Link, PageTitle } from "./ui";
import { Uploader, planSlices, type SliceUpload, type UploadProgress } from "./upload";

const CREATE_GROUP = `mutation CreateMaskGroup($input: CreateMaskGroupInput!) {
  createMaskGroup(input: $input) { id }
}`;

export const LABEL_PATTERN = "[A-Za-z0-9][A-Za-z0-9_\\-]{0,63}";

/** Runs one upload and keeps its progress and outcome for the page. */
export function useUpload() {
  const [progress, setProgress] = useState<UploadProgress | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [running, setRunning] = useState(false);
  async function start(groupId: string, slices: SliceUpload[]): Promise<boolean> {
    setError(null);
    setRunning(true);
    const uploader = new Uploader(groupId, slices, setProgress);
    try {
      setProgress(await uploader.run());
      return true;
    } catch (failure) {
      setError(errorSentence(failure));
      return false;
    } finally {
      setRunning(false);
    }
  }
  return { progress, error, setError, running, start };
}

export function UploadPage(props: { annotationId: string }) {
  const [files, setFiles] = useState<File[]>([]);
  const [groupId, setGroupId] = useState<string | null>(null);
  const upload = useUpload();
  return (
    <main>
      <PageTitle>Upload a mask group</PageTitle>
      <p>
        To annotation <Link href={`${BASE}/annotations/${props.annotationId}`}>{props.annotationId}</Link>
      </p>
      <form
        class="upload"
        onSubmit={async (event) => {
          event.preventDefault();
          const form = new FormData(event.currentTarget);
          const text = (name: string) => String(form.get(name) ?? "").trim() || null;
          const slices = planSlices(files, text("labelName"));
          if (slices.length === 0) {
            upload.setError("Choose at least one PNG file to upload.");
            return;
          }
          const confidence = text("confidence");
          try {
            const data = await gql<{ createMaskGroup: { id: string } }>(CREATE_GROUP, {
              input: {
                annotationId: props.annotationId,
                sliceCount: Math.max(...slices.map((slice) => slice.sliceIndex)) + 1,
                groupName: text("groupName"),
                modelName: text("modelName"),
                version: text("version"),
                modality: text("modality"),
                description: text("description"),
                confidence: confidence === null ? null : Number(confidence),
              },
            });
            setGroupId(data.createMaskGroup.id);
            await upload.start(data.createMaskGroup.id, slices);
          } catch (failure) {
            upload.setError(errorSentence(failure));
          }
        }}
      >
        <fieldset disabled={upload.running}>
          <legend>Mask group</legend>
          <div class="grid-form">
            <div class="field">
              <label for="group-name">Group name</label>
              <input id="group-name" name="groupName" />
            </div>
            <div class="field">
              <label for="model-name">Model name</label>
              <input id="model-name" name="modelName" />
            </div>
            <div class="field">
              <label for="version">Version</label>
              <input id="version" name="version" />
            </div>
            <div class="field">
              <label for="modality">Modality</label>
              <input id="modality" name="modality" placeholder="CT" />
            </div>
            <div class="field">
              <label for="confidence">Confidence</label>
              <input id="confidence" name="confidence" type="number" min="0" max="1" step="any" />
            </div>
            <div class="field">
              <label for="label">Label</label>
              <input id="label" name="labelName" pattern={LABEL_PATTERN} title="letters, digits, _ and -, up to 64" />
            </div>
            <div class="field wide">
              <label for="description">Description</label>
              <textarea id="description" name="description" rows={2} />
            </div>
          </div>
        </fieldset>
        <fieldset disabled={upload.running}>
          <legend>Files</legend>
          <FilePicker idPrefix="upload" onFiles={setFiles} />
          <p aria-live="polite">{files.length ? `${files.length} files chosen.` : "No files chosen yet."}</p>
        </fieldset>
        <button type="submit" disabled={upload.running || groupId !== null}>
          Upload
        </button>
      </form>
      <ErrorMessage error={upload.error} />
      {upload.progress && <ProgressView progress={upload.progress} />}
      {groupId && !upload.running && (
        <p>
          <Link href={`${BASE}/groups/${groupId}`}>Open the mask group</Link>
        </p>
      )}
    </main>
  );
}
