"""Waveforms to bytes and files: 16-bit PCM, WAV (the standard library's ``wave``) and FLAC (soundfile)."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

from vllm_omni.audio.code2wav_request import SAMPLE_RATE

FORMATS = ("wav", "pcm16", "flac")
"""What ``encode`` writes: a WAV file, raw little-endian 16-bit samples, a FLAC file."""


def pcm16(waveform: np.ndarray) -> bytes:
    """Mono float samples in [-1, 1] (clipped) as little-endian 16-bit integers."""
    samples = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (samples * 32767.0).round().astype("<i2").tobytes()


def encode(waveform: np.ndarray, audio_format: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """``waveform`` (mono float32) in ``audio_format``, one of ``FORMATS`` (else a ValueError)."""
    if audio_format == "pcm16":
        return pcm16(waveform)
    buffer = io.BytesIO()
    if audio_format == "wav":
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(sample_rate)
            out.writeframes(pcm16(waveform))
    elif audio_format == "flac":
        import soundfile

        samples = np.asarray(waveform, dtype=np.float32).reshape(-1)
        soundfile.write(buffer, samples, sample_rate, format="FLAC")
    else:
        raise ValueError(f"audio format must be one of {list(FORMATS)}, got {audio_format!r}")
    return buffer.getvalue()


def save_wav(path: str | Path, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write ``waveform`` as a 16-bit mono WAV file; returns the path."""
    path = Path(path)
    path.write_bytes(encode(waveform, "wav", sample_rate))
    return path
