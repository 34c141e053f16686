"""`phileo-shard`: convert MajorTOM (and later FastTOM, PhilEO Bench) into WebDataset shards.

reader (sources/) -> planner (plan.py) -> writer (writer.py) -> distributor (distributor.py),
wired by the CLI (cli.py). Only `phileo` is imported from outside this package.
"""
