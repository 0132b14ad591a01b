// The Files panel: a small browser of the session's home folder on the
// `files` endpoints (GET lists or downloads, PUT uploads), with drag and drop.

import { ApiError } from "/static/api.js";

const $ = (id) => document.getElementById(id);

function filesUrl(session, path = "") {
  const base = `/api/sessions/${encodeURIComponent(session.session_id)}/files`;
  return path ? `${base}/${path.split("/").map(encodeURIComponent).join("/")}` : base;
}

async function call(session, method, url, body) {
  let response;
  try {
    response = await fetch(url, { method, body, cache: "no-store", headers: { Authorization: `Bearer ${session.token}` } });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    throw new ApiError(response.status, payload?.error?.code || "internal",
      payload?.error?.message || `The server answered ${response.status}.`);
  }
  return response;
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

export class FilesPanel {
  constructor(getSession) {
    this.getSession = getSession;
    this.path = "";
    this.listings = 0; // listings asked for; only the newest is shown
    const panel = $("files-panel");
    panel.addEventListener("toggle", () => {
      if (panel.open) this.refresh();
    });
    $("files-input").addEventListener("change", (event) => {
      this.upload([...event.target.files]);
      event.target.value = "";
    });
    const drop = $("files-drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      this.upload([...event.dataTransfer.files]);
    });
  }

  reset() {
    this.path = "";
    $("files-list").replaceChildren();
    $("files-feedback").textContent = "";
    $("files-panel").open = false;
  }

  say(text, tone = "") {
    $("files-feedback").textContent = text;
    $("files-feedback").className = `feedback${tone ? ` feedback-${tone}` : ""}`;
  }

  /** Lists the folder; an answer overtaken by a later listing is dropped. */
  async refresh() {
    const session = this.getSession();
    if (!session?.session_id) return;
    const listing = ++this.listings;
    try {
      const url = `${filesUrl(session)}?path=${encodeURIComponent(this.path || ".")}`;
      const { entries } = await (await call(session, "GET", url)).json();
      if (listing === this.listings) this.render(entries || []);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (listing === this.listings) this.say(`Could not list ${this.path || "the home folder"}: ${error.message}`, "error");
    }
  }

  render(entries) {
    this.renderPath();
    const sorted = [...entries].sort((a, b) => (b.dir - a.dir) || a.name.localeCompare(b.name));
    const rows = sorted.map((entry) => {
      const row = document.createElement("li");
      const path = this.path ? `${this.path}/${entry.name}` : entry.name;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      if (entry.dir) {
        button.textContent = `${entry.name}/`;
        button.setAttribute("aria-label", `Open folder ${entry.name}`);
        button.addEventListener("click", () => this.open(path));
        row.append(button);
      } else {
        button.textContent = entry.name;
        button.setAttribute("aria-label", `Download ${entry.name}`);
        button.addEventListener("click", () => this.download(path, entry.name));
        const meta = document.createElement("span");
        meta.className = "hint";
        meta.textContent = size(entry.size);
        row.append(button, meta);
      }
      return row;
    });
    if (!rows.length) {
      // Said in the list, not the feedback line, which tells of the last action.
      const empty = document.createElement("li");
      empty.className = "hint";
      empty.textContent = `${this.path || "The home folder"} is empty.`;
      rows.push(empty);
    }
    $("files-list").replaceChildren(...rows);
  }

  renderPath() {
    const parts = this.path ? this.path.split("/") : [];
    const crumbs = [["home", ""], ...parts.map((part, i) => [part, parts.slice(0, i + 1).join("/")])];
    $("files-path").replaceChildren(...crumbs.map(([name, path], i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = i ? `/ ${name}` : "home";
      button.addEventListener("click", () => this.open(path));
      return button;
    }));
  }

  open(path) {
    this.path = path;
    this.say("");
    this.refresh();
  }

  async download(path, name) {
    const session = this.getSession();
    try {
      const blob = await (await call(session, "GET", filesUrl(session, path))).blob();
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = name;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
      this.say(`Downloaded ${name}.`, "ok");
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      this.say(`Could not download ${name}: ${error.message}`, "error");
    }
  }

  async upload(list) {
    const session = this.getSession();
    if (!session?.session_id || !list.length) return;
    for (const file of list) {
      const path = this.path ? `${this.path}/${file.name}` : file.name;
      this.say(`Uploading ${file.name}…`, "pending");
      try {
        await call(session, "PUT", filesUrl(session, path), file);
        this.say(`Uploaded ${file.name} (${size(file.size)}).`, "ok");
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        this.say(`Could not upload ${file.name}: ${error.message}`, "error");
        return;
      }
    }
    await this.refresh();
    if (list.length > 1) this.say(`Uploaded ${list.length} files.`, "ok");
  }
}
