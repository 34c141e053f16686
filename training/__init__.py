"""`phileo-train`: streaming DDP pretraining and fine-tuning on phileo-shard datasets.

data/ (the streaming loader: shard lists, remote reads, epoch plan, crops, labels, batches) ->
pretrain.py (the loop) with objective.py, parallel.py (DDP / FSDP), checkpoint.py, distributed.py
(all rank logic); finetune/ (PhilEO Bench fine-tuning: trainer, data, metrics, plots, n-shot sweep).
config.py holds every default; cli.py only wires.
"""
