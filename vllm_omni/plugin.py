"""``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts.

It registers vllm-omni's models with vLLM (lazily, by module path: vLLM inspects them in a subprocess that
runs only the plugins) and makes sure the patch layer is armed where the start-up hook did not run (e.g. an
interpreter started with ``-S``). It is re-entrant.
"""

from vllm_omni.patch import registry

MODELS = {
    "MultimodalQwen3ForCausalLM": "vllm_omni.model_executor.models.multimodal_qwen3",
    "Qwen2_5OmniTalkerForConditionalGeneration": "vllm_omni.model_executor.models.qwen2_5_omni_talker",
}
"""Architecture name (``config.json``, also the class name) -> module of the vLLM model."""


def register() -> None:
    """Register the models and arm the patch layer in this process (idempotent)."""
    from vllm import ModelRegistry

    for architecture, module in MODELS.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"{module}:{architecture}")
    registry.arm("plugin")
