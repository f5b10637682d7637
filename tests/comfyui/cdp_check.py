"""Run inside ComfyUI's venv (it has aiohttp): ask a headless Chromium, through the DevTools
protocol, what our frontend extension did in the ComfyUI page. Prints one JSON object.

Usage: python cdp_check.py DEVTOOLS_PORT STRATEGY_FILE_NAME
"""

import asyncio
import json
import sys

import aiohttp

CHECKS = """
(async () => {
  const wait = async (cond, ms) => { const t0 = Date.now();
    while (!cond()) { if (Date.now() - t0 > ms) return false; await new Promise(r => setTimeout(r, 100)); }
    return true; };
  const ready = await wait(() => window.app && window.app.graph && window.LiteGraph &&
      (app.extensions || []).length > 0, 60000);
  if (!ready) return {ready: false};
  const names = (app.extensions || []).map(e => e.name);
  const node = LiteGraph.createNode("SparseVDiTLoadStrategy");
  app.graph.add(node);
  const widget = node.widgets.find(w => w.name === "strategy_name");
  widget.value = __STRATEGY_NAME__;
  widget.callback(__STRATEGY_NAME__);
  const fetched = await wait(() => node.sparseVdit && (node.sparseVdit.info || node.sparseVdit.error), 20000);
  app.canvas.draw(true, true);
  const byType = (app.canvas && app.canvas.default_connection_color_byType) || {};
  const linkColours = (window.LGraphCanvas && LGraphCanvas.link_type_colors) || {};
  return {ready: true, extension: names.includes("SparseVDiT.StrategyViewer"), fetched,
          info_layers: node.sparseVdit && node.sparseVdit.info ? node.sparseVdit.info.layers : null,
          error: node.sparseVdit ? node.sparseVdit.error : null,
          colour: byType.SPARSE_VDIT_STRATEGY || linkColours.SPARSE_VDIT_STRATEGY || null};
})()
"""


async def main(port: int, strategy: str) -> dict:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/json") as r:
                    pages = [p for p in await r.json() if p.get("type") == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            expression = CHECKS.replace("__STRATEGY_NAME__", json.dumps(strategy))
            for attempt in range(1, 6):  # the page may still reload itself while starting up
                await ws.send_json({"id": attempt, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True}})
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == attempt:
                        break
                if "result" in data:
                    result = data["result"]
                    if "exceptionDetails" in result:
                        details = result["exceptionDetails"]
                        return {"exception": (details.get("exception") or {}).get("description")
                                or details.get("text")}
                    return result["result"].get("value")
                await asyncio.sleep(2)
            return {"cdp_error": data.get("error")}
    return {}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), sys.argv[2]))))
