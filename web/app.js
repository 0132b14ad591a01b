// The deskhive web client: after the login form (login.js), one session's
// desktop, controls, jobs and log. The socket and resume logic live in
// protocol.js, the log panel in logview.js, what survives a reload in store.js,
// the sessions this browser knows in known.js, the keep-alive in keepalive.js,
// the desktop's tools in tools.js, files and sharing in files.js and share.js.

import { ApiError, logout, serverInfo } from "/static/api.js";
import { confirmAction } from "/static/confirm.js";
import { applyInfo, loadWorkflows, setFeedback, wireControls } from "/static/controls.js";
import { FilesPanel } from "/static/files.js";
import { KeepAlive } from "/static/keepalive.js";
import { forgetSession, rememberSession } from "/static/known.js";
import { initLogin, showLogin } from "/static/login.js";
import { LogView } from "/static/logview.js";
import { CLOSE_SESSION_ENDED, CLOSE_SHARE_REVOKED, SessionLink, socketUrl } from "/static/protocol.js";
import { JobList, describeResult, labelFromState } from "/static/requests.js";
import { SharePanel } from "/static/share.js";
import * as store from "/static/store.js";
import * as tools from "/static/tools.js";

const $ = (id) => document.getElementById(id);

// A desktop worth showing exists only in these states.
const LIVE_STATES = new Set(["ready", "busy"]);
const DESKTOP_MESSAGES = {
  idle: "No desktop is running. Start one to see it here.",
  starting: "Starting the desktop…",
  ready: "The desktop is ready, but this sandbox has no stream to show.",
  busy: "A job is running; there is no desktop stream to show.",
  stopping: "Stopping the desktop…",
  closed: "This session has ended.",
  failed: "This session failed. Log out and log in again.",
};
const AGENT_KINDS = ["run_task", "run_workflow"];
// What each role may do; the server refuses the rest (forbidden) anyway.
const ROLE_NOTES = {
  view: "You are watching this session as a view-only guest: you see its desktop, jobs and log, and can change nothing.",
  control: "You are a guest with control of this session: you may use its desktop, run commands and jobs, and cancel them; only its owner can clear the log, share it or end it.",
};
const OWNER_ONLY = ["logout", "clear-logs", "share-panel"];
const CONTROL_ONLY = ["start-desktop", "setup-environment", "kill-desktop", "launch-terminal", "launch-browser",
  "take-screenshot", "task-form", "workflow-form", "command-form", "files-panel", "desktop-paste"];
// Saving the history on every event would stall big outputs; a short pause
// batches them (and pagehide flushes the rest).
const HISTORY_SAVE_DELAY_MS = 250;
const JOB_NAMES_KEPT = 200;

const view = {
  session: null, // {session_id, token, ws_url, stream_url, username}
  link: null,
  history: [], // journal events shown, oldest first, as saved in the tab
  lastSeq: 0,
  welcomeSeq: 0, // events at or below it are replayed history, not news
  state: "idle",
  lastState: null, // the newest state event seen: welcome lacks its current_command
  jobNames: new Map(), // request id -> label, of jobs seen running in state events
  wasConnected: false,
  saveTimer: null,
  role: "owner",
  info: {},
};
const log = new LogView($("log"), $("log-jump"));
const jobs = new JobList($("jobs"), $("jobs-empty"), (job) => cancelJob(job));
const keepAlive = new KeepAlive({ ping: sendPing, show: showTimeLeft });
const files = new FilesPanel(() => view.session);
const shares = new SharePanel(() => view.session);

// --------------------------------------------------------------------------
// Session

