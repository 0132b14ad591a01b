// The WebSocket side of a session: hello, resume from the last seq seen,
// drop anything already seen, and reconnect with backoff when the socket
// drops. It knows nothing about the page; it calls back with events and
// with its connection status.

export const CLOSE_UNAUTHORIZED = 4401;
export const CLOSE_SESSION_ENDED = 4404;
export const CLOSE_SHARE_REVOKED = 4403;

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10_000;

/** Resolves ws_url against the page (it may be relative or http(s)), else same-origin /ws. */
export function socketUrl(wsUrl) {
  const url = new URL(wsUrl || "/ws", location.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  return url.href;
}

export class SessionLink {
  /**
   * @param {object} options
   * @param {string} options.url      WebSocket URL
   * @param {string} options.token    the session's bearer token
   * @param {number} options.lastSeq  newest seq already shown
   * @param {(event: object) => void} options.onEvent   every frame not seen before
   * @param {(status: string, detail?: string) => void} options.onStatus
   * @param {(reason: string, code: number) => void} options.onEnded  the session is gone for good
   */
  constructor({ url, token, lastSeq, onEvent, onStatus, onEnded }) {
    this.url = url;
    this.token = token;
    this.lastSeq = lastSeq;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.onEnded = onEnded;
    this.socket = null;
    this.welcomed = false;
    this.stopped = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.reconnectNow = () => this.retrySoon(0);
    window.addEventListener("online", this.reconnectNow);
  }

  start() {
    this.connect();
  }

  get connected() {
    return this.welcomed && this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Sends one request; false when the socket is not ready (the caller says so). */
  send(frame) {
    if (!this.connected) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  /** Stops for good: no reconnect, no more callbacks. */
  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    window.removeEventListener("online", this.reconnectNow);
    if (this.socket) this.socket.close(1000, "client leaving");
    this.socket = null;
  }

  connect() {
    if (this.stopped) return;
    this.welcomed = false;
    this.onStatus("connecting");
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ type: "hello", token: this.token, last_seq: this.lastSeq }));
    });
    socket.addEventListener("message", (message) => {
      if (socket === this.socket) this.receive(message.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket === this.socket) this.closed(event);
    });
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // The server only sends JSON; a torn frame is not worth a crash.
    }
    if (frame.type === "welcome") {
      this.welcomed = true;
      this.attempt = 0;
      // Not resumed (no last_seq sent, or one this session never numbered):
      // the whole journal follows, and every event of it is new to this page.
      if (frame.resumed === false) this.lastSeq = 0;
      this.onStatus("connected");
    }
    if (Number.isInteger(frame.seq) && frame.type !== "welcome") {
      if (frame.seq <= this.lastSeq) return; // seen before this reconnect
      this.lastSeq = frame.seq;
    }
    this.onEvent(frame);
  }

  closed(event) {
    this.socket = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    if (this.stopped) return;
    if ([CLOSE_SESSION_ENDED, CLOSE_UNAUTHORIZED, CLOSE_SHARE_REVOKED].includes(event.code)) {
      // A restarted server with durable sessions takes the same token back:
      // only these codes mean the session (or this share of it) is gone.
      this.end(event.reason || "the session has ended", event.code);
    } else {
      // 1001 (server going away), 1008 (we read too slowly), a dropped
      // network: resume from lastSeq after a pause.
      if (wasWelcomed) this.attempt = 0;
      this.retrySoon(this.backoff());
    }
  }

  end(reason, code) {
    this.stop();
    this.onEnded(reason, code);
  }

  backoff() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    this.attempt += 1;
    // Jitter keeps many tabs from knocking on a restarted server at once.
    return Math.round(base * (0.75 + Math.random() * 0.5));
  }

  retrySoon(delay) {
    if (this.stopped || this.socket) return;
    clearTimeout(this.retryTimer);
    this.onStatus("reconnecting", `${Math.ceil(delay / 1000)} s`);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}
