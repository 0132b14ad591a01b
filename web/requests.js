// The requests this page has sent and not yet seen answered, and how an
// answer reads. Jobs among them are listed with a Cancel button.

const JOB_TYPES = new Set([
  "start_desktop", "setup_environment", "run_command", "run_task", "run_workflow", "screenshot", "launch",
]);

// Ids must not collide with other tabs of the same session, nor with the
// ids this tab used before a reload: a random prefix per page load.
const ID_PREFIX = Array.from(crypto.getRandomValues(new Uint8Array(4)), (b) => b.toString(16).padStart(2, "0")).join("");

function truncate(text, length = 200) {
  return text.length > length ? `${text.slice(0, length)}…` : text;
}

// What a state event's current_command says, for the server's job kinds;
// anything else is a command line.
const STATE_LABELS = {
  kill_desktop: () => "kill desktop",
  start_desktop: () => "start desktop",
  setup_environment: () => "set up environment",
  screenshot: () => "screenshot",
  run_task: (rest) => `task “${rest}”`,
  run_workflow: (rest) => `workflow ${rest}`,
  launch: (rest) => `open ${rest}`,
};

/** The label of a job this tab did not send, from the state event that showed it running. */
export function labelFromState(currentCommand) {
  const match = /^([a-z_]+)(?:: (.*))?$/s.exec(currentCommand);
  const named = match && STATE_LABELS[match[1]];
  return named ? named(match[2] || "") : `$ ${currentCommand}`;
}

/**
 * How a `result` reads: `text` for the log, `feedback` for the line next to
 * the control that sent it, `tone` for both (ok, warn, error, cancelled).
 */
export function describeResult(result, label) {
  const data = result.data || {};
  const exit = Number.isInteger(result.exit_code) ? ` (exit code ${result.exit_code})` : "";
  // A command that ran is told by its exit code, whatever ok says.
  if (!result.error && Number.isInteger(result.exit_code)) {
    const clean = result.exit_code === 0;
    return {
      tone: clean ? "ok" : "warn",
      text: `${clean ? "✓" : "!"} ${label} exited with code ${result.exit_code}`,
      feedback: `Exited with code ${result.exit_code}.`,
    };
  }
  if (!result.ok) {
    const error = result.error || { code: "internal", message: "failed without a reason" };
    const cancelled = error.code === "cancelled";
    return {
      tone: cancelled ? "cancelled" : "error",
      text: `✗ ${label} ${cancelled ? "cancelled" : `failed [${error.code}]`}${exit}: ${error.message}`,
      feedback: cancelled ? `Cancelled: ${error.message}` : `${error.message}${exit}`,
    };
  }
  if (typeof data.answer === "string") {
    return { tone: "ok", text: `✓ ${label}: ${data.answer}`, feedback: `Answer: ${truncate(data.answer)}` };
  }
  if (data.workflow) {
    const count = Array.isArray(data.steps) ? data.steps.length : data.steps;
    const steps = Number.isInteger(count) ? ` (${count} steps)` : "";
    return { tone: "ok", text: `✓ workflow ${data.workflow} finished${steps}`, feedback: `Finished${steps}.` };
  }
  return { tone: "ok", text: `✓ ${label}: done`, feedback: `${label[0].toUpperCase()}${label.slice(1)}: done.` };
}

export class JobList {
  /**
   * The Jobs panel. What runs is learnt from the session's `state` events
   * (`running_id`, `current_command`), the same for every tab and client;
   * the jobs waiting behind it are those this tab sent and saw acked.
   *
   * @param {HTMLUListElement} list  where the jobs are listed
   * @param {HTMLElement} empty  shown when there is no job
   * @param {(job: object) => void} onCancel
   */
  constructor(list, empty, onCancel) {
    this.list = list;
    this.empty = empty;
    this.onCancel = onCancel;
    this.requests = new Map(); // id -> {id, type, label, origin, acked}
    this.rows = new Map(); // id -> <li>, kept so focus survives updates
    this.counter = 0;
    this.current = null; // the state's current_command
    this.currentId = undefined; // the state's running_id (undefined: the server does not say)
    this.canCancel = true;
  }

