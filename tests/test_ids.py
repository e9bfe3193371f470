"""Golden tests for synth/ids.py: the canonical form of request ids.

Every completion in every user's store is keyed by `request_id`. The literal hashes below were
computed once with the code as it stood and are hard-coded on purpose.

    CHANGING ANY GOLDEN VALUE IN THIS FILE INVALIDATES EVERY USER'S CACHE.

If one of these tests fails, the fix is almost never to update the constant: it is to find what
changed the canonical form (key order, whitespace, None handling, escaping, hash length, ...).
Update a golden value only together with a store migration.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from synth.ids import ID_HEX_CHARS, canonical_json, content_hash, prompt_id, request_id, sample_seed

MODEL = "Qwen/Qwen2.5-7B-Instruct"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
PARAMS = {"temperature": 0.7, "max_tokens": 256, "seed": 1234}


# ---- golden values (changing any of them invalidates every user's cache) ---------------------------

def test_canonical_json_golden_request_payload():
    """The exact bytes hashed for a request: sorted keys at every depth, no whitespace."""
    payload = {"model": MODEL, "messages": MESSAGES, "params": PARAMS, "sample": 0}
    assert canonical_json(payload) == (
        '{"messages":[{"content":"Be brief.","role":"system"},{"content":"What is 2+2?","role":"user"}],'
        '"model":"Qwen/Qwen2.5-7B-Instruct","params":{"max_tokens":256,"seed":1234,"temperature":0.7},'
        '"sample":0}'
    )


def test_canonical_json_golden_none_and_unicode():
    """None-valued dict keys are dropped at any depth; None inside a list stays `null`;
    non-ASCII text is kept as UTF-8, not \\u-escaped."""
    value = {"b": 1, "a": [None, {"y": None, "x": "é"}], "c": None}
    assert canonical_json(value) == '{"a":[null,{"x":"é"}],"b":1}'


@pytest.mark.parametrize(("value", "expected"), [
    ({}, "44136fa355b3678a1146ad16f7e8649e"),
    ([], "4f53cda18c2baa0c0354bb5f9a3ecbe5"),
    ("", "12ae32cb1ec02d01eda3581b127c1fee"),
    (0, "5feceb66ffc86f38d952786c6d696c79"),
    ({"a": 1}, "015abd7f5cc57a2dd94b7590f04ad808"),
    ("héllo ✓", "0cdefd49632b8e3b5ba62136c175e6a1"),
])
def test_content_hash_golden(value, expected):
    """content_hash of fixed values (changing these invalidates every user's cache)."""
    assert content_hash(value) == expected


def test_content_hash_is_truncated_sha256_of_canonical_json():
    """content_hash = the first 32 hex chars (128 bits) of sha256 over canonical_json's UTF-8 bytes."""
    value = {"z": [1, 2.5, "ü"], "a": {"k": True}}
    expected = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:32]
    assert ID_HEX_CHARS == 32
    assert content_hash(value) == expected


@pytest.mark.parametrize(("sample", "expected"), [
    (0, "2adfa2f0989ccf95caef21032aea7d44"),
    (1, "07df8083c336bdc7cfb3dc4d350e125a"),
    (2, "ff4e0e6549d34eeed758321a806a7fa0"),
])
def test_request_id_golden(sample, expected):
    """request_id of a fixed request (changing these invalidates every user's cache)."""
    assert request_id(MODEL, MESSAGES, PARAMS, sample) == expected


def test_request_id_golden_minimal_params():
    """request_id with only max_tokens set (changing this invalidates every user's cache)."""
    assert request_id(MODEL, MESSAGES, {"max_tokens": 256}, 0) == "38dada36dc26273f7f412e08bccf141c"


def test_prompt_id_golden():
    """prompt_id of a fixed conversation (changing this invalidates every user's cache)."""
    assert prompt_id(MESSAGES) == "ec8a9542e8ada48e9552b3740904d9f4"


@pytest.mark.parametrize(("seed", "sample", "expected"), [
    (0, 0, 20100060), (0, 1, 1024489803), (0, 2, 725209316),
    (1, 0, 1224775998), (1, 1, 240274042), (1, 2, 404030285),
    (1234, 0, 1141804717), (1234, 1, 1581699946), (1234, 2, 1004874631),
])
def test_sample_seed_golden(seed, sample, expected):
    """The seed sent to the teacher for sample k (changing these changes what every seeded run samples)."""
    assert sample_seed(seed, sample) == expected


# ---- properties of the canonical form ---------------------------------------------------------------

def test_request_id_independent_of_params_key_order():
    """Two params dicts with the same items in a different order give the same id."""
    reordered = dict(reversed(list(PARAMS.items())))
    assert list(reordered) != list(PARAMS)
    assert request_id(MODEL, MESSAGES, reordered, 0) == request_id(MODEL, MESSAGES, PARAMS, 0)


def test_request_id_independent_of_message_key_order():
    """A message written {"content", "role"} is the same message as {"role", "content"}."""
    swapped = [{"content": m["content"], "role": m["role"]} for m in MESSAGES]
    assert request_id(MODEL, swapped, PARAMS, 0) == request_id(MODEL, MESSAGES, PARAMS, 0)
    assert prompt_id(swapped) == prompt_id(MESSAGES)


def test_none_param_is_same_as_absent_param():
    """An explicit None-valued param is the same request as one where the key is absent."""
    with_none = {**PARAMS, "top_p": None, "stop": None}
    assert request_id(MODEL, MESSAGES, with_none, 0) == request_id(MODEL, MESSAGES, PARAMS, 0)


