"""Pure LLaMA functions, presets, HF interop and LoRA."""
