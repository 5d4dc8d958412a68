"""Train the acceptance head: `python train.py fit --config configs/train/demo.yaml` (LightningCLI, omegaconf mode)."""

from lightning.pytorch.cli import LightningCLI

from specdecpp.data import AcceptanceDataModule
from specdecpp.module import AcceptanceHeadModule, check_checkpoint


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one pair of models for data and head: set them under data, the model follows
        parser.link_arguments("data.target", "model.target")
        parser.link_arguments("data.draft", "model.draft")

    def before_fit(self) -> None:
        check_checkpoint(self.config_init[self.subcommand].get("ckpt_path"))  # before any model loads


def main(args=None) -> None:
    CLI(AcceptanceHeadModule, AcceptanceDataModule, parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
