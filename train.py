"""Entry point: ``python train.py fit --config configs/demo.yaml`` (also validate / test / predict)."""

from comat_lightning.cli import main

if __name__ == "__main__":
    main()
