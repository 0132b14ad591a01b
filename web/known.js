// The sessions this browser opened, kept in localStorage (per origin, shared
// by its tabs) until they end: the login page lists them with Resume and End,
// so closing tabs without logging out never locks a username out.

const KEY = "deskhive.known";
const MAX_KNOWN = 20;

function read() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY));
    return Array.isArray(list) ? list.filter((s) => s && s.session_id && s.token) : [];
  } catch {
    return [];
  }
}

function write(list) {
  try {
    localStorage.setItem(KEY, JSON.stringify(list.slice(-MAX_KNOWN)));
  } catch {
    // Storage full or refused: the list is a convenience, the session still works.
  }
}

/** Every known session, oldest first. */
export function knownSessions() {
  return read();
}

/** Remembers *session* (what a reload or Resume needs to enter it again). */
export function rememberSession(session) {
  const list = read().filter((s) => s.session_id !== session.session_id);
  const { session_id, token, ws_url, stream_url, username, role } = session;
  list.push({ session_id, token, ws_url, stream_url, username, role: role || "owner",
    created: session.created || new Date().toISOString() });
  write(list);
}

export function forgetSession(sessionId) {
  write(read().filter((s) => s.session_id !== sessionId));
}

/** Calls *onChange* when another tab of this browser changes the list (a log out there). */
export function watchKnown(onChange) {
  window.addEventListener("storage", (event) => {
    if (event.key === KEY || event.key === null) onChange();
  });
}
