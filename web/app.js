// The deskhive web client: after the login form (login.js), one session's
// desktop, controls, jobs and log. The socket and resume logic live in
// protocol.js, the log panel in logview.js, what survives a reload in store.js.

import { ApiError, listWorkflows, logout } from "/static/api.js";
import { initLogin, showLogin } from "/static/login.js";
import { LogView } from "/static/logview.js";
import { SessionLink, socketUrl } from "/static/protocol.js";
import * as store from "/static/store.js";
import { JobList, describeResult } from "/static/requests.js";

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
// Saving the history on every event would stall big outputs; a short pause
// batches them (and pagehide flushes the rest).
const HISTORY_SAVE_DELAY_MS = 250;

const view = {
  session: null, // {session_id, token, ws_url, stream_url, username}
  link: null,
  history: [], // journal events shown, oldest first, as saved in the tab
  lastSeq: 0,
  welcomeSeq: 0, // events at or below it are replayed history, not news
  state: "idle",
  lastState: null, // the newest state event seen: welcome lacks its current_command
  wasConnected: false,
  saveTimer: null,
};
const log = new LogView($("log"), $("log-jump"));
const jobs = new JobList($("jobs"), $("jobs-empty"), (job) => cancelJob(job));

// --------------------------------------------------------------------------
// Session

function enterSession(session) {
  view.session = session;
  const saved = store.loadHistory();
  view.history = saved.events;
  view.lastSeq = saved.lastSeq;
  view.welcomeSeq = saved.lastSeq;
  view.wasConnected = false;
  jobs.restore(store.loadPending());

  $("login-view").hidden = true;
  $("session-view").hidden = false;
  document.title = `${session.username} · deskhive`;
  $("session-user").textContent = session.username;
  $("session-id").textContent = session.session_id;
  setState(session.state || "idle", session.stream_url, null);

  log.clear();
  for (const frame of view.history) draw(frame);
  view.lastState = view.history.findLast((frame) => frame.type === "state") || null;
  loadWorkflows();

  openLink();
  $("session-title").focus();
}

/** Connects (again) to the session, resuming after the last event shown. */
function openLink() {
  view.link = new SessionLink({
    url: socketUrl(view.session.ws_url),
    token: view.session.token,
    lastSeq: view.lastSeq,
    onEvent: receive,
    onStatus: showConnection,
    onEnded: (reason) => leave(`This session is no longer available (${reason}).`),
  });
  view.link.start();
}

