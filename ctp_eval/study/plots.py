"""PPL vs compression level, with and without the learned prompt (the paper's Figures 2-3), as PNG files."""

from __future__ import annotations

from pathlib import Path

from ctp_eval.study.runs import PPL_TASKS, Run, main_k


def _level(spec: str) -> tuple[str, float] | None:
    """('quantization', bits) or ('sparsity', fraction) for single-method specs; None for joint/none."""
    from ctp_eval.compress.spec import parse_spec

    if "/" in spec:  # another tool's checkpoint (ctp_eval.external label): not on our compression axis
        return None
    parsed = parse_spec(spec)
    if parsed.is_none or (parsed.quant and parsed.sparse):
        return None
    if parsed.quant:
        return "quantization", float(parsed.quant.bits)
    return "sparsity", parsed.sparse.sparsity


def ppl_vs_compression(runs: list[Run], stem: Path) -> list[tuple[str, Path]]:
    """One PNG per compression family present; each has a panel per PPL dataset. Returns (caption, path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in runs if r.kind == "dense"), None)
    k = main_k(runs)
    written = []
    for family, xlabel in (("quantization", "bits (GPTQ)"), ("sparsity", "sparsity (SparseGPT)")):
        fam = [r for r in runs if (lv := _level(r.compression)) and lv[0] == family and r.compression.split(":")[0] in ("gptq", "sparsegpt")]
        tasks = [t for t in PPL_TASKS if any(t in r.values for r in fam)]
        if not fam or not tasks:
            continue
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            recipes = sorted({r.recipe for r in fam if r.kind == "learned" and not r.in_study}, key=lambda x: (x != "paper", x))
            builds = sorted({r.build for r in fam if r.kind == "none"}, key=lambda b: (b != "", b))
            tag = lambda b: f" [build {b or 'earlier'}]" if len(builds) > 1 else ""  # noqa: E731
            lines = [(kind, "", b, style, name + tag(b)) for b in builds
                     for kind, style, name in (("none", "o-", "no prompt"), ("hard", "s--", "hard prompt"))] + [
                ("learned", rec, None, "^-" if rec == "paper" else "v-",
                 "learned prompt" + ("" if rec == "paper" else f" (recipe {rec})")) for rec in recipes]
            for kind, recipe, build, style, name in lines:
                pts = sorted(
                    (_level(r.compression)[1], r.values[task])
                    for r in fam
                    if r.kind == kind and task in r.values and (build is None or r.build == build) and (kind != "learned" or (
                        r.trained_on == r.compression and r.train_data == "c4" and r.k == k and r.recipe == recipe))
                )
                if pts:
                    ax.plot(*zip(*pts), style, label=name)
            if dense and task in dense.values:
                ax.axhline(dense.values[task], color="gray", ls=":", label="dense")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(f"{PPL_TASKS[task]} token PPL")
            if family == "quantization":
                ax.invert_xaxis()  # left to right = more compression
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{sorted({r.model for r in fam})[0]}: PPL vs {family}")  # our specs' model, not a checkpoint's
        fig.tight_layout()
        path = Path(f"{stem}-ppl-vs-{family}.png")
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append((f"PPL vs {family}, with and without prompts", path))
    return written
