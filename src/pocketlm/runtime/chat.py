"""``pocketlm chat``: a terminal chat through the model's chat template, on llama.cpp for GGUF
files and on transformers otherwise. Replies stream as they are generated (greedy)."""
from __future__ import annotations

import sys


def _lines():
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            return
        yield line


def run(model: str, max_tokens: int, system: str | None, threads: int | None) -> None:
    from .. import models

    src = models.resolve(model)
    messages = [{"role": "system", "content": system}] if system else []
    reply = _llama_reply(src.describe(), threads) if model.endswith(".gguf") else _hf_reply(model)
    if sys.stdin.isatty():
        print("(empty line or Ctrl-D to end)", file=sys.stderr)
    for line in _lines():
        messages.append({"role": "user", "content": line})
        text = []
        for piece in reply(messages, max_tokens):
            text.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(text)})


def _llama_reply(path: str, threads: int | None):
    from .llamacpp import load

    llm = load(path, n_ctx=4096, threads=threads, logits_all=False)

    def reply(messages, max_tokens):
        for part in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True):
            delta = part["choices"][0]["delta"].get("content")
            if delta:
                yield delta

    return reply


def _hf_reply(spec: str):
    import threading

    from transformers import TextIteratorStreamer

    from .. import models

    model, tok, _ = models.load(spec)

    def reply(messages, max_tokens):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        t = threading.Thread(target=model.generate, kwargs=kw)
        t.start()
        yield from streamer
        t.join()

    return reply