  /** A new request; *command* is how the server names it in `current_command` while it runs. */
  add(type, label, origin, command = type) {
    this.counter += 1;
    const request = { id: `${ID_PREFIX}-${this.counter}`, type, label, origin, command, acked: false };
    this.requests.set(request.id, request);
    this.render();
    return request;
  }

  /** What runs now, from a `state` event: its request id and how the server names it. */
  running(runningId, currentCommand) {
    this.current = currentCommand || null;
    this.currentId = runningId === undefined ? undefined : runningId || null;
    this.render();
  }

  /** The id of the running job: the server's, else (older servers) the oldest of ours it names. */
  runningId() {
    if (this.currentId !== undefined) return this.currentId;
    const current = this.current;
    if (!current) return null;
    const job = this.pending().find((request) => request.acked && (
      current === request.command || current.startsWith(`${request.type}:`)));
    return job ? job.id : null;
  }

  /** The running job as a row: ours, or one sent by another tab or client. */
  runningJob() {
    const id = this.runningId();
    if (!id) return null;
    return this.requests.get(id) || { id, type: "job", label: this.current || `job ${id}`, foreign: true };
  }

  statusOf(job, runningId) {
    if (job.id === runningId) return job.foreign ? "running (sent elsewhere)" : "running";
    return job.acked ? "waiting" : "sent";
  }

  /** Marks request *id* as taken by the server; answers it (or null when it is not ours). */
  acked(id) {
    const request = this.requests.get(id) || null;
    if (request) request.acked = true;
    this.render();
    return request;
  }

  /** Forgets request *id*, answering what it was (or null when it is not ours). */
  finish(id) {
    const request = this.requests.get(id) || null;
    this.requests.delete(id);
    if (id === this.currentId) this.currentId = null;
    this.render();
    return request;
  }

  /** This tab's label of request *id*, else the one seen in the session's state, else its id. */
  labelOf(id, seen) {
    const request = this.requests.get(id);
    return request ? request.label : seen || `request ${id}`;
  }

  pending() {
    return [...this.requests.values()];
  }

  /** The jobs shown, the running one first. */
  shown() {
    const runningId = this.runningId();
    const running = this.runningJob();
    const waiting = this.pending().filter((request) => JOB_TYPES.has(request.type) && request.id !== runningId);
    return running ? [running, ...waiting] : waiting;
  }

  restore(requests) {
    this.requests = new Map(requests.map((request) => [request.id, request]));
    this.render();
  }

  render() {
    const jobs = this.shown();
    const ids = new Set(jobs.map((job) => job.id));
    for (const [id, row] of this.rows) {
      if (!ids.has(id)) {
        row.remove();
        this.rows.delete(id);
      }
    }
    const runningId = this.runningId();
    for (const job of jobs) {
      const row = this.rows.get(job.id) || this.row(job);
      row.querySelector(".job-status").textContent = this.statusOf(job, runningId);
      row.classList.toggle("job-running", job.id === runningId);
      row.querySelector("button").hidden = !this.canCancel;
      // Rows keep their place (moving one would drop its focus), but the running one leads.
      if (!row.isConnected) {
        if (job.id === runningId) this.list.prepend(row);
        else this.list.append(row);
      }
    }
    this.empty.hidden = jobs.length > 0;
  }

  row(job) {
    const row = document.createElement("li");
    row.className = "job";
    row.dataset.id = job.id;
    const label = document.createElement("span");
    label.className = "job-label";
    label.textContent = job.label;
    label.title = job.label;
    const status = document.createElement("span");
    status.className = "job-status";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small danger";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", `Cancel ${job.label}`);
    cancel.addEventListener("click", () => this.onCancel(job));
    row.append(label, status, cancel);
    this.rows.set(job.id, row);
    return row;
  }
}
