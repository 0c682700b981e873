"""The model's chat template on the device: rendered as transformers' ``apply_chat_template(messages,
tokenize=False, add_generation_prompt=True)`` renders it, without transformers.

The templates are written out here in the styles real models ship (Qwen2.5's ChatML with a default system
prompt, Llama 3, a Llama 3.2-style one that dates itself with ``strftime_now`` and defaults its system prompt,
a Mistral-style one that refuses roles out of turn with ``raise_exception`` and marks ``{% generation %}``).
The renderer is checked against literal expected strings, so this file runs in an edge-only environment;
the last test (skipped without transformers) checks those strings are what transformers itself renders,
with the sled tiny tokenizer's own special tokens and with real special tokens added to it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from sled_edge.chat_template import MAX_RENDERED_CHARS, ChatTemplateError, load_chat_format

CHATML_QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header"
    "_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if"
    ' loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if'
    " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

LLAMA32_DATED = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_STRICT = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
    {%- if loop.last %}{{- ' ' + (message | tojson) }}{%- endif %}
{%- endfor %}
"""

CHAT = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": 'Sort a list <b>fast</b> & "well"'},
        {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "And in reverse? é→"}]
ALONE = [{"role": "user", "content": "hi"}]
LLAMA_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
# name: (template, the special tokens it is saved with, {messages name: what transformers renders}).
# "{today}" stands for strftime_now("%d %b %Y") at render time.
CASES = {
    "chatml_qwen25": (CHATML_QWEN25, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {
        "chat": "<|im_start|>system\nAnswer in Python.<|im_end|>\n<|im_start|>user\nSort a list <b>fast</b> & \"well\"<|im_end|>\n"
                "<|im_start|>assistant\nsorted(xs)<|im_end|>\n<|im_start|>user\nAnd in reverse? é→<|im_end|>\n<|im_start|>assistant\n",
        "alone": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}),
    "llama3": (LLAMA3, LLAMA_TOKENS, {
        "chat": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in Python.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nSort a list <b>fast</b> & \"well\"<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nsorted(xs)<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd in reverse? é→<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "alone": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"}),
    "llama32_system_default": (LLAMA32_DATED, LLAMA_TOKENS, {
        "chat": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                "Today Date: {today}\n\nAnswer in Python.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                "Sort a list <b>fast</b> & \"well\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nsorted(xs)<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd in reverse? é→<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "alone": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                 "Today Date: {today}\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"}),
    "mistral_strict": (MISTRAL_STRICT, {"bos_token": "<s>", "eos_token": "</s>"}, {
        "chat": "<s> [INST] Answer in Python.\n\nSort a list <b>fast</b> & \"well\" [/INST] sorted(xs)</s> [INST] And in reverse? é→ "
                "[/INST] {\"role\": \"user\", \"content\": \"And in reverse? é→\"}",
        "alone": "<s> [INST] hi [/INST] {\"role\": \"user\", \"content\": \"hi\"}"}),
}
MESSAGES = {"chat": CHAT, "alone": ALONE}


def expected(text: str) -> str:
    return text.replace("{today}", datetime.now().strftime("%d %b %Y"))


def saved_tokenizer(directory: Path, template: str | None, special: dict, as_jinja: bool = False, **config) -> Path:
    """A tokenizer directory's template and special tokens as transformers 4.5x saves them (AddedToken dicts)."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = {key: {"content": value, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} if key == "bos_token" else value for key, value in special.items()}
    saved = {"added_tokens_decoder": {}, "tokenizer_class": "PreTrainedTokenizerFast", **entries, **config}
    if template is not None and as_jinja:
        (directory / "chat_template.jinja").write_text(template)
    elif template is not None:
        saved["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(saved))
    return directory


@pytest.mark.parametrize("as_jinja", [False, True], ids=["tokenizer_config", "chat_template_jinja"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_templates_render_as_transformers_does(case, as_jinja, tmp_path):
    template, special, goldens = CASES[case]
    chat_format = load_chat_format(saved_tokenizer(tmp_path, template, special, as_jinja))
    assert chat_format.name == "chat_template"
    for name, messages in MESSAGES.items():
        prompt = chat_format.render(messages)
        assert prompt.text == expected(goldens[name]), (case, name)
        assert prompt.prompt_format == "chat_template" and prompt.add_special_tokens is False


def test_a_tokenizer_without_a_template_gets_the_plain_layout(tmp_path):
    chat_format = load_chat_format(saved_tokenizer(tmp_path, None, LLAMA_TOKENS))
    prompt = chat_format.render(ALONE + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])
    assert chat_format.name == prompt.prompt_format == "plain" and prompt.add_special_tokens
    assert prompt.text == "user: hi\nassistant: hello\nuser: more\nassistant:"
    assert load_chat_format(tmp_path / "no-such-dir").name == "plain"  # no tokenizer_config.json at all


def test_a_template_that_refuses_the_messages_is_a_chat_template_error(tmp_path):
    chat_format = load_chat_format(saved_tokenizer(tmp_path, MISTRAL_STRICT, {"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        chat_format.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_template_runs_in_a_sandbox(tmp_path):
    """It can neither change the caller's messages nor reach Python internals."""
    mutating = "{{ messages.append({'role': 'x', 'content': 'y'}) }}{{ messages | length }}"
    with pytest.raises(ChatTemplateError):
        load_chat_format(saved_tokenizer(tmp_path / "a", mutating, {})).render(ALONE)
    escaping = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        load_chat_format(saved_tokenizer(tmp_path / "b", escaping, {})).render(ALONE)
    assert ALONE == [{"role": "user", "content": "hi"}]


def test_a_render_stops_at_its_time_limit_and_its_size_limit(tmp_path):
    """A render that would run for hours (no output, no end) stops itself at its deadline, so the worker thread
    running it is free again; one that writes too much stops at MAX_RENDERED_CHARS."""
    endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
               "{% endfor %}{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="time limit"):
        load_chat_format(saved_tokenizer(tmp_path / "a", endless, {})).render(ALONE, timeout_s=0.1)
    huge = "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=f"more than {MAX_RENDERED_CHARS}"):
        load_chat_format(saved_tokenizer(tmp_path / "b", huge, {})).render([{"role": "user", "content": "x" * 100}])


def test_named_templates_and_legacy_special_tokens(tmp_path):
    """A list of named templates renders "default"; an old save's special_tokens_map.json overrides the config."""
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}|{{ eos_token }}|"
                                                                                     "{{ additional_special_tokens | join(',') }}"}]
    directory = tmp_path / "legacy"
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": "<old>",
                                                                 "additional_special_tokens": ["<a>"]}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<new>"}, "eos_token": "</e>",
                                                                   "additional_special_tokens": ["<a>", "<b>"]}))
    assert load_chat_format(directory).render(ALONE).text == "<new>|</e>|<a>,<b>"
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_format(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ChatTemplateError):
        load_chat_format(directory)


