// One stream in detail: live charts, the timeline of segments with thumbnails, the ask box with
// its streamed answer, and the answer's evidence (thumbnails, times, scores, marked on the timeline).

import { api, askStream, thumbnailURL } from "./api.js";
import { Sparkline } from "./charts.js";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const SHOWN_EVIDENCE = 6;  // the best-scored first; the rest behind "show all"
const seconds = (t) => (t >= 60 ? `${Math.floor(t / 60)}:${(t % 60).toFixed(1).padStart(4, "0")}` : `${t.toFixed(1)} s`);
const span = ([a, b], show) => (a === b ? show(a) : `${show(a)}–${show(b)}`);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

export class StreamDetail {
  constructor(model, notify) {
    this.model = model;
    this.notify = notify;
    this.id = null;
    this.charts = {
      rate: new Sparkline($("chart-rate"), { format: (v) => `${v.toFixed(1)}/s` }),
      lag: new Sparkline($("chart-lag"), { format: (v) => `${v.toFixed(0)} fr` }),
      latency: new Sparkline($("chart-latency"), { size: 20, format: (v) => `${v.toFixed(2)} s` }),
    };
    this.objectURLs = [];
    $("ask").addEventListener("submit", (e) => { e.preventDefault(); this.ask($("question").value); });
    $("copy-link").addEventListener("click", () => this.copyLink());
  }

  open(id) {
    if (this.id === id) return;
    this.id = id;
    this.lastSegment = -1;
    this.previous = null;
    this.evidence = [];
    this.asking = null;
    Object.values(this.charts).forEach((c) => c.reset());
    ["rate-now", "lag-now", "latency-now"].forEach((k) => ($(k).textContent = ""));
    $("timeline").replaceChildren();
    $("answer-box").hidden = true;
    $("question").value = "";
    $("detail-title").textContent = id;
    $("detail").hidden = false;
    $("empty-detail").hidden = true;
    this.refreshTimeline();
  }

  close() {
    this.id = null;
    $("detail").hidden = true;
    $("empty-detail").hidden = false;
  }

  // The stream's row of the last GET /v1/streams: charts and the header.
  update(status) {
    const now = performance.now() / 1000;
    if (this.previous) {
      const dt = now - this.previous.at;
      const rate = (status.frames_ingested - this.previous.frames) / Math.max(dt, 1e-3);
      this.charts.rate.push(rate);
      $("rate-now").textContent = `${rate.toFixed(1)} frames/s`;
    }
    this.previous = { at: now, frames: status.frames_ingested };
    const lag = status.frames_pending ?? 0;
    this.charts.lag.push(lag);
    $("lag-now").textContent = plural(lag, "frame");
    const state = status.state === "lost" ? "lost" : status.source_state || "no source";
    $("detail-state").textContent = state;
    $("detail-state").className = `badge ${state.replace(" ", "-")}`;
    const last = status.last_time == null ? "" : ` · ${seconds(status.last_time)}`;
    $("detail-meta").textContent = `${status.method} · ${status.frames_ingested} frames · ${status.segments} segments${last}`;
  }

  async refreshTimeline() {
    const id = this.id;
    if (id === null) return;
    for (let more = true; more && id === this.id;) {
      const page = await api.timeline(id, this.lastSegment);
      if (id !== this.id) return;
      const strip = $("timeline");
      const atEnd = strip.scrollLeft + strip.clientWidth >= strip.scrollWidth - 24;
      for (const segment of page.data) strip.append(this.segmentTile(segment));
      if (page.data.length) this.lastSegment = page.data[page.data.length - 1].segment;
      if (atEnd && page.data.length) strip.scrollLeft = strip.scrollWidth;
      $("segment-count").textContent = strip.children.length;
      more = page.has_more;
    }
    this.markEvidence();
  }

  segmentTile(segment) {
    const tile = el("div", "segment");
    tile.dataset.segment = segment.segment;
    tile.dataset.frames = segment.frames.join(",");
    const img = tile.appendChild(el("img"));
    img.alt = `segment ${segment.segment}`;
    if (segment.thumbnail) img.src = `data:image/jpeg;base64,${segment.thumbnail.jpeg_base64}`;
    else tile.classList.add("no-thumbnail");
    tile.append(el("span", "seg-no", `#${segment.segment}`));
    tile.append(el("span", "seg-time", `${seconds(segment.times[0])}–${seconds(segment.times[1])}`));
    tile.title = `segment ${segment.segment}: frames ${segment.frames[0]}–${segment.frames[1] - 1}`;
    return tile;
  }

