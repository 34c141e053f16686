"""`phileo-shard`: convert MajorTOM, FastTOM, folders of GeoTIFFs and PhilEO Bench into WebDataset shards.

sources/ (list and read inputs) -> build/ (plan, work units, shard writer, local / Ray / multi-node
distributors, manifest) ; phileo_bench/ (the PhilEO Bench build on the same machinery) ; dataset/
(query, subset, split, coverage, verify, inspect of a built dataset). layout.py names the dataset's
files; cli.py only wires these together. Only `phileo` is imported from outside this package.
"""