function enterSession(session) {
  view.session = session;
  view.role = session.role || "owner";
  const saved = store.loadHistory();
  view.history = saved.events;
  view.lastSeq = saved.lastSeq;
  view.welcomeSeq = saved.lastSeq;
  view.wasConnected = false;
  jobs.restore(store.loadPending());

  $("login-view").hidden = true;
  $("session-view").hidden = false;
  document.title = `${session.username} · deskhive`;
  $("session-user").textContent = session.username || "guest";
  $("session-id").textContent = session.session_id || "";
  showRole(view.role);
  setState(session.state || "idle", session.stream_url, null);

  log.clear();
  view.restState = null;
  for (const frame of view.history) draw(frame);
  view.lastState = view.history.findLast((frame) => frame.type === "state") || null;
  loadWorkflows();

  openLink();
  keepAlive.setTimeout(view.info.idle_timeout);
  keepAlive.start();
  $("session-title").focus();
}

/** What the page lets this person do: owners everything, guests what their share grants. */
function showRole(role) {
  const guest = role === "view" || role === "control";
  $("role-badge").hidden = !guest;
  $("role-badge").textContent = role === "view" ? "view only" : "guest with control";
  $("guest-note").hidden = !guest;
  $("guest-note").textContent = ROLE_NOTES[role] || "";
  for (const id of OWNER_ONLY) $(id).hidden = guest;
  for (const id of CONTROL_ONLY) {
    const element = $(id);
    element.inert = role === "view";
    element.classList.toggle("not-allowed", role === "view");
  }
  jobs.canCancel = role !== "view";
  jobs.render();
  $("logout").hidden = guest;
}

/** Connects (again) to the session, resuming after the last event shown. */
function openLink() {
  view.link = new SessionLink({
    url: socketUrl(view.session.ws_url),
    token: view.session.token,
    lastSeq: view.lastSeq,
    onEvent: receive,
    onStatus: showConnection,
    onEnded: ended,
  });
  view.link.start();
}

/** The server closed the session for good: say why in plain words, and forget it. */
function ended(reason, code) {
  const sessionId = view.session?.session_id;
  if (sessionId) forgetSession(sessionId);
  let message;
  if (code === CLOSE_SHARE_REVOKED) {
    message = "The owner of this session stopped sharing it with you: this link no longer works.";
  } else if (code === CLOSE_SESSION_ENDED) {
    // The server's reason says "session ended: logout" itself.
    const why = String(reason || "").replace(/^((this|the) )?session (has )?ended:?\s*/i, "");
    message = `This session has ended, and its desktop and files are gone${why ? ` (${why})` : ""}. Log in to start a new one.`;
  } else {
    message = view.role === "owner"
      ? "The server no longer knows this session: it was ended (by a log out, for being idle, or with the server). Its desktop and files are gone. Log in to start a new one."
      : "This link does not open a session: it was revoked, or the session has ended.";
  }
  leave(message);
}

/** Back to the login form, forgetting everything this tab knew of the session. */
function leave(message) {
  if (!view.session) return;
  view.link?.stop();
  keepAlive.stop();
  files.reset();
  shares.reset();
  clearTimeout(view.saveTimer);
  Object.assign(view, { session: null, link: null, history: [], lastSeq: 0, welcomeSeq: 0, lastState: null });
  view.jobNames.clear();
  store.forgetAll();
  jobs.restore([]);
  log.clear();
  setState("idle", null, null);
  for (const id of ["desktop-feedback", "task-feedback", "workflow-feedback", "jobs-feedback",
    "log-feedback", "command-feedback", "logout-error"]) {
    setFeedback(id, "", "");
  }
  showLogin(message);
}

/** Leave this page for the login page; the session, its desktop and files are kept. */
function leavePage() {
  const guest = view.role === "view" || view.role === "control";
  leave(guest
    ? `You left session ${view.session.session_id}; it goes on for its owner. Resume it below, or forget its link.`
    : `You left session ${view.session.session_id}; it is kept, with its desktop and files. Resume it below, or end it.`);
}

