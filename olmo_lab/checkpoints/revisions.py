"""Revisions of a checkpoint: the intermediate training checkpoints, in training order.

OLMo publishes them as branches of its hub repos, named `stage1-step1413814-tokens2965B` (the training
stage, the optimizer step, the tokens seen); a local directory keeps its own as checkpoints in
`revisions/<name>/` beside its final one. `list_revisions` lists either, oldest first;
`load_model(path, revision=...)` and `load_tokenizer(path, revision=...)` load one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import hub
from ..errors import CheckpointError, HubError

NAME = re.compile(r"stage(\d+)-step(\d+)(?:-tokens(\d+)([KMBT]?))?")
SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
LOCAL = "revisions"  # a local checkpoint's folder of revisions


def parse(name: str) -> dict:
    """{"stage", "step", "tokens"} of an OLMo-style revision name (None where the name does not say)."""
    m = NAME.fullmatch(name)
    if m is None:
        return {"stage": None, "step": None, "tokens": None}
    tokens = None if m.group(3) is None else int(m.group(3)) * SCALE[m.group(4)]
    return {"stage": int(m.group(1)), "step": int(m.group(2)), "tokens": tokens}


def training_order(names: list[str]) -> list[str]:
    """Named revisions by (stage, step); others (main, tags) after them, by name."""
    def key(name):
        p = parse(name)
        return (0, p["stage"], p["step"], name) if p["step"] is not None else (1, 0, 0, name)
    return sorted(names, key=key)


def local_revision(directory: str, revision: str) -> str:
    """The checkpoint directory of `revision` of a local checkpoint (CheckpointError naming those it has)."""
    kept = _local(directory)
    if revision not in kept:
        have = f"it has {', '.join(training_order(kept))}" if kept else \
            f"it has only the one version (no {LOCAL}/ folder of checkpoints)"
        raise CheckpointError(f"revision: {revision!r} is not a revision of the local checkpoint {directory!r}; {have}")
    return os.path.join(directory, LOCAL, revision)


def _local(directory: str) -> list[str]:
    root = Path(directory) / LOCAL
    return [p.name for p in root.iterdir() if (p / "config.json").is_file()] if root.is_dir() else []


def list_revisions(path_or_repo_id: str | os.PathLike) -> list[str]:
    """The revisions of a local checkpoint or a hub repo, oldest first (a repo's `main` last).

    A hub repo's branches come from the hub, or offline (HF_HUB_OFFLINE=1) from the local hub cache.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return training_order(_local(path))
    if not hub.looks_like_repo_id(path) or "/" not in path:
        raise CheckpointError(f"checkpoint: {path!r} is not a directory (and not a hub repo id like "
                              f"'allenai/Olmo-3-1025-7B')")
    if hub.offline():
        cached = hub.cached_revisions(hub.cache_path(), path)
        if not cached:
            raise HubError(f"cannot list the revisions of hub repo {path!r}: offline (HF_HUB_OFFLINE=1) and the local "
                           "hub cache has none of it")
        return training_order(cached)
    from huggingface_hub import list_repo_refs
    try:
        refs = list_repo_refs(path)
    except Exception as e:  # noqa: BLE001 - any failure to reach or find the repo
        raise HubError(f"cannot list the revisions of hub repo {path!r}: {type(e).__name__}: {e}") from None
    return training_order([b.name for b in refs.branches])
