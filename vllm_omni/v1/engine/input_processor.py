"""Frontend request checks for mm_embedding (wraps ``InputProcessor.process_inputs``).

Bad ``extra_args["mm_embedding"]`` options fail here, in the caller's process, with a ``ValueError``
naming the option (HTTP 400 on the server) before anything reaches the engine. A request that will get
embeddings back skips prefix-cache *reads*: a prefix hit over a multimodal placeholder would skip that
item's gather in the worker, and with it the embedding. Its blocks are still written to the cache.
"""

from vllm.sampling_params import SamplingParams

from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams


def wants_mm_embedding(model_config, request) -> bool:
    """Whether ``request`` (an ``EngineCoreRequest``) will get embeddings back."""
    mm_config = model_config.multimodal_config
    if not getattr(mm_config, "enable_return_mm_embedding", False) or not request.mm_features:
        return False
    params = MMEmbeddingParams.from_extra_args(request.sampling_params.extra_args)
    return any(params.wants(feature.modality) for feature in request.mm_features)


def patch_input_processor(module) -> None:
    """Validate the options and keep prefix-cache reads from hiding items."""
    processor_cls = module.InputProcessor
    stock_process_inputs = processor_cls.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if isinstance(params, SamplingParams):
            MMEmbeddingParams.from_extra_args(params.extra_args)
        request = stock_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        sampling_params = request.sampling_params
        if (
            sampling_params is not None
            and sampling_params.skip_reading_prefix_cache is None
            and wants_mm_embedding(self.model_config, request)
        ):
            sampling_params.skip_reading_prefix_cache = True
        return request

    processor_cls.process_inputs = process_inputs
