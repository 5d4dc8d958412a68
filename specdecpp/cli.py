"""The training command line: `python train.py fit --config configs/train/demo.yaml` (LightningCLI, omegaconf
mode). It lives in the package so the demo and experiments call it without importing the top-level script."""

from lightning.pytorch.cli import LightningCLI

from .data import AcceptanceDataModule
from .training import AcceptanceHeadModule
from .training.checkpoints import check_checkpoint


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one pair of models for data and head: set them under data, the model follows
        parser.link_arguments("data.target", "model.target")
        parser.link_arguments("data.draft", "model.draft")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a checkpoint's hyperparameters into the config here, silently over the command line's:
        first refuse a damaged checkpoint, and one whose head differs from the head asked for, by name."""
        sub = self.config.get("subcommand")
        if sub:
            check_checkpoint(self.config[sub].get("ckpt_path"), dict(self.config[sub].model))
        super()._parse_ckpt_path()


def main(args=None) -> None:
    CLI(AcceptanceHeadModule, AcceptanceDataModule, parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True}, args=args)
