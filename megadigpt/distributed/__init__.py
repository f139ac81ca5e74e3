"""Everything about running on many processes: launcher environment, the DeepSpeed engine, activation
checkpointing. The model code never imports from here."""
