"""Opt-in: the frontend extension in a real browser (headless Debian Chromium) against a running
ComfyUI with our pack: it registers, colours the strategy socket type, and the Load Strategy
node fetches the strategy's heatmap data from our route.

Needs COMFYUI_ROOT (a ComfyUI work tree), COMFY_VENV (its Python environment, default
/tmp/comfyenv, e.g. as ../shared/tools/comfyui-harness.sh builds them) and chromium on PATH.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMFY_ROOT = os.environ.get("COMFYUI_ROOT")
VENV = os.environ.get("COMFY_VENV", "/tmp/comfyenv")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="set COMFYUI_ROOT"),
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
              pytest.mark.skipif(not os.path.isfile(os.path.join(VENV, "bin", "python")), reason="no ComfyUI venv")]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def page_state(tmp_path_factory):
    sys.path.insert(0, HERE)
    from test_comfyui_integration import free_port, write_strategies

    work = tmp_path_factory.mktemp("browser")
    write_strategies(str(work / "models" / "sparse_strategies"))
    (work / "extra.yaml").write_text(f"svtest:\n  base_path: {work / 'models'}\n  sparse_strategies: sparse_strategies\n")
    link = os.path.join(COMFY_ROOT, "custom_nodes", "sparse_vdit_browser_test")
    os.symlink(ROOT, link)
    port, devtools = free_port(), free_port()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    server = subprocess.Popen([os.path.join(VENV, "bin", "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
                               "--port", str(port), "--disable-auto-launch", "--extra-model-paths-config",
                               str(work / "extra.yaml")], cwd=COMFY_ROOT, env=env,
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/system_stats", 120)
        browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    f"--remote-debugging-port={devtools}", f"--user-data-dir={work / 'chrome'}",
                                    f"http://127.0.0.1:{port}/"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        check = subprocess.run([os.path.join(VENV, "bin", "python"), os.path.join(HERE, "cdp_check.py"),
                                str(devtools), "tiny_wan_sparse.safetensors"],
                               capture_output=True, text=True, timeout=180)
        assert check.returncode == 0, check.stderr[-2000:]
        yield json.loads(check.stdout)
    finally:
        if browser is not None:
            stop(browser)
        stop(server)
        os.unlink(link)


def test_extension_registers_and_colours_the_strategy_socket(page_state):
    assert page_state.get("ready"), page_state
    assert page_state["extension"] is True
    assert page_state["colour"] == "#ab47bc"


def test_load_strategy_node_fetches_the_heatmap_data(page_state):
    assert page_state["fetched"] and page_state["error"] is None, page_state
    assert page_state["info_layers"] == 3
