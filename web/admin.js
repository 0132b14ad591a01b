// The operator's page: /status and /metrics with the admin token, refreshed
// every few seconds, and End for a session. The token stays in this tab only.

import { ApiError, request } from "/static/api.js";
import { confirmAction } from "/static/confirm.js";

const $ = (id) => document.getElementById(id);
const KEY = "deskhive.admin";
const REFRESH_MS = 5000;
let timer = null;

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function idle(seconds) {
  const s = Math.round(seconds || 0);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function renderTotals(status) {
  const items = { uptime: idle(status.uptime_seconds), sessions: status.sessions.length, ...status.totals };
  $("admin-totals").replaceChildren(...Object.entries(items).flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    return [dt, dd];
  }));
}

function renderLimits(limits) {
  $("admin-limits-panel").hidden = !limits;
  if (!limits) return;
  $("admin-limits").replaceChildren(...Object.entries(limits).map(([name, limit]) => {
    const row = document.createElement("tr");
    const use = typeof limit === "object" && limit ? limit.use ?? limit.current ?? "" : "";
    const value = typeof limit === "object" && limit ? limit.value ?? limit.limit ?? "" : limit;
    row.append(cell(name), cell(String(use)), cell(String(value)));
    return row;
  }));
}

function renderSessions(sessions) {
  $("admin-sessions").replaceChildren(...sessions.map((session) => {
    const row = document.createElement("tr");
    const desktop = session.sandbox_id ? `${session.sandbox_kind} ${session.sandbox_id}` : session.sandbox_kind;
    row.append(cell(session.session_id), cell(session.username), cell(session.state), cell(idle(session.idle_seconds)),
      cell(String(session.sockets)), cell(desktop || ""));
    const end = document.createElement("button");
    end.type = "button";
    end.className = "small danger";
    end.textContent = "End";
    end.setAttribute("aria-label", `End ${session.session_id}`);
    end.addEventListener("click", () => endSession(session.session_id));
    const td = document.createElement("td");
    td.append(end);
    row.append(td);
    return row;
  }));
  $("admin-empty").hidden = sessions.length > 0;
}

async function endSession(sessionId) {
  const ok = await confirmAction("End this session?",
    `Session ${sessionId} ends now: its user is logged out, its desktop killed and its files deleted.`, "End the session");
  if (!ok) return;
  try {
    await request("DELETE", `/admin/sessions/${encodeURIComponent(sessionId)}`, { token: token() });
    $("admin-feedback").textContent = `Ended ${sessionId}.`;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    $("admin-feedback").textContent = `Could not end ${sessionId}: ${error.message}`;
  }
  await refresh();
}

function token() {
  return sessionStorage.getItem(KEY) || "";
}

async function metrics() {
  const answer = await fetch("/metrics", { headers: { Authorization: `Bearer ${token()}` }, cache: "no-store" });
  return answer.ok ? answer.text() : `(no metrics: the server answered ${answer.status})`;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const status = await request("GET", "/status", { token: token() });
    $("admin-error").textContent = "";
    $("admin-view").hidden = false;
    renderTotals(status);
    renderLimits(status.limits);
    renderSessions(status.sessions || []);
    $("admin-metrics").textContent = await metrics();
    $("admin-updated").textContent = `Updated ${new Date().toLocaleTimeString([], { hour12: false })}; refreshed every ${REFRESH_MS / 1000} s.`;
    timer = setTimeout(refresh, REFRESH_MS);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    $("admin-error").textContent = error.status === 401 ? "Wrong admin token." : error.message;
    if (error.status !== 401) timer = setTimeout(refresh, REFRESH_MS);
  }
}

$("admin-login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("admin-token").value);
  $("admin-token").value = "";
  refresh();
});
if (token()) refresh();
else $("admin-token").focus();
