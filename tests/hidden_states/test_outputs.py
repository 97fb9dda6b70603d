"""The field on the way out: msgpack transport (zero-copy) and merged streaming outputs."""

import numpy as np
import torch
import vllm.v1.engine as engine_types
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder


def test_engine_core_output_carries_it_out_of_band_without_copy():
    hidden_states = torch.randn(17, 64)
    output = engine_types.EngineCoreOutput(
        request_id="r", new_token_ids=[1], prompt_hidden_states=hidden_states
    )
    buffers = MsgpackEncoder().encode(engine_types.EngineCoreOutputs(outputs=[output]))
    assert len(buffers) == 2
    assert np.frombuffer(buffers[1], dtype=np.uint8).ctypes.data == hidden_states.data_ptr()
    decoded = MsgpackDecoder(engine_types.EngineCoreOutputs).decode(buffers).outputs[0]
    assert torch.equal(decoded.prompt_hidden_states, hidden_states) and decoded.mm_embedding is None


def completion(prompt_hidden_states=None) -> CompletionOutput:
    return CompletionOutput(0, "a", [1], None, None, prompt_hidden_states=prompt_hidden_states)


def request_output(completion_output: CompletionOutput) -> RequestOutput:
    return RequestOutput("r", "p", [5, 6], None, [completion_output], finished=False)


def test_merged_streaming_outputs_keep_it():
    hidden_states = torch.randn(2, 64)
    merged = request_output(completion())
    merged.add(request_output(completion(hidden_states)), aggregate=True)
    assert merged.outputs[0].prompt_hidden_states is hidden_states
    merged.add(request_output(completion()), aggregate=True)  # later deltas carry none: still kept
    assert merged.outputs[0].prompt_hidden_states is hidden_states