async function logOut() {
  const { session } = view;
  const ok = await confirmAction("Log out and end this session?",
    "Logging out ends the session: its desktop is killed and the files in its home folder are deleted. "
    + "To keep them, choose Leave instead.", "End the session");
  if (!ok) return;
  $("logout-error").textContent = "";
  // Stop first, so the socket's 4404 close does not report our own logout.
  view.link.stop();
  try {
    await logout(session.session_id, session.token);
    forgetSession(session.session_id);
    leave("You have logged out; the session and its files are gone.");
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 404 || error.status === 401) {
      forgetSession(session.session_id);
      leave(`Your session had already ended: ${error.message}`);
      return;
    }
    $("logout-error").textContent = `Could not log out: ${error.message}`;
    openLink();
  }
}

function showConnection(status, detail) {
  const label = {
    connecting: "connecting…",
    connected: "connected",
    reconnecting: `reconnecting in ${detail}…`,
  }[status];
  $("connection").textContent = label;
  $("connection").className = `connection connection-${status}`;
  if (status === "reconnecting" && view.wasConnected) {
    log.note("warn", navigator.onLine === false
      ? "Connection lost: this computer is offline. The page reconnects when the network is back."
      : "Connection lost; reconnecting. The session goes on on the server.");
    view.wasConnected = false;
  }
  if (status === "connected" && view.resuming) {
    log.note("info", "Reconnected: the session resumed where the page left it.");
    view.resuming = false;
  }
  if (status === "reconnecting") view.resuming = true;
}

function showTimeLeft(left, warning) {
  $("time-left").hidden = !left;
  $("time-left").textContent = left || "";
  $("idle-warning").hidden = !warning;
  $("idle-warning-text").textContent = warning || "";
  document.title = view.session
    ? `${warning ? `⚠ ${left} · ` : ""}${view.session.username || "guest"} · deskhive` : "deskhive";
}

function sendPing() {
  if (!view.link || !view.link.connected) return false;
  return view.link.send({ type: "ping", id: `keepalive-${Date.now()}` });
}

function setState(state, streamUrl, currentCommand, runningId) {
  const badge = $("state-badge");
  badge.textContent = state;
  badge.className = `badge state-${state}`;
  view.state = state;
  setCurrentCommand(currentCommand, runningId);
  if (view.session) view.session.stream_url = streamUrl;

  const live = LIVE_STATES.has(state) && Boolean(streamUrl);
  const frame = $("desktop-frame");
  if (live) {
    const src = tools.streamLink(streamUrl, view.role);
    // Only a new URL reloads the stream; ready <-> busy must not.
    if (frame.src !== src) frame.src = src;
    $("desktop-open").href = src;
  } else if (frame.getAttribute("src")) {
    frame.removeAttribute("src");
  }
  frame.hidden = !live;
  // One desktop per session: starting it again would only say "done" twice.
  $("start-desktop").disabled = live || state === "starting" || state === "ready";
  $("desktop-links").hidden = !live;
  $("desktop-placeholder").hidden = live;
  $("desktop-message").textContent = DESKTOP_MESSAGES[state] || `State: ${state}`;
}

function setCurrentCommand(currentCommand, runningId) {
  $("current-command").textContent = currentCommand ? `running: ${currentCommand}` : "";
  jobs.running(runningId, currentCommand);
  const busy = $("command-busy");
  busy.hidden = !currentCommand;
  busy.textContent = currentCommand
    ? `A job is still running (${currentCommand}): a command sent now waits until it ends. Cancel it in Jobs above; programs with windows are better started with Open terminal / Open browser, or with a trailing &.`
    : "";
  const agent = Boolean(currentCommand) && AGENT_KINDS.some((kind) => currentCommand.startsWith(`${kind}:`));
  $("agent-stop").hidden = !agent || view.role === "view";
  // A running agent or workflow shows its Stop, even where the panel was folded.
  if (agent) $("agent-panel").open = true;
}

// --------------------------------------------------------------------------
// Events from the server

