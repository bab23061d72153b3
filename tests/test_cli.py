"""The command line: real runs on a checkpoint directory, and clean errors (never a traceback)."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import olmo_lab
from olmo_lab.__main__ import main, run
from olmo_lab.checkpoint import checkpoint_size
from _hub_cache import add_revision
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


@pytest.mark.parametrize("argv", [[], ["fly"], ["info"], ["generate", "x", "--max-new-tokens", "many"],
                                  ["toggle", "x"], ["generate", "x", "--max-new-tokens", "-3"],
                                  ["generate", "x", "--dtype", "int8"], ["route", "x", "--stream"]])
def test_bad_arguments_give_usage_and_status_2(argv):
    out = subprocess.run([sys.executable, "-m", "olmo_lab", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: olmo-lab" in out.stderr and "Traceback" not in out.stderr


def cli(argv, stdin=""):
    """`python -m olmo_lab argv` with `stdin` piped in: (status, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "olmo_lab", *argv], input=stdin, capture_output=True, text=True)
    return out.returncode, out.stdout, out.stderr


def test_prompts_from_standard_input_one_per_line(dense, capsys):
    expected = []
    for prompt in ("abc", "xyz"):
        assert main(["generate", prompt, "--model", dense, "--max-new-tokens", "4"]) == 0
        expected.append(capsys.readouterr().out)
    for argv in (["generate"], ["generate", "-"]):  # no prompt, or '-': standard input, each line a prompt
        code, out, err = cli(argv + ["--model", dense, "--max-new-tokens", "4"], stdin="abc\n\nxyz\n")
        assert (code, out) == (0, "".join(expected)), err


def test_empty_standard_input_is_an_input_error(dense):
    code, out, err = cli(["generate", "--model", dense], stdin="\n  \n")
    assert code == 1 and err.startswith("olmo-lab: error: no prompt") and "Traceback" not in err


def test_a_terminal_without_a_prompt_gives_usage(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: True))
    with pytest.raises(SystemExit) as exit_:
        main(["generate"])
    assert exit_.value.code == 2 and "the prompt is missing" in capsys.readouterr().err


class Writes(io.StringIO):
    """A stdout that counts its flushes: a stream prints piece by piece, each piece flushed at once."""

    flushes = 0

    def flush(self):
        self.flushes += 1


def test_stream_prints_the_same_text_piece_by_piece(dense, capsys):
    assert main(["generate", "abc", "--model", dense, "--max-new-tokens", "6"]) == 0
    whole = capsys.readouterr().out
    args = olmo_lab.__main__._parser().parse_args(["generate", "abc", "--model", dense, "--max-new-tokens", "6",
                                                    "--stream"])
    out = Writes()
    run(args, out)
    assert out.getvalue() == whole
    new = olmo_lab.generate(olmo_lab.load_model(dense), olmo_lab.load_tokenizer(dense), "abc", max_new_tokens=6)
    assert out.flushes == 1 + len(list(olmo_lab.Lab(dense).generate("abc", max_new_tokens=6, stream=True))) > 2
    assert whole == "abc" + new + "\n"


def test_device_and_dtype_reach_the_model(dense, capsys):
    assert main(["generate", "abc", "--model", dense, "--max-new-tokens", "5", "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    lab = olmo_lab.Lab(dense, dtype=torch.bfloat16, device="cpu")
    assert capsys.readouterr().out == "abc" + lab.generate("abc", max_new_tokens=5) + "\n"
    for device in ("nowhere", "cuda:0" if not torch.cuda.is_available() else "cuda:4096"):
        assert main(["generate", "abc", "--model", dense, "--device", device]) == 1
        err = capsys.readouterr().err
        assert err.startswith("olmo-lab: error: device: ") and device in err and "\n" == err[-1], err


def test_revision_selects_a_branch_of_the_hub_cache(tmp_path, monkeypatch, capsys):
    for branch, seed in (("main", 0), ("stage1-step1000-tokens2B", 1)):
        files = char_tokenizer(make_checkpoint(olmo3_config(), tmp_path / branch, seed=seed))
        add_revision(tmp_path / "hub", "lab-test/cli", branch, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outputs = {}
    for branch in ("main", "stage1-step1000-tokens2B"):
        argv = ["generate", "abc", "--model", "lab-test/cli", "--revision", branch, "--max-new-tokens", "8"]
        assert main(argv) == 0
        outputs[branch] = capsys.readouterr().out
        assert outputs[branch] == "abc" + olmo_lab.generate(olmo_lab.load_model(tmp_path / branch),
                                                            olmo_lab.load_tokenizer(tmp_path / branch), "abc",
                                                            max_new_tokens=8) + "\n"
    assert outputs["main"] != outputs["stage1-step1000-tokens2B"]
    assert main(["generate", "abc", "--model", "lab-test/cli", "--revision", "v9"]) == 1
    assert "revision 'v9'" in capsys.readouterr().err


def test_info_reports_config_experts_counts_and_layer_types(flex, capsys):
    assert main(["info", flex]) == 0
    out = capsys.readouterr().out
    model = olmo_lab.load_model(flex)
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert f"parameters: {model.num_parameters():,} = " in lines["parameters"]
    assert f"bytes: {checkpoint_size(flex):,} of weight files on disk" in lines["bytes"]
    assert lines["layer types"] == "layer types: 0-1 full_attention"
    per_expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters()) * 2  # 2 layers
    assert lines["experts"] == f"experts: 3 (expert_0, expert_1, expert_2), top-2 routing; {per_expert:,} parameters each"
    assert "  num_experts: 3" in out and "  hidden_size: 64" in out


def test_info_on_a_lab_model_shows_its_sliding_layers(capsys):
    assert main(["info", "olmo3-lab"]) == 0
    config = olmo_lab.load_model(olmo_lab.lab_model("olmo3-lab")).config
    window = config.sliding_window
    assert f"layer types: 0-2 sliding_attention (window {window}), 3 full_attention" in capsys.readouterr().out


def test_version():
    code, out, _ = cli(["--version"])
    assert (code, out.strip()) == (0, f"olmo-lab {olmo_lab.__version__}")
