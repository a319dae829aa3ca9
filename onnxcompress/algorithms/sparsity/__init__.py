"""Weight sparsity (NNCF paper §4.3): magnitude sparsity, fine-tuned (`magnitude`) or one-shot (`oneshot`).

Masks multiply float weights in the training graph (`MaskWeight`); the export writes the masked weights, whose
zeros stay exact through quantization.
"""
