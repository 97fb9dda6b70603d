"""Canary: the signature of every vLLM callable the patch layer wraps, pinned for vLLM 0.32.0.

A vLLM upgrade that changes one of them fails here, in CI, instead of silently in production. The
stock signatures are read in a subprocess with the layer off (in this process they are wrapped).
Annotations are left out: names, kinds and defaults are what the wrappers depend on.
"""

import json
import os
import subprocess
import sys

from vllm_omni.patch.patches import PATCHES

GPU_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
CHAT = "vllm.entrypoints.openai.chat_completion"
COMPLETION = "vllm.entrypoints.openai.completion"
PINNED = {
    "importlib.metadata:version": "(distribution_name)",
    "vllm.engine.arg_utils:EngineArgs.add_cli_args": "(parser)",
    "vllm.engine.arg_utils:EngineArgs.create_model_config": "(self)",
    "vllm.engine.arg_utils:EngineArgs.create_engine_config": "(self, usage_context=None, headless=False)",
    f"{CHAT}.protocol:ChatCompletionRequest.to_sampling_params": (
        "(self, max_tokens, default_sampling_params)"
    ),
    f"{CHAT}.serving:OpenAIServingChat.chat_completion_full_generator": (
        "(self, request, result_generator, request_id, model_name, conversation, tokenizer, "
        "request_metadata, parser=None, mm_token_counts=None)"
    ),
    f"{CHAT}.serving:OpenAIServingChat.chat_completion_stream_generator": (
        "(self, request, result_generator, request_id, model_name, conversation, tokenizer, "
        "request_metadata, chat_template_kwargs=None, mm_token_counts=None)"
    ),
    f"{CHAT}.serving:OpenAIServingChat.create_chat_completion": "(self, request, raw_request=None)",
    f"{COMPLETION}.protocol:CompletionRequest.to_sampling_params": (
        "(self, max_tokens, default_sampling_params=None)"
    ),
    f"{COMPLETION}.serving:OpenAIServingCompletion.completion_stream_generator": (
        "(self, request, engine_inputs, result_generator, request_id, created_time, model_name, "
        "num_prompts, tokenizer, request_metadata)"
    ),
    f"{COMPLETION}.serving:OpenAIServingCompletion.create_completion": "(self, request, raw_request=None)",
    f"{COMPLETION}.serving:OpenAIServingCompletion.request_output_to_completion_response": (
        "(self, final_res_batch, request, request_id, created_time, model_name, tokenizer, request_metadata)"
    ),
    "vllm.outputs:RequestOutput.add": "(self, next_output, aggregate)",
    "vllm.renderers.chat_utils:_parse_chat_message_content_part": (
        "(part, mm_parser, *, wrap_dicts, interleave_strings)"
    ),
    "vllm.renderers.chat_utils:_resolve_items": "(items_by_modality, mm_processor, modality_order)",
    "vllm.sampling_params:SamplingParams._verify_args": "(self)",
    "vllm.v1.core.sched.scheduler:Scheduler._free_request": "(self, request, delay_free_blocks=False)",
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": (
        "(self, scheduler_output, model_runner_output)"
    ),
    "vllm.v1.engine.input_processor:InputProcessor.process_inputs": (
        "(self, request_id, prompt, params, supported_tasks, arrival_time=None, lora_request=None, "
        "tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None, "
        "resumable=False, session_id=None, kv_hints=None)"
    ),
    "vllm.v1.engine.output_processor:OutputProcessor.process_outputs": (
        "(self, engine_core_outputs, engine_core_timestamp=None, iteration_stats=None, weight_version=None)"
    ),
    "vllm.v1.engine.output_processor:RequestState._new_completion_output": (
        "(self, token_ids, finish_reason, stop_reason)"
    ),
    f"{GPU_RUNNER}._gather_mm_embeddings": "(self, scheduler_output, shift_computed_tokens=0)",
    f"{GPU_RUNNER}._setup_eagle3_aux_hidden_state_outputs": "(self)",
    f"{GPU_RUNNER}._update_states": "(self, scheduler_output)",
    f"{GPU_RUNNER}.execute_model": "(self, scheduler_output, intermediate_tensors=None)",
    f"{GPU_RUNNER}.sample_tokens": "(self, grammar_output)",
}

READ_STOCK_SIGNATURES = """
import importlib, inspect, json, sys
def bare(obj):
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
result = {}
for target in json.loads(sys.argv[1]):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    result[target] = bare(obj)
print(json.dumps(result))
"""


def test_every_wrapped_callable_is_pinned():
    wrapped = {target for patch in PATCHES for target in patch.wraps}
    assert wrapped == set(PINNED)


def test_stock_signatures_are_unchanged():
    env = {**os.environ, "VLLM_OMNI_DISABLE_PATCHES": "1"}
    cmd = [sys.executable, "-c", READ_STOCK_SIGNATURES, json.dumps(sorted(PINNED))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == PINNED


def test_patch_names_are_unique():
    names = [patch.name for patch in PATCHES]
    assert len(names) == len(set(names))


def test_execute_model_state_still_has_the_fields_prompt_hidden_states_reads():
    # The capture reads the forward pass's state that execute_model keeps for sample_tokens.
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState

    assert {"scheduler_output", "hidden_states", "aux_hidden_states"} <= set(ExecuteModelState._fields)


def test_private_vllm_apis_the_ar_stage_engine_calls_are_unchanged():
    # ARStageEngine renders prompts the way LLM.generate does, then adds them with its own request ids.
    import inspect

    from vllm.entrypoints.llm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    def names(fn) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert names(LLM._preprocess_cmpl) == ["self", "prompts", "tokenization_kwargs", "mm_processor_kwargs"]
    assert names(LLMEngine.add_request)[:4] == ["self", "request_id", "prompt", "params"]
