// Keeps a watched session from being reaped, and says when it would be.
// The server reaps a session idle for `idle_timeout` seconds (no client
// frame, no job); `welcome` and `state` say how long it has been idle. While
// the page is visible it pings every few minutes; when the time left runs low
// (a hidden tab pings rarely, if at all) it shows it and warns, with Stay.

const PING_EVERY_MAX_S = 240;
const PING_EVERY_MIN_S = 2;
const TICK_MS = 1000;

function clock(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s` : `${s} s`;
}

export class KeepAlive {
  /**
   * @param {object} options
   * @param {() => boolean} options.ping  sends one ping; false when offline
   * @param {(left: string|null, warn: string|null) => void} options.show
   */
  constructor({ ping, show }) {
    this.ping = ping;
    this.show = show;
    this.timeout = null; // seconds, from the server; null until it says
    this.deadline = null; // ms since the epoch when the server would reap
    this.lastPing = 0;
    this.timer = null;
    this.onVisible = () => {
      if (document.visibilityState === "visible") this.stay();
    };
  }

  start() {
    this.stop();
    this.lastPing = Date.now(); // the hello about to be sent counts as a frame
    document.addEventListener("visibilitychange", this.onVisible);
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    document.removeEventListener("visibilitychange", this.onVisible);
    this.deadline = null;
    this.show(null, null);
  }

  /** The bound the server announces before any session tells it (GET /api/info). */
  setTimeout(seconds) {
    if (typeof seconds === "number" && seconds > 0 && this.timeout === null) this.timeout = seconds;
  }

  /** What the server said in `welcome` or `state`: the bound and how idle the session is. */
  report(frame) {
    if (typeof frame.idle_timeout !== "number") return;
    this.timeout = frame.idle_timeout;
    // Replayed states are old news; only live ones (and welcome) tell the present.
    if (typeof frame.idle_seconds === "number") {
      this.deadline = Date.now() + (frame.idle_timeout - frame.idle_seconds) * 1000;
    }
    this.tick();
  }

  /** The page sent a frame: the server's idle clock starts again. */
  sent() {
    if (this.timeout !== null) this.deadline = Date.now() + this.timeout * 1000;
    this.tick();
  }

  /** Keeps the session now (the Stay button, the page coming back into view). */
  stay() {
    if (this.ping()) {
      this.lastPing = Date.now();
      this.sent();
    }
  }

  interval() {
    const third = this.timeout === null ? PING_EVERY_MAX_S : this.timeout / 3;
    return Math.max(PING_EVERY_MIN_S, Math.min(PING_EVERY_MAX_S, third)) * 1000;
  }

  tick() {
    if (document.visibilityState === "visible" && Date.now() - this.lastPing >= this.interval()) this.stay();
    if (this.deadline === null || this.timeout === null) {
      this.show(null, null);
      return;
    }
    const left = (this.deadline - Date.now()) / 1000;
    // "Low" is the last fifth of the bound, at most five minutes; the warning, the last half of that.
    const low = Math.min(300, this.timeout / 5);
    if (left > low) {
      this.show(null, null);
    } else if (left > low / 2) {
      this.show(`${clock(left)} left`, null);
    } else if (left > 0) {
      this.show(`${clock(left)} left`,
        `This session will be ended for being idle in ${clock(left)}: its desktop and files go with it.`);
    } else {
      this.show("idle", "This session has been idle past the server's limit and may have been ended.");
    }
  }
}
