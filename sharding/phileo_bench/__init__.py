"""The PhilEO Bench build: downstream patches -> shards, with the benchmark's n-shot selections."""
