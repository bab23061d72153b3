"""A cold start stays out of torch's compiler stack (timings are measured in benchmarks/, not here)."""

import subprocess
import sys

import torch

import olmo_lab

PROBE = """
import sys, olmo_lab
model = olmo_lab.load_model(olmo_lab.lab_model(sys.argv[1]))
olmo_lab.generate(model, olmo_lab.load_tokenizer(olmo_lab.lab_model(sys.argv[1])), "The king said", max_new_tokens=3)
print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
"""


def test_loading_and_generating_import_no_compiler():
    for name in olmo_lab.lab.LAB_MODELS:
        out = subprocess.run([sys.executable, "-c", PROBE, name], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (name, out.stdout)


def test_the_skipped_init_is_confined_to_the_model_shell():
    """Parameters built after a load initialise as usual: the init skip ends with the shell."""
    olmo_lab.load_model(olmo_lab.lab_model("olmo3-lab"))
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    torch.manual_seed(0)
    expected = torch.empty(8, 8)
    torch.nn.init.kaiming_uniform_(expected, a=5 ** 0.5)
    assert torch.equal(layer.weight, expected)
