// The desktop page (desktop.html): noVNC from Debian's novnc package, served
// by deskhive at /novnc/. It opens in the session page's frame, in a tab of
// its own, or from a view-only link.

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

// The stream token travels in the fragment, which browsers never send to
// servers or put in Referer headers; it is then dropped from the address bar,
// and kept in this tab's sessionStorage so that a reload still works.
const KEY = `deskhive.stream:${location.pathname}`;
const fragment = new URLSearchParams(location.hash.slice(1));
let saved = {};
try {
  saved = JSON.parse(sessionStorage.getItem(KEY)) || {};
} catch {
  saved = {};
}
const token = fragment.get("token") || saved.token;
const viewOnly = fragment.has("token") ? fragment.get("view") === "1" : Boolean(saved.viewOnly);
if (token) {
  try {
    sessionStorage.setItem(KEY, JSON.stringify({ token, viewOnly }));
  } catch {
    // Without storage a reload needs the link again; the stream still works now.
  }
}
history.replaceState(null, "", location.pathname + location.search);

let rfb = null;
let attempt = 0;
let everConnected = false;
let retryTimer = null;

function socketUrl() {
  const url = new URL(location.pathname.replace(/\/$/, "") + "/websockify", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  return url;
}

/**
 * Why the stream closed, asked of the server with a plain GET (which it
 * answers with its error): {fatal, text}. Only a bad link or a gone session
 * is fatal; anything else is worth another try.
 */
async function whyClosed() {
  const url = socketUrl();
  url.protocol = location.protocol;
  try {
    const answer = await fetch(url, { cache: "no-store" });
    if (answer.status === 401 || answer.status === 403) {
      return { fatal: true, text: "This link is not valid (wrong or revoked stream token). Ask for a new one." };
    }
    if (answer.status === 404) return { fatal: true, text: "This session no longer exists: the link is dead." };
    if (answer.status === 409) {
      return { fatal: false, text: "The desktop of this session is not running; it shows here once it is started." };
    }
    return { fatal: false, text: "Connection lost." };
  } catch {
    return { fatal: false, text: "The server cannot be reached." };
  }
}

function connect() {
  show("connecting", everConnected ? "Reconnecting…" : "Connecting…");
  rfb = new RFB(screen, socketUrl().href, { wsProtocols: ["binary"] });
  rfb.viewOnly = viewOnly;
  // Fit the desktop to this pane: ask the X screen to take its size, and
  // scale what it cannot match.
  rfb.scaleViewport = true;
  rfb.resizeSession = !viewOnly;
  rfb.focusOnClick = !viewOnly;
  rfb.addEventListener("connect", () => {
    everConnected = true;
    attempt = 0;
    show("connected", "Connected");
    if (document.hasFocus()) rfb.focus();
  });
  rfb.addEventListener("disconnect", async (event) => {
    rfb = null;
    if (event.detail.clean && everConnected) {
      show("disconnected", "Disconnected");
    }
    const { fatal, text } = await whyClosed();
    if (fatal) {
      show("failed", text);
      return;
    }
    const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** attempt);
    attempt += 1;
    show("disconnected", `${text} Retrying in ${Math.ceil(delay / 1000)} s…`);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  });
  rfb.addEventListener("securityfailure", (e) => show("failed", `Refused: ${e.detail.reason || "security"}`));
  rfb.addEventListener("desktopname", (e) => { document.title = `deskhive — ${e.detail.name}`; });
  rfb.addEventListener("clipboard", (e) => {
    if (window.parent !== window) window.parent.postMessage({ deskhive: "clipboard", text: e.detail.text }, location.origin);
  });
}

if (viewOnly) {
  mode.hidden = false;
  mode.textContent = "view only: your keys and clicks do not reach this desktop";
}
if (!token) {
  show("failed", "This link has no stream token (#token=…): open the desktop from the session's page.");
} else {
  connect();
}

// Tab into the frame: the keys go to the desktop's canvas.
window.addEventListener("focus", () => rfb?.focus());
window.addEventListener("message", (event) => {
  if (event.origin !== location.origin || event.data?.deskhive !== "paste" || !rfb || viewOnly) return;
  rfb.clipboardPasteFrom(String(event.data.text || ""));
});
