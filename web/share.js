// The Share panel: links for guests (view-only or with control), the list
// of shares with their sockets, and Revoke, on the `shares` endpoints.

import { ApiError, request } from "/static/api.js";

const $ = (id) => document.getElementById(id);

function sharesPath(session) {
  return `/api/sessions/${encodeURIComponent(session.session_id)}/shares`;
}

export class SharePanel {
  constructor(getSession) {
    this.getSession = getSession;
    this.listings = 0; // listings asked for; only the newest is shown
    $("share-panel").addEventListener("toggle", () => {
      if ($("share-panel").open) this.refresh();
    });
    $("share-view").addEventListener("click", () => this.create("view"));
    $("share-control").addEventListener("click", () => this.create("control"));
  }

  reset() {
    $("share-list").replaceChildren();
    $("share-feedback").textContent = "";
    $("share-panel").open = false;
  }

  say(text, tone = "") {
    $("share-feedback").textContent = text;
    $("share-feedback").className = `feedback${tone ? ` feedback-${tone}` : ""}`;
  }

  async create(mode) {
    const session = this.getSession();
    try {
      const share = await request("POST", sharesPath(session), { body: { mode }, token: session.token });
      const url = new URL(share.url, location.href).href;
      this.lastUrl = url;
      let copied = true;
      try {
        await navigator.clipboard.writeText(url);
      } catch {
        copied = false;
      }
      this.say(copied ? `Copied a ${mode === "view" ? "view-only" : "control"} link: ${url}`
        : `A ${mode === "view" ? "view-only" : "control"} link (copy it): ${url}`, "ok");
      await this.refresh();
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      this.say(`Could not share: ${error.message}`, "error");
    }
  }

  /** Lists the shares; an answer overtaken by a later listing is dropped. */
  async refresh() {
    const session = this.getSession();
    if (!session?.session_id || !$("share-panel").open) return;
    const listing = ++this.listings;
    try {
      const { shares } = await request("GET", sharesPath(session), { token: session.token });
      if (listing === this.listings) this.render(shares || []);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (listing === this.listings) this.say(`Could not list the shares: ${error.message}`, "error");
    }
  }

  render(shares) {
    const rows = shares.map((share) => {
      const row = document.createElement("li");
      row.className = "share-row";
      const text = document.createElement("span");
      const sockets = share.sockets === 1 ? "1 socket" : `${share.sockets ?? 0} sockets`;
      text.textContent = `${share.mode === "view" ? "view only" : "control"}${share.label ? ` · ${share.label}` : ""} · ${sockets}`;
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "small danger";
      revoke.textContent = "Revoke";
      revoke.setAttribute("aria-label", `Revoke ${share.mode} share ${share.share_id}`);
      revoke.addEventListener("click", () => this.revoke(share));
      row.append(text, revoke);
      return row;
    });
    if (!rows.length) {
      // Said in the list, not the feedback line, which tells of the last action.
      const empty = document.createElement("li");
      empty.className = "hint";
      empty.textContent = "Not shared with anyone.";
      rows.push(empty);
    }
    $("share-list").replaceChildren(...rows);
  }

  async revoke(share) {
    const session = this.getSession();
    try {
      await request("DELETE", `${sharesPath(session)}/${encodeURIComponent(share.share_id)}`, { token: session.token });
      this.say("Revoked: that link no longer works, and its guests were disconnected.", "ok");
      await this.refresh();
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      this.say(`Could not revoke: ${error.message}`, "error");
    }
  }
}
