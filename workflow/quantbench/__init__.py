"""quantbench: what quantization costs a language model, measured cell by cell."""
