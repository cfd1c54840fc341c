"""Running exported models: llama.cpp (through llama-cpp-python) for GGUF files."""
