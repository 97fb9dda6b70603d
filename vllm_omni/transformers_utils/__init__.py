"""Helpers around Hugging Face folders (configs, tokenizers, weights), as vllm/transformers_utils."""
