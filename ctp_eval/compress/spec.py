"""The one compression spec syntax, shared by `compression=`, `ctp-train` and the leaderboards.

Grammar (case-insensitive, no spaces)::

    spec   := "none" | part | sparse "+" quant
    part   := quant | sparse
    quant  := ("gptq" | "rtn") ":" "w" BITS ["g" GROUP] ["-sym"] ["-act"]
    sparse := ("sparsegpt" | "magnitude") ":" (FRACTION | N ":" M)

`GROUP` 0 or absent means one grid per output channel. `-act` (GPTQ only) processes columns by decreasing
Hessian diagonal. `rtn` (round-to-nearest) and `magnitude` are the calibration-free sanity baselines. Joint
specs pair the calibrated methods (`sparsegpt:0.5+gptq:w4`, solved in one OBS sweep so pruned weights stay
zero) or the baselines (`magnitude:0.5+rtn:w4`). `str(spec)` is the canonical form and `parse_spec`
round-trips it, so the string can serve as a cache key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUANT_METHODS = ("gptq", "rtn")
SPARSE_METHODS = ("sparsegpt", "magnitude")
# Which quantizer may follow which pruner: the calibrated pair runs as one joint OBS sweep, the baseline
# pair as prune-then-round. Mixing them would measure neither the paper's method nor a clean baseline.
JOINT_PAIRS = {"sparsegpt": "gptq", "magnitude": "rtn"}

VALID_FORMS = (
    "none",
    "gptq:w4  gptq:w3g128  gptq:w2g64-act  gptq:w4g128-sym",
    "rtn:w4  rtn:w4g128",
    "sparsegpt:0.5  sparsegpt:0.625  sparsegpt:2:4",
    "magnitude:0.5  magnitude:2:4",
    "sparsegpt:0.5+gptq:w4  magnitude:0.5+rtn:w4",
)

_QUANT_RE = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<flags>(?:-(?:sym|act))*)$")
_NM_RE = re.compile(r"^(?P<n>\d+):(?P<m>\d+)$")


class SpecError(ValueError):
    """A malformed or unsupported compression spec; the message lists the valid forms."""

    def __init__(self, spec: str, reason: str):
        forms = "\n  ".join(VALID_FORMS)
        super().__init__(f"Invalid compression spec {spec!r}: {reason}.\nValid forms:\n  {forms}")


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only uniform quantization (fake-quantized: weights stay dense floats on the grid)."""

    method: str = field(default="gptq", metadata={"help": "gptq (Hessian error feedback) or rtn (round-to-nearest)"})
    bits: int = field(default=4, metadata={"help": "bits per weight, 2..8"})
    group_size: int = field(default=0, metadata={"help": "input columns per grid; 0 = one grid per output row"})
    sym: bool = field(default=False, metadata={"help": "symmetric grid (default asymmetric min-max, as GPTQ)"})
    act_order: bool = field(default=False, metadata={"help": "GPTQ: quantize columns by decreasing H diagonal"})

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quant method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order only applies to gptq")

    def __str__(self) -> str:
        s = f"{self.method}:w{self.bits}"
        if self.group_size:
            s += f"g{self.group_size}"
        if self.sym:
            s += "-sym"
        if self.act_order:
            s += "-act"
        return s


@dataclass(frozen=True)
class SparseSpec:
    """Unstructured (`sparsity`) or n:m (`n` zeros in every `m` consecutive input columns) pruning."""

    method: str = field(default="sparsegpt", metadata={"help": "sparsegpt (OBS) or magnitude"})
    sparsity: float = field(default=0.0, metadata={"help": "fraction of weights set to zero (unstructured)"})
    n: int = field(default=0, metadata={"help": "n:m pattern: zeros per block (0 = unstructured)"})
    m: int = field(default=0, metadata={"help": "n:m pattern: block length along the input dimension"})

    def __post_init__(self):
        if self.method not in SPARSE_METHODS:
            raise ValueError(f"sparse method must be one of {SPARSE_METHODS}, got {self.method!r}")
        if self.n or self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"n:m needs 0 < n < m, got {self.n}:{self.m}")
            # n:m fixes the fraction; keep `sparsity` consistent so callers can always read it.
            object.__setattr__(self, "sparsity", self.n / self.m)
        elif not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        if self.structured:
            return f"{self.method}:{self.n}:{self.m}"
        return f"{self.method}:{self.sparsity:g}"


