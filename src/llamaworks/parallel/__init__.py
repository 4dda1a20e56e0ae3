"""Parallelism for training and inference: torchrun process groups (distributed.py), the
parallelize() driver that applies TP/SP, activation checkpointing, compile and FSDP2/DDP in
torchtitan's order (parallelize.py), and tensor-parallel loading for inference (tp_load.py)."""
