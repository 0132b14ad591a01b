// noVNC from Debian's novnc package, served by deskhive at /novnc/.
import RFB from "/novnc/core/rfb.js";

const status = document.getElementById("status");
function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// The stream token travels in the fragment, which browsers never send to
// servers or put in Referer headers; it is then dropped from the address bar.
const token = new URLSearchParams(location.hash.slice(1)).get("token");
history.replaceState(null, "", location.pathname + location.search);

if (!token) {
  show("failed", "No stream token in the link (#token=…).");
} else {
  const url = new URL(location.pathname.replace(/\/$/, "") + "/websockify", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  const rfb = new RFB(document.getElementById("screen"), url.href, { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.addEventListener("connect", () => show("connected", "Connected"));
  rfb.addEventListener("disconnect", (e) =>
    show("disconnected", e.detail.clean ? "Disconnected" : "Connection lost"));
  rfb.addEventListener("securityfailure", (e) => show("failed", "Refused: " + (e.detail.reason || "security")));
  rfb.addEventListener("desktopname", (e) => { document.title = "deskhive — " + e.detail.name; });
}
