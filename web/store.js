// What this tab remembers across reloads, in sessionStorage (per tab, gone
// when the tab closes). The rendered events and the last seq seen are written
// together under one key, so a reload never resumes past an event it cannot
// show, nor shows an event it will receive again.

const SESSION_KEY = "deskhive.session";
const HISTORY_KEY = "deskhive.history";
const PENDING_KEY = "deskhive.pending";

// The server keeps 1000 events by default; keeping as many here lets a
// reload show what the page showed. The size bound keeps clear of the
// browser's quota (about 5 MB of UTF-16 per origin).
export const HISTORY_MAX_EVENTS = 1000;
const HISTORY_MAX_CHARS = 1_500_000;

function read(key) {
  try {
    return JSON.parse(sessionStorage.getItem(key));
  } catch {
    return null;
  }
}

function write(key, value) {
  try {
    sessionStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

export function loadSession() {
  const session = read(SESSION_KEY);
  // A guest's session has no id until its first welcome: the token is what counts.
  return session && session.token ? session : null;
}

export function saveSession(session) {
  write(SESSION_KEY, session);
}

export function loadHistory() {
  const history = read(HISTORY_KEY);
  if (!history || !Array.isArray(history.events) || !Number.isInteger(history.lastSeq)) {
    return { lastSeq: 0, events: [] };
  }
  return history;
}

/** Keeps the newest events that fit; falls back to a full replay from the server. */
export function saveHistory(lastSeq, events) {
  let kept = events.slice(-HISTORY_MAX_EVENTS);
  let size = kept.reduce((total, event) => total + JSON.stringify(event).length, 0);
  while (size > HISTORY_MAX_CHARS && kept.length) {
    size -= JSON.stringify(kept[0]).length;
    kept = kept.slice(1);
  }
  if (!write(HISTORY_KEY, { lastSeq, events: kept })) {
    // Nothing kept: the next load asks the server for its whole journal.
    write(HISTORY_KEY, { lastSeq: 0, events: [] });
  }
}

export function loadPending() {
  const pending = read(PENDING_KEY);
  return Array.isArray(pending) ? pending : [];
}

export function savePending(requests) {
  write(PENDING_KEY, requests);
}

export function forgetAll() {
  for (const key of [SESSION_KEY, HISTORY_KEY, PENDING_KEY]) sessionStorage.removeItem(key);
}
