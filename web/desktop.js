// noVNC from Debian's novnc package, served by deskhive at /novnc/.
import RFB from "/novnc/core/rfb.js";

const status = document.getElementById("status");
function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// /desktop/{session_id}: the page of one session's desktop.
const sessionId = decodeURIComponent(location.pathname.replace(/\/$/, "").split("/").pop());

// A stream token may come in the fragment, which browsers never send to
// servers or put in Referer headers; it is then dropped from the address bar.
const given = new URLSearchParams(location.hash.slice(1)).get("token");
history.replaceState(null, "", location.pathname + location.search);

/** The credential this tab logged in with (the web client's sessionStorage), if it is this session's. */
function storedToken() {
  try {
    const session = JSON.parse(sessionStorage.getItem("deskhive.session"));
    return session && session.session_id === sessionId ? session.token : null;
  } catch {
    return null;
  }
}

/** A stream token for the running desktop, asked for with the session's (or share's) token. */
async function streamToken() {
  if (given) return given;
  const bearer = storedToken();
  if (!bearer) throw new Error("No stream token: open the desktop from the deskhive page.");
  const answer = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/stream`, {
    method: "POST",
    headers: { Authorization: `Bearer ${bearer}` },
  });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error((body.error && body.error.message) || `Refused (${answer.status}).`);
  return body.token;
}

function connect(token) {
  const url = new URL(location.pathname.replace(/\/$/, "") + "/websockify", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // The token travels as a subprotocol, not in the URL, which proxies log.
  const rfb = new RFB(document.getElementById("screen"), url.href, {
    wsProtocols: ["binary", `deskhive.stream.${token}`],
  });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.addEventListener("connect", () => show("connected", "Connected"));
  rfb.addEventListener("disconnect", (e) =>
    show("disconnected", e.detail.clean ? "Disconnected" : "Connection lost"));
  rfb.addEventListener("securityfailure", (e) => show("failed", "Refused: " + (e.detail.reason || "security")));
  rfb.addEventListener("desktopname", (e) => { document.title = "deskhive — " + e.detail.name; });
}

streamToken().then(connect, (error) => show("failed", error.message));
