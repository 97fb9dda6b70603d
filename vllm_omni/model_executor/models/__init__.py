"""Models registered with vLLM by the plugin (see ``vllm_omni.plugin``)."""
