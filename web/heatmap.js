// Pure layout logic of the Sparse-vDiT strategy heatmap: no DOM, no ComfyUI.
// Input: the JSON of GET /sparse_vdit/strategy_info (layers, heads, modes[bucket][head][layer],
// shown [bucket indices to draw; all when absent], palette {mode: [r, g, b]}, layer_density[layer],
// density, sigma_edges, geometry).
// Output: rectangles and labels in node-local pixels that sparse_vdit.js paints on a canvas.

export const FALLBACK_COLOUR = "rgb(230,80,80)";

/** CSS colour of a mode from the route's palette (a fixed fallback for unknown modes). */
export function colourFor(mode, palette) {
  const rgb = palette && palette[mode];
  if (!Array.isArray(rgb) || rgb.length !== 3) return FALLBACK_COLOUR;
  return `rgb(${rgb.map((c) => Math.max(0, Math.min(255, Math.round(c)))).join(",")})`;
}

/** Throws a clear Error when the route's answer is not a strategy description. */
export function checkInfo(info) {
  if (!info || typeof info !== "object") throw new Error("strategy info: not an object");
  const { layers, heads, modes, layer_density: density } = info;
  if (!Number.isInteger(layers) || layers < 1 || !Number.isInteger(heads) || heads < 1) {
    throw new Error(`strategy info: bad size ${layers} layers x ${heads} heads`);
  }
  if (!Array.isArray(modes) || modes.length < 1) throw new Error("strategy info: no sigma buckets");
  modes.forEach((bucket, b) => {
    if (!Array.isArray(bucket) || bucket.length !== heads || bucket.some((row) => !Array.isArray(row) || row.length !== layers)) {
      throw new Error(`strategy info: bucket ${b} is not ${heads} heads x ${layers} layers`);
    }
  });
  if (info.shown !== undefined && (!Array.isArray(info.shown)
      || info.shown.some((b) => !Number.isInteger(b) || b < 0 || b >= modes.length))) {
    throw new Error(`strategy info: shown must list bucket indices 0..${modes.length - 1}`);
  }
  if (!Array.isArray(density) || density.length !== layers) {
    throw new Error(`strategy info: layer_density must have ${layers} entries`);
  }
}

/**
 * Lay out one heads x layers panel per shown sigma bucket, then a density bar per layer.
 * width: pixels available; top: y of the first row. Returns {rects, labels, height}.
 * Each rect: {x, y, w, h, colour}; each label: {x, y, text}.
 */
export function layoutHeatmap(info, { width, top = 0, labelHeight = 12, barHeight = 30, maxPanelHeight = 120 } = {}) {
  checkInfo(info);
  if (!(width > 0)) throw new Error(`heatmap width must be > 0, got ${width}`);
  const { layers, heads, modes, palette } = info;
  const cellW = width / layers;
  const cellH = Math.max(1, Math.min(cellW, maxPanelHeight / heads));
  const rects = [];
  const labels = [];
  let y = top;
  const shown = info.shown ?? modes.map((_, b) => b);
  shown.forEach((b) => {
    const bucket = modes[b];
    const hi = info.sigma_edges ? info.sigma_edges[b] : null;
    const lo = info.sigma_edges ? info.sigma_edges[b + 1] : null;
    labels.push({ x: 0, y: y + labelHeight - 2, text: hi === null ? `bucket ${b}` : `sigma ${fmt(lo)}..${fmt(hi)}` });
    y += labelHeight;
    bucket.forEach((row, h) => {
      row.forEach((mode, l) => {
        rects.push({ x: l * cellW, y: y + h * cellH, w: cellW, h: cellH, colour: colourFor(mode, palette) });
      });
    });
    y += heads * cellH;
  });
  y += 2;
  info.layer_density.forEach((d, l) => {
    const v = Math.max(0, Math.min(1, Number(d) || 0));
    rects.push({ x: l * cellW, y: y + barHeight * (1 - v), w: Math.max(1, cellW - 1), h: barHeight * v, colour: "rgb(66,133,244)" });
  });
  y += barHeight;
  labels.push({ x: 0, y: y + labelHeight - 2, text: `density ${fmt(info.density)} (${layers} layers x ${heads} heads)` });
  y += labelHeight;
  return { rects, labels, height: y - top };
}

function fmt(v) {
  return typeof v === "number" && Number.isFinite(v) ? String(Number(v.toPrecision(3))) : "?";
}

/** Legend entries [{mode, colour}] for the modes that occur in the strategy, in palette order. */
export function legend(info) {
  const used = new Set(info.modes.flat(2));
  const order = Object.keys(info.palette || {});
  const extra = [...used].filter((m) => !order.includes(m)).sort();
  return [...order.filter((m) => used.has(m)), ...extra].map((mode) => ({ mode, colour: colourFor(mode, info.palette) }));
}
