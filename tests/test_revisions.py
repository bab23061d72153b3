"""`revision=` offline: a local hub cache with two branches of one repo (see `_hub_cache`)."""

import json
from pathlib import Path

import pytest
import torch

import olmo_lab
from olmo_lab import HubError
from _hub_cache import add_revision
from oracle import char_tokenizer, make_checkpoint, olmo3_config

REPO = "lab-test/tiny-olmo3"
BRANCHES = {"stage1-step1000-tokens2B": 1, "main": 2}  # branch: the seed of its random weights


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    for branch, seed in BRANCHES.items():
        files = tmp_path_factory.mktemp(branch)
        make_checkpoint(olmo3_config(), files, seed=seed)
        char_tokenizer(files)
        config = json.loads((files / "tokenizer_config.json").read_text())
        (files / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 100 + seed}))
        add_revision(cache, REPO, branch, files)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_each_branch_loads_its_own_weights(offline):
    models = {b: olmo_lab.load_model(REPO, revision=b) for b in BRANCHES}
    default = olmo_lab.load_model(REPO)  # no revision: main
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        logits = {b: m(ids).logits for b, m in models.items()}
        assert torch.equal(default(ids).logits, logits["main"])
    assert not torch.equal(logits["main"], logits["stage1-step1000-tokens2B"])
    for branch, model in models.items():
        commit = (offline / f"models--{REPO.replace('/', '--')}" / "refs" / branch).read_text()
        assert Path(model.source).name == commit


def test_each_branch_loads_its_own_tokenizer_files(offline):
    for branch, seed in BRANCHES.items():
        assert olmo_lab.load_tokenizer(REPO, revision=branch).model_max_length == 100 + seed


def test_an_unknown_revision_names_it_and_the_cached_ones(offline):
    for load in (olmo_lab.load_model, olmo_lab.load_tokenizer):
        with pytest.raises(HubError, match=r"revision 'stage1-step9-tokens0B'") as err:
            load(REPO, revision="stage1-step9-tokens0B")
        assert "revisions in the local hub cache: main, stage1-step1000-tokens2B" in str(err.value)


def test_a_snapshot_link_out_of_the_blob_store_is_refused(offline, tmp_path):
    repo = offline / f"models--{REPO.replace('/', '--')}"
    files = tmp_path / "files"
    make_checkpoint(olmo3_config(), files)
    commit = add_revision(offline, REPO, "escape", files)
    link = repo / "snapshots" / commit / "model.safetensors"
    link.unlink()
    link.symlink_to(files / "model.safetensors")  # a real safetensors file, but outside the cache
    try:
        with pytest.raises(olmo_lab.UnsafeCheckpointError, match="link to a file outside"):
            olmo_lab.load_model(REPO, revision="escape")
    finally:
        (repo / "refs" / "escape").unlink()


def test_a_revision_of_a_local_directory_is_refused(tmp_path):
    directory = char_tokenizer(make_checkpoint(olmo3_config(), tmp_path / "local"))
    with pytest.raises(olmo_lab.CheckpointError, match="revision: 'main' names a version of a hub repo, but"):
        olmo_lab.load_model(directory, revision="main")
    with pytest.raises(olmo_lab.TokenizerError, match="revision: 'main' names a version of a hub repo, but"):
        olmo_lab.load_tokenizer(directory, revision="main")