def test_none_in_list_is_not_dropped():
    """Only None-valued dict keys are dropped; a None list element is data and changes the hash."""
    assert content_hash([1, None]) != content_hash([1])


def test_request_id_changes_with_model():
    """A different model id is a different request."""
    assert request_id(MODEL + "-v2", MESSAGES, PARAMS, 0) != request_id(MODEL, MESSAGES, PARAMS, 0)


@pytest.mark.parametrize(("index", "field"), [(0, "content"), (1, "content"), (0, "role"), (1, "role")])
def test_request_id_changes_with_any_message_field(index, field):
    """Changing the content or role of any message changes the id (and the prompt id)."""
    changed = copy.deepcopy(MESSAGES)
    changed[index][field] += "x"
    assert request_id(MODEL, changed, PARAMS, 0) != request_id(MODEL, MESSAGES, PARAMS, 0)
    assert prompt_id(changed) != prompt_id(MESSAGES)


def test_request_id_changes_with_message_order():
    """Messages are a list: their order is part of the request."""
    assert request_id(MODEL, MESSAGES[::-1], PARAMS, 0) != request_id(MODEL, MESSAGES, PARAMS, 0)


def test_request_id_changes_with_trailing_whitespace_in_content():
    """Content is hashed byte for byte: no normalisation of whitespace."""
    changed = copy.deepcopy(MESSAGES)
    changed[1]["content"] += " "
    assert request_id(MODEL, changed, PARAMS, 0) != request_id(MODEL, MESSAGES, PARAMS, 0)


@pytest.mark.parametrize(("key", "value"), [
    ("temperature", 0.8), ("max_tokens", 257), ("seed", 1235), ("top_p", 0.9), ("stop", ["\n"]),
])
def test_request_id_changes_with_any_param(key, value):
    """Changing or adding any sampling param changes the id."""
    changed = {**PARAMS, key: value}
    assert request_id(MODEL, MESSAGES, changed, 0) != request_id(MODEL, MESSAGES, PARAMS, 0)


def test_request_id_changes_with_sample_index():
    """Each sample index of the same prompt is a distinct request."""
    ids = {request_id(MODEL, MESSAGES, PARAMS, k) for k in range(50)}
    assert len(ids) == 50


def test_int_and_float_params_are_different_requests():
    """canonical_json does not normalise numbers: 1 and 1.0 hash differently. Callers must pass
    typed params (SamplingParams coerces temperature to float) or identical requests get two ids."""
    assert canonical_json({"t": 1}) != canonical_json({"t": 1.0})
    assert request_id(MODEL, MESSAGES, {"temperature": 1}, 0) != request_id(MODEL, MESSAGES, {"temperature": 1.0}, 0)


def test_canonical_json_rejects_nan():
    """NaN/inf have no JSON form, so they are refused rather than hashed as a non-standard token."""
    with pytest.raises(ValueError):
        canonical_json({"temperature": float("nan")})


def test_prompt_id_ignores_model_params_and_sample():
    """prompt_id depends on the messages alone: every sample of a prompt shares it."""
    assert prompt_id(MESSAGES) == prompt_id(copy.deepcopy(MESSAGES))
    assert prompt_id(MESSAGES) != request_id(MODEL, MESSAGES, PARAMS, 0)


def test_ids_are_lowercase_hex_of_fixed_length():
    """Ids are 32 lowercase hex characters."""
    for value in (request_id(MODEL, MESSAGES, PARAMS, 0), prompt_id(MESSAGES)):
        assert len(value) == ID_HEX_CHARS
        assert value == value.lower()
        int(value, 16)


def test_request_id_does_not_mutate_inputs():
    """Hashing drops None keys from a copy, never from the caller's dicts."""
    params = {**PARAMS, "top_p": None}
    messages = copy.deepcopy(MESSAGES)
    before = json.dumps([params, messages])
    request_id(MODEL, messages, params, 0)
    assert json.dumps([params, messages]) == before


# ---- sample_seed -------------------------------------------------------------------------------------

def test_sample_seed_is_deterministic():
    """The same (seed, sample) always gives the same seed."""
    assert [sample_seed(7, k) for k in range(10)] == [sample_seed(7, k) for k in range(10)]


def test_sample_seed_differs_per_sample():
    """Samples of one request get different seeds."""
    seeds = [sample_seed(42, k) for k in range(100)]
    assert len(set(seeds)) == 100


def test_sample_seed_is_not_seed_plus_sample():
    """Seed 0 / sample 1 must not equal seed 1 / sample 0 (the reason seeds are hashed, not added)."""
    assert sample_seed(0, 1) != sample_seed(1, 0)
    assert {sample_seed(0, k) for k in range(20)}.isdisjoint({sample_seed(1, k) for k in range(20)})


def test_sample_seed_fits_a_signed_32_bit_int():
    """Derived seeds are in [0, 2**31): accepted by every backend's seed argument."""
    for seed in (0, 1, -5, 2**40):
        for k in range(20):
            value = sample_seed(seed, k)
            assert isinstance(value, int)
            assert 0 <= value < 2**31


@pytest.mark.parametrize("sample", [0, 1, 7])
def test_sample_seed_none_when_no_seed(sample):
    """A request without a seed stays unseeded for every sample: sample_seed returns None."""
    assert sample_seed(None, sample) is None
