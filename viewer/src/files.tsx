// Choosing mask files: a file input, a folder input and drag-and-drop (folders included).
import { useState } from "preact/hooks";

async function entryFiles(entry: FileSystemEntry): Promise<File[]> {
  if (entry.isFile) {
    return [await new Promise<File>((resolve, reject) => (entry as FileSystemFileEntry).file(resolve, reject))];
  }
  const reader = (entry as FileSystemDirectoryEntry).createReader();
  const files: File[] = [];
  // readEntries answers in pages (100 in Chromium) until it returns an empty page.
  for (;;) {
    const page = await new Promise<FileSystemEntry[]>((resolve, reject) => reader.readEntries(resolve, reject));
    if (page.length === 0) return files;
    for (const child of page) files.push(...(await entryFiles(child)));
  }
}

export function FilePicker(props: { onFiles: (files: File[]) => void; idPrefix: string }) {
  const [over, setOver] = useState(false);
  return (
    <div
      class={over ? "drop over" : "drop"}
      onDragOver={(event) => {
        event.preventDefault();
        setOver(true);
      }}
      onDragLeave={() => setOver(false)}
      onDrop={async (event) => {
        event.preventDefault();
        setOver(false);
        const items = [...(event.dataTransfer?.items ?? [])];
        const entries = items.map((item) => item.webkitGetAsEntry()).filter((entry): entry is FileSystemEntry => entry !== null);
        const files = entries.length ? (await Promise.all(entries.map(entryFiles))).flat() : [...(event.dataTransfer?.files ?? [])];
        props.onFiles(files);
      }}
    >
      <div class="field">
        <label for={`${props.idPrefix}-files`}>Mask files</label>
        <input id={`${props.idPrefix}-files`} type="file" multiple accept="image/png,.png" onChange={(event) => props.onFiles([...(event.currentTarget.files ?? [])])} />
      </div>
      <div class="field">
        <label for={`${props.idPrefix}-folder`}>Mask folder</label>
        <input
          id={`${props.idPrefix}-folder`}
          type="file"
          {...{ webkitdirectory: "" }}
          onChange={(event) => props.onFiles([...(event.currentTarget.files ?? [])])}
        />
      </div>
      <p class="hint">…or drop PNG files or a folder here. A number at the end of a name (liver_0007.png) gives the slice index; otherwise the sorted order does.</p>
    </div>
  );
}
