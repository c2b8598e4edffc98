"""Train once, deploy many: exports a library or the Hugging Face Hub can load (pretrained: safetensors, model
card, ONNX), AST's switchable sub-nets in one file (dynamic), and sparse CPU inference (inference)."""
