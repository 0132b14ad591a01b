// The desktop page (desktop.html): noVNC from Debian's novnc package, served
// by deskhive at /novnc/. It opens in the session page's frame, in a tab of
// its own, or from a link that carries a stream token.
//
// A stream token opens one desktop run for one credential (the owner's or a
// share's). It comes either in the link's fragment (`#token=…&view=1`),
// which browsers never send to servers, or, each time the page connects,
// from `POST /api/sessions/{id}/stream` with the credential this browser
// keeps for the session (the tab's own, or a session it opened before). It
// travels as the WebSocket subprotocol `deskhive.stream.<token>`, never in
// the URL, which proxies log.

import RFB from "/novnc/core/rfb.js";

const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 15_000;
const status = document.getElementById("status");
const mode = document.getElementById("mode");
const screen = document.getElementById("screen");

function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// /desktop/{session_id}
const sessionId = decodeURIComponent(location.pathname.replace(/\/$/, "").split("/").pop());

// A link's token is kept in this tab's sessionStorage, so that a reload still works.
const KEY = `deskhive.stream:${location.pathname}`;
const fragment = new URLSearchParams(location.hash.slice(1));
let saved = {};
try {
  saved = JSON.parse(sessionStorage.getItem(KEY)) || {};
} catch {
  saved = {};
}
const linkToken = fragment.get("token") || saved.token || null;
let viewOnly = fragment.has("token") ? fragment.get("view") === "1" : Boolean(saved.viewOnly);
if (linkToken) {
  try {
    sessionStorage.setItem(KEY, JSON.stringify({ token: linkToken, viewOnly }));
  } catch {
    // Without storage a reload needs the link again; the stream still works now.
  }
}
history.replaceState(null, "", location.pathname + location.search);

/** The session's credential this browser keeps: this tab's, else one of the sessions it opened. */
function credential() {
  try {
    const mine = JSON.parse(sessionStorage.getItem("deskhive.session"));
    if (mine && mine.session_id === sessionId && mine.token) return mine.token;
  } catch {
    // fall through
  }
  try {
    const known = JSON.parse(localStorage.getItem("deskhive.known"));
    const found = Array.isArray(known) && known.find((s) => s && s.session_id === sessionId && s.token);
    if (found) return found.token;
  } catch {
    // fall through
  }
  return null;
}

/** A failure that ends the page's tries (a bad link, a gone session). */
class Fatal extends Error {}

const BAD_LINK = "This link is not valid (a wrong, revoked or expired stream token). Ask for a new one.";
const GONE = "This session no longer exists: the link is dead.";
const NOT_RUNNING = "The desktop of this session is not running; it shows here once it is started.";

/** A stream token for the desktop running now, asked for with the kept credential. */
async function freshToken(bearer) {
  let answer;
  try {
    answer = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/stream`, {
      method: "POST",
      headers: { Authorization: `Bearer ${bearer}` },
      cache: "no-store",
    });
  } catch {
    throw new Error("The server cannot be reached.");
  }
  if (answer.status === 401 || answer.status === 403) throw new Fatal(BAD_LINK);
  if (answer.status === 404) throw new Fatal(GONE);
  if (answer.status === 409) throw new Error(NOT_RUNNING);
  if (!answer.ok) throw new Error(`The server refused the stream (${answer.status}).`);
  const body = await answer.json();
  viewOnly = body.mode === "view";
  return body.token;
}

let rfb = null;
let attempt = 0;
let everConnected = false;
let connectedThisTry = false;
let retryTimer = null;

function socketUrl() {
  const url = new URL(location.pathname.replace(/\/$/, "") + "/websockify", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url;
}

function retry(text) {
  const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** attempt);
  attempt += 1;
  show("disconnected", `${text} Retrying in ${Math.ceil(delay / 1000)} s…`);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay);
}

/** One try: a token (the link's first, else a fresh one), then the stream. */
async function connect() {
  show("connecting", everConnected ? "Reconnecting…" : "Connecting…");
  const bearer = credential();
  let token = linkToken;
  try {
    if (!token || (everConnected && bearer)) {
      if (!bearer) {
        // A tab that was showing the desktop and lost its session's credential:
        // the session was logged out (or forgotten) in its page.
        throw new Fatal(everConnected
          ? "This desktop's session has ended (or its page forgot it): open the desktop again from the session's page."
          : "This link has no stream token: open the desktop from the session's page.");
      }
      token = await freshToken(bearer);
    }
  } catch (error) {
    if (error instanceof Fatal) show("failed", error.message);
    else retry(error.message);
    return;
  }
  showMode();
  open(token, bearer);
}

function open(token, bearer) {
  connectedThisTry = false;
  rfb = new RFB(screen, socketUrl().href, { wsProtocols: ["binary", `deskhive.stream.${token}`] });
  rfb.viewOnly = viewOnly;
  // Fit the desktop to this pane: ask the X screen to take its size, and
  // scale what it cannot match.
  rfb.scaleViewport = true;
  rfb.resizeSession = !viewOnly;
  rfb.focusOnClick = !viewOnly;
  rfb.addEventListener("connect", () => {
    everConnected = connectedThisTry = true;
    attempt = 0;
    show("connected", "Connected");
    if (document.hasFocus()) rfb.focus();
  });
  rfb.addEventListener("disconnect", () => {
    rfb = null;
    // A link's token that never opened the stream is no good.
    if (!connectedThisTry && token === linkToken && !everConnected) {
      show("failed", BAD_LINK);
      return;
    }
    // A token opens one desktop run only: without a credential to ask for
    // another, a link cannot follow the desktop once it is restarted.
    if (!bearer && (!connectedThisTry || attempt >= 3)) {
      show("failed", "The desktop was stopped or restarted: this link no longer opens it.");
      return;
    }
    retry("Connection lost.");
  });
  rfb.addEventListener("securityfailure", (e) => show("failed", `Refused: ${e.detail.reason || "security"}`));
  rfb.addEventListener("desktopname", (e) => { document.title = `deskhive — ${e.detail.name}`; });
  rfb.addEventListener("clipboard", (e) => {
    if (window.parent !== window) window.parent.postMessage({ deskhive: "clipboard", text: e.detail.text }, location.origin);
  });
}

function showMode() {
  mode.hidden = !viewOnly;
  mode.textContent = viewOnly ? "view only: your keys and clicks do not reach this desktop" : "";
}

showMode();
connect();

// Tab into the frame: the keys go to the desktop's canvas.
window.addEventListener("focus", () => rfb?.focus());
window.addEventListener("message", (event) => {
  if (event.origin !== location.origin || event.data?.deskhive !== "paste" || !rfb || viewOnly) return;
  rfb.clipboardPasteFrom(String(event.data.text || ""));
});
