"""Export: a trained student in the formats people deploy (ONNX + int8 for encoders, a merged HF folder for LoRA LMs)."""
