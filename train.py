"""Entry point: ``python train.py fit --config configs/demo.yaml`` (also validate / test / predict)."""

import sys

from comat_lightning.command_help import overview, wants_overview

if __name__ == "__main__":
    if wants_overview(sys.argv[1:]):  # before importing Lightning: the overview prints at once
        print(overview())
        sys.exit(0)
    from comat_lightning.cli import command_line

    command_line()
