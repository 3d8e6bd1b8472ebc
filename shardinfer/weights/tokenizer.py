"""Tokenizers (through the `tokenizers` library) and chat templates (through jinja2).

Built from a Hugging Face directory's tokenizer.json, or from a GGUF file's metadata.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

Message = dict[str, Any]


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment settings transformers uses for chat templates.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    return env.from_string(source)


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        prepend_bos_id: int | None = None,
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        # GGUF tokenizers have no post-processor; they say in metadata whether to add BOS.
        self._prepend_bos_id = prepend_bos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos_id is not None:
            ids = [self._prepend_bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise ValueError(
                "this model's tokenizer has no chat template; pass raw prompts instead"
            )
        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as e:  # the template refused these messages
            raise ValueError(f"the chat template refused the conversation: {e}") from e

    def save(self, directory: Path) -> None:
        """Writes tokenizer.json and tokenizer_config.json, which `from_hf_dir` reads back."""
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "shardinfer_prepend_bos_id": self._prepend_bos_id,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer | None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        jinja_path = directory / "chat_template.jinja"  # where transformers 5 saves it
        if jinja_path.is_file():
            template = jinja_path.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        return cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            chat_template=template,
            prepend_bos_id=config.get("shardinfer_prepend_bos_id"),
        )

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        fields = gguf_file.fields
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE, 'gpt2')"
            )
        tokens = gguf_file.array_field("tokenizer.ggml.tokens")
        merges = gguf_file.array_field("tokenizer.ggml.merges") or []
        types = gguf_file.array_field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        backend = tokenizers.Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if fields.get("tokenizer.ggml.pre") == "smollm":
            # SmolLM's own tokenizer.json splits digits one by one before the byte-level regex.
            byte_level = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        # Control tokens (type 3) are special: never split, skipped when decoding.
        backend.add_special_tokens(
            [
                tokenizers.AddedToken(t, special=True)
                for t, k in zip(tokens, types, strict=True)
                if k == 3
            ]
        )
        backend.add_tokens(
            [
                tokenizers.AddedToken(t, special=False)
                for t, k in zip(tokens, types, strict=True)
                if k == 4
            ]
        )

        def token(key: str) -> str | None:
            i = fields.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos_id = fields.get("tokenizer.ggml.bos_token_id")
        return cls(
            backend,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            chat_template=fields.get("tokenizer.chat_template"),
            prepend_bos_id=bos_id if fields.get("tokenizer.ggml.add_bos_token") else None,
        )


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"message {i}: 'role' and 'content' must be strings")
