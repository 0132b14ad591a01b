// The login form: POST /api/sessions, and the server's refusal shown next
// to the field it is about (400 username or other named field, 401 password,
// anything else on the form).

import { ApiError, login, logout, mySessions } from "/static/api.js";
import { confirmAction } from "/static/confirm.js";
import { forgetSession, knownSessions, rememberSession, watchKnown } from "/static/known.js";
import * as store from "/static/store.js";

const $ = (id) => document.getElementById(id);

const FIELDS = {
  username: "login-username",
  aws_login: "login-aws",
  customer_name: "login-customer",
  password: "login-password",
};

function clearErrors() {
  for (const inputId of Object.values(FIELDS)) {
    $(inputId).removeAttribute("aria-invalid");
    $(`${inputId}-error`).textContent = "";
  }
  $("login-form-error").textContent = "";
  $("login-form-error").classList.remove("info");
}

/** Which field an error is about: the one a 400 names (the username unless another), the password on 401. */
function fieldOf(error) {
  if (error.status === 401) return "password";
  if (error.status !== 400) return null;
  const message = error.message.toLowerCase();
  if (message.includes("aws")) return "aws_login";
  if (message.includes("customer")) return "customer_name";
  if (message.includes("password")) return "password";
  return "username";
}

function showError(error) {
  const field = fieldOf(error);
  if (!field) {
    $("login-form-error").textContent = error.message;
    return;
  }
  const input = $(FIELDS[field]);
  input.setAttribute("aria-invalid", "true");
  $(`${FIELDS[field]}-error`).textContent = error.message;
  // A 401 teaches us this server wants passwords.
  if (error.status === 401) $("login-password-optional").textContent = "(this server requires one)";
  input.focus();
}

function readFields() {
  const form = new FormData($("login-form"));
  const fields = { username: String(form.get("username") || "").trim() };
  for (const name of ["aws_login", "customer_name"]) {
    const value = String(form.get(name) || "").trim();
    if (value) fields[name] = value;
  }
  // Spaces may belong to a password: sent as typed.
  const password = String(form.get("password") || "");
  if (password) fields.password = password;
  return fields;
}

let enter = null; // the page's way into a session, set by initLogin

/** Wires the form; *onLoggedIn* gets the new session, already saved for reloads. */
export function initLogin(onLoggedIn, { passwords = false } = {}) {
  enter = onLoggedIn;
  $("mine-list").hidden = !passwords;
  // A session another tab ended leaves this page's list at once.
  watchKnown(() => {
    if (!$("login-view").hidden) renderKnown();
  });
  $("mine-list").addEventListener("click", () => listMine([]));
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const fields = readFields();
    $("login-submit").disabled = true;
    try {
      const answer = await login(fields);
      $("login-password").value = "";
      const session = {
        session_id: answer.session_id,
        token: answer.token,
        ws_url: answer.ws_url,
        stream_url: answer.stream_url,
        username: answer.username || fields.username,
        state: answer.state || "idle",
      };
      store.forgetAll();
      store.saveSession(session);
      rememberSession(session);
      onLoggedIn(session);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      showError(error);
      if (error.status === 429 && knownSessions().length) {
        const said = $("login-form-error").textContent.replace(/[.\s]*$/, "");
        $("login-form-error").textContent = `${said}. Your sessions on this browser are listed here: end one, or resume it.`;
      }
    } finally {
      $("login-submit").disabled = false;
    }
  });
  // The button is disabled until here: a form sent before the page is wired
  // would go out as a plain GET, the password in its address.
  $("login-submit").disabled = false;
}

/** Shows the form, with *message* (why we are back here) above the button. */
export function showLogin(message) {
  $("session-view").hidden = true;
  $("login-view").hidden = false;
  document.title = "deskhive";
  clearErrors();
  if (message) {
    $("login-form-error").textContent = message;
    $("login-form-error").classList.add("info");
  }
  renderKnown();
  $("login-username").focus();
}

