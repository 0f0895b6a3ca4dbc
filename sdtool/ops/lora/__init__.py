"""LoRA arithmetic: bake into a checkpoint, extract from a fine-tune, resize a LoRA's rank."""
