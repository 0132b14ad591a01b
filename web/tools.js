// The desktop's tools on the page: screenshot, fullscreen, the clipboard
// box, the log's download, and the links that open the desktop or the page
// as a guest.

import { describeResult } from "/static/requests.js";

const $ = (id) => document.getElementById(id);

/** The desktop page's URL for *role*: a view-only guest's viewer says so and sends no input. */
export function streamLink(streamUrl, role) {
  const url = new URL(streamUrl, location.href);
  if (role === "view") {
    const fragment = new URLSearchParams(url.hash.slice(1));
    fragment.set("view", "1");
    url.hash = fragment.toString();
  }
  return url.href;
}

/** A guest's session from a `/#share=<token>` link, the token then dropped from the address bar. */
export function shareFromLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get("share");
  if (!token) return null;
  history.replaceState(null, "", location.pathname + location.search);
  // The id and username come with the welcome; the share's token is the credential.
  return { session_id: null, token, ws_url: "/ws", stream_url: null, username: "", role: "guest" };
}

/** Shows a screenshot result's PNG with a Save button. */
export function showScreenshot(data, sessionId) {
  if (!data || !data.png) return;
  const src = `data:image/png;base64,${data.png}`;
  $("shot-image").src = src;
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
  $("shot-save").href = src;
  $("shot-save").download = `${sessionId || "desktop"}-${stamp}.png`;
  $("shot-title").textContent = data.width ? `Screenshot (${data.width}×${data.height})` : "Screenshot";
  $("shot").showModal();
}

function line(frame) {
  const when = frame.ts || frame._received || "";
  switch (frame.type) {
    case "log": {
      const { type, seq, ts, level, event, _received, thumbnail, ...fields } = frame;
      const rest = Object.entries(fields).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
      return `${when} #${seq} ${String(level).toUpperCase()} ${event} ${rest.join(" ")}`.trimEnd();
    }
    case "output":
      return `${when} #${frame.seq} ${frame.stream} ${frame.data.replace(/\n$/, "")}`;
    case "state":
      return `${when} #${frame.seq} state ${frame.state}${frame.current_command ? ` ${frame.current_command}` : ""}`;
    case "result":
      return `${when} #${frame.seq} ${describeResult(frame, frame._label || `request ${frame.id}`).text}`;
    case "gap":
      return `${when} gap: events ${frame.from_seq} to ${frame.to_seq} were not kept`;
    default:
      return null;
  }
}

/** Saves what the page holds of the session's log as a text file. */
export function downloadLog(session, history) {
  const text = history.map(line).filter((entry) => entry !== null).join("\n");
  const blob = new Blob([`${text}\n`], { type: "text/plain;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `deskhive-${session?.session_id || "session"}.log`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

export function fullscreen() {
  $("desktop-frame").requestFullscreen?.().catch(() => {});
}

export function openPaste() {
  $("paste").showModal();
  $("paste-text").focus();
}

function desktopWindow() {
  const frame = $("desktop-frame");
  return frame.hidden ? null : frame.contentWindow;
}

export function wireTools() {
  $("paste").addEventListener("close", () => {
    if ($("paste").returnValue !== "send") return;
    desktopWindow()?.postMessage({ deskhive: "paste", text: $("paste-text").value }, location.origin);
  });
  // The desktop page tells what was copied on the desktop.
  window.addEventListener("message", (event) => {
    if (event.origin !== location.origin || event.data?.deskhive !== "clipboard") return;
    $("paste-text").value = String(event.data.text || "");
  });
}
