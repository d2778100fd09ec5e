"""The online MTP trainer: `run_training(TrainConfig) -> TrainResult` (see train.py)."""
