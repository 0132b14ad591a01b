// HTTP calls to the deskhive server. Every error body is
// {"error": {"code", "message"}}; ApiError keeps the status next to them so
// the caller can decide which field an error is about.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, { body, token } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Check your connection and try again.");
  }
  if (response.status === 204) return null;
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const error = payload && payload.error;
    throw new ApiError(
      response.status,
      (error && error.code) || "internal",
      (error && error.message) || `The server answered ${response.status} ${response.statusText}.`,
    );
  }
  return payload;
}

/** Creates a session; answers {session_id, token, ws_url, stream_url, username, state}. */
export function login(fields) {
  return request("POST", "/api/sessions", { body: fields });
}

/** Ends the session: its job is cancelled, its sandbox killed, its token void. */
export function logout(sessionId, token) {
  return request("DELETE", `/api/sessions/${encodeURIComponent(sessionId)}`, { token });
}

/** The server's workflows: [{name, description, steps}]. */
export async function listWorkflows() {
  const payload = await request("GET", "/api/workflows");
  return (payload && payload.workflows) || [];
}

/** What this server offers: {sandbox, agent, passwords, network, idle_timeout}; {} when it cannot say. */
export async function serverInfo() {
  try {
    return (await request("GET", "/api/info")) || {};
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    return {};
  }
}

/** With a users file: the user's live sessions, after ending those in *end*. */
export async function mySessions(username, password, end = []) {
  const body = { username, password };
  if (end.length) body.end = end;
  const payload = await request("POST", "/api/sessions/mine", { body });
  return (payload && payload.sessions) || [];
}

export { request };
