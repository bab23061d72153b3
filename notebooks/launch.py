"""Start JupyterLab on these notebooks: what `make lab` runs, anywhere.

As root (most containers and cloud notebooks) JupyterLab refuses to start without `--allow-root`; on a
machine without a display (no DISPLAY or WAYLAND_DISPLAY on Linux) there is no browser to open, so it
prints the address to open instead (`--no-browser`). Extra arguments go to JupyterLab as they are:

    python notebooks/launch.py --port=8899 --IdentityProvider.token=secret
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent


def command(extra: list[str], euid: int, env: dict, platform: str = sys.platform) -> list[str]:
    """The JupyterLab command line for this user and machine, `extra` arguments last."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={NOTEBOOKS}"]
    if euid == 0:
        cmd.append("--allow-root")
    if platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        cmd.append("--no-browser")
    return cmd + extra


if __name__ == "__main__":
    cmd = command(sys.argv[1:], os.geteuid() if hasattr(os, "geteuid") else -1, dict(os.environ))
    os.execv(cmd[0], cmd)