  markEvidence() {
    for (const tile of $("timeline").children) {
      const [a, b] = tile.dataset.frames.split(",").map(Number);
      const hit = this.evidence.some((e) => e.frames[0] < b && a < e.frames[1]);
      tile.classList.toggle("evidence", hit);
    }
    const first = $("timeline").querySelector(".segment.evidence");
    if (first && this.evidence.length) first.scrollIntoView({ block: "nearest", inline: "center" });
  }

  link(question) {
    const params = new URLSearchParams({ stream: this.id });
    if (question) params.set("ask", question);
    return `${location.origin}/console?${params}`;
  }

  async copyLink() {
    const url = this.link($("question").value.trim());
    history.replaceState(null, "", url);
    try {
      await navigator.clipboard.writeText(url);
      this.notify("Link copied");
    } catch {
      this.notify(url);
    }
  }

  async ask(question) {
    question = question.trim();
    if (!question || this.id === null) return;
    const id = this.id, run = {};
    this.asking = run;
    $("question").value = question;
    history.replaceState(null, "", this.link(question));
    this.objectURLs.forEach((u) => URL.revokeObjectURL(u));
    this.objectURLs = [];
    const answer = $("answer");
    answer.textContent = "";
    answer.dataset.state = "streaming";
    $("answer-box").hidden = false;
    $("answer-meta").textContent = "thinking…";
    $("evidence").replaceChildren();
    $("evidence").classList.remove("all");
    this.evidence = [];
    this.markEvidence();
    const start = performance.now();
    let first = null, last = null;
    try {
      await askStream(this.model, id, question, (chunk) => {
        if (this.asking !== run) return;
        const piece = chunk.choices[0].delta.content;
        if (piece) {
          first ??= performance.now();
          answer.textContent += piece;
        }
        if (chunk.choices[0].finish_reason) last = chunk;
      });
    } catch (error) {
      if (this.asking !== run) return;
      answer.dataset.state = "error";
      answer.textContent = `${error.type}: ${error.message}`;
      $("answer-meta").textContent = "";
      return;
    }
    if (this.asking !== run) return;
    const total = (performance.now() - start) / 1000;
    this.charts.latency.push(total);
    $("latency-now").textContent = `${total.toFixed(2)} s`;
    const ttft = first === null ? "" : ` · first token ${((first - start) / 1000).toFixed(2)} s`;
    const usage = last?.usage ? ` · ${last.usage.prompt_tokens} prompt tokens` : "";
    $("answer-meta").textContent = `answered in ${total.toFixed(2)} s${ttft}${usage}`;
    this.evidence = last?.evidence || [];
    this.markEvidence();
    await this.showEvidence(id, run);
    if (this.asking === run) answer.dataset.state = "done";
  }

  async showEvidence(id, run) {
    const box = $("evidence");
    const best = Math.max(1e-9, ...this.evidence.map((e) => Math.abs(e.score ?? 0)));
    const ranked = [...this.evidence].sort((a, b) => (b.score ?? -Infinity) - (a.score ?? -Infinity));
    const cards = ranked.map((e, rank) => {
      const card = el("div", rank < SHOWN_EVIDENCE ? "evidence-item" : "evidence-item more");
      card.dataset.frames = e.frames.join(",");
      card.dataset.score = e.score ?? "";
      const img = card.appendChild(el("img"));
      const frames = span([e.frames[0], e.frames[1] - 1], String);
      img.alt = `frames ${frames}`;
      const text = card.appendChild(el("div", "ev-text"));
      text.append(el("div", "ev-time", span(e.times, seconds)));
      text.append(el("div", "muted", `${e.frames[1] - e.frames[0] === 1 ? "frame" : "frames"} ${frames}`));
      if (e.score != null) {
        const bar = text.appendChild(el("div", "score"));
        bar.append(el("span", "score-fill"));
        bar.firstChild.style.width = `${Math.round((100 * Math.abs(e.score)) / best)}%`;
        text.append(el("div", "ev-score", `score ${e.score.toFixed(3)}`));
      }
      box.append(card);
      return [card, img, Math.floor((e.frames[0] + e.frames[1] - 1) / 2)];
    });
    if (ranked.length > SHOWN_EVIDENCE) {
      const all = box.appendChild(el("button", "ghost show-all", `show all ${ranked.length}`));
      all.type = "button";
      all.addEventListener("click", () => { box.classList.add("all"); all.remove(); });
    }
    await Promise.all(cards.map(async ([card, img, frame]) => {
      try {
        const thumb = await thumbnailURL(id, frame);
        if (this.asking !== run) return URL.revokeObjectURL(thumb.url);
        this.objectURLs.push(thumb.url);
        img.title = `frame ${thumb.frame}`;
        await new Promise((resolve) => { img.onload = img.onerror = resolve; img.src = thumb.url; });
      } catch {
        card.classList.add("no-thumbnail");
      }
    }));
  }
}
