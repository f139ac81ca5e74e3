"""Training loops (pretraining now; fine-tuning and probing later) and what they share."""
