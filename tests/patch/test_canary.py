"""Canary: what the patch layer depends on in vLLM 0.32.0, pinned so a vLLM upgrade fails here, in CI.

- The signature of every vLLM callable a patch wraps or calls into, or an extension class overrides.
  The stock signatures are read in a subprocess with the layer off (in this process they are wrapped).
  Annotations are left out: names, kinds and defaults are what the wrappers depend on.
- Every attribute the worker captures and EngineCore collectors READ from vLLM objects: a dataclass,
  NamedTuple or msgspec field, a class attribute (method, property), or an attribute assigned to
  ``self`` in a method of the class or a base (found in vLLM's source), so a rename fails.
"""

import ast
import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vllm_omni.patch.patches import EXTENSIONS, PATCHES

GPU_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
CHAT = "vllm.entrypoints.openai.chat_completion"
COMPLETION = "vllm.entrypoints.openai.completion"
PINNED = {
    "importlib.metadata:version": "(distribution_name)",
    "vllm.utils.gc_utils:freeze_gc_heap": "()",
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
    "vllm.config.scheduler:SchedulerConfig.get_scheduler_cls": "(self)",
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
    f"{GPU_RUNNER}._preprocess": "(self, scheduler_output, num_input_tokens, intermediate_tensors=None)",
    f"{GPU_RUNNER}.execute_model": "(self, scheduler_output, intermediate_tensors=None)",
    f"{GPU_RUNNER}.sample_tokens": "(self, grammar_output)",
}
# Called by the captures and checks, neither wrapped nor overridden.
CALLED = {
    f"{GPU_RUNNER}.get_model": "(self)",
    "vllm.config.model:ModelConfig.get_total_num_hidden_layers": "(self)",
    "vllm.model_executor.models.interfaces:SupportsEagle3.set_aux_hidden_state_layers": "(self, layers)",
    "vllm.model_executor.models.interfaces:supports_eagle3": "(model)",
}
# What the captures (worker), collectors (EngineCore), checks and reports read: class -> attributes.
READS = {
    GPU_RUNNER: (
        "vllm_config",
        "encoder_cache",
        "requests",
        "input_batch",
        "query_start_loc",
        "execute_model_state",
        "use_aux_hidden_state_outputs",
        "device",
        "model_config",
    ),
    "vllm.v1.worker.gpu_input_batch:InputBatch": ("req_ids", "num_reqs", "num_computed_tokens_cpu"),
    "vllm.v1.worker.gpu_input_batch:CachedRequestState": (
        "mm_features",
        "num_prompt_tokens",
        "sampling_params",
        "num_computed_tokens",
    ),
    "vllm.v1.worker.gpu_model_runner:ExecuteModelState": (
        "scheduler_output",
        "hidden_states",
        "aux_hidden_states",
    ),
    "vllm.v1.worker.gpu_model_runner:AsyncGPUModelRunnerOutput": ("_model_runner_output",),
    "vllm.v1.utils:CpuGpuBuffer": ("np",),
    "vllm.multimodal.inputs:MultiModalFeatureSpec": ("mm_position", "identifier", "modality"),
    "vllm.multimodal.inputs:PlaceholderRange": ("offset",),
    "vllm.v1.core.sched.output:SchedulerOutput": ("num_scheduled_tokens", "finished_req_ids"),
    "vllm.v1.outputs:ModelRunnerOutput": ("req_ids", "req_id_to_index"),
    "vllm.v1.core.sched.scheduler:Scheduler": ("vllm_config", "requests"),
    "vllm.v1.request:Request": (
        "request_id",
        "sampling_params",
        "mm_features",
        "num_prompt_tokens",
        "max_tokens",
        "num_tokens",
    ),
    "vllm.v1.engine:EngineCoreOutputs": ("outputs",),
    "vllm.v1.engine:EngineCoreOutput": ("request_id", "finished"),
    "vllm.sampling_params:SamplingParams": ("extra_args", "stop"),
    "vllm.config:VllmConfig": (
        "model_config",
        "scheduler_config",
        "parallel_config",
        "speculative_config",
        "kv_transfer_config",
        "additional_config",
        "use_v2_model_runner",
    ),
    "vllm.config:ModelConfig": ("multimodal_config", "runner_type"),
    "vllm.config:ParallelConfig": ("pipeline_parallel_size",),
    "vllm.config:SpeculativeConfig": ("method",),
    "vllm.config:SchedulerConfig": ("scheduler_cls",),
    "vllm.v1.engine.core:EngineCore": ("scheduler",),
    "vllm.v1.worker.worker_base:WorkerBase": ("model_runner",),
    # Whether the OpenAI server's engine returns a tensor (entrypoints/openai/tensor_fields.py).
    "vllm.entrypoints.generate.base.serving:GenerateBaseServing": ("engine_client", "model_config"),
    "vllm.v1.engine.async_llm:AsyncLLM": ("vllm_config",),
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


def resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def vllm_overrides(cls: type) -> set[str]:
    """``module:qualname`` of each vLLM method that ``cls`` (one of ours) defines again (not dunders:
    an ``__init__`` of ours forwards every argument)."""
    ours = [c for c in cls.__mro__ if c.__module__.startswith("vllm_omni.")]
    vllm_bases = [c for c in cls.__mro__ if c.__module__.startswith("vllm.")]
    names = {n for c in ours for n, value in vars(c).items() if callable(value) and not n.startswith("__")}
    found = set()
    for name in names:
        owner = next((c for c in vllm_bases if name in vars(c)), None)
        if owner is not None:
            found.add(f"{owner.__module__}:{owner.__qualname__}.{name}")
    return found


def test_every_wrapped_or_overridden_callable_is_pinned():
    wrapped = {target for patch in PATCHES for target in patch.wraps}
    overridden = {target for extension in EXTENSIONS for target in extension.overrides}
    assert wrapped | overridden == set(PINNED)


@pytest.mark.parametrize("extension", EXTENSIONS, ids=lambda e: e.name)
def test_extension_classes_override_exactly_what_they_list(extension):
    for cls_path in extension.classes:
        assert vllm_overrides(resolve(cls_path)) == set(extension.overrides), cls_path


def test_stock_signatures_are_unchanged():
    pinned = {**PINNED, **CALLED}
    env = {**os.environ, "VLLM_OMNI_DISABLE_PATCHES": "1"}
    cmd = [sys.executable, "-c", READ_STOCK_SIGNATURES, json.dumps(sorted(pinned))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == pinned


def declared(cls: type) -> set[str]:
    """Fields (dataclass, NamedTuple, msgspec) and class attributes (methods, properties) of ``cls``."""
    names = {name for c in cls.__mro__ for name in vars(c)}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names | set(getattr(cls, "_fields", ())) | set(getattr(cls, "__struct_fields__", ()))


def assigned_to_self(cls: type) -> set[str]:
    """Names assigned (or annotated) as ``self.<name>`` in the methods of ``cls`` and its vLLM bases."""
    names = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm."):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass)))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for leaf in ast.walk(target) if isinstance(target, ast.AST) else ():
                    if isinstance(leaf, ast.Attribute) and getattr(leaf.value, "id", None) == "self":
                        names.add(leaf.attr)
    return names


@pytest.mark.parametrize("target", sorted(READS))
def test_attributes_the_layer_reads_still_exist(target):
    cls = resolve(target)
    missing = set(READS[target]) - declared(cls)
    if missing:
        missing -= assigned_to_self(cls)
    assert not missing, f"{target} no longer has {sorted(missing)}"


def test_patch_names_are_unique():
    names = [patch.name for patch in PATCHES]
    assert len(names) == len(set(names))


def test_private_vllm_apis_the_ar_stage_engine_calls_are_unchanged():
    # ARStageEngine renders prompts the way LLM.generate does, then adds them with its own request ids.
    from vllm.entrypoints.llm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    def names(fn) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert names(LLM._preprocess_cmpl) == ["self", "prompts", "tokenization_kwargs", "mm_processor_kwargs"]
    assert names(LLMEngine.add_request)[:4] == ["self", "request_id", "prompt", "params"]