@pytest.fixture
def tiny_tokenizer_dir(request) -> Path:
    """The sled tiny tokenizer (needs the full install: skipped in an edge-only environment)."""
    pytest.importorskip("transformers")
    return request.getfixturevalue("tiny_models").target


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_expected_strings_are_what_transformers_renders(case, tiny_tokenizer_dir, tmp_path):
    """With the sled tiny tokenizer given the template (and the template's special tokens added to it): our
    text is transformers' text, and its token ids are ``apply_chat_template(tokenize=True)``'s."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    template, special, goldens = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = template
    for as_jinja in (True, False):
        saved = tmp_path / f"jinja-{as_jinja}"
        tokenizer.save_pretrained(saved, save_jinja_files=as_jinja)
        assert (saved / "chat_template.jinja").is_file() == as_jinja
        ours = load_chat_format(saved)
        for name, messages in MESSAGES.items():
            theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt = ours.render(messages)
            assert prompt.text == theirs == expected(goldens[name]), (case, name)
            ids = Tokenizer.from_file(str(saved / "tokenizer.json")).encode(prompt.text, add_special_tokens=False).ids
            assert ids == tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    # The tiny tokenizer's own special tokens (bos = eos = <|endoftext|>), nothing added.
    own = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    own.chat_template = LLAMA3
    own.save_pretrained(tmp_path / "own")
    assert load_chat_format(tmp_path / "own").render(CHAT).text == own.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)
    assert load_chat_format(tiny_tokenizer_dir).name == "plain"  # as built: no template
