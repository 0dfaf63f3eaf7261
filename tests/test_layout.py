"""The package layout: old public import paths keep working, and docs/architecture.md names every module."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_old_public_names_still_import():
    import ctp_eval.compress as compress
    from ctp_eval.eval.lm import CTPLM as new_lm
    from ctp_eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt
    from ctp_eval.prompt.format import SoftPrompt as new_prompt

    assert CTPLM is new_lm and SoftPrompt is new_prompt
    for name in compress.__all__:  # the lazy exports all resolve
        assert getattr(compress, name) is not None


def test_python_m_ctp_eval_train_is_the_ctp_train_cli():
    out = subprocess.run([sys.executable, "-m", "ctp_eval.train", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: ctp-train")


def test_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc[doc.index("ctp_eval/\n") : doc.index("```", doc.index("ctp_eval/\n"))]
    listed, package = set(), ""
    for line in tree.splitlines()[1:]:
        m = re.match(r"^  (\s*)(\S+)", line)
        if not m:
            continue
        name = m.group(2)
        if name.endswith("/"):
            package = name.rstrip("/")
        elif name.endswith(".py"):
            listed.add(f"{package}/{name}" if m.group(1) else name)
            package = package if m.group(1) else ""
    modules = {str(p.relative_to(ROOT / "ctp_eval")) for p in (ROOT / "ctp_eval").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    listed.discard("__init__.py")  # the package's own, described on the tree's first line
    modules.discard("lm.py")  # the old import path of the `ctp` model, named under "Renamed modules"
    assert modules - listed == set(), f"modules missing from docs/architecture.md: {sorted(modules - listed)}"
    assert listed - modules == set(), f"docs/architecture.md names modules that do not exist: {sorted(listed - modules)}"
