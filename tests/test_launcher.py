"""`make lab`: JupyterLab starts as root and as a normal user, with or without a display."""

import importlib.util
import json
import os
import re
import secrets
import shlex
import sys
import urllib.request
from pathlib import Path

import pytest

from _jupyter import free_port, jupyter_server

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("launch", ROOT / "notebooks" / "launch.py")
launch = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(launch)


@pytest.mark.parametrize("euid,env,platform,root_flag,browser_flag", [
    (0, {}, "linux", True, True),  # a container: root, no display
    (1000, {"DISPLAY": ":0"}, "linux", False, False),  # a desktop
    (1000, {"WAYLAND_DISPLAY": "wayland-0"}, "linux", False, False),
    (0, {"DISPLAY": ":1"}, "linux", True, False),
    (1000, {}, "linux", False, True),  # a server over ssh
    (501, {}, "darwin", False, False),  # macOS always has a browser to open
])
def test_the_command_fits_the_user_and_the_machine(euid, env, platform, root_flag, browser_flag):
    cmd = launch.command(["--port=1"], euid, env, platform)
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and cmd[-1] == "--port=1"
    assert ("--allow-root" in cmd) == root_flag and ("--no-browser" in cmd) == browser_flag


def makefile_recipe(target: str) -> list[str]:
    """The command line of a one-line Makefile recipe, with $(PY) as this interpreter and $(LAB_ARGS) kept."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{target}:.*\n\t(.+)$", text, re.MULTILINE).group(1)
    return shlex.split(recipe.replace("$(PY)", shlex.quote(sys.executable)))


def test_make_lab_serves_the_notebooks(tmp_path):
    cmd = makefile_recipe("lab")
    assert cmd[-1] == "$(LAB_ARGS)"
    port, token = free_port(), secrets.token_hex(16)
    cmd = cmd[:-1] + ["--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
                      "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}  # never open a browser
    env.update(JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"))
    with jupyter_server(cmd, port, token, env, cwd=ROOT) as url:
        listing = json.load(urllib.request.urlopen(f"{url}/api/contents?token={token}", timeout=10))
        lab_page = urllib.request.urlopen(f"{url}/lab?token={token}", timeout=10).read().decode()
    names = {item["name"] for item in listing["content"]}
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= names and len(names) >= 6
    assert "JupyterLab" in lab_page
