// The console page: the token, the caller's streams (polled), creating and deleting streams,
// and the deep link /console?stream=<id>&ask=<question> (opens the stream, asks the question).

import { ApiError, api, token, upload } from "./api.js";
import { StreamDetail } from "./detail.js";

const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);
let detail = null;
let streams = [];
let toastTimer = null;
let polling = null;

function notify(text) {
  const toast = $("toast");
  toast.textContent = text;
  toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (toast.hidden = true), 4000);
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i += 1) n /= 1024;
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// ---- the token -------------------------------------------------------------------------------
function askForToken(message, refused = token.get()) {
  if (token.get() === refused) token.clear();  // (not one stored meanwhile, by another tab)
  $("token-error").textContent = message || "";
  $("token-input").value = "";
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
}

async function signIn() {
  const tried = token.get();
  try {
    const models = await api.models();
    detail ??= new StreamDetail(models.data[0].id, notify);
    $("model").textContent = `model ${models.data[0].id}`;
    $("token-state").textContent = token.get() ? "token set" : "no token needed";
    $("forget-token").hidden = !token.get();
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askForToken(tried ? "That token was refused." : "", tried);
      return false;
    }
    throw error;
  }
}

// ---- streams ---------------------------------------------------------------------------------
// Rows are kept per stream and updated in place, so a poll leaves a half-confirmed delete alone.
function streamRow(id) {
  const row = document.createElement("tr");
  row.dataset.stream = id;
  const cells = Array.from({ length: 7 }, () => row.appendChild(document.createElement("td")));
  const remove = document.createElement("button");
  remove.className = "ghost danger delete";
  remove.textContent = "Delete";
  remove.addEventListener("click", (e) => { e.stopPropagation(); removeStream(id, remove); });
  cells[6].append(remove);
  row.addEventListener("click", () => select(id));
  return row;
}

function fill(row, s) {
  const [name, state, frames, kv, source, lag] = row.cells;
  const live = s.state === "lost" ? "lost" : "live";
  const health = s.source_state || "none";
  name.textContent = s.stream_id;
  name.className = "name";
  name.title = `${s.method}${s.mode ? `, ${s.mode} mode` : ""}`;
  state.textContent = live;
  state.className = `state ${live}`;
  frames.textContent = s.frames_ingested;
  kv.textContent = bytes(s.retained_bytes);
  source.textContent = health;
  source.className = `source ${health}`;
  source.title = s.last_error || "";
  lag.textContent = s.frames_pending ?? "–";
  for (const td of [frames, kv, lag]) td.className = "num";
  row.classList.toggle("selected", detail?.id === s.stream_id);
}

function renderStreams() {
  const body = $("streams").tBodies[0];
  const rows = new Map([...body.rows].map((r) => [r.dataset.stream, r]));
  const ordered = streams.map((s) => {
    const row = rows.get(s.stream_id) || streamRow(s.stream_id);
    fill(row, s);
    return row;
  });
  for (const [id, row] of rows) if (!streams.some((s) => s.stream_id === id)) row.remove();
  ordered.forEach((row, i) => { if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null); });
  $("no-streams").hidden = streams.length > 0;
  $("stream-count").textContent = streams.length;
}

async function poll() {
  try {
    streams = (await api.streams()).data.sort((a, b) => a.stream_id.localeCompare(b.stream_id));
    renderStreams();
    const open = streams.find((s) => s.stream_id === detail?.id);
    if (open) {
      detail.update(open);
      await detail.refreshTimeline();
    } else if (detail?.id) {
      notify(`stream ${detail.id} is gone`);
      detail.close();
    }
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return askForToken("The token was refused.");
    if (!(error instanceof ApiError && error.status === 404)) notify(`${error.type || "error"}: ${error.message}`);
  }
}

function select(id) {
  detail.open(id);
  history.replaceState(null, "", detail.link(""));
  renderStreams();
  const status = streams.find((s) => s.stream_id === id);
  if (status) detail.update(status);
}

async function removeStream(id, button) {
  if (button.dataset.armed !== "1") {  // a second click confirms
    button.dataset.armed = "1";
    button.textContent = "Confirm";
    setTimeout(() => { button.dataset.armed = ""; button.textContent = "Delete"; }, 3000);
    return;
  }
  try {
    await api.remove(id);
    notify(`deleted ${id}`);
    if (detail.id === id) detail.close();
  } catch (error) {
    notify(`${error.type}: ${error.message}`);
  }
  await poll();
}

async function create(event) {
  event.preventDefault();
  const status = $("create-status");
  const file = $("new-file").files[0];
  const spec = { method: $("new-method").value };
  if ($("new-id").value.trim()) spec.stream_id = $("new-id").value.trim();
  if ($("new-source").value.trim() && !file) spec.source = $("new-source").value.trim();
  if ($("new-fps").value) spec.fps = Number($("new-fps").value);
  try {
    status.textContent = "creating…";
    const created = await api.create(spec);
    if (file) {
      await upload(created.stream_id, file, (f) => (status.textContent = `uploading ${Math.round(100 * f)}%`));
    }
    status.textContent = `created ${created.stream_id}`;
    $("create").reset();
    await poll();
    select(created.stream_id);
  } catch (error) {
    status.textContent = `${error.type || "error"}: ${error.message}`;
  }
}

// ---- start -----------------------------------------------------------------------------------
async function start() {
  if (!(await signIn())) return;
  await poll();
  const params = new URLSearchParams(location.search);
  const wanted = params.get("stream");
  if (wanted && streams.some((s) => s.stream_id === wanted)) {
    select(wanted);
    if (params.get("ask")) detail.ask(params.get("ask"));
  } else if (wanted) {
    notify(`no stream ${wanted} for this token`);
  }
  polling ??= setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("create").addEventListener("submit", create);
  $("token-form").addEventListener("submit", () => {
    token.set($("token-input").value.trim());
    start();
  });
  $("token-dialog").addEventListener("cancel", (e) => e.preventDefault());  // no way past it without one
  $("forget-token").addEventListener("click", () => { token.clear(); location.replace("/console"); });
  start();
});
