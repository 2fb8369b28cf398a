"""Training on Ray Train: the loop (plain PyTorch), the job config and trainer, checkpoints and reports."""
