"""Registers the `ctp` model and the ctp task folder with lm-eval, lazily.

lm-eval 0.4.x has no plugin discovery (lm-eval issues #1457, #1621, #3282), so the wheel installs a one-line
`.pth` file that imports this module at interpreter start. It only puts a finder on `sys.meta_path`; nothing
else is imported. When some program later imports `lm_eval.models` (or `lm_eval.tasks.manager`), the finder
lets the real module load and then:

* registers `ctp` -> "ctp_eval.eval.lm:CTPLM" as a lazy placeholder (torch/transformers load only if `ctp` is used);
* makes every `TaskManager` also scan ctp_eval's task folder, so `--tasks ctp_paper` works without
  `--include_path` (which still works: lm-eval de-duplicates the folder).

Programs that never import lm_eval pay for one tiny import and nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_WATCHED = ("lm_eval.models", "lm_eval.tasks.manager")


def tasks_dir() -> str:
    """The folder holding ctp's lm-eval task YAMLs (in the wheel: ctp_eval/tasks; in a checkout: ./tasks)."""
    here = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(here, "tasks")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(here), "tasks")


def register_model() -> None:
    from lm_eval.api.registry import model_registry

    if "ctp" not in model_registry:
        model_registry.register("ctp", target="ctp_eval.eval.lm:CTPLM")
    if "ctp-vllm" not in model_registry:  # lazy too: vLLM is imported only when the model is used
        model_registry.register("ctp-vllm", target="ctp_eval.eval.vllm_lm:CTPVLLM")


def patch_task_manager(module) -> None:
    manager_cls = module.TaskManager
    if getattr(manager_cls, "_ctp_patched", False):
        return
    original_init = manager_cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
        )
        ours = tasks_dir()
        if os.path.isdir(ours) and not any(os.path.abspath(str(p)) == ours for p in paths):
            paths.append(ours)
        original_init(self, *args, include_path=paths or None, **kwargs)

    manager_cls.__init__ = __init__
    manager_cls._ctp_patched = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a watched module to run our registration after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        sys.meta_path.remove(self)  # let the normal finders resolve the real spec
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            try:
                if fullname == "lm_eval.models":
                    register_model()
                else:
                    patch_task_manager(module)
            except Exception as err:  # never break lm-eval itself because of us
                print(f"ctp_eval: could not register with lm-eval: {err!r}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    # lm_eval may already be imported (e.g. this hook installed late by `import ctp_eval.eval.lm`).
    if "lm_eval.models" in sys.modules:
        register_model()
    if "lm_eval.tasks.manager" in sys.modules:
        patch_task_manager(sys.modules["lm_eval.tasks.manager"])


if os.environ.get("CTP_EVAL_NO_HOOK") != "1":
    install()
