"""The model's own chat template, rendered on the device exactly as transformers'
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` does, without
transformers: the same sandboxed jinja2 environment (``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks`` and loop controls), the same ``raise_exception``, ``tojson`` and
``strftime_now``, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.

The template comes from ``chat_template.jinja`` beside the tokenizer, else ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used). A tokenizer
without one (like the demo family's) gets the plain layout: "role: content" lines, then "assistant:".
A prompt rendered from a template already holds its special tokens (a BOS, say), so it is encoded without
adding them again (``ChatPrompt.add_special_tokens``), as ``apply_chat_template(tokenize=True)`` does.

A render has a time limit and an output limit (``render(..., timeout_s=)``, ``MAX_RENDERED_CHARS``): the
sandbox checks its deadline at every call, attribute and item lookup and every piece of output, so a render
that runs over stops itself (``ChatTemplateError``) and a worker thread running it is free again. The API
renders in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextvars
import json
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["MAX_RENDERED_CHARS", "RENDER_TIMEOUT_S", "ChatFormat", "ChatPrompt", "ChatTemplateError",
           "load_chat_format", "plain_prompt"]

RENDER_TIMEOUT_S = 2.0             # a chat template renders in milliseconds; far beyond that it is refused
MAX_RENDERED_CHARS = 4 << 20       # the prompt a template may write (the API takes bodies up to 1 MiB)
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("chat_template_deadline", default=None)

# The attributes transformers' ``special_tokens_map`` offers a template (when set).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                  "additional_special_tokens")


class ChatTemplateError(ValueError):
    """A template that cannot be loaded, or that refuses these messages (its ``raise_exception``)."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    prompt_format: str          # "chat_template" or "plain"
    add_special_tokens: bool    # False when the template wrote them itself


def plain_prompt(messages: list[dict]) -> str:
    """"role: content" lines, then "assistant:": for models trained without a chat template."""
    lines = [f"{m.get('role', 'user')}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


@dataclass(frozen=True)
class ChatFormat:
    template: str | None                    # None: the plain layout
    special_tokens: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return "plain" if self.template is None else "chat_template"

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               timeout_s: float | None = RENDER_TIMEOUT_S) -> ChatPrompt:
        """The prompt for ``messages``; ChatTemplateError when the template refuses them, or runs past
        ``timeout_s`` (None: no limit) or ``MAX_RENDERED_CHARS``."""
        if self.template is None:
            return ChatPrompt(plain_prompt(messages), "plain", add_special_tokens=True)
        deadline = _DEADLINE.set(None if timeout_s is None else time.monotonic() + timeout_s)
        try:
            pieces, size = [], 0
            for piece in _compile(self.template).generate(messages=messages, tools=None, documents=None,
                                                          add_generation_prompt=add_generation_prompt,
                                                          **dict(self.special_tokens)):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(f"the model's chat template wrote more than {MAX_RENDERED_CHARS} "
                                            "characters for these messages")
                _check_deadline()
                pieces.append(piece)
        except jinja2.TemplateError as exc:  # raise_exception, or a template that does not fit these messages
            raise ChatTemplateError(f"the model's chat template refused the messages: {exc}") from None
        finally:
            _DEADLINE.reset(deadline)
        return ChatPrompt("".join(pieces), "chat_template", add_special_tokens=False)


def load_chat_format(tokenizer_dir: str | Path) -> ChatFormat:
    """The chat format of the tokenizer in ``tokenizer_dir``: its template and special tokens, or plain."""
    directory = Path(tokenizer_dir)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():  # transformers prefers it to tokenizer_config.json's entry
        template = template_file.read_text(encoding="utf-8")
    else:
        template = _default_template(config.get("chat_template"))
    if template is None:
        return ChatFormat(None)
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template of {directory}: {exc}") from None
    return ChatFormat(template, tuple(_special_tokens(directory, config).items()))


def _default_template(entry: object) -> str | None:
    if entry is None or isinstance(entry, str):
        return entry or None
    if isinstance(entry, list):  # [{"name": ..., "template": ...}]: transformers renders "default" without tools
        named = {item["name"]: item["template"] for item in entry}
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(f"several chat templates ({', '.join(named)}) and none named 'default'")
    raise ChatTemplateError(f"chat_template must be a string or a list of named templates, not {type(entry).__name__}")


def _token_text(value: object) -> object:
    """A special token as transformers hands it to a template: its text (AddedToken dicts included)."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(item) for item in value]
    return value


def _special_tokens(directory: Path, config: dict) -> dict[str, object]:
    values = {key: config.get(key) for key in SPECIAL_TOKENS}
    values.update(config.get("extra_special_tokens") or {})  # model-specific ones join the map (transformers 4.5x)
    legacy = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        # Older saves: special_tokens_map.json overrides the config (additional tokens are merged).
        for key, value in json.loads(legacy.read_text(encoding="utf-8")).items():
            if key == "additional_special_tokens":
                merged = list(_token_text(values.get(key)) or [])
                value = merged + [t for t in _token_text(value) if t not in merged]
            values[key] = value
    tokens = {key: _token_text(value) for key, value in values.items()}
    return {key: value for key, value in tokens.items() if value}  # special_tokens_map leaves out unset ones


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Not jinja's own tojson, which escapes HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates use to mark the assistant's
    tokens for training masks: rendered as its body, in the same call-block scope transformers gives it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _check_deadline() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError("the model's chat template ran past its time limit for these messages")


class _TimedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, checking the render's deadline at every call and lookup (a loop calls range,
    reads a message's fields), so a render that runs over stops itself wherever it is."""

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)


@cache
def _compile(template: str) -> jinja2.Template:
    environment = _TimedSandbox(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)
