"""HTTP routes of the extension: ``GET /sparse_vdit/strategy_info?name=...`` for the web viewer.

The answer logic (``strategy_info``) is plain Python; ``register_routes`` mounts it on ComfyUI's
PromptServer when one is running.
"""

from __future__ import annotations

import logging

from ..strategies.geometry import VideoGeometry
from ..strategies.file import StrategyError, searched_geometry
from . import strategy_store, strategy_view

log = logging.getLogger(__name__)
INFO_PATH = "/sparse_vdit/strategy_info"


def strategy_info(query) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a query with ``name`` and optional frames/height/width."""
    name = query.get("name")
    if not name:
        return 400, {"error": "missing query parameter 'name' (a file in models/sparse_strategies)"}
    try:
        strategy = strategy_store.load(name)
        sizes = [query.get(k) for k in ("frames", "height", "width")]
        if all(sizes):
            geometry = VideoGeometry(*(int(s) for s in sizes))
        else:
            geometry = searched_geometry(strategy) or VideoGeometry(1, 1, 1)
        return 200, dict(strategy_view.view_data(strategy, geometry), name=name)
    except StrategyError as err:
        return (404 if err.code == StrategyError.NOT_FOUND else 422), {"error": str(err)}
    except ValueError as err:
        return 400, {"error": str(err)}


def register_routes() -> bool:
    """Mount the routes on ComfyUI's server; False (with a log line) when there is none."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        log.info("Sparse-vDiT: no ComfyUI server, the strategy viewer route is not mounted")
        return False
    if getattr(PromptServer, "instance", None) is None:
        return False

    @PromptServer.instance.routes.get(INFO_PATH)
    async def _strategy_info(request):
        status, body = strategy_info(request.rel_url.query)
        return web.json_response(body, status=status)

    return True