function receive(frame) {
  switch (frame.type) {
    case "welcome":
      welcomed(frame);
      return;
    case "ack": {
      const request = jobs.acked(frame.id);
      store.savePending(jobs.pending());
      if (request) setFeedback(request.origin, `${request.label}: accepted.`, "pending");
      return;
    }
    case "error":
      failed(frame);
      return;
    case "gap":
      remember(frame);
      draw(frame);
      return;
    case "log":
    case "output":
    case "state":
    case "result":
      if (frame.type === "state") learnJobName(frame);
      if (frame.type === "result") frame._label = jobs.labelOf(frame.id, view.jobNames.get(frame.id));
      remember(frame);
      draw(frame);
      act(frame);
      return;
    default:
      return; // pong, and anything newer than this client
  }
}

function welcomed(frame) {
  view.welcomeSeq = frame.seq;
  view.wasConnected = true;
  if (frame.resumed === false && view.history.length) {
    // The server did not resume from what this page holds (it never numbered
    // those events): its whole journal follows, in place of the page's.
    view.history = [];
    view.lastState = null;
    log.clear();
  }
  // A guest learns whose session it watches only now.
  if (frame.role && frame.role !== view.role) {
    view.role = frame.role;
    showRole(frame.role);
  }
  if (frame.session_id && frame.session_id !== view.session.session_id) {
    Object.assign(view.session, { session_id: frame.session_id, username: frame.username });
    $("session-user").textContent = frame.username;
    $("session-id").textContent = frame.session_id;
  }
  view.session.role = view.role;
  store.saveSession(view.session);
  rememberSession(view.session);
  keepAlive.report(frame);
  // welcome has no current_command; the newest state event seen has it.
  const last = view.lastState?.state === frame.state ? view.lastState : null;
  setState(frame.state, frame.stream_url, last ? last.current_command : null, last ? last.running_id : undefined);
  forgetUnconfirmed();
}

/** Remembers what a running job does, so its result reads by name in every tab. */
function learnJobName(frame) {
  if (!frame.running_id || !frame.current_command) return;
  view.jobNames.set(frame.running_id, labelFromState(frame.current_command));
  // Names are only wanted until the job's result: keep the newest few.
  if (view.jobNames.size > JOB_NAMES_KEPT) view.jobNames.delete(view.jobNames.keys().next().value);
}

/** Keeps a journal event for the next reload of this tab. */
function remember(frame) {
  // Live events without a time of their own keep the time they arrived;
  // replayed ones borrow the newest earlier event's (logview.js).
  if (!frame.ts && !(frame.seq <= view.welcomeSeq)) frame._received = new Date().toISOString();
  view.history.push(frame);
  // The tab keeps no more than it can save; the log panel has its own bound.
  if (view.history.length > store.HISTORY_MAX_EVENTS) view.history.shift();
  if (Number.isInteger(frame.seq)) view.lastSeq = frame.seq;
  clearTimeout(view.saveTimer);
  view.saveTimer = setTimeout(saveHistory, HISTORY_SAVE_DELAY_MS);
}

function saveHistory() {
  clearTimeout(view.saveTimer);
  if (view.session) store.saveHistory(view.lastSeq, view.history);
}

/** Puts one event in the log panel; the same for live, replayed and saved events. */
function draw(frame) {
  switch (frame.type) {
    case "log":
      log.log(frame);
      break;
    case "output":
      log.output(frame);
      break;
    case "state": {
      // Into a job and back to the state before it is bookkeeping; a desktop
      // starting, stopping or failing, or a job's end in a new state, is news.
      let bookkeeping;
      if (frame.current_command) {
        bookkeeping = !["starting", "stopping", "failed", "closed"].includes(frame.state);
      } else {
        bookkeeping = frame.state === view.restState;
        view.restState = frame.state;
      }
      log.note("state", `state: ${frame.state}${frame.current_command ? ` · ${frame.current_command}` : ""}`,
        frame.seq, frame._received, bookkeeping);
      break;
    }
    case "result": {
      const { text, tone } = describeResult(frame, frame._label || `request ${frame.id}`);
      log.note(tone, text, frame.seq, frame._received);
      break;
    }
    case "gap":
      log.note("gap", `Events ${frame.from_seq} to ${frame.to_seq} are no longer kept by the server and cannot be shown.`,
        undefined, frame._received);
      break;
    default:
      break;
  }
}

