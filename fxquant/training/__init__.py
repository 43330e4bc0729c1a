"""Quantization-aware training: the loop, the resumable trainer, device placement, losses, and the train/eval
agreement check."""
