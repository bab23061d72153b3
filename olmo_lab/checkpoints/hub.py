"""Resolving Hugging Face hub repo ids to local files, offline-aware, with one clear error.

Only the files asked for are fetched. huggingface_hub reads HF_HUB_OFFLINE and the cache location
once, at import; they are read again here at call time, so setting them in a running notebook works.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HubError


def looks_like_repo_id(name: str) -> bool:
    """True for `name` or `owner/name`; local-looking paths ("./x", "/x", "x.json") are not repo ids."""
    parts = name.split("/")
    return (len(parts) <= 2 and all(parts) and not name.startswith((".", "~", "/"))
            and not name.endswith(".json") and "\\" not in name)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(repo_id: str, revision: str | None, patterns: list[str], what: str) -> Path:
    """Download (or find in the local hub cache) the files of `repo_id` matching `patterns`."""
    import huggingface_hub  # imported here: only hub ids need it
    from huggingface_hub import constants

    is_offline = constants.HF_HUB_OFFLINE or offline()
    cache_dir = _cache_dir_set()
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                      cache_dir=cache_dir, local_files_only=is_offline))
    # huggingface_hub raises from several hierarchies (OSError subclasses for HTTP and cache misses,
    # ValueError for bad ids, httpx errors for proxies); all mean "could not get the files".
    except Exception as err:  # noqa: BLE001 -- turned into one clear HubError
        cached = cached_revisions(cache_path(), repo_id)
        if is_offline and revision and cached:
            reason = "HF_HUB_OFFLINE is set and the local hub cache has no such revision"
        elif is_offline:
            reason = "HF_HUB_OFFLINE is set and the repo is not in the local hub cache"
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reason = f"the hub is unreachable or the repo does not exist ({type(err).__name__}: {first})"
        if revision and cached:
            reason += f" (revisions in the local hub cache: {', '.join(cached)})"
        raise HubError(f"cannot load the {what} of hub repo {where}: {reason}. "
                       "Pass a local checkpoint directory instead.") from None


def _cache_dir_set() -> str | None:
    """The hub cache the environment names (HF_HUB_CACHE, or HF_HOME/hub), read now; None: huggingface_hub's default."""
    return os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)


def cache_path() -> Path:
    """The local hub cache in use."""
    from huggingface_hub import constants

    return Path(_cache_dir_set() or constants.HF_HUB_CACHE)


def cached_revisions(cache: Path, repo_id: str) -> list[str]:
    """The branch and tag names (`refs/`) of `repo_id` in a local hub cache, sorted; [] when it has none."""
    refs = cache / ("models--" + repo_id.replace("/", "--")) / "refs"
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def blob_store(snapshot_dir: str | os.PathLike) -> Path:
    """The `blobs/` folder a hub-cache snapshot (`models--o--n/snapshots/<commit>/`) links its files into."""
    return Path(snapshot_dir).resolve().parent.parent / "blobs"
