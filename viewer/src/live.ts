// maskGroupEvents over graphql-transport-ws; graphql-ws reconnects by itself with back-off.
import { createClient } from "graphql-ws";
import { loadToken } from "./session";

export type LiveState = "connecting" | "connected" | "reconnecting";

export interface MaskGroupEvent {
  kind: "CREATED" | "SLICES_COMPLETED" | "DELETED" | "VALIDATED";
  annotationId: string;
  maskGroupId: string;
  sliceCount: number;
  uploadedSliceCount: number;
  status: string;
  occurredAt: string;
}

const EVENTS = `subscription Events($annotationId: ID!) {
  maskGroupEvents(annotationId: $annotationId) {
    kind annotationId maskGroupId sliceCount uploadedSliceCount status occurredAt
  }
}`;

export function subscribeGroupEvents(annotationId: string, onState: (state: LiveState) => void, onEvent: (event: MaskGroupEvent) => void): () => void {
  const url = `${window.location.origin.replace(/^http/, "ws")}/graphql`;
  let disposed = false;
  let waiting: ReturnType<typeof setTimeout> | undefined;
  const client = createClient({
    url,
    connectionParams: () => ({ Authorization: `Bearer ${loadToken() ?? ""}` }),
    retryAttempts: Number.POSITIVE_INFINITY,
    shouldRetry: () => true,
    // After dispose the wait never ends: graphql-ws would otherwise reject a promise nobody
    // awaits ("All Subscriptions Gone"), an uncaught error in the page.
    retryWait: (retries) =>
      new Promise((resolve) => {
        if (!disposed) waiting = setTimeout(resolve, Math.min(1000 * 2 ** retries, 30000) * (0.5 + Math.random() / 2));
      }),
    on: {
      connected: () => onState("connected"),
      closed: () => onState("reconnecting"),
    },
  });
  const unsubscribe = client.subscribe<{ maskGroupEvents: MaskGroupEvent }>(
    { query: EVENTS, variables: { annotationId } },
    {
      next: (message) => {
        if (message.data) onEvent(message.data.maskGroupEvents);
      },
      error: () => onState("reconnecting"),
      complete: () => undefined,
    },
  );
  return () => {
    disposed = true;
    clearTimeout(waiting);
    unsubscribe();
    void client.dispose();
  };
}
