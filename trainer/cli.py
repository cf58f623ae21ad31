"""`toto-train`: pre-train, sweep, export, generate and evaluate models over visual tokens."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="toto")
def main() -> None:
    """Toto trainer: pre-training, checkpoints, export, generation and probes."""


from trainer.export import export_hf_command  # noqa: E402
from trainer.generate import generate_command  # noqa: E402
from trainer.pretrain_cli import pretrain_command  # noqa: E402
from trainer.sweep_lr import sweep_lr_command  # noqa: E402

main.add_command(pretrain_command)
main.add_command(sweep_lr_command)
main.add_command(export_hf_command)
main.add_command(generate_command)
from trainer.evals.cli import probe, scaling, track  # noqa: E402

main.add_command(probe)
main.add_command(track)
main.add_command(scaling)
from trainer.demo import demo  # noqa: E402

main.add_command(demo)
from trainer.finetune_cli import finetune_command  # noqa: E402

main.add_command(finetune_command)
from trainer.figures_cli import curves_command, position_loss_command  # noqa: E402

main.add_command(curves_command)
main.add_command(position_loss_command)
from trainer.evals.sta import sta_command  # noqa: E402

main.add_command(sta_command)
from trainer.evals.robot import robot_command  # noqa: E402

main.add_command(robot_command)

if __name__ == "__main__":
    main()
