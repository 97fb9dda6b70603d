"""Frontend request checks for mm_embedding.

Bad ``extra_args["mm_embedding"]`` options fail when the ``SamplingParams`` is built (wrapped
``SamplingParams._verify_args``): in the caller's process, with a ``ValueError`` naming the option
(HTTP 400 on the server), before any prompt is rendered. Failing later, after the multimodal processor
cached the prompt's items in the frontend, would leave the frontend and EngineCore caches out of step.

A request that will get embeddings back skips prefix-cache *reads* (wrapped
``InputProcessor.process_inputs``): a prefix hit over a multimodal placeholder would skip that item's
gather in the worker, and with it the embedding. Its blocks are still written to the cache.
"""

from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams


def wants_mm_embedding(model_config, request) -> bool:
    """Whether ``request`` (an ``EngineCoreRequest``) will get embeddings back."""
    mm_config = model_config.multimodal_config
    if not getattr(mm_config, "enable_return_mm_embedding", False) or not request.mm_features:
        return False
    params = MMEmbeddingParams.from_extra_args(request.sampling_params.extra_args)
    return params.num_wanted(request.mm_features) > 0


def patch_sampling_params(module) -> None:
    """Validate ``extra_args["mm_embedding"]`` with the rest of the sampling parameters."""
    params_cls = module.SamplingParams
    stock_verify = params_cls._verify_args

    def _verify_args(self) -> None:
        stock_verify(self)
        MMEmbeddingParams.from_extra_args(self.extra_args)

    params_cls._verify_args = _verify_args


def patch_input_processor(module) -> None:
    """Keep prefix-cache reads from hiding the items of requests that get embeddings back."""
    processor_cls = module.InputProcessor
    stock_process_inputs = processor_cls.process_inputs

    def process_inputs(self, *args, **kwargs):
        request = stock_process_inputs(self, *args, **kwargs)
        sampling_params = request.sampling_params
        if (
            sampling_params is not None
            and sampling_params.skip_reading_prefix_cache is None
            and wants_mm_embedding(self.model_config, request)
        ):
            sampling_params.skip_reading_prefix_cache = True
        return request

    processor_cls.process_inputs = process_inputs
