"""Build the notebooks from their sources in notebooks/src/*.py and run them to store their outputs.

    make notebooks                       # every notebook
    make notebooks NB="02 04"            # only those whose name starts with these prefixes
    make notebooks NB="e"                # the exercise notebooks (notebooks/exercises/src/e*.py)

The Makefile pins the CPU numerics and threads the kernels run with, as `make test` does, so the
stored outputs are what nbval recomputes in CI on any x86-64 machine; run directly, this refuses.

A source is a Python file in the "percent" format: `# %%` starts a code cell, `# %% [markdown]` a
markdown cell whose lines are comments. Keeping sources as plain Python makes them easy to review and
diff; the committed .ipynb files (with outputs) are what readers open and what nbval checks in CI.

An exercise source (notebooks/exercises/src/*.py) gives two notebooks: the solution
(notebooks/exercises/solutions/) and the student's (notebooks/exercises/), in which every block
between `# BEGIN SOLUTION` and `# END SOLUTION` is replaced by a `raise NotImplementedError` blank.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(os.path.dirname(HERE), "docs", "images")
EXERCISES = os.path.join(HERE, "exercises")
SOLUTION = re.compile(r"^( *)# BEGIN SOLUTION\n.*?^ *# END SOLUTION\n", flags=re.M | re.S)
BLANK = '\\1raise NotImplementedError("your code here")\n'


def student_version(source: str) -> str:
    """The exercise source with each solution block replaced by a blank that raises NotImplementedError."""
    return SOLUTION.sub(BLANK, source)


def solution_version(source: str) -> str:
    """The exercise source with the solution markers removed."""
    return re.sub(r"^ *# (BEGIN|END) SOLUTION\n", "", source, flags=re.M)


def parse(source: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    for chunk in re.split(r"^# %%", source, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if header.strip() == "[markdown]":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(body))
    for i, cell in enumerate(nb.cells):  # stable ids: no random element ids in the committed files
        cell.id = f"cell-{i:03d}"
        if cell.cell_type == "code" and "NBVAL_SKIP" in cell.source:  # not run here either (needs the hub)
            cell.metadata.tags = ["skip-execution"]
    return nb


def build(name: str, source: str | None = None, out_dir: str = HERE) -> str:
    """Run one notebook and write it to out_dir/name.ipynb (source: the text; default notebooks/src/name.py)."""
    if source is None:
        with open(os.path.join(HERE, "src", name + ".py"), encoding="utf-8") as f:
            source = f.read()
    nb = parse(source)
    env_backup = {k: os.environ.pop(k) for k in ("OLMO_LAB_MODEL", "OLMO_LAB_MOE_MODEL") if k in os.environ}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": out_dir}}).execute()
    finally:
        os.environ.update(env_backup)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":  # one stdout block per run of prints, however the kernel flushed them
            merged = []
            for output in cell.outputs:
                if merged and output.output_type == merged[-1].output_type == "stream" and output.name == merged[-1].name:
                    merged[-1].text += output.text
                else:
                    merged.append(output)
            cell.outputs = merged
    out = os.path.join(out_dir, name + ".ipynb")
    with open(out, "w", encoding="utf-8") as f:
        f.write(stable_widget_ids(nbformat.writes(nb), name) + "\n")
    export_figure(nb, name)
    return out


WIDGET_REF = re.compile(r"IPY_MODEL_([0-9a-f]{32})")


def stable_widget_ids(text: str, name: str) -> str:
    """The notebook's JSON with each widget's random model id replaced by one derived from its place.

    Widgets are numbered in a fixed order: those shown in cell outputs (in cell order), then the
    widgets they refer to (breadth first), then any others by their content; the result is written
    again with sorted keys, so the same notebook gives the same file on every run.
    """
    nb = json.loads(text)
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get(
        "state", {})
    queue = [output["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for cell in nb["cells"]
             for output in cell.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    order = []
    while queue:
        wid = queue.pop(0)
        if wid in state and wid not in order:
            order.append(wid)
            queue += WIDGET_REF.findall(json.dumps(state[wid], sort_keys=True))
    order += sorted((w for w in state if w not in order),
                    key=lambda w: WIDGET_REF.sub("", json.dumps(state[w], sort_keys=True)))
    for i, old in enumerate(order):
        text = text.replace(old, hashlib.md5(f"{name}/{i}".encode()).hexdigest())
    return nbformat.writes(nbformat.reads(text, as_version=4))


def export_figure(nb: nbformat.NotebookNode, name: str) -> None:
    """Save the first picture of the cell marked `# README figure` as docs/images/<name>.png."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "# README figure" in cell.source:
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    os.makedirs(IMAGES, exist_ok=True)
                    with open(os.path.join(IMAGES, name + ".png"), "wb") as f:
                        f.write(base64.b64decode(png))
                    return


def main(prefixes: list[str]) -> None:
    if "ATEN_CPU_CAPABILITY" not in os.environ or "OMP_NUM_THREADS" not in os.environ:
        sys.exit("build the notebooks with `make notebooks`: it pins the CPU numerics that `make test` checks them with")
    names = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "src")) if f.endswith(".py"))
    for name in names:
        if not prefixes or any(name.startswith(p) for p in prefixes):
            print("built", build(name), flush=True)
    exercises = sorted(f[:-3] for f in os.listdir(os.path.join(EXERCISES, "src")) if f.endswith(".py"))
    for name in exercises:
        if not prefixes or any(name.startswith(p) for p in prefixes):
            with open(os.path.join(EXERCISES, "src", name + ".py"), encoding="utf-8") as f:
                source = f.read()
            print("built", build(name, solution_version(source), os.path.join(EXERCISES, "solutions")), flush=True)
            print("built", build(name, student_version(source), EXERCISES), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
