// Small live charts: an inline SVG area sparkline over the last `size` values.

const NS = "http://www.w3.org/2000/svg";
const W = 240, H = 56, PAD = 3;

export class Sparkline {
  constructor(svg, { size = 60, format = (v) => v.toFixed(1) } = {}) {
    this.svg = svg;
    this.size = size;
    this.format = format;
    this.values = [];
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    this.area = svg.appendChild(document.createElementNS(NS, "path"));
    this.area.setAttribute("class", "area");
    this.line = svg.appendChild(document.createElementNS(NS, "path"));
    this.line.setAttribute("class", "line");
    this.dot = svg.appendChild(document.createElementNS(NS, "circle"));
    this.dot.setAttribute("class", "dot");
    this.dot.setAttribute("r", 2.5);
    this.top = svg.appendChild(document.createElementNS(NS, "text"));
    this.top.setAttribute("class", "scale");
    this.top.setAttribute("x", PAD);
    this.top.setAttribute("y", 11);
  }

  reset() {
    this.values = [];
    this.draw();
  }

  push(value) {
    this.values.push(Math.max(0, value));
    if (this.values.length > this.size) this.values.shift();
    this.draw();
  }

  draw() {
    const n = this.values.length;
    const max = Math.max(1e-9, ...this.values);
    const x = (i) => PAD + (n < 2 ? W - 2 * PAD : (i * (W - 2 * PAD)) / (n - 1));
    const y = (v) => H - PAD - (v / max) * (H - 2 * PAD - 10);
    const points = this.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    this.line.setAttribute("d", n ? `M${points.join("L")}` : "");
    this.area.setAttribute("d", n ? `M${x(0)},${H - PAD}L${points.join("L")}L${x(n - 1)},${H - PAD}Z` : "");
    this.top.textContent = n ? this.format(max) : "";
    this.dot.setAttribute("visibility", n ? "visible" : "hidden");
    if (n) {
      this.dot.setAttribute("cx", x(n - 1));
      this.dot.setAttribute("cy", y(this.values[n - 1]));
    }
  }
}
