"""`phileo-train` command line (pretraining and fine-tuning arrive with later issues)."""

import click


@click.group()
def main() -> None:
    """Pretrain and fine-tune PhilEO geospatial foundation models on phileo-shard datasets."""


if __name__ == "__main__":
    main()