@dataclass(frozen=True)
class CompressSpec:
    """What to do to every Linear inside the decoder blocks. Both parts None means `none` (dense)."""

    sparse: SparseSpec | None = field(default=None, metadata={"help": "pruning part, applied first"})
    quant: QuantSpec | None = field(default=None, metadata={"help": "quantization part"})

    def __post_init__(self):
        if self.sparse and self.quant and JOINT_PAIRS[self.sparse.method] != self.quant.method:
            raise ValueError(
                f"{self.sparse.method} can only be combined with {JOINT_PAIRS[self.sparse.method]}, "
                f"not {self.quant.method}"
            )
        if self.sparse and self.quant and self.quant.act_order:
            # act-order permutes columns inside the sweep, which would break n:m blocks; the SparseGPT
            # paper's joint mode runs in natural order, so we keep to that.
            raise ValueError("act_order (-act) is not supported together with sparsity")

    @property
    def is_none(self) -> bool:
        return self.sparse is None and self.quant is None

    @property
    def needs_calibration(self) -> bool:
        """RTN and magnitude pruning look only at the weights; GPTQ/SparseGPT need activations."""
        return (self.sparse is not None and self.sparse.method == "sparsegpt") or (
            self.quant is not None and self.quant.method == "gptq"
        )

    def __str__(self) -> str:
        parts = [str(p) for p in (self.sparse, self.quant) if p is not None]
        return "+".join(parts) or "none"


def _parse_quant(spec: str, method: str, arg: str) -> QuantSpec:
    m = _QUANT_RE.match(arg)
    if not m:
        raise SpecError(spec, f"{method} expects w<bits>[g<group>][-sym][-act], got {arg!r}")
    flags = set(filter(None, m["flags"].split("-")))
    try:
        return QuantSpec(
            method=method,
            bits=int(m["bits"]),
            group_size=int(m["group"] or 0),
            sym="sym" in flags,
            act_order="act" in flags,
        )
    except ValueError as e:
        raise SpecError(spec, str(e)) from None


def _parse_sparse(spec: str, method: str, arg: str) -> SparseSpec:
    try:
        nm = _NM_RE.match(arg)
        if nm:
            return SparseSpec(method=method, n=int(nm["n"]), m=int(nm["m"]))
        try:
            frac = float(arg)
        except ValueError:
            raise SpecError(spec, f"{method} expects a fraction like 0.5 or n:m like 2:4, got {arg!r}") from None
        return SparseSpec(method=method, sparsity=frac)
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(spec, str(e)) from None


def parse_spec(spec: str | CompressSpec | None) -> CompressSpec:
    """Parse a spec string (see module docstring). `None`, "" and "none" mean no compression."""
    if isinstance(spec, CompressSpec):
        return spec
    text = (spec or "none").strip().lower()
    if text in ("none", "dense"):
        return CompressSpec()
    sparse = quant = None
    for part in text.split("+"):
        method, sep, arg = part.partition(":")
        if not sep or not arg:
            raise SpecError(spec, f"part {part!r} has no ':<args>'")
        if method in QUANT_METHODS:
            if quant is not None:
                raise SpecError(spec, "more than one quantization part")
            quant = _parse_quant(spec, method, arg)
        elif method in SPARSE_METHODS:
            if sparse is not None:
                raise SpecError(spec, "more than one sparsity part")
            sparse = _parse_sparse(spec, method, arg)
        else:
            raise SpecError(spec, f"unknown method {method!r}")
    try:
        return CompressSpec(sparse=sparse, quant=quant)
    except ValueError as e:
        raise SpecError(spec, str(e)) from None


def canonical_spec(spec: str | CompressSpec | None) -> str:
    """Canonical string of a spec, e.g. 'GPTQ:W4G128' -> 'gptq:w4g128', 'gptq:w4+sparsegpt:.5' -> 'sparsegpt:0.5+gptq:w4'."""
    return str(parse_spec(spec))