/** Back to the login form, forgetting everything this tab knew of the session. */
function leave(message) {
  if (!view.session) return;
  view.link?.stop();
  clearTimeout(view.saveTimer);
  Object.assign(view, { session: null, link: null, history: [], lastSeq: 0, welcomeSeq: 0, lastState: null });
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

async function logOut() {
  const { session } = view;
  $("logout-error").textContent = "";
  // Stop first, so the socket's 4404 close does not report our own logout.
  view.link.stop();
  try {
    await logout(session.session_id, session.token);
    leave("You have logged out.");
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 404 || error.status === 401) {
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
    log.note("warn", "Connection lost; reconnecting. Nothing will be missed.");
    view.wasConnected = false;
  }
}

function setState(state, streamUrl, currentCommand) {
  const badge = $("state-badge");
  badge.textContent = state;
  badge.className = `badge state-${state}`;
  view.state = state;
  setCurrentCommand(currentCommand);
  if (view.session) view.session.stream_url = streamUrl;

  const live = LIVE_STATES.has(state) && Boolean(streamUrl);
  const frame = $("desktop-frame");
  if (live) {
    const src = new URL(streamUrl, location.href).href;
    // Only a new URL reloads the stream; ready <-> busy must not.
    if (frame.src !== src) frame.src = src;
    $("desktop-open").href = src;
  } else if (frame.getAttribute("src")) {
    frame.removeAttribute("src");
  }
  frame.hidden = !live;
  $("desktop-links").hidden = !live;
  $("desktop-placeholder").hidden = live;
  $("desktop-message").textContent = DESKTOP_MESSAGES[state] || `State: ${state}`;
}

function setCurrentCommand(currentCommand) {
  $("current-command").textContent = currentCommand ? `running: ${currentCommand}` : "";
  jobs.running(currentCommand);
}

// --------------------------------------------------------------------------
// Events from the server

function receive(frame) {
  switch (frame.type) {
    case "welcome":
      view.welcomeSeq = frame.seq;
      view.wasConnected = true;
      // welcome has no current_command; the newest state event seen has it.
      setState(frame.state, frame.stream_url,
        view.lastState?.state === frame.state ? view.lastState.current_command : null);
      forgetUnconfirmed();
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
      if (frame.type === "result") frame._label = jobs.labelOf(frame.id);
      remember(frame);
      draw(frame);
      act(frame);
      return;
    default:
      return; // pong, and anything newer than this client
  }
}

/** Keeps a journal event for the next reload of this tab. */
function remember(frame) {
  // Only log events carry a time; the others keep the time they arrived.
  if (!frame.ts) frame._received = new Date().toISOString();
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
    case "state":
      log.note("state", `state: ${frame.state}${frame.current_command ? ` · ${frame.current_command}` : ""}`,
        frame.seq, frame._received);
      break;
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
  if (frame.type === "state") {
    view.lastState = frame;
    // Replayed states are history: only the command still running can be learnt from them.
    if (frame.seq > view.welcomeSeq) setState(frame.state, frame.stream_url, frame.current_command);
    else if (frame.state === view.state) setCurrentCommand(frame.current_command);
  }
  if (frame.type !== "result") return;
  const request = jobs.finish(frame.id);
  store.savePending(jobs.pending());
  if (!request) return;
  const { feedback, tone } = describeResult(frame, request.label);
  setFeedback(request.origin, feedback, tone);
  if (request.type === "clear_logs" && frame.ok) clearLocalLog();
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
  store.savePending(jobs.pending());
  setFeedback(origin, `${label}: sent…`, "pending");
  return true;
}

function cancelJob(job) {
  send("cancel", { target: job.id }, "jobs-feedback", `cancel ${job.label}`);
}

function setFeedback(id, text, tone) {
  const element = $(id);
  element.textContent = text;
  element.className = `feedback${tone ? ` feedback-${tone}` : ""}`;
  // The field the answer is about is marked invalid while the answer is an error.
  const field = document.querySelector(`[aria-describedby~="${id}"]`);
  if (!field) return;
  if (tone === "error") field.setAttribute("aria-invalid", "true");
  else field.removeAttribute("aria-invalid");
}

async function loadWorkflows() {
  const select = $("workflow-name");
  try {
    const workflows = await listWorkflows();
    if (!workflows.length) return;
    select.replaceChildren(...workflows.map((workflow) => {
      const option = new Option(workflow.name, workflow.name);
      option.dataset.description = workflow.description || "";
      option.dataset.needsQuery = workflow.needs_query ? "yes" : "";
      return option;
    }));
    const fallback = workflows.find((workflow) => workflow.name === "default");
    if (fallback) select.value = "default";
    describeWorkflow();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    setFeedback("workflow-feedback", `Could not load the workflows: ${error.message}`, "error");
  }
}

function describeWorkflow() {
  const option = $("workflow-name").selectedOptions[0];
  const description = option ? option.dataset.description || "" : "";
  $("workflow-description").textContent = description;
  $("workflow-description").title = description; // the line may be cut short
}

// --------------------------------------------------------------------------
// Controls

const commandHistory = { entries: [], index: 0 };

function runCommand(event) {
  event.preventDefault();
  const input = $("command-input");
  const cmd = input.value.trim();
  if (!cmd) {
    setFeedback("command-feedback", "Type a command first.", "error");
    return;
  }
  if (send("run_command", { cmd }, "command-feedback", `$ ${cmd}`, cmd)) {
    commandHistory.entries.push(cmd);
    commandHistory.index = commandHistory.entries.length;
    input.value = "";
  }
}

/** Up and down in the command box walk through the commands sent from this page. */
function browseCommands(event) {
  if (event.key !== "ArrowUp" && event.key !== "ArrowDown") return;
  const { entries } = commandHistory;
  if (!entries.length) return;
  event.preventDefault();
  const step = event.key === "ArrowUp" ? -1 : 1;
  commandHistory.index = Math.max(0, Math.min(entries.length, commandHistory.index + step));
  $("command-input").value = entries[commandHistory.index] || "";
}

function runTask(event) {
  event.preventDefault();
  const query = $("task-query").value.trim();
  if (!query) {
    setFeedback("task-feedback", "Type a task for the agent first.", "error");
    $("task-query").focus();
    return;
  }
  send("run_task", { query }, "task-feedback", `task “${query}”`);
}

function runWorkflow(event) {
  event.preventDefault();
  const workflow = $("workflow-name").value;
  const query = $("task-query").value.trim();
  if (!query && $("workflow-name").selectedOptions[0]?.dataset.needsQuery) {
    setFeedback("workflow-feedback", `The ${workflow} workflow needs a query: type it in the task box above.`, "error");
    $("task-query").focus();
    return;
  }
  send("run_workflow", query ? { workflow, query } : { workflow }, "workflow-feedback", `workflow ${workflow}`);
}

function wire() {
  initLogin(enterSession);
  $("logout").addEventListener("click", logOut);
  $("start-desktop").addEventListener("click", () =>
    send("start_desktop", {}, "desktop-feedback", "start desktop"));
  $("setup-environment").addEventListener("click", () =>
    send("setup_environment", {}, "desktop-feedback", "set up environment"));
  $("kill-desktop").addEventListener("click", () =>
    send("kill_desktop", {}, "desktop-feedback", "kill desktop"));
  $("clear-logs").addEventListener("click", () =>
    send("clear_logs", {}, "log-feedback", "clear log"));
  $("task-form").addEventListener("submit", runTask);
  $("workflow-form").addEventListener("submit", runWorkflow);
  $("workflow-name").addEventListener("change", describeWorkflow);
  $("command-form").addEventListener("submit", runCommand);
  $("command-input").addEventListener("keydown", browseCommands);
  window.addEventListener("pagehide", saveHistory);
}

wire();
const saved = store.loadSession();
if (saved) enterSession(saved);
else showLogin();
