"""Train the projectors of a multimodal Qwen3 (LM frozen) on a synthetic task, then serve them with vLLM.

The task needs the embeddings: K classes, each a random prototype item of ``rows x width`` in the
modality's width; an input is its class's prototype plus Gaussian noise. The prompt
``"<|audio|> Which word?"`` carries the item at its placeholder and the answer is the class's word, one token
of the tokenizer (``" cat"``, ``" dog"``...), so the greedy next token after the prompt is the prediction.

Steps: build a folder with random (seeded) projectors from ``--base``; load it with transformers
(``MultimodalQwen3HF``), freeze the LM and train the projector with Adam on the cross-entropy of the
answer token at the last position; save the projector with safetensors and build a second folder with
``build_multimodal_qwen3(..., projectors=saved_file)``; measure the greedy 1-token accuracy on a held-out
set through vLLM for both folders (BEFORE and AFTER training) and through transformers after training.

Usage (the defaults take about a minute on 2 CPU cores with the tiny random Qwen3: seconds of training,
the rest is two vLLM engine starts)::

    .venv/bin/python examples/training/train_projectors.py [--base QWEN3_DIR] [--out DIR] \\
        [--modality audio=24] [--classes 8] [--steps 300] [--lr 3e-3] [--seed 0]

Prints the task, the training loss every 50 steps, then (defaults)::

    accuracy on 128 held-out items (chance 1/8 = 0.125):
      vLLM, random projectors (before): 0.000
      vLLM, trained projectors (after):  1.000
      transformers, trained (after):     1.000
      vLLM and transformers predict the same token for 1.000 of the items

Before training the random projectors make the LM answer with none of the K words, hence 0 rather than
1/K. With the tiny random LM the loss only gets down to about 5.2 (ln of the vocabulary size is 6.2): its
logits span about +-1, so the answer wins the argmax by tenths of a logit, not by a wide margin.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from vllm_omni.config.multimodal_qwen3 import placeholder_text
from vllm_omni.testing.tiny_models import tiny_model_path
from vllm_omni.transformers_utils.multimodal_qwen3 import MultimodalQwen3HF
from vllm_omni.transformers_utils.multimodal_qwen3_builder import build_multimodal_qwen3

QUESTION = " Which word?"
"""Text after the placeholder; the answer word (with its leading space) is the next token."""
CANDIDATE_WORDS = (
    " cat", " dog", " fox", " lake", " red", " park", " mat", " brown",
    " quick", " lazy", " sunset", " mountains", " image", " world", " Paris",
)  # fmt: skip
"""Answer words, in order of preference; only those that are a single token of the tokenizer are used."""


@dataclass
class Task:
    """K classes, each a prototype item ``(rows, width)``; an input is a prototype plus noise."""

    prototypes: torch.Tensor
    """``(classes, rows, width)``."""
    words: list[str]
    """The answer word of each class."""
    answer_ids: torch.Tensor
    """``(classes,)``: the token id of each class's word."""
    noise: float
    """Standard deviation of the Gaussian noise added to the prototype."""

    def sample(self, num_items: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_items`` inputs ``(num_items, rows, width)`` and their class labels ``(num_items,)``."""
        labels = torch.randint(len(self.words), (num_items,), generator=generator)
        noise = torch.randn((num_items, *self.prototypes.shape[1:]), generator=generator)
        return self.prototypes[labels] + self.noise * noise, labels


def single_token_words(tokenizer, num_words: int) -> list[str]:
    """The first ``num_words`` of ``CANDIDATE_WORDS`` that the tokenizer keeps as one token."""
    words = [w for w in CANDIDATE_WORDS if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    if len(words) < num_words:
        raise ValueError(f"--classes {num_words}: the tokenizer has only {len(words)} one-token answer words")
    return words[:num_words]


def make_task(tokenizer, classes: int, rows: int, width: int, noise: float, seed: int) -> Task:
    """A seeded task with ``classes`` classes of ``rows x width`` items."""
    words = single_token_words(tokenizer, classes)
    answer_ids = torch.tensor([tokenizer.encode(w, add_special_tokens=False)[0] for w in words])
    prototypes = torch.randn((classes, rows, width), generator=torch.Generator().manual_seed(seed))
    return Task(prototypes, words, answer_ids, noise)


def last_logits(model: MultimodalQwen3HF, modality: str, prompt_ids: list[int], items: torch.Tensor):
    """``(num_items, vocab)``: the LM's logits after the prompt, one item per prompt."""
    expanded = model.expand_placeholders(prompt_ids, {modality: [items[0]]})
    # One call for the batch: the prompts back to back pair with the items in order, then split per item.
    embeds = model.inputs_embeds(expanded * len(items), {modality: list(items)})
    return model.lm(inputs_embeds=embeds.view(len(items), len(expanded), -1)).logits[:, -1]


def train(model, task: Task, modality: str, prompt_ids: list[int], args) -> None:
    """Adam on the projector only: cross-entropy of the answer token at the last position."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than two on a busy CPU
    try:
        _train(model, task, modality, prompt_ids, args)
    finally:
        torch.set_num_threads(threads)


def _train(model, task: Task, modality: str, prompt_ids: list[int], args) -> None:
    model.lm.requires_grad_(False)
    params = list(model.multi_modal_projectors.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        items, labels = task.sample(args.batch_size, generator)
        logits = last_logits(model, modality, prompt_ids, items)
        loss = torch.nn.functional.cross_entropy(logits, task.answer_ids[labels])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}")


@torch.no_grad()
def transformers_predictions(model, modality: str, prompt_ids: list[int], items) -> torch.Tensor:
    """``(num_items,)``: the greedy next token after the prompt with each item, by transformers."""
    return last_logits(model, modality, prompt_ids, items).argmax(-1)


def vllm_predictions(folder: Path, modality: str, prompt: str, items) -> torch.Tensor:
    """``(num_items,)``: the greedy next token after the prompt with each item, by vLLM serving ``folder``."""
    from vllm import LLM, SamplingParams

    # enforce_eager: no graph compilation, which costs more than it saves for one short batch
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=1 << 28,
        enforce_eager=True,
    )
    try:
        requests = [
            {"prompt": prompt, "multi_modal_data": {"multimodal_embeddings": {modality: [item]}}}
            for item in items
        ]
        outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return torch.tensor([output.outputs[0].token_ids[0] for output in outputs])


def _modality(text: str) -> tuple[str, int]:
    name, sep, width = text.partition("=")
    if not sep or not width.isdigit() or int(width) < 1:
        raise argparse.ArgumentTypeError(f"--modality expects NAME=WIDTH (e.g. audio=24), got {text!r}")
    return name, int(width)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=None, help="a Qwen3 folder (default: the tiny random Qwen3)")
    parser.add_argument("--out", default=None, help="where the folders go (default: a temporary directory)")
    parser.add_argument(
        "--modality", type=_modality, default=("audio", 24), metavar="NAME=WIDTH", help="default: audio=24"
    )
    parser.add_argument("--classes", type=int, default=8, help="number of classes (answer words)")
    parser.add_argument("--rows", type=int, default=4, help="positions per item (rows of the 2-D item)")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the noise added to a prototype")
    parser.add_argument("--projector-hidden-size", type=int, default=64, help="projector hidden width")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="items per training step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--num-eval", type=int, default=128, help="held-out items")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, projectors and data")
    args = parser.parse_args(argv)
    for name in ("classes", "rows", "projector_hidden_size", "steps", "batch_size", "num_eval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the accuracies ``vllm_before``, ``vllm_after``, ``hf_after`` and the share
    of items on which vLLM and transformers predict the same token after training (``agreement``)."""
    args = parse_args(argv)
    base = args.base or tiny_model_path("qwen3")
    out = Path(args.out or tempfile.mkdtemp(prefix="train_projectors_"))
    modality, width = args.modality
    random_folder = build_multimodal_qwen3(
        base, out / "random", {modality: width}, args.projector_hidden_size, seed=args.seed
    )
    model = MultimodalQwen3HF.from_pretrained(random_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(random_folder)
    task = make_task(tokenizer, args.classes, args.rows, width, args.noise, args.seed)
    prompt = placeholder_text(modality) + QUESTION
    prompt_ids = tokenizer.encode(prompt)
    print(f"task: {args.classes} classes {task.words}, items {args.rows} x {width}, noise {args.noise}")
    print(f"prompt {prompt!r} ({len(prompt_ids)} tokens; the placeholder takes {args.rows} positions)")

    start = time.perf_counter()
    train(model, task, modality, prompt_ids, args)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    projectors = out / "projectors.safetensors"
    save_file(model.projector_state_dict(), str(projectors), metadata={"format": "pt"})
    trained_folder = build_multimodal_qwen3(
        base, out / "trained", {modality: width}, projectors=projectors, seed=args.seed
    )

    items, labels = task.sample(args.num_eval, torch.Generator().manual_seed(args.seed + 2))
    answers = task.answer_ids[labels]
    before = vllm_predictions(random_folder, modality, prompt, items)
    after = vllm_predictions(trained_folder, modality, prompt, items)
    hf_after = transformers_predictions(model, modality, prompt_ids, items)
    accuracies = {
        "vllm_before": _share(before == answers),
        "vllm_after": _share(after == answers),
        "hf_after": _share(hf_after == answers),
        "agreement": _share(after == hf_after),
    }
    report(accuracies, args.num_eval, args.classes)
    print(f"folders: {random_folder} (before), {trained_folder} (after)")
    return accuracies


def report(accuracies: dict[str, float], num_eval: int, classes: int) -> None:
    """Print the accuracies of ``main``."""
    print(f"accuracy on {num_eval} held-out items (chance 1/{classes} = {1 / classes:.3f}):")
    print(f"  vLLM, random projectors (before): {accuracies['vllm_before']:.3f}")
    print(f"  vLLM, trained projectors (after):  {accuracies['vllm_after']:.3f}")
    print(f"  transformers, trained (after):     {accuracies['hf_after']:.3f}")
    print(f"  vLLM and transformers predict the same token for {accuracies['agreement']:.3f} of the items")


def _share(hits: torch.Tensor) -> float:
    return hits.float().mean().item()


if __name__ == "__main__":
    main()
