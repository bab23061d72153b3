"""A local Hugging Face hub cache written by hand, in the layout huggingface_hub reads offline.

    models--{owner}--{name}/blobs/{hash}            file contents
    models--{owner}--{name}/refs/{branch}           the commit the branch points at
    models--{owner}--{name}/snapshots/{commit}/...  links to the blobs, one tree per commit
"""

import hashlib
import os
from pathlib import Path


def add_revision(cache: Path, repo_id: str, branch: str, files: Path) -> str:
    """Put the files of directory `files` into `cache` as the tree of a new commit `branch` points at."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
