"""`toto-pipeline`: turn images and videos into token shards, mix them, and inspect the results."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="toto")
def main() -> None:
    """Toto data pipeline: decode → tokenize → token shards → mix manifests.

    \b
    Typical flow:
      toto-pipeline demo-data --out demo/data
      toto-pipeline tokenize --dataset imagenet --input demo/data/imagenet --output tok/imagenet
      toto-pipeline status tok/imagenet
      toto-pipeline mix --ratios imagenet=0.2,k600=0.8 --inputs imagenet=tok/imagenet,k600=tok/k600 --out mix.json
    """


# Each step's commands live beside its code; this group only collects them.
from pipeline.demo_data.cli import demo_cater, demo_data  # noqa: E402
from pipeline.jobs.cli import COMMANDS as _job_commands  # noqa: E402
from pipeline.mix.cli import mix_command  # noqa: E402
from pipeline.shards.cli import COMMANDS as _shard_commands  # noqa: E402
from pipeline.sources.cli import worklist  # noqa: E402
from pipeline.tokenizers.convert import convert_tokenizer_cmd  # noqa: E402
from pipeline.tokenizers.train import train_tokenizer_cmd  # noqa: E402

for _cmd in (demo_data, demo_cater, worklist, *_job_commands, convert_tokenizer_cmd, train_tokenizer_cmd, mix_command,
             *_shard_commands):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
