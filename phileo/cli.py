"""Command-line conventions shared by `phileo-shard` and `phileo-train`."""

from __future__ import annotations

import click


class AliasedOption(click.Option):
    """An option with older spellings that still parse but stay out of --help (scripts keep working).

    `click.option("--output", "--out", "out", cls=AliasedOption)`: help shows only `--output`.
    """

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        spellings, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = spellings


def output_option(help_text: str, dest: str = "output", required: bool = True):
    """`--output` (the one spelling of both CLIs for what a command writes), with `--out` as a hidden alias."""
    return click.option("--output", "--out", dest, cls=AliasedOption, required=required, help=help_text)
