"""The streaming loader: shard lists, remote reads, tar stream, epoch plan, crops, labels, batches."""
