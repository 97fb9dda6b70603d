"""Audio stages: ``code2wav`` (Qwen2.5-Omni's token2wav: codec tokens -> DiT mel -> BigVGAN waveform)."""
