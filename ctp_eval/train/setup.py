"""What a `ctp-train` run trains on: the (compressed) model, its identity, and the distillation teacher.

Identity (`target_identity`): base model + compression spec + calibration + build, independent of where the
compressed folder lives, so `--resume` works on a machine whose cache path differs and refuses another build.
"""

from __future__ import annotations

import logging
import os

from ctp_eval.train.config import TrainConfig, TrainError

logger = logging.getLogger(__name__)


def compressed_info(path) -> dict | None:
    from ctp_eval.compress import read_compression_info

    return read_compression_info(path) if path and os.path.isdir(str(path)) else None


def external_label(path) -> str | None:
    """The label of the quantization a checkpoint another tool made declares (`ctp_eval.external`), else None."""
    from ctp_eval import external

    quant = external.read_quantization(path) if compressed_info(path) is None else None
    return quant.label if quant else None


def target_identity(cfg: TrainConfig) -> dict:
    """What the prompt is trained on, independent of where it lives on disk: base model, spec, calibration.
    `--resume` compares this (not the path), so a run resumes on a machine whose cache path differs."""
    from ctp_eval import models

    info = compressed_info(cfg.model)
    if info is not None:  # --model is a compressed checkpoint folder; its build tells two builds of a spec apart
        from ctp_eval.compress.io import DamagedCompressionError, build_id

        try:
            build = build_id(cfg.model)  # also checks the folder's files against its record
        except DamagedCompressionError as err:
            raise TrainError(str(err)) from None
        return dict(base_model=info.get("base_model", ""), compression=info.get("spec", "unknown"),
                    calibration=info.get("calibration"), build=build)
    calibration = None
    label = external_label(cfg.model) if cfg.compression == "none" else None
    if label:  # quantized by another tool: its own label
        return dict(base_model=models.model_id(cfg.model), compression=label, calibration=None)
    if cfg.compression != "none":
        from ctp_eval.compress import parse_spec
        from ctp_eval.compress.io import CalibConfig, calibration_details

        if parse_spec(cfg.compression).needs_calibration:
            calib = CalibConfig(nsamples=cfg.calib_nsamples, seqlen=cfg.calib_seqlen)
            calibration = calibration_details(calib, cfg.data_dir)
    return dict(base_model=models.model_id(cfg.model), compression=cfg.compression, calibration=calibration)


def load_model(cfg: TrainConfig, device):
    """(model, tokenizer, compression spec) of the model the prompt is trained on (compressed first if asked).
    A checkpoint another tool quantized answers its label (`ctp_eval.external`) as its spec."""
    from ctp_eval import models
    from ctp_eval.external import ExternalCheckpointError

    path = models.resolve_pretrained(cfg.model)
    compression = cfg.compression
    dtype = cfg.torch_dtype
    if compression != "none":
        from ctp_eval.compress import CalibConfig
        from ctp_eval.compress.host import compress_once_per_host

        calib = CalibConfig(nsamples=cfg.calib_nsamples, seqlen=cfg.calib_seqlen)
        # Compressed where and in what the training runs: the same cache entry as compression=SPEC,dtype=...
        path = compress_once_per_host(path, compression, calib=calib, data_dir=cfg.data_dir, device=device, dtype=dtype)
    else:
        info = compressed_info(path)  # --model may itself be a compressed checkpoint folder
        compression = info.get("spec", "unknown") if info else "none"
    try:
        model, tokenizer = models.load_model_and_tokenizer(path, dtype=dtype, device=str(device), input_grad=True)
    except ExternalCheckpointError as err:
        raise TrainError(str(err)) from None
    quant = models.external_quantization(model)
    if compression == "none" and quant is not None:
        compression = quant.label
    return model, tokenizer, compression


def external_details(model, compression: str) -> dict | None:
    """The full record of the checkpoint's own quantization (prompt metadata `extra`), when `compression` is its
    label; None for dense models and our own compressions."""
    from ctp_eval import models

    quant = models.external_quantization(model)
    return quant.details if quant is not None and quant.label == compression else None


def teacher_path(cfg: TrainConfig) -> str:
    """--teacher, else the uncompressed base model of what is being trained on."""
    from ctp_eval import models

    if cfg.teacher:
        return cfg.teacher
    info = compressed_info(cfg.model)
    if info is None and cfg.compression == "none" and external_label(cfg.model):
        raise TrainError(f"{cfg.model} was quantized by another tool ({external_label(cfg.model)}) and does not say "
                         "which uncompressed model it came from; pass that model with --teacher")
    if info is None:
        if cfg.compression == "none":
            logger.warning("--loss %s on an uncompressed model: the teacher is the model itself", cfg.loss)
        return models.resolve_pretrained(cfg.model)
    for candidate in (info.get("base_model_path"), info.get("base_model")):
        if candidate == models.EMBEDDED_ID:
            return models.resolve_pretrained(None)
        if candidate and (os.path.isdir(candidate) or not os.path.isabs(candidate)):
            return candidate  # a local folder, or a hub id
    raise TrainError(f"cannot find the uncompressed base model of {cfg.model} (recorded as "
                     f"{info.get('base_model_path') or info.get('base_model')!r}); pass it with --teacher")


def teacher_identity(cfg: TrainConfig, identity: dict, tokenizer) -> dict:
    """Who the teacher is, without loading it: its name (not its path, which may change between machines), dtype
    and tokenizer (the trained model's: `load_teacher` refuses a teacher whose tokenizer differs). `--resume`
    compares it, and the teacher cache records it."""
    from ctp_eval import models
    from ctp_eval.prompt import tokenizer_fingerprint

    return dict(teacher=models.model_id(cfg.teacher) if cfg.teacher else identity["base_model"],
                dtype=cfg.dtype, tokenizer=tokenizer_fingerprint(tokenizer))


def load_teacher(cfg: TrainConfig, identity: dict, tokenizer, dist, wins):
    from ctp_eval import models
    from ctp_eval.prompt import tokenizer_fingerprint
    from ctp_eval.train.teacher import Teacher

    path = teacher_path(cfg)
    dtype = cfg.torch_dtype
    model, tok = models.load_model_and_tokenizer(path, dtype=dtype, device=str(dist.device))
    teacher_id = teacher_identity(cfg, identity, tokenizer)
    if tokenizer_fingerprint(tok) != teacher_id["tokenizer"]:
        raise TrainError(f"teacher {path} has another tokenizer than the model being trained; distillation needs the same")
    teacher = Teacher(model, cfg.loss_chunk, cfg.teacher_topk, cfg.teacher_cache, teacher_id)
    try:
        teacher.check_cache(wins, dist.rank)
    except ValueError as err:
        raise TrainError(str(err)) from None
    dist.barrier()  # rank 0 may have just created cache.json
    logger.info("distilling from %s (%s)", path, "full vocabulary" if not cfg.teacher_cache else
                f"top-{cfg.teacher_topk}, cached in {cfg.teacher_cache}")
    return teacher
