"""The multimodal Qwen3 folder builder: layout, config, tokenizer, projectors (random or trained), errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from vllm_omni.config.multimodal_qwen3 import modalities_from_config
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.transformers_utils.multimodal_qwen3 import MultimodalQwen3HF
from vllm_omni.transformers_utils.multimodal_qwen3_builder import (
    PROJECTORS_FILE,
    build_multimodal_qwen3,
    main,
)


@pytest.fixture(scope="module")
def qwen3() -> str:
    return tiny_model_path("qwen3")


def test_cli_builds_a_folder_with_placeholders_and_projectors(tmp_path, qwen3):
    out = tmp_path / "mm"
    cmd = [sys.executable, "-m", "vllm_omni.transformers_utils.multimodal_qwen3_builder", "--base", qwen3,
           "--out", str(out), "--modality", "speech=12", "--modality", "sensor=5",
           "--projector-hidden-size", "8"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MultimodalQwen3ForCausalLM"] and config["model_type"] == "qwen3"
    specs = modalities_from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, width in (("speech", 12), ("sensor", 5)):
        assert specs[name].input_width == width and specs[name].hidden_size == 8
        assert tokenizer.convert_tokens_to_ids(f"<|{name}|>") == specs[name].placeholder_id
        assert specs[name].placeholder_id < config["vocab_size"]  # grew the vocabulary to fit
    ids = tokenizer("a<|speech|>b<|sensor|>").input_ids
    assert specs["speech"].placeholder_id in ids and specs["sensor"].placeholder_id in ids
    weights = load_file(out / PROJECTORS_FILE)
    assert weights["multi_modal_projectors.speech.linear_1.weight"].shape == (8, 12)
    assert weights["multi_modal_projectors.sensor.linear_2.weight"].shape == (64, 8)
    # The base LM weights are kept under their names: transformers loads the LM with no missing key.
    model = MultimodalQwen3HF.from_pretrained(out)
    assert model.lm.get_input_embeddings().weight.shape[0] == config["vocab_size"]


def test_trained_projectors_round_trip(tmp_path, qwen3):
    first = build_multimodal_qwen3(qwen3, tmp_path / "a", {"speech": 12}, projector_hidden_size=8, seed=1)
    trained = MultimodalQwen3HF.from_pretrained(first)
    with torch.no_grad():
        for p in trained.multi_modal_projectors.parameters():
            p.add_(1.0)
    save_file(trained.projector_state_dict(), tmp_path / "trained.safetensors")
    second = build_multimodal_qwen3(
        qwen3, tmp_path / "b", {"speech": 12}, projectors=tmp_path / "trained.safetensors"
    )
    reloaded = MultimodalQwen3HF.from_pretrained(second).projector_state_dict()
    for key, value in trained.projector_state_dict().items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)


def test_sharded_checkpoint_with_vocabulary_room(tmp_path, qwen3):
    """Like a hub Qwen3: vocabulary padded past the tokenizer, weights in shards listed by an index."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    base = tmp_path / "sharded"
    model = Qwen3ForCausalLM.from_pretrained(qwen3)
    model.resize_token_embeddings(512)
    model.save_pretrained(base, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(qwen3).save_pretrained(base)
    assert len(list(base.glob("model-*.safetensors"))) > 1
    out = build_multimodal_qwen3(base, tmp_path / "mm", {"speech": 12}, seed=0)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["multi_modal_projectors.speech.linear_2.bias"] == PROJECTORS_FILE
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512  # the placeholder fit in the padding: no resize
    assert MultimodalQwen3HF.from_pretrained(out).lm.get_input_embeddings().weight.shape[0] == 512


@pytest.mark.parametrize(
    ("modalities", "kwargs", "message"),
    [
        ({}, {}, "give at least one name=width"),
        ({"2d": 4}, {}, "modality name '2d' is not allowed"),
        ({"audio_embeds": 4}, {}, "modality name 'audio_embeds' is reserved by vLLM"),
        ({"model_id": 4}, {}, "modality name 'model_id' is reserved by vLLM"),
        ({"speech": 0}, {}, "input width must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, qwen3, modalities, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_multimodal_qwen3(qwen3, tmp_path / "mm", modalities, **kwargs)


def test_projectors_file_must_match_the_modalities(tmp_path, qwen3):
    names = [f"multi_modal_projectors.speech.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    weights = {name: torch.zeros(2, 2) for name in names}
    save_file(weights, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"missing \['multi_modal_projectors.sensor.linear_1.bias'"):
        build_multimodal_qwen3(
            qwen3, tmp_path / "mm", {"speech": 2, "sensor": 2}, projectors=tmp_path / "p.safetensors"
        )
    with pytest.raises(
        ValueError, match=r"projector 'speech' maps 2 -> 2 -> 2, expected input width 2 and output 64"
    ):
        build_multimodal_qwen3(qwen3, tmp_path / "mm", {"speech": 2}, projectors=tmp_path / "p.safetensors")


def test_base_must_be_qwen3(tmp_path):
    with pytest.raises(ValueError, match="is a 'llava' checkpoint; the base must be a Qwen3 folder"):
        build_multimodal_qwen3(tiny_model_path("llava"), tmp_path / "mm", {"speech": 2})


def test_cli_rejects_malformed_modalities(capsys, tmp_path):
    for argv, message in (
        (["--modality", "speech"], "--modality expects NAME=WIDTH"),
        (["--modality", "a=1", "--modality", "a=2"], "--modality names must be unique"),
    ):
        with pytest.raises(SystemExit):
            main(["--base", "x", "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (None, "needs a non-empty 'multimodal_projectors' dict"),
        ({"a b": {}}, "modality name 'a b' is not allowed"),
        ({"speech": {"input_width": 4}}, r"multimodal_projectors.speech: .*missing"),
        ({"speech": {"input_width": -1, "hidden_size": 2, "placeholder": "<|speech|>", "placeholder_id": 3}},
         r"multimodal_projectors.speech.input_width must be an integer >= 1, got -1"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(entry, message):
    with pytest.raises(ValueError, match=message):
        modalities_from_config({} if entry is None else {"multimodal_projectors": entry})
