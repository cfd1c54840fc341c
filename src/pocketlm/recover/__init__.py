"""Recovery: distillation fine-tuning of a compressed model toward the uncompressed one, keeping
its compressed structure (masks, removed layers, merged heads, quantization grids) exactly, and
planned to fit a memory budget."""
