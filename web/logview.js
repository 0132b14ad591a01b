// The live log and output panel. It follows new events while the reader is
// at the bottom, and leaves the scroll position alone once they scroll up
// (a "new events" button brings them back).

// Past this many rows the oldest go: the server's journal is the record,
// the page only needs to stay fast.
const MAX_ROWS = 3000;
// Within this many pixels of the bottom still counts as "following".
const FOLLOW_SLACK_PX = 24;

const LEVELS = new Set(["debug", "info", "warning", "error", "critical"]);
const LOG_KNOWN_KEYS = new Set(["type", "seq", "ts", "level", "event", "fields"]);

function time(ts) {
  const date = ts ? new Date(ts) : new Date();
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour12: false });
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

  clear() {
    this.list.replaceChildren();
    this.lastOutput = null;
    this.following = true;
    this.lastScrollTop = 0;
    this.jumpButton.hidden = true;
  }

  /** One server log event: time, level, dotted name, fields. */
  log(event) {
    const level = LEVELS.has(event.level) ? event.level : "info";
    const row = this.row(`entry entry-log level-${level}`, event.seq, event.ts);
    row.append(this.tag(`level`, level.toUpperCase()), this.span("event", event.event || "log"));
    const details = describeFields(event);
    if (details) row.append(this.span("fields", details));
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
    const row = this.row(`entry output ${stream}`, event.seq);
    const text = document.createTextNode(event.data || "");
    const pre = document.createElement("pre");
    pre.append(text);
    row.append(this.tag("stream", stream), pre);
    this.add(row);
    this.lastOutput = { id: event.id, stream, element: row, text };
  }

  /** A line the page writes itself: state changes, results, gaps, connection notes. */
  note(kind, text, seq, ts) {
    const row = this.row(`entry note note-${kind}`, seq, ts);
    row.append(this.span("message", text));
    this.add(row);
  }

  row(className, seq, ts) {
    const row = document.createElement("div");
    row.className = className;
    if (Number.isInteger(seq)) row.dataset.seq = String(seq);
    row.append(this.span("time", time(ts)));
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
