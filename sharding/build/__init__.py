"""The build: plan -> work units -> shards -> manifest, on one machine, Ray or several nodes."""
