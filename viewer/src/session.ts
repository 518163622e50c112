// The API token lives in sessionStorage: it is gone when the tab closes and never reaches a URL.
const TOKEN_KEY = "pacs-masks.token";
const ME_KEY = "pacs-masks.me";

export interface Me {
  user: string;
  role: "READER" | "UPLOADER" | "ADMIN";
}

export function loadToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function loadMe(): Me | null {
  const raw = sessionStorage.getItem(ME_KEY);
  return raw ? (JSON.parse(raw) as Me) : null;
}

export function saveSession(token: string, me: Me): void {
  sessionStorage.setItem(TOKEN_KEY, token);
  sessionStorage.setItem(ME_KEY, JSON.stringify(me));
}

export function clearSession(): void {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ME_KEY);
}
