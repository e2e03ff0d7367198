"""GGUF and Hugging Face files: the architecture config, GGUF reading, MXFP4, conversion."""
