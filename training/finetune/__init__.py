"""Fine-tuning on PhilEO Bench: trainer, data, metrics, plots, the n-shot sweep."""
