"""A tiny byte-level BPE tokenizer, trained with ``tokenizers`` on a few sentences, with a ChatML template.

Every tiny checkpoint shares it, so their prompts tokenize the same way.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A beautiful landscape with mountains, a lake and a red sunset.",
    "Describe the image in one sentence.",
    "What is the capital of France? Paris is the capital of France.",
    "vLLM serves large language models with paged attention and continuous batching.",
    "Diffusion transformers denoise latents step by step to draw an image.",
    "The cat sat on the mat. The dog ran in the park. Hello, world!",
    "user assistant system: you are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
)

# ChatML, the format of Qwen chat models; a list content renders image parts as the image token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(extra_special_tokens: tuple[str, ...] = (), vocab_size: int = 512):
    """Train the tiny BPE tokenizer; ``extra_special_tokens`` (e.g. ``"<image>"``) are kept whole."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(extra_special_tokens),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
