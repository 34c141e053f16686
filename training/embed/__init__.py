"""`phileo-train embed`: embeddings of a pretrained model over a phileo-shard dataset, in Major-TOM's layout."""
