"""Frontend request checks for the per-request outputs (mm_embedding, prompt hidden states).

Bad ``extra_args["mm_embedding"]`` options or a non-boolean ``extra_args["prompt_hidden_states"]`` fail
when the ``SamplingParams`` is built (wrapped ``SamplingParams._verify_args``): in the caller's process,
with a ``ValueError`` naming the option (HTTP 400 on the server), before any prompt is rendered. Failing
later, after the multimodal processor cached the prompt's items in the frontend, would leave the
frontend and EngineCore caches out of step. Asking for prompt hidden states from an engine without
``return_prompt_hidden_states`` fails in ``InputProcessor.process_inputs``, where vLLM checks its own
request parameters against the engine.

A request that will get embeddings or prompt hidden states back skips prefix-cache *reads* (as vLLM
does for prompt logprobs): a prefix hit skips computing those prompt tokens in the worker, and with it
their multimodal items or hidden-state rows. Its blocks are still written to the cache.
"""

from vllm.sampling_params import SamplingParams

from vllm_omni.config import prompt_hidden_states as phs
from vllm_omni.multimodal.mm_embedding import MMEmbeddingParams


def wants_mm_embedding(model_config, request) -> bool:
    """Whether ``request`` (an ``EngineCoreRequest``) will get embeddings back."""
    mm_config = model_config.multimodal_config
    if not getattr(mm_config, "enable_return_mm_embedding", False) or not request.mm_features:
        return False
    params = MMEmbeddingParams.from_extra_args(request.sampling_params.extra_args)
    return params.num_wanted(request.mm_features) > 0


def check_prompt_hidden_states(vllm_config, params) -> bool:
    """Whether ``params`` ask for prompt hidden states; ``ValueError`` if the engine cannot give them."""
    if not isinstance(params, SamplingParams) or not phs.requested(params.extra_args):
        return False
    if phs.configured_layer(vllm_config) is None:
        raise ValueError(
            f"extra_args['{phs.EXTRA_ARGS_KEY}'] needs an engine started with "
            "return_prompt_hidden_states=True (--return-prompt-hidden-states)"
        )
    return True


def patch_sampling_params(module) -> None:
    """Validate ``extra_args["mm_embedding"]`` and ``["prompt_hidden_states"]`` with the rest."""
    params_cls = module.SamplingParams
    stock_verify = params_cls._verify_args

    def _verify_args(self) -> None:
        stock_verify(self)
        MMEmbeddingParams.from_extra_args(self.extra_args)
        phs.check_request(self)

    params_cls._verify_args = _verify_args


def patch_input_processor(module) -> None:
    """Refuse prompt hidden states the engine cannot give; skip prefix-cache reads for requests that
    get embeddings or prompt hidden states back."""
    processor_cls = module.InputProcessor
    stock_process_inputs = processor_cls.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        wants_hidden_states = check_prompt_hidden_states(self.vllm_config, params)
        request = stock_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        sampling_params = request.sampling_params
        if sampling_params is not None and (
            wants_hidden_states or wants_mm_embedding(self.model_config, request)
        ):
            # Not only when None: SamplingParams.__post_init__ already set it to False.
            sampling_params.skip_reading_prefix_cache = True
        return request

    processor_cls.process_inputs = process_inputs
