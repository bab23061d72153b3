"""The package is grouped by role while its public module names stay flat (olmo_lab.heads, olmo_lab.trace, ...)."""

import importlib
import pathlib
import subprocess
import sys

import olmo_lab

PACKAGE = pathlib.Path(olmo_lab.__file__).parent


def test_every_module_in_a_role_folder_has_its_flat_name():
    on_disk = {role: sorted(p.stem for p in (PACKAGE / role).glob("*.py") if p.stem != "__init__")
               for role in olmo_lab.ROLES}
    assert on_disk == {role: sorted(ms) for role, ms in olmo_lab.ROLES.items()}
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "errors", "session"]  # nothing left outside the folders
    for role, modules in olmo_lab.ROLES.items():
        for m in modules:
            real = importlib.import_module(f"olmo_lab.{role}.{m}")
            assert importlib.import_module(f"olmo_lab.{m}") is real  # one module, two names
            assert real.__name__ == f"olmo_lab.{role}.{m}" and real.__package__ == f"olmo_lab.{role}"


def test_trace_and_generate_stay_functions_after_importing_their_modules():
    from olmo_lab.generate import generate  # noqa: F401
    from olmo_lab.trace import Trace  # noqa: F401

    assert callable(olmo_lab.trace) and olmo_lab.trace.__name__ == "trace"
    assert callable(olmo_lab.generate) and olmo_lab.generate.__name__ == "generate"


def test_a_fresh_process_imports_each_flat_name_once():
    code = ("import sys, olmo_lab.heads, olmo_lab.flexolmo, olmo_lab.lens\n"
            "from olmo_lab.interventions import Zero\n"
            "import olmo_lab.analysis.interventions as iv, olmo_lab.recipe.flexolmo as fx\n"
            "assert Zero is iv.Zero and olmo_lab.flexolmo is fx\n"
            "assert olmo_lab.lab.samples and olmo_lab.summary.describe and olmo_lab.plots.__name__.endswith('plots')\n"
            "modules = {id(m): m for k, m in sys.modules.items() if k.startswith('olmo_lab.') and hasattr(m, '__file__')}\n"
            "files = [m.__file__ for m in modules.values()]\n"
            "print(len(files) == len(set(files)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "True"  # every file is loaded under its own name only
