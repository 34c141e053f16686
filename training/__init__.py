"""`phileo-train`: streaming DDP pretraining and fine-tuning on phileo-shard datasets."""
