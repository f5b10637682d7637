// Unit tests of the pure heatmap layout (run: node --test web/tests/).
import { test } from "node:test";
import assert from "node:assert/strict";
import { checkInfo, colourFor, layoutHeatmap, legend, FALLBACK_COLOUR } from "../heatmap.js";

function randomInfo(layers, heads, buckets, seed) {
  let s = seed;
  const rand = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648);
  const names = ["dense", "skip", "Diagonal", "MultiDiagonal", "VerticalStripe", "Union"];
  const modes = Array.from({ length: buckets }, () =>
    Array.from({ length: heads }, () => Array.from({ length: layers }, () => names[Math.floor(rand() * names.length)])));
  return {
    layers, heads, modes,
    sigma_edges: Array.from({ length: buckets + 1 }, (_, i) => 1 - i / buckets),
    palette: { dense: [150, 150, 150], skip: [20, 20, 20], Diagonal: [66, 133, 244], MultiDiagonal: [52, 168, 83], VerticalStripe: [171, 71, 188] },
    layer_density: Array.from({ length: layers }, () => rand()),
    density: 0.4,
  };
}

test("every head of every bucket gets one cell of its mode's colour, inside the width", () => {
  for (const [layers, heads, buckets] of [[1, 1, 1], [7, 3, 2], [40, 40, 3]]) {
    const info = randomInfo(layers, heads, buckets, layers * 31 + heads);
    const width = 301;
    const { rects, height } = layoutHeatmap(info, { width, top: 5 });
    const cells = rects.slice(0, buckets * heads * layers);
    assert.equal(rects.length, buckets * heads * layers + layers);
    let i = 0;
    info.modes.forEach((bucket) => bucket.forEach((row) => row.forEach((mode, l) => {
      const c = cells[i++];
      assert.equal(c.colour, colourFor(mode, info.palette));
      assert.ok(Math.abs(c.x - (l * width) / layers) < 1e-9);
      assert.ok(c.x >= 0 && c.x + c.w <= width + 1e-9 && c.y >= 5 && c.y + c.h <= 5 + height + 1e-9);
    })));
  }
});

test("density bars are proportional to each layer's density and clamp to [0, 1]", () => {
  const info = randomInfo(4, 2, 1, 7);
  info.layer_density = [0, 0.25, 1, 3];
  const bars = layoutHeatmap(info, { width: 100, barHeight: 40 }).rects.slice(-4);
  assert.deepEqual(bars.map((b) => b.h), [0, 10, 40, 40]);
  const bottoms = bars.map((b) => b.y + b.h);
  assert.ok(bottoms.every((y) => Math.abs(y - bottoms[0]) < 1e-9));
});

test("unknown modes and bad palette entries get the fallback colour; channels are clamped", () => {
  assert.equal(colourFor("Mystery", { dense: [1, 2, 3] }), FALLBACK_COLOUR);
  assert.equal(colourFor("dense", { dense: [1, 2] }), FALLBACK_COLOUR);
  assert.equal(colourFor("dense", { dense: [300, -4, 10.4] }), "rgb(255,0,10)");
});

test("legend lists the modes in use, palette order first", () => {
  const info = randomInfo(2, 1, 1, 3);
  info.modes = [[["Union", "dense"]]];
  assert.deepEqual(legend(info).map((e) => e.mode), ["dense", "Union"]);
});

test("only the buckets listed in shown are drawn, labelled with their sigma range", () => {
  const info = randomInfo(3, 2, 5, 11);
  info.shown = [0, 4];
  const { rects, labels } = layoutHeatmap(info, { width: 90 });
  assert.equal(rects.length, 2 * 2 * 3 + 3);
  assert.equal(rects[6].colour, colourFor(info.modes[4][0][0], info.palette));
  assert.deepEqual(labels.slice(0, 2).map((l) => l.text), ["sigma 0.8..1", "sigma 0..0.2"]);
});

test("malformed route answers raise clear errors", () => {
  const good = randomInfo(3, 2, 2, 5);
  assert.throws(() => checkInfo(null), /not an object/);
  assert.throws(() => checkInfo({ ...good, layers: 0 }), /bad size/);
  assert.throws(() => checkInfo({ ...good, modes: [] }), /no sigma buckets/);
  assert.throws(() => checkInfo({ ...good, modes: [good.modes[0], good.modes[1].slice(1)] }), /bucket 1/);
  assert.throws(() => checkInfo({ ...good, layer_density: [0.1] }), /3 entries/);
  assert.throws(() => checkInfo({ ...good, shown: [0, 2] }), /shown must list bucket indices 0..1/);
  assert.throws(() => layoutHeatmap(good, { width: 0 }), /width must be > 0/);
});
