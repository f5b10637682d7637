// Sparse-vDiT frontend extension: a colour for the strategy socket type and a heatmap of the
// strategy (heads x layers by mode, density per layer) drawn on Load / Save Strategy nodes.
// The data comes from GET /sparse_vdit/strategy_info?name=...; the layout from ./heatmap.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { layoutHeatmap, legend } from "./heatmap.js";

const STRATEGY_TYPE = "SPARSE_VDIT_STRATEGY";
const SOCKET_COLOUR = "#ab47bc";
const LOAD_NODE = "SparseVDiTLoadStrategy";
const SAVE_NODE = "SparseVDiTSaveStrategy";
const SAVED_PREFIX = "saved models/sparse_strategies/";
const MARGIN = 10;

async function fetchInfo(name) {
  const res = await api.fetchApi(`/sparse_vdit/strategy_info?name=${encodeURIComponent(name)}`);
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function showStrategy(node, name) {
  if (!name) return;
  node.sparseVdit = { name, info: null, error: null };
  fetchInfo(name)
    .then((info) => { if (node.sparseVdit?.name === name) node.sparseVdit.info = info; })
    .catch((err) => { if (node.sparseVdit?.name === name) node.sparseVdit.error = String(err.message || err); })
    .finally(() => node.setDirtyCanvas(true, true));
}

function widgetsBottom(node) {
  const last = node.widgets?.[node.widgets.length - 1];
  return last?.last_y !== undefined ? last.last_y + 24 : 60;
}

function drawHeatmap(node, ctx) {
  const state = node.sparseVdit;
  if (!state) return;
  const top = widgetsBottom(node);
  ctx.save();
  ctx.font = "10px sans-serif";
  if (state.error || !state.info) {
    ctx.fillStyle = state.error ? "#e57373" : "#999";
    ctx.fillText(state.error || "loading strategy...", MARGIN, top + 12);
    ctx.restore();
    return;
  }
  const width = node.size[0] - 2 * MARGIN;
  const layout = layoutHeatmap(state.info, { width, top });
  for (const r of layout.rects) {
    ctx.fillStyle = r.colour;
    ctx.fillRect(MARGIN + r.x, r.y, r.w, r.h);
  }
  ctx.fillStyle = "#ddd";
  for (const l of layout.labels) ctx.fillText(l.text, MARGIN + l.x, l.y);
  let x = MARGIN;
  const y = top + layout.height + 10;
  for (const entry of legend(state.info)) {
    ctx.fillStyle = entry.colour;
    ctx.fillRect(x, y - 8, 8, 8);
    ctx.fillStyle = "#ddd";
    ctx.fillText(entry.mode, x + 10, y);
    x += 14 + ctx.measureText(entry.mode).width;
  }
  const wanted = y + 8;
  if (node.size[1] < wanted) node.setSize([node.size[0], wanted]);
  ctx.restore();
}

// The frontend's colour palette rewrites the per-type colours after start-up (unknown types get
// ""), so the colour is set again whenever nodes are created or a graph is loaded.
function applySocketColour() {
  const byType = app.canvas?.default_connection_color_byType;
  if (byType) byType[STRATEGY_TYPE] = SOCKET_COLOUR;
  const linkColours = globalThis.LGraphCanvas?.link_type_colors;
  if (linkColours) linkColours[STRATEGY_TYPE] = SOCKET_COLOUR;
}

app.registerExtension({
  name: "SparseVDiT.StrategyViewer",
  async setup() {
    applySocketColour();
  },
  nodeCreated() {
    applySocketColour();
  },
  afterConfigureGraph() {
    applySocketColour();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== LOAD_NODE && nodeData.name !== SAVE_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "strategy_name");
      if (widget) {
        const callback = widget.callback;
        widget.callback = (value, ...rest) => {
          showStrategy(this, value);
          return callback?.call(widget, value, ...rest);
        };
        setTimeout(() => showStrategy(this, widget.value), 0);
      }
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.[0];
      if (typeof text === "string" && text.startsWith(SAVED_PREFIX)) showStrategy(this, text.slice(SAVED_PREFIX.length));
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawHeatmap(this, ctx);
      return r;
    };
  },
});
