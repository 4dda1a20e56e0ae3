"""Pretraining: token shards, the data loader and the training loop."""
