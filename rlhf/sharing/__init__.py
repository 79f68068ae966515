"""Sharing a trained model: `rlhf export` copies a finished run's export with a model card
(export.py, card.py, reading the run through run_dir.py) and can push it to the hub (hub.py)."""
