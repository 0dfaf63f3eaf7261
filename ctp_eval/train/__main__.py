"""`python -m ctp_eval.train ...` (accelerate launch / torchrun): the `ctp-train` CLI."""

from ctp_eval.cli.train import main

if __name__ == "__main__":
    main()
