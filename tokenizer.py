"""The tokenizer of a Hugging Face model folder, and its chat template.

A `tokenizers.Tokenizer` read from tokenizer.json, plus what generation needs from tokenizer_config.json:
the BOS / EOS tokens and the chat template, rendered in a sandboxed Jinja environment as transformers
renders it. Nothing here depends on the rest of the project.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_json_object(file: Path) -> dict:
    """An optional JSON-object file (tokenizer_config.json, generation_config.json): {} when absent, a
    one-line error naming the file when it is not a JSON object."""
    try:
        obj = json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file} must hold a JSON object; fix or delete it")
    return obj


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception on any malformed file
            raise ValueError(f"{path / 'tokenizer.json'} is not a valid tokenizer file ({str(e)[:200]})") from None
        cfg_file = path / "tokenizer_config.json"
        cfg = read_json_object(cfg_file)
        self.config_file = cfg_file
        token = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
        self.bos_token, self.eos_token = token(cfg.get("bos_token")), token(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates: take "default"
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.add_bos = bool(cfg.get("add_bos_token", False))

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.tok.token_to_id(self.eos_token)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids; BOS first where the tokenizer adds one (bos=False: a continuation of earlier text)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text is not valid UTF-8 (undecodable bytes in the prompt or its file)") from None
        # Special tokens written in the text (from a chat template) are parsed as such.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        bos_id = None if self.bos_token is None else self.tok.token_to_id(self.bos_token)
        return [bos_id] + ids if bos and self.add_bos and bos_id is not None and ids[:1] != [bos_id] else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, prompt: str, system: str | None = None) -> str:
        """The prompt as the model's own chat template renders it (a sandboxed Jinja environment, as
        transformers does); without a template, a plain "User: / Assistant:" layout."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.render_messages(messages)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A whole conversation ({"role", "content"} dicts) as the chat template renders it."""
        if not self.chat_template:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return text + ("Assistant:" if add_generation_prompt else "")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"the chat template in {self.config_file} refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "")
        except (TemplateError, TypeError, OverflowError, AttributeError, KeyError, IndexError, ZeroDivisionError,
                RecursionError, MemoryError) as e:  # SecurityError is a TemplateError
            raise ValueError(f"the chat template in {self.config_file} failed ({type(e).__name__}: "
                             f"{str(e)[:200]}); fix the template, or pass --no-chat where the command has it") from None


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)


class TextStream:
    """Prints generated text as it comes, decoding the whole tail so multi-byte characters that span
    tokens are printed only once complete. Usable as a generation hook (see reasonalloc.generate)."""

    def __init__(self, tokenizer: Tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def put(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def __call__(self, step, token, logits, cache):
        if token is not None:  # step 0 is the prompt
            self.put(token)
