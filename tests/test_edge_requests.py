"""What the device accepts as a request: the API's body and the CLI's flags are checked by SamplingParams (the
one place the sampling ranges live), its refusal turned into a 400 (BadRequest) or exit 78 (ConfigError); a
greedy request carries no sampling. The API keeps OpenAI's temperature cap of 2 on top."""

from __future__ import annotations

import pytest

from sled_edge.__main__ import build_parser, sampling_from_args
from sled_edge.api import BadRequest, parse_request
from sled_protocol import SamplingParams
from sled_protocol.config import ConfigError

BAD_BODIES = [
    ({"temperature": 3}, "'temperature' must be in [0, 2]"),   # OpenAI's range, the API's own
    ({"temperature": -0.5}, "outside [0, 100]"),               # SamplingParams' range from here on
    ({"temperature": "hot"}, "must be numbers"),
    ({"temperature": True}, "must be numbers"),                # a bool is not a number (was accepted)
    ({"top_p": 0}, "top_p 0 is outside (0, 1]"),
    ({"top_k": -1}, "top_k -1 is outside"),
    ({"top_k": 2.5}, "must be integers"),
    ({"seed": -1}, "seed -1 is outside"),
    ({"seed": 2**63}, "outside [0, 2**63)"),
]


@pytest.mark.parametrize(("fields", "complaint"), BAD_BODIES, ids=[str(f) for f, _ in BAD_BODIES])
def test_the_api_refuses_what_sampling_params_refuses(fields, complaint):
    with pytest.raises(BadRequest) as refused:
        parse_request({"prompt": "x", **fields}, chat=False, default_max_tokens=4)
    assert complaint in str(refused.value)


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-5])
def test_a_greedy_request_carries_no_sampling(temperature):
    assert parse_request({"prompt": "x", "temperature": temperature}, chat=False, default_max_tokens=4).sampling is None


def test_a_sampled_request_keeps_its_parameters():
    sampling = parse_request({"prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 11}, chat=False,
                             default_max_tokens=4).sampling
    assert sampling == SamplingParams(0.7, 5, 0.9, 11) and not sampling.greedy


def generate_args(*flags: str):
    return build_parser().parse_args(["generate", "--draft", "d", "--prompt", "x", *flags])


@pytest.mark.parametrize(("flags", "complaint"), [
    (["--temperature", "101"], "outside [0, 100]"),
    (["--temperature", "nan"], "outside [0, 100]"),
    (["--top-p", "1.5"], "outside (0, 1]"),
    (["--top-k", "-3"], "top_k -3 is outside"),
    (["--seed", "-1"], "seed -1 is outside"),
])
def test_the_cli_refuses_what_sampling_params_refuses(flags, complaint):
    with pytest.raises(ConfigError) as refused:
        sampling_from_args(generate_args("--temperature", "0.5", *flags))
    assert complaint in str(refused.value)


def test_the_cli_is_greedy_by_default_and_samples_with_a_temperature():
    assert sampling_from_args(generate_args()) is None
    sampled = sampling_from_args(generate_args("--temperature", "0.8", "--seed", "9"))
    assert sampled == SamplingParams(0.8, 0, 1.0, 9)
