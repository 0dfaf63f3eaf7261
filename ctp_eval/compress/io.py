"""Compressed checkpoints on disk, and the cache that lets one compression serve many runs.

A compressed checkpoint is an ordinary Hugging Face model folder (`save_pretrained`: config + safetensors +
tokenizer), so `pretrained=DIR` loads it anywhere, plus `ctp_compression.json` saying what was done: spec,
base model, calibration (dataset, split, exact data source, n samples, seqlen, seed), solver options,
versions and per-layer stats. Quantized specs also write `ctp_qparams.safetensors` (per-layer scale / zero /
g_idx) for packed export. The weights themselves stay dense floats (fake-quantized / masked), because
prompt learning back-propagates through them.

`ensure_compressed(pretrained, spec)` returns such a folder from the cache, keyed by model + spec +
calibration + options + dtype, and compresses (then saves atomically) on a miss.

`ctp_compression.json` also records every file's size and sha256 ("files"), so a damaged folder (a truncated
copy, a disk error) is caught before transformers reads it: a damaged cache entry is rebuilt, a damaged folder
of the user's is refused with the command that rebuilds it (`check_compressed`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ctp_eval.files import atomic_path, slug

from .apply import CompressOptions, compress_model
from .spec import CompressSpec, parse_spec

logger = logging.getLogger(__name__)

INFO_FILE = "ctp_compression.json"
QPARAMS_FILE = "ctp_qparams.safetensors"
FORMAT = "ctp-compression/2"  # bump when solver behaviour changes, so stale cache entries are not reused
# Sizes are checked on every load. sha256 reads every byte (~1 GB/s per core): seconds for small models, minutes
# for a 140 GB 70B checkpoint. So a file is hashed when the whole folder is at most CHECKSUM_ALL_BYTES, or when
# the file itself is at most CHECKSUM_SMALL_BYTES (config, tokenizer, qparams); larger folders get sizes only
# for their weight shards, which catches truncated or partial copies, the common damage.
CHECKSUM_ALL_BYTES = 4 << 30
CHECKSUM_SMALL_BYTES = 64 << 20


class DamagedCompressionError(ValueError):
    """A compressed folder whose files do not match its `ctp_compression.json`; the message says how to rebuild."""


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: random `seqlen`-token crops of documents (GPTQ protocol). Paper: C4 train."""

    dataset: str = field(default="c4", metadata={"help": "corpus name (c4, wikitext2, ptb) or .txt/.jsonl path"})
    split: str = field(default="train", metadata={"help": "corpus split"})
    nsamples: int = field(default=128, metadata={"help": "number of calibration sequences"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the document / crop draw"})

    def __post_init__(self):
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples}, {self.seqlen}")


def calibration_ids(tokenizer, calib: CalibConfig = CalibConfig(), data_dir=None) -> torch.Tensor:
    """LongTensor (nsamples, seqlen) of calibration tokens, deterministic for the config."""
    from ctp_eval import data

    return data.random_segments(
        tokenizer, calib.dataset, calib.split, calib.nsamples, calib.seqlen, calib.seed, data_dir=data_dir
    )


def calibration_details(calib: CalibConfig, data_dir=None) -> dict:
    """The config plus which data it resolves to (offline C4 and hub C4 are different documents)."""
    from ctp_eval import data

    return {**asdict(calib), "source": data.corpus_source(calib.dataset, calib.split, data_dir)}


def read_compression_info(path: str | os.PathLike) -> dict | None:
    """The `ctp_compression.json` of a model folder, or None for an uncompressed / non-local model."""
    f = Path(path) / INFO_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCompressionError(f"{f} is not readable JSON ({err}): the compressed folder {path} is damaged; "
                                      "remove it and compress the base model again (ctp-compress --spec SPEC "
                                      f"--model BASE --out {path})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest needs Python 3.11
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: str | os.PathLike) -> dict:
    """{relative path: {"size", "sha256"}} of every file in `folder` except `ctp_compression.json` itself."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != INFO_FILE)
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


# (folder, file stats) already hashed in this process: a run checks one folder several times (ensure_compressed,
# then build_id), and a file rewritten since has another mtime or inode.
_verified: set = set()


def find_damage(folder: str | os.PathLike, info: dict) -> str | None:
    """What is wrong with the files of compressed `folder` against `info["files"]` (None: nothing found).

    Checks sizes always, sha256 within the CHECKSUM_* limits. Folders written before the "files" map, and
    compressed-tensors exports (whose map, copied from the source, describes other files), are not checked.
    """
    records = info.get("files")
    if not isinstance(records, dict) or "export" in info:
        logger.debug("%s records no file checksums: not verified", folder)
        return None
    root = Path(folder)
    stats = []
    for name, rec in sorted(records.items()):
        try:
            st = (root / name).stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec.get("size"):
            return f"{name} is {st.st_size} bytes, {rec.get('size')} when written"
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    key = (str(root.resolve()), tuple(stats))
    if key in _verified:
        return None
    hash_all = sum(rec.get("size", 0) for rec in records.values()) <= CHECKSUM_ALL_BYTES
    for name, rec in sorted(records.items()):
        if (hash_all or rec["size"] <= CHECKSUM_SMALL_BYTES) and _sha256(root / name) != rec.get("sha256"):
            return f"{name} does not match its sha256 from when it was written"
    _verified.add(key)
    return None


def rebuild_command(folder: str | os.PathLike, info: dict) -> str:
    """The `ctp-compress` line that writes `folder` again from its base model (same spec, calibration, options)."""
    import shlex

    from ctp_eval import models

    args = ["ctp-compress", "--spec", str(info.get("spec", "SPEC"))]
    model = info.get("base_model_path") or info.get("base_model")
    if model and model != models.EMBEDDED_ID:
        args += ["--model", model]
    calib, default_calib = info.get("calibration") or {}, asdict(CalibConfig())
    options, default_options = info.get("options") or {}, CompressOptions().key()
    for given, default in ((calib, default_calib), (options, default_options)):
        for name, value in given.items():
            if name in default and value != default[name]:
                flag = "--" + name.replace("_", "-")
                args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    if info.get("dtype"):
        args += ["--dtype", info["dtype"]]
    return shlex.join([*args, "--out", str(folder)])


def check_compressed(path: str | os.PathLike) -> dict | None:
    """The `ctp_compression.json` of `path` (None if it has none) once its files match it; else
    DamagedCompressionError naming the folder, the bad file and the command that rebuilds it."""
    info = read_compression_info(path)
    problem = find_damage(path, info) if info is not None else None
    if problem:
        raise DamagedCompressionError(f"compressed checkpoint {path} is damaged: {problem}. Remove it and rebuild it "
                                      f"with: {rebuild_command(path, info)}")
    return info


def _discard(entry: Path) -> None:
    """Take a cache entry out of view atomically (rename), then delete it; another process may beat us to it."""
    aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".damaged-"))
    try:
        os.replace(entry, aside / entry.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def save_compressed(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    spec: str | CompressSpec,
    base_model: str,
    calibration: dict | None,
    options: CompressOptions = CompressOptions(),
    stats: dict | None = None,
    qparams: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an HF model folder + `ctp_compression.json` (+ qparams) to `out_dir` (not atomic; see ensure_)."""
    import transformers
    from safetensors.torch import save_file

    import ctp_eval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if qparams:
        tensors = {f"{name}.{k}": v.contiguous() for name, d in qparams.items() for k, v in d.items()}
        save_file(tensors, str(out / QPARAMS_FILE))
    info = {
        "format": FORMAT,
        "spec": str(parse_spec(spec)),
        "base_model": base_model,
        "calibration": calibration,
        "options": options.key(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": {
            "ctp_eval": ctp_eval.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
        "files": file_records(out),  # checked on load (find_damage); not part of build_id
        "stats": stats or {},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return out


def cache_key(identity: str, spec: CompressSpec, calibration: dict | None, options: CompressOptions, dtype) -> str:
    payload = {
        "format": FORMAT,
        "model": identity,
        "spec": str(spec),
        "calibration": calibration,  # None for RTN / magnitude: they read no data
        "options": options.key(),
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_compressed(
    pretrained: str | None,
    spec: str | CompressSpec,
    *,
    calib: CalibConfig = CalibConfig(),
    options: CompressOptions = CompressOptions(),
    cache_dir: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    data_dir=None,
    batch_size: int = 8,
    progress: bool = True,
    activations_on_host: bool = False,
    threads: int | None = None,
    lookup_only: bool = False,
) -> str | None:
    """Local folder of `pretrained` compressed with `spec`: from the cache, else compressed now and cached.

    `pretrained` is a hub id, a local folder, or None for the embedded SmolLM2-135M. Spec "none" returns the
    dense model's path. A folder that already holds a compression is returned as is when its spec matches
    (so a saved checkpoint can be passed together with its spec) and rejected otherwise. The cache lives in
    `cache_dir` (default `default_cache_dir()/"compressed"`), one folder per key, written atomically.

    dtype: the weights' dtype while compressing and on disk ("auto"/None: the checkpoint's own, e.g. bf16); it
    is part of the cache key. device: where each block is solved ("auto"/None: CUDA when available, else the
    CPU); the model itself is loaded on the host and the blocks visit `device` one at a time (see
    `apply.compress_model`, with `activations_on_host` and `threads`). lookup_only: return the cached folder
    or None, never compress.
    """
    from ctp_eval import models

    spec = parse_spec(spec)
    work = models.resolve_device(device)  # a bad device fails here, before any loading
    if spec.is_none:
        return models.resolve_pretrained(pretrained)
    existing = read_compression_info(pretrained) if pretrained and os.path.isdir(str(pretrained)) else None
    if existing is not None:
        if existing.get("spec") == str(spec):
            check_compressed(pretrained)  # the user's folder: refused if damaged, never rebuilt in place
            return str(pretrained)
        raise ValueError(
            f"{pretrained} is already compressed with {existing.get('spec')!r}; compress the base model "
            f"{existing.get('base_model')!r} with {str(spec)!r} instead of stacking compressions"
        )
    ident = models.model_identity(pretrained)
    base, identity = ident.name, ident.key
    dtype = models.resolve_dtype(pretrained, dtype)
    calibration = calibration_details(calib, data_dir) if spec.needs_calibration else None
    key = cache_key(identity, spec, calibration, options, dtype)
    root = Path(cache_dir) if cache_dir is not None else models.default_cache_dir() / "compressed"
    target = root / f"{slug(base)[:60]}__{slug(str(spec))}__{key}"
    if not target.exists():  # an entry named by an older naming rule: the key alone identifies it
        target = next(root.glob(f"*__{key}"), target) if root.is_dir() else target
    if (target / INFO_FILE).is_file():
        try:
            problem = find_damage(target, read_compression_info(target))
        except DamagedCompressionError as err:  # the json itself
            problem = str(err)
        if problem is None:
            logger.info("compressed model cache hit: %s", target)
            return str(target)
        logger.warning("compressed model cache entry %s is damaged (%s): removing it and compressing again",
                       target, problem)
        _discard(target)
    if lookup_only:
        return None

    logger.info("compressing %s with %s in %s, blocks solved on %s (cache miss, key %s)", base, spec,
                str(dtype).replace("torch.", ""), work, key)
    model, tokenizer = models.load_model_and_tokenizer(pretrained, device="cpu", dtype=dtype)  # host; blocks visit `work`
    calib_ids = calibration_ids(tokenizer, calib, data_dir) if spec.needs_calibration else None
    qparams: dict = {}
    stats = compress_model(
        model, spec, calib_ids, options=options, device=work, batch_size=batch_size, progress=progress,
        qparams_out=qparams, activations_on_host=activations_on_host, threads=threads,
    )
    try:
        with atomic_path(target) as tmp:
            save_compressed(
                model, tokenizer, tmp, spec=spec, base_model=base, calibration=calibration, options=options,
                stats=stats, qparams=qparams,
                extra={"cache_key": key, "base_model_path": identity, "compress_device": str(work),
                       "compress_kernels": compute_kernels(work)},
            )
    except OSError:
        if not (target / INFO_FILE).is_file():  # lost a race to another process: fine if it finished
            raise
    return str(target)


def compute_kernels(device) -> str:
    """What the solves' floating point ran on: the GPU's name, or the CPU kernel set torch dispatched to.

    GPTQ / SparseGPT builds are reproducible on one kernel set but not across them (an AVX-512 CPU rounds
    differently from an AVX2 one, a GPU's kernels likely differ too, and low-bit solves amplify that):
    recorded so that a rebuild that does not match its build id can say why. On CPU,
    `ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2` let one AVX-512 machine rebuild an AVX2 machine's compression, but
    not another (docs/compression.md).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cbwr = os.environ.get("MKL_CBWR")
        return torch.backends.cpu.get_cpu_capability() + (f", MKL_CBWR={cbwr}" if cbwr else "")
    return device.type


def build_id(path: str | os.PathLike) -> str:
    """A short fingerprint of what a compression produced (its per-layer errors), "" for an uncompressed model.

    The cache key names the inputs (model, spec, calibration, options, dtype, format); two builds with the same
    key can still differ when solver code changed without a format bump. Results record this id, so a
    leaderboard never compares a prompt with the no-prompt row of another build of the same spec. It hashes
    only the per-layer stats, so recording more in the json ("files") leaves existing ids as they were. A
    damaged folder raises DamagedCompressionError (see `check_compressed`): its id would describe other weights.
    """
    info = check_compressed(path)
    if not info:
        return ""
    layers = (info.get("stats") or {}).get("layers", {})
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:8]
