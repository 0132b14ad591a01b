// The session's controls: desktop buttons, the agent's task and workflow,
// the command box. Each sends one request through the page's `send`, and
// hears back in the feedback line next to it (setFeedback).

import { ApiError, listWorkflows } from "/static/api.js";
import { confirmAction } from "/static/confirm.js";

const $ = (id) => document.getElementById(id);
let send = null; // (type, fields, origin, label, command?) => boolean, from app.js
let jobs = null; // the page's JobList

/** Says up front what this server lacks, rather than letting the user fail. */
export function applyInfo(info) {
  const noAgent = info.agent === false;
  // The query box stays: workflows take their query from it.
  $("run-task").disabled = noAgent;
  $("task-unavailable").hidden = !noAgent;
  $("task-unavailable").textContent = noAgent
    ? "No AI model on this server: tasks for the agent cannot run here (the server's operator can configure one)." : "";
  // Without a model the agent's box only takes room from the log: folded, and
  // said why on its summary (workflows of plain steps still run, opened).
  $("agent-panel").open = !noAgent;
  $("agent-summary-note").textContent = noAgent ? "(no AI model on this server)" : "";
  $("network-note").hidden = info.network !== false;
  $("network-note").textContent = "No network: programs in this sandbox cannot reach the internet, so web pages will not load.";
}

export function setFeedback(id, text, tone) {
  const element = $(id);
  element.textContent = text;
  element.className = `feedback${tone ? ` feedback-${tone}` : ""}`;
  // The field the answer is about is marked invalid while the answer is an error.
  const field = document.querySelector(`[aria-describedby~="${id}"]`);
  if (!field) return;
  if (tone === "error") field.setAttribute("aria-invalid", "true");
  else field.removeAttribute("aria-invalid");
}

function stopAgent() {
  const running = jobs.runningJob();
  if (running) send("cancel", { target: running.id }, "task-feedback", `stop ${running.label}`);
}

async function killDesktop() {
  const ok = await confirmAction("Kill the desktop?",
    "Every program on the desktop is closed and the running job is cancelled. The files in the home folder are kept.",
    "Kill desktop");
  if (ok) send("kill_desktop", {}, "desktop-feedback", "kill desktop");
}

async function clearLog() {
  const ok = await confirmAction("Clear the log?",
    "The server forgets this session's log and output, for every tab and guest; it cannot be brought back. "
    + "Download it first to keep a copy.", "Clear log");
  if (ok) send("clear_logs", {}, "log-feedback", "clear log");
}

function launch(app) {
  send("launch", { app }, "desktop-feedback", `open ${app}`, `launch ${app}`);
}

export async function loadWorkflows() {
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


/** Wires the controls to the page's *send* and its *jobs*. */
export function wireControls(page) {
  ({ send, jobs } = page);
  $("start-desktop").addEventListener("click", () =>
    send("start_desktop", {}, "desktop-feedback", "start desktop"));
  $("setup-environment").addEventListener("click", () =>
    send("setup_environment", {}, "desktop-feedback", "set up environment"));
  $("kill-desktop").addEventListener("click", killDesktop);
  $("launch-terminal").addEventListener("click", () => launch("terminal"));
  $("launch-browser").addEventListener("click", () => launch("browser"));
  $("take-screenshot").addEventListener("click", () =>
    send("screenshot", {}, "desktop-feedback", "screenshot"));
  $("agent-stop").addEventListener("click", stopAgent);
  $("clear-logs").addEventListener("click", clearLog);
  $("task-form").addEventListener("submit", runTask);
  $("workflow-form").addEventListener("submit", runWorkflow);
  $("workflow-name").addEventListener("change", describeWorkflow);
  $("command-form").addEventListener("submit", runCommand);
  $("command-input").addEventListener("keydown", browseCommands);
}