// --------------------------------------------------------------------------
// Your sessions: those this browser opened, and (with a password) all of them

function knownRow(label, detail, actions) {
  const row = document.createElement("li");
  row.className = "known-session";
  const text = document.createElement("span");
  text.className = "known-label";
  text.textContent = label;
  const small = document.createElement("span");
  small.className = "hint";
  small.textContent = detail;
  text.append(" ", small);
  row.append(text, ...actions);
  return row;
}

function button(text, aria, onClick, className = "small") {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  element.setAttribute("aria-label", aria);
  element.addEventListener("click", onClick);
  return element;
}

function since(iso) {
  const date = new Date(typeof iso === "number" ? iso * 1000 : iso);
  return Number.isNaN(date.getTime()) ? "" : `since ${date.toLocaleString([], { hour12: false })}`;
}

/** Lists this browser's sessions on the login page; hidden when there are none. */
export function renderKnown() {
  const sessions = knownSessions();
  $("known-list").replaceChildren(...sessions.map((session) => knownRow(
    session.role && session.role !== "owner" ? `${session.username} (guest, ${session.role})` : session.username,
    `${session.session_id || ""} ${since(session.created)}`.trim(),
    [
      button("Resume", `Resume ${session.session_id || session.username}`, () => resume(session), "small primary"),
      button(session.role && session.role !== "owner" ? "Forget" : "End…", `End ${session.session_id || session.username}`,
        () => endKnown(session), "small danger"),
    ],
  )));
  $("known-sessions").hidden = sessions.length === 0;
}

function resume(session) {
  if (store.loadSession()?.session_id !== session.session_id) store.forgetAll();
  store.saveSession(session);
  enter(session);
}

async function endKnown(session) {
  const guest = session.role && session.role !== "owner";
  if (guest) {
    forgetSession(session.session_id);
    renderKnown();
    return;
  }
  const ok = await confirmAction("End this session?",
    `Session ${session.session_id} ends for good: its desktop is killed and the files in its home folder are deleted.`,
    "End the session");
  if (!ok) return;
  try {
    await logout(session.session_id, session.token);
    $("known-feedback").textContent = `Ended ${session.session_id}.`;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status !== 404 && error.status !== 401) {
      $("known-feedback").textContent = `Could not end ${session.session_id}: ${error.message}`;
      return;
    }
    $("known-feedback").textContent = `${session.session_id} had already ended.`;
  }
  forgetSession(session.session_id);
  renderKnown();
  $("known-sessions").hidden = false;
}

/** With a users file: lists (and ends) the user's sessions from any browser, by password. */
async function listMine(end) {
  clearErrors();
  const { username, password } = readFields();
  if (!username || !password) {
    $("login-form-error").textContent = "Type your username and password first, then list your sessions.";
    return;
  }
  let sessions;
  try {
    sessions = await mySessions(username, password, end);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    showError(error);
    return;
  }
  for (const sessionId of end) forgetSession(sessionId);
  renderKnown();
  const known = new Map(knownSessions().map((session) => [session.session_id, session]));
  $("known-list").replaceChildren(...sessions.map((session) => knownRow(
    session.session_id,
    `${session.state}${session.desktop ? ", desktop running" : ""} ${since(session.created)}`,
    [
      ...(known.has(session.session_id)
        ? [button("Resume", `Resume ${session.session_id}`, () => resume(known.get(session.session_id)), "small primary")]
        : []),
      button("End…", `End ${session.session_id}`, async () => {
        const ok = await confirmAction("End this session?",
          `Session ${session.session_id} ends for good: its desktop is killed and the files in its home folder are deleted.`,
          "End the session");
        if (ok) await listMine([session.session_id]);
      }, "small danger"),
    ],
  )));
  $("known-sessions").hidden = false;
  $("known-feedback").textContent = sessions.length
    ? `${sessions.length} live session${sessions.length > 1 ? "s" : ""} of ${username}.`
    : `${username} has no live session now: log in.`;
}
