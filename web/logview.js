// The live log and output panel. It follows new events while the reader is
// at the bottom, and leaves the scroll position alone once they scroll up
// (a "new events" button brings them back).

// Past this many rows the oldest go: the server's journal is the record,
// the page only needs to stay fast.
const MAX_ROWS = 3000;
// Within this many pixels of the bottom still counts as "following".
const FOLLOW_SLACK_PX = 24;

const LEVELS = new Set(["debug", "info", "warning", "error", "critical"]);
const LEVEL_RANK = { debug: 0, info: 1, warning: 2, error: 3, critical: 4 };
const LOG_KNOWN_KEYS = new Set(["type", "seq", "ts", "level", "event", "fields", "_received"]);
// Lines about the machinery rather than the work: folded unless "details" is on.
const BOOKKEEPING_EVENTS = new Set(["job.started", "job.finished", "share.joined", "session.resumed"]);
const NOTE_LEVELS = { error: "error", warn: "warning", gap: "warning", cancelled: "info" };
const AGENT_SHOWN_KEYS = new Set(["step", "text", "action", "outcome", "thumbnail"]);

function time(ts) {
  const date = ts ? new Date(ts) : new Date();
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour12: false });
}

/** Whether a log event is bookkeeping: the lines around every job that say nothing new. */
function isBookkeeping(event) {
  return event.level === "debug" || BOOKKEEPING_EVENTS.has(event.event);
}

function describeFields(event) {
  const fields = { ...(event.fields || {}) };
  for (const [key, value] of Object.entries(event)) {
    if (!LOG_KNOWN_KEYS.has(key)) fields[key] = value;
  }
  return Object.entries(fields)
    .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(" ");
}

export class LogView {
  /**
   * @param {HTMLElement} list  the scrolling role="log" element
   * @param {HTMLButtonElement} jumpButton  shown when new events arrive out of view
   */
  constructor(list, jumpButton) {
    this.list = list;
    this.jumpButton = jumpButton;
    this.following = true;
    this.lastOutput = null; // {id, stream, element}: consecutive chunks share a row
    this.scrollQueued = false;
    this.lastScrollTop = 0;
    this.filter = { text: "", level: "debug", stream: "all" };
    this.lastTs = null; // the newest event time seen, for events that carry none
    list.classList.add("folded");
    list.addEventListener("scroll", () => this.scrolled());
    jumpButton.addEventListener("click", () => {
      this.following = true;
      this.scrollToEnd();
      list.focus();
    });
  }

  /**
   * Only a move up stops following: rows added between our own scroll and
   * its event also leave us short of the bottom, and must not count.
   */
  scrolled() {
    const { list } = this;
    if (list.scrollTop + list.clientHeight >= list.scrollHeight - FOLLOW_SLACK_PX) {
      this.following = true;
      this.jumpButton.hidden = true;
    } else if (list.scrollTop < this.lastScrollTop) {
      this.following = false;
    }
    this.lastScrollTop = list.scrollTop;
  }

  /** Shows or folds the bookkeeping lines. */
  showDetails(on) {
    this.list.classList.toggle("folded", !on);
    this.followUp();
  }

  /** Shows only rows matching *text* (any case), at or above *level*, of *stream*. */
  setFilter(filter) {
    Object.assign(this.filter, filter);
    for (const row of this.list.children) this.applyFilter(row);
    this.followUp();
  }

  applyFilter(row) {
    const { text, level, stream } = this.filter;
    const kind = row.dataset.kind;
    let shown = (LEVEL_RANK[row.dataset.level] ?? 1) >= LEVEL_RANK[level];
    if (stream === "output") shown &&= kind === "output";
    else if (stream === "stdout" || stream === "stderr") shown &&= row.dataset.stream === stream;
    else if (stream === "log") shown &&= kind === "log";
    if (text) shown &&= row.textContent.toLowerCase().includes(text.toLowerCase());
    row.classList.toggle("filtered", !shown);
  }

  clear() {
    this.list.replaceChildren();
    this.lastTs = null;
    this.lastOutput = null;
    this.following = true;
    this.lastScrollTop = 0;
    this.jumpButton.hidden = true;
  }

