"""`revision=` offline: a local hub cache with two branches of one repo (see `_hub_cache`)."""

import json
import weakref
from pathlib import Path

import pytest
import torch

import olmo_lab
from olmo_lab import HubError
from olmo_lab.revisions import list_revisions, parse
from olmo_lab.sweep import checkpoint_sweep
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


def test_a_revision_a_local_directory_does_not_have_is_refused(tmp_path):
    directory = char_tokenizer(make_checkpoint(olmo3_config(), tmp_path / "local"))
    with pytest.raises(olmo_lab.CheckpointError, match="revision: 'main' is not a revision of the local checkpoint"
                                                       ".*only the one version"):
        olmo_lab.load_model(directory, revision="main")
    with pytest.raises(olmo_lab.TokenizerError, match="revision: 'main' is not a revision of the local checkpoint"):
        olmo_lab.load_tokenizer(directory, revision="main")


# ---------------------------------------------------------------------------------------- listing and sweeping
LOCAL = {"stage1-step1000-tokens10M": 2, "stage1-step200-tokens2M": 1, "stage2-step50-tokens11M": 3}


@pytest.fixture(scope="module")
def local_with_revisions(tmp_path_factory):
    """A local checkpoint with three revisions in revisions/<name>/ (given out of training order)."""
    root = tmp_path_factory.mktemp("local-revisions")
    char_tokenizer(make_checkpoint(olmo3_config(), root, seed=9))
    for name, seed in LOCAL.items():
        char_tokenizer(make_checkpoint(olmo3_config(), root / "revisions" / name, seed=seed))
    return root


def test_revisions_are_listed_in_training_order(local_with_revisions, offline):
    assert list_revisions(local_with_revisions) == ["stage1-step200-tokens2M", "stage1-step1000-tokens10M",
                                                    "stage2-step50-tokens11M"]
    assert list_revisions(REPO) == ["stage1-step1000-tokens2B", "main"]  # offline: the local hub cache's refs
    assert parse("stage1-step1413814-tokens2965B") == {"stage": 1, "step": 1413814, "tokens": 2965 * 10**9}
    assert parse("main") == {"stage": None, "step": None, "tokens": None}
    with pytest.raises(HubError, match="cannot list the revisions of hub repo 'lab-test/absent'"):
        list_revisions("lab-test/absent")


def test_a_local_revision_loads_its_own_weights(local_with_revisions):
    ids = torch.tensor([[3, 4, 5, 6]])
    name = "stage1-step200-tokens2M"
    with torch.inference_mode():
        theirs = olmo_lab.load_model(local_with_revisions / "revisions" / name)(ids).logits
        assert torch.equal(olmo_lab.load_model(local_with_revisions, revision=name)(ids).logits, theirs)
        assert not torch.equal(olmo_lab.load_model(local_with_revisions)(ids).logits, theirs)
    with pytest.raises(olmo_lab.CheckpointError, match="it has stage1-step200-tokens2M, stage1-step1000-tokens10M"):
        olmo_lab.load_model(local_with_revisions, revision="stage9-step1")


def test_a_sweep_computes_the_metric_on_each_revision_one_model_at_a_time(local_with_revisions, offline):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    alive = []

    def metric(model, tok):
        assert all(ref() is None for ref in alive)  # the previous revision's model is gone
        alive.append(weakref.ref(model))
        with torch.inference_mode():
            logits = model(ids).logits
        return {"loss": torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]), "vocab": len(tok)}

    sweep = checkpoint_sweep(local_with_revisions, metric, progress=False)
    assert [r["revision"] for r in sweep.rows] == list_revisions(local_with_revisions)
    assert [r["step"] for r in sweep.rows] == [200, 1000, 50] and sweep.metrics == ["loss", "vocab"]
    for row in sweep.rows:  # each row is that revision's own number
        with torch.inference_mode():
            logits = olmo_lab.load_model(local_with_revisions, revision=row["revision"])(ids).logits
        assert row["loss"] == float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    frame = sweep.frame()
    assert list(frame.columns) == ["revision", "stage", "step", "tokens", "loss", "vocab"] and len(frame) == 3
    assert sweep.table().splitlines()[1].startswith("stage1-step200-tokens2M")
    hub_sweep = checkpoint_sweep(REPO, lambda m, t: t.model_max_length, progress=False)  # each revision's tokenizer
    assert [(r["revision"], r["metric"]) for r in hub_sweep.rows] == [("stage1-step1000-tokens2B", 101.0), ("main", 102.0)]


@pytest.mark.parametrize("metric,revisions,match", [
    (lambda m, t: float("nan"), None, "expected a finite number"),
    (lambda m, t: "low", None, "expected a finite number"),
    ("loss", None, "metric: expected a function"),
    (lambda m, t: 1.0, [], "non-empty list of revision names"),
    (lambda m, t: 1.0, ["stage7-step1"], "is not a revision of the local checkpoint"),
])
def test_bad_sweeps_are_refused(local_with_revisions, metric, revisions, match):
    with pytest.raises((olmo_lab.InputError, olmo_lab.CheckpointError), match=match):
        checkpoint_sweep(local_with_revisions, metric, revisions=revisions, progress=False)


def test_a_metric_that_changes_its_names_is_refused(local_with_revisions):
    calls = []

    def metric(model, tok):
        calls.append(1)
        return {"a": 1.0} if len(calls) == 1 else {"b": 1.0}
    with pytest.raises(olmo_lab.InputError, match=r"gave \['b'\], the ones before it \['a'\]"):
        checkpoint_sweep(local_with_revisions, metric, progress=False)
