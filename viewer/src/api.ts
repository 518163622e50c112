import { loadToken } from "./session";

export interface GraphQLErrorBody {
  message: string;
  extensions?: { code?: string; sliceIndexes?: number[]; requestId?: string };
}

/** A failed request, with the sentence a person can act on. */
export class ApiError extends Error {
  readonly code: string;
  constructor(code: string, sentence: string) {
    super(sentence);
    this.code = code;
  }
}

function slices(error: GraphQLErrorBody): string {
  const indexes = error.extensions?.sliceIndexes ?? [];
  if (indexes.length === 0) return "";
  const shown = indexes.slice(0, 10).join(", ");
  return ` (slice${indexes.length > 1 ? "s" : ""} ${shown}${indexes.length > 10 ? ", …" : ""})`;
}

export function sentenceFor(error: GraphQLErrorBody): string {
  const code = error.extensions?.code ?? "";
  switch (code) {
    case "UNAUTHENTICATED":
      return "You are not signed in, or your API token is no longer valid. Sign in again with a valid token.";
    case "FORBIDDEN":
      return "Your role does not allow this. Ask an administrator for the access you need.";
    case "NOT_FOUND":
      return "This item does not exist; it may have been deleted.";
    case "BAD_USER_INPUT":
      return `The server refused the input: ${error.message}`;
    case "CONFLICT":
      return `This conflicts with the current state: ${error.message}`;
    case "UPLOAD_INCOMPLETE":
      return `Some slices are not in storage yet${slices(error)}. Upload them again.`;
    case "CHECKSUM_MISMATCH":
      return `Some stored slices differ from the files that were declared${slices(error)}. Upload them again.`;
    case "STORAGE_UNAVAILABLE":
      return "The mask storage cannot be reached right now. Try again in a moment.";
    case "INTERNAL_SERVER_ERROR":
      return `The server failed unexpectedly. Quote request id ${error.extensions?.requestId ?? "(none)"} to your administrator.`;
    default:
      return "The request failed. Try again, and tell your administrator if it keeps failing.";
  }
}

export const NETWORK_SENTENCE = "The server cannot be reached. Check the connection and try again.";

/** One GraphQL request; the first error becomes an ApiError with its sentence. */
export async function gql<T>(query: string, variables: Record<string, unknown> = {}, token?: string): Promise<T> {
  const bearer = token ?? loadToken();
  let response: Response;
  try {
    response = await fetch("/graphql", {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Accept: "application/json",
        ...(bearer ? { Authorization: `Bearer ${bearer}` } : {}),
      },
      body: JSON.stringify({ query, variables }),
    });
  } catch {
    throw new ApiError("NETWORK", NETWORK_SENTENCE);
  }
  let body: { data?: T; errors?: GraphQLErrorBody[] };
  try {
    body = await response.json();
  } catch {
    throw new ApiError("NETWORK", NETWORK_SENTENCE);
  }
  if (body.errors?.length) {
    const first = body.errors[0];
    throw new ApiError(first.extensions?.code ?? "UNKNOWN", sentenceFor(first));
  }
  return body.data as T;
}

export function errorSentence(error: unknown): string {
  if (error instanceof ApiError) return error.message;
  return "Something went wrong in the page. Reload it and try again.";
}
