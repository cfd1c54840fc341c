"""Pruning: one-shot pruners (magnitude, Wanda, SparseGPT), the LLM-Barber mask rebuild, and
ShortGPT's removal of whole decoder layers. Each method is one module registering one stage."""
