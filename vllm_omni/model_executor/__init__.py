"""Model code served by vLLM, as vllm/model_executor."""
