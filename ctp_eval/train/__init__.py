"""`ctp-train`: learn a soft prompt (or the LoRA baseline) that recovers a compressed model.

config (settings and their paper defaults), setup (the model, its identity, the teacher), loop (the run),
tuners (prompt or LoRA), losses (CE / KD, chunked), teacher (distillation targets and their cache), checkpoint,
schedule (lr and data order), runlog, distributed. `python -m ctp_eval.train` runs the CLI (for accelerate
launch / torchrun).
"""

from ctp_eval.train.config import (  # noqa: F401
    DTYPES,
    METHODS,
    RESUME_MAY_CHANGE,
    TrainConfig,
    TrainError,
    TrainingDiverged,
)
from ctp_eval.train.loop import (  # noqa: F401
    TrainResult,
    build_tuner,
    make_optimizer,
    train,
    train_step,
)


def main(argv=None) -> None:
    from ctp_eval.cli.train import main as cli_main

    cli_main(argv)