/** What an event changes beyond the log: the badge, the desktop, a request's answer. */
function act(frame) {
  if (frame.type === "log" && String(frame.event).startsWith("share.") && frame.seq > view.welcomeSeq) shares.refresh();
  if (frame.type === "state") {
    view.lastState = frame;
    // Replayed states are history: only the command still running can be learnt from them.
    if (frame.seq > view.welcomeSeq) {
      setState(frame.state, frame.stream_url, frame.current_command, frame.running_id);
      keepAlive.report(frame);
    } else if (frame.state === view.state) {
      setCurrentCommand(frame.current_command, frame.running_id);
    }
  }
  if (frame.type !== "result") return;
  const request = jobs.finish(frame.id);
  store.savePending(jobs.pending());
  if (!request) return;
  const { feedback, tone } = describeResult(frame, request.label);
  setFeedback(request.origin, feedback, tone);
  if (request.type === "clear_logs" && frame.ok) clearLocalLog();
  if (request.type === "screenshot" && frame.ok) tools.showScreenshot(frame.data, view.session.session_id);
}

/**
 * Requests sent on an earlier socket that the server never acknowledged may
 * not have reached it; say so where they were sent rather than wait forever.
 */
function forgetUnconfirmed() {
  for (const request of jobs.pending()) {
    if (request.acked) continue;
    jobs.finish(request.id);
    setFeedback(request.origin, `${request.label}: the connection dropped before the server took it; send it again.`, "error");
  }
  store.savePending(jobs.pending());
}

function failed(frame) {
  const request = frame.id ? jobs.finish(frame.id) : null;
  store.savePending(jobs.pending());
  if (request) {
    setFeedback(request.origin, frame.message, "error");
  }
  log.note("error", `${request ? request.label : "request"} refused (${frame.code}): ${frame.message}`);
}

function clearLocalLog() {
  view.history = [];
  saveHistory();
  log.clear();
  log.note("info", "Log cleared.");
}

// --------------------------------------------------------------------------
// Requests

/** Sends one request, answering in the feedback line *origin*; false when offline. */
function send(type, fields, origin, label, command = type) {
  if (!view.link || !view.link.connected) {
    setFeedback(origin, "Not connected to the server yet; try again in a moment.", "error");
    return false;
  }
  const request = jobs.add(type, label, origin, command);
  view.link.send({ type, id: request.id, ...fields });
  keepAlive.sent();
  store.savePending(jobs.pending());
  setFeedback(origin, `${label}: sent…`, "pending");
  return true;
}

function cancelJob(job) {
  send("cancel", { target: job.id }, "jobs-feedback", `cancel ${job.label}`);
}

function wireLog() {
  $("log-search").addEventListener("input", (event) => log.setFilter({ text: event.target.value.trim() }));
  $("log-level").addEventListener("change", (event) => log.setFilter({ level: event.target.value }));
  $("log-stream").addEventListener("change", (event) => log.setFilter({ stream: event.target.value }));
  $("log-details").addEventListener("change", (event) => log.showDetails(event.target.checked));
  $("log-download").addEventListener("click", () => tools.downloadLog(view.session, view.history));
}

function wire(info) {
  initLogin(enterSession, { passwords: Boolean(info.passwords) });
  view.info = info;
  applyInfo(info);
  wireControls({ send, jobs });
  $("logout").addEventListener("click", logOut);
  $("leave").addEventListener("click", leavePage);
  $("idle-stay").addEventListener("click", () => keepAlive.stay());
  $("desktop-fullscreen").addEventListener("click", tools.fullscreen);
  $("desktop-paste").addEventListener("click", tools.openPaste);
  wireLog();
  tools.wireTools();
  window.addEventListener("pagehide", saveHistory);
}

const info = await serverInfo();
wire(info);
const guest = tools.shareFromLink();
if (guest) {
  store.forgetAll();
  store.saveSession(guest);
}
const saved = store.loadSession();
if (saved) enterSession(saved);
else showLogin();