  /** One server log event: time, level, dotted name, fields. */
  log(event) {
    const level = LEVELS.has(event.level) ? event.level : "info";
    if (event.event === "agent.step") {
      this.agentStep(event, level);
      return;
    }
    const row = this.row(`entry entry-log level-${level}`, event.seq, event.ts);
    row.dataset.kind = "log";
    row.dataset.level = level;
    if (isBookkeeping(event)) row.classList.add("bookkeeping");
    row.append(this.tag(`level`, level.toUpperCase()), this.span("event", event.event || "log"));
    const details = describeFields(event);
    if (details) row.append(this.span("fields", details));
    this.add(row);
  }

  /** One agent step as one readable line: the model's words, what it did, how it went, the screen. */
  agentStep(event, level) {
    const row = this.row(`entry entry-log agent-step level-${level}`, event.seq, event.ts);
    row.dataset.kind = "log";
    row.dataset.level = level;
    row.append(this.tag("level", `STEP ${event.step ?? ""}`.trim()));
    const body = this.span("agent-body", "");
    if (event.text) body.append(this.span("agent-text", event.text));
    body.append(this.span("agent-action", `→ ${event.action || "?"}`));
    if (event.outcome) body.append(this.span("agent-outcome", `: ${event.outcome}`));
    const rest = Object.entries(event).filter(([key]) => !LOG_KNOWN_KEYS.has(key) && !AGENT_SHOWN_KEYS.has(key));
    if (rest.length) body.append(this.span("fields", describeFields(Object.fromEntries(rest))));
    row.append(body);
    if (typeof event.thumbnail === "string" && event.thumbnail.startsWith("data:image/")) {
      const img = document.createElement("img");
      img.className = "agent-thumb";
      img.src = event.thumbnail;
      img.alt = `The screen at step ${event.step ?? ""}`;
      img.loading = "lazy";
      row.append(img);
    }
    this.add(row);
  }

  /** A chunk of a job's output; chunks of one stream run on in one block. */
  output(event) {
    const stream = event.stream === "stderr" ? "stderr" : "stdout";
    const last = this.lastOutput;
    if (last && last.id === event.id && last.stream === stream && last.element.isConnected) {
      last.text.appendData(event.data || "");
      this.followUp();
      return;
    }
    const row = this.row(`entry output ${stream}`, event.seq, event._received);
    row.dataset.kind = "output";
    row.dataset.stream = stream;
    const text = document.createTextNode(event.data || "");
    const pre = document.createElement("pre");
    pre.append(text);
    row.append(this.tag("stream", stream), pre);
    this.add(row);
    this.lastOutput = { id: event.id, stream, element: row, text };
  }

  /** A line the page writes itself: state changes, results, gaps, connection notes. */
  note(kind, text, seq, ts, bookkeeping = false) {
    const row = this.row(`entry note note-${kind}`, seq, ts);
    row.dataset.kind = "note";
    row.dataset.level = NOTE_LEVELS[kind] || "info";
    if (bookkeeping) row.classList.add("bookkeeping");
    row.append(this.span("message", text));
    this.add(row);
  }

  /**
   * A row stamped with its event's time: its own `ts`, else the time it
   * first reached this page (kept across reloads), else the newest time of
   * an earlier event (a replay into a fresh tab: at or after it).
   */
  row(className, seq, ts) {
    const row = document.createElement("div");
    row.className = className;
    if (Number.isInteger(seq)) row.dataset.seq = String(seq);
    const when = ts || this.lastTs;
    if (ts) this.lastTs = ts;
    const stamp = this.span("time", when ? time(when) : time());
    if (when) stamp.title = new Date(when).toLocaleString([], { hour12: false });
    row.append(stamp);
    return row;
  }

  span(className, text) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  tag(className, text) {
    const tag = this.span(`tag ${className}`, text);
    return tag;
  }

  add(row) {
    if (!row.classList.contains("output")) this.lastOutput = null;
    this.applyFilter(row);
    this.list.append(row);
    if (this.list.childElementCount > MAX_ROWS) {
      while (this.list.childElementCount > MAX_ROWS) this.list.firstElementChild.remove();
      // Trimming pulls scrollTop down by itself; that is no move of the reader's.
      if (this.following) this.lastScrollTop = 0;
    }
    this.followUp();
  }

  followUp() {
    if (!this.following) {
      this.jumpButton.hidden = false;
      return;
    }
    // One scroll per frame, however many events arrived in it.
    if (this.scrollQueued) return;
    this.scrollQueued = true;
    requestAnimationFrame(() => {
      this.scrollQueued = false;
      if (this.following) this.scrollToEnd();
    });
  }

  scrollToEnd() {
    this.list.scrollTop = this.list.scrollHeight;
    this.jumpButton.hidden = true;
  }
}
