"""Chat with an omni server's ar pipeline with the official openai client: one answer, then one streamed.

Start a server first, e.g. on the tiny random Qwen3 (no download; it answers gibberish):
    python -m vllm_omni.testing.tiny_models --out tiny qwen3
    vllm serve tiny/qwen3 --omni --max-model-len 512
then:
    python examples/online_serving/omni_chat_client.py --url http://localhost:8000
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--prompt", default="Name three colours.")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
    print(f"answer: {answer.choices[0].message.content!r} ({answer.usage.completion_tokens} tokens)")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    print(f"streamed in {len(pieces)} chunks: {''.join(pieces)!r}")


if __name__ == "__main__":
    main()
