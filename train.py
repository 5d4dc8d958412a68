"""Train the acceptance head: `python train.py fit --config configs/train/demo.yaml` (specdecpp/cli.py)."""
from specdecpp.cli import main

if __name__ == "__main__":
    main()
