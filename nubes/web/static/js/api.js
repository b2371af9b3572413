// The JSON API as the dashboard uses it: one request function that sends the session's
// token and turns every error body ({code, message, hint}) into an ApiError.

const SESSION_KEY = "nubes.session";
const PAGE = 200;

export class ApiError extends Error {
  constructor(status, body) {
    super(body && typeof body.message === "string" ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.code) || "http_error";
    this.hint = (body && body.hint) || null;
  }
}

let onUnauthorized = () => {};

/** Called when the API refuses the stored token (expired or revoked elsewhere). */
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

/** The logged-in session ({token, token_id, user, role, project}) or null. */
export function session() {
  try {
    return JSON.parse(sessionStorage.getItem(SESSION_KEY));
  } catch {
    return null;
  }
}

export function authHeaders() {
  const current = session();
  return current ? { Authorization: `Bearer ${current.token}` } : {};
}

export async function request(method, path, body) {
  const headers = { Accept: "application/json", ...authHeaders() };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/v1${path}`, init);
  } catch {
    throw new ApiError(0, {
      code: "unreachable",
      message: "the API does not answer",
      hint: "check that the node runs (`nubes status`), then try again",
    });
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && session() !== null) onUnauthorized(error);
    throw error;
  }
  return data;
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body);
export const del = (path) => request("DELETE", path);

/** Every item of a paged listing, following `next`. */
export async function listAll(path, query = {}) {
  const items = [];
  let cursor = null;
  do {
    const params = new URLSearchParams({ ...query, limit: String(PAGE) });
    if (cursor) params.set("cursor", cursor);
    const page = await get(`${path}?${params}`);
    items.push(...page.items);
    cursor = page.next;
  } while (cursor);
  return items;
}

export const enc = encodeURIComponent;

export async function login(user, password, project, totp) {
  const body = { user, password };
  if (project) body.project = project;
  if (totp) body.totp = totp;
  const result = await post("/auth/login", body);
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(result));
  return result;
}

/** Revokes the token (so a copy of it is useless too), then forgets it either way. */
export async function logout() {
  try {
    if (session() !== null) await del("/auth/token");
  } finally {
    sessionStorage.removeItem(SESSION_KEY);
  }
}

export function forget() {
  sessionStorage.removeItem(SESSION_KEY);
}
