"""Training stage (torch): dataset + augmentation, model, training loop, checkpoints."""
