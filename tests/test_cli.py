"""The command line: real runs on a checkpoint directory, and clean errors (never a traceback)."""

import subprocess
import sys

import pytest

from olmo_lab.__main__ import main
from oracle import char_tokenizer, flex_config, make_checkpoint, olmo3_config


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    d = make_checkpoint(flex_config(3, 2), tmp_path_factory.mktemp("fx"))
    char_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = make_checkpoint(olmo3_config(), tmp_path_factory.mktemp("o3"))
    char_tokenizer(d)
    return str(d)


def test_generate(dense, capsys):
    assert main(["generate", "abc", "--model", dense, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("abc") and len(out) >= 3


def test_route_prints_a_table(flex, capsys):
    assert main(["route", "ab", "--model", flex, "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["token", "layer", "0", "layer", "1"]
    assert len(lines) == 1 + 2 + 2  # header, the prompt's tokens, generated tokens fed back


def test_toggle_compares(flex, capsys):
    assert main(["toggle", "ab", "--model", flex, "--off", "expert_1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "all experts" in out and "expert_1 off (opt_out)" in out and "KL =" in out


@pytest.mark.parametrize("argv,code,message", [
    (["toggle", "ab", "--off", "physics"], 1, "unknown expert name 'physics'"),
    (["toggle", "ab", "--off", "0,1,2"], 1, "no expert would be left enabled"),
    (["generate", "", "--max-new-tokens", "3"], 1, "prompt is empty"),
    (["generate", "ab", "--temperature", "-1"], 1, "temperature"),
])
def test_errors_are_one_line(flex, capsys, argv, code, message):
    assert main(argv + ["--model", flex]) == code
    err = capsys.readouterr().err
    assert err.startswith("olmo-lab: error:") and message in err and "Traceback" not in err


def test_route_on_a_dense_model_is_refused(dense, capsys):
    assert main(["route", "ab", "--model", dense]) == 1
    assert "dense olmo3 model" in capsys.readouterr().err


def test_missing_model_directory(capsys, tmp_path):
    assert main(["generate", "ab", "--model", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["fly"], ["generate"], ["generate", "x", "--max-new-tokens", "many"],
                                  ["toggle", "x"], ["generate", "x", "--max-new-tokens", "-3"]])
def test_bad_arguments_give_usage_and_status_2(argv):
    run = subprocess.run([sys.executable, "-m", "olmo_lab", *argv], capture_output=True, text=True)
    assert run.returncode == 2 and "usage: olmo-lab" in run.stderr and "Traceback" not in run.stderr
