"""The example YAML pipeline loads into the stages its script runs."""

from pathlib import Path

from vllm_omni.config.stage import load_stage_configs

EXAMPLE = Path(__file__).parents[2] / "examples" / "offline_inference" / "omni_pipeline.yaml"


def test_the_example_yaml_describes_a_text_to_image_pipeline(monkeypatch):
    monkeypatch.setenv("OMNI_LLM", "/models/llm")
    monkeypatch.setenv("OMNI_DIT", "/models/dit")
    ar, dit = load_stage_configs(EXAMPLE)
    assert (ar.engine_type, ar.model_path, ar.output_modalities) == ("ar", "/models/llm", ["text"])
    assert ar.engine_args == {"max_model_len": 512}
    assert (dit.engine_type, dit.model_path, dit.source_stage) == ("dit", "/models/dit", 0)
    assert (dit.dit_config.num_inference_steps, dit.dit_config.height) == (8, 64)
