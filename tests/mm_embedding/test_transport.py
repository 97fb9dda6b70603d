"""The embedding crosses EngineCore -> frontend through vLLM's own msgpack, zero-copy; off is stock."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import vllm.v1.engine as engine_types
from vllm import SamplingParams
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from tests.utils import image_request, random_image
from vllm_omni.v1.engine.outputs import MMEmbeddingOutput, OmniEngineCoreOutput, OmniEngineCoreOutputs

StockOutput, StockOutputs = OmniEngineCoreOutput.__mro__[1], OmniEngineCoreOutputs.__mro__[1]


def outputs_with(embedding: MMEmbeddingOutput | None, output_cls=OmniEngineCoreOutput, outputs_cls=None):
    extra = {} if embedding is None else {"mm_embedding": embedding}
    output = output_cls(request_id="req-0", new_token_ids=[7, 8], **extra)
    return (outputs_cls or engine_types.EngineCoreOutputs)(outputs=[output], timestamp=1.0)


def test_vllm_hands_out_the_subclasses():
    assert engine_types.EngineCoreOutput is OmniEngineCoreOutput
    assert engine_types.EngineCoreOutputs is OmniEngineCoreOutputs


def test_roundtrip_sends_the_tensor_out_of_band_without_copy():
    embedding = torch.randn(16, 64)
    message = outputs_with(MMEmbeddingOutput(embedding, ["image"], [0], [16]))
    buffers = MsgpackEncoder().encode(message)
    assert len(buffers) == 2, "the tensor should travel as its own buffer"
    address = np.frombuffer(buffers[1], dtype=np.uint8).ctypes.data
    assert address == embedding.data_ptr(), "the buffer should be the tensor's memory, not a copy"

    decoded = MsgpackDecoder(engine_types.EngineCoreOutputs).decode(buffers).outputs[0]
    assert isinstance(decoded, OmniEngineCoreOutput)
    assert torch.equal(decoded.mm_embedding.embedding, embedding)
    assert decoded.mm_embedding.items()[0].length == 16


def test_a_stock_decoder_reads_the_new_payload():
    message = outputs_with(MMEmbeddingOutput(torch.ones(16, 64), ["image"], [0], [16]))
    decoded = MsgpackDecoder(StockOutputs).decode(MsgpackEncoder().encode(message)).outputs[0]
    assert decoded.request_id == "req-0" and decoded.new_token_ids == [7, 8]


def test_without_embedding_the_message_is_stock_plus_one_nil_per_field():
    # msgspec writes array_like structs in full, so each extra field costs one nil byte per output.
    num_extra = len(OmniEngineCoreOutput.__struct_fields__) - len(StockOutput.__struct_fields__)
    assert num_extra == 3  # mm_embedding, prompt_hidden_states, hidden_states
    (ours,) = MsgpackEncoder().encode(outputs_with(None))
    (stock,) = MsgpackEncoder().encode(outputs_with(None, StockOutput, StockOutputs))
    assert len(ours) == len(stock) + num_extra
    decoded = MsgpackDecoder(StockOutputs).decode(ours)
    assert decoded == MsgpackDecoder(StockOutputs).decode(stock)


STOCK_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from tests.utils import image_request, random_image
if __name__ == "__main__":
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True)
    requests = [image_request(random_image(60)), "plain text", image_request(random_image(61))]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    print("RESULT" + json.dumps([[o.prompt_token_ids, list(o.outputs[0].token_ids), o.outputs[0].text]
                                 for o in outputs]))
"""


@pytest.mark.engine
def test_feature_off_generates_exactly_what_stock_vllm_generates(llava_llm, llava_path):
    env = {**os.environ, "VLLM_OMNI_DISABLE_PATCHES": "1"}
    result = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, llava_path], capture_output=True, text=True, env=env
    )
    line = [row for row in result.stdout.splitlines() if row.startswith("RESULT")]
    assert line, result.stderr[-3000:]
    stock = json.loads(line[0][len("RESULT") :])
    requests = [image_request(random_image(60)), "plain text", image_request(random_image(61))]
    ours = llava_llm.generate(requests, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [[o.prompt_token_ids, list(o.outputs[0].token_ids), o.outputs[0].text] for o in ours] == stock
