"""The Python API refuses bad inputs with one-line errors before any network call, and warns (once per model)
when a time-conditioned model is sampled by a rule that feeds it σ = 0."""

import warnings

import pytest
import torch
from conftest import tiny_model

import bd3lm

pytestmark = pytest.mark.usefixtures("one_thread")


def counted(model):
    """``model`` with a counter of its forward calls (``model.calls[0]``)."""
    model.calls = [0]

    def hook(module, args, kwargs):
        module.calls[0] += 1

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def assert_one_line_error(exc_type, match, fn, model):
    with pytest.raises(exc_type, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    assert model.calls[0] == 0, "the argument must be checked before any forward"


@pytest.mark.parametrize("prompt", ["a str prompt", b"bytes", ["two", "prompts"], ("a",)])
def test_text_prompts_say_tokenize_first(prompt):
    model = counted(tiny_model())
    assert_one_line_error(TypeError, r"input_ids must be token ids, not text; tokenize first, e\.g\. tokenizer\(text\)",
                   lambda: bd3lm.generate(model, input_ids=prompt, max_new_tokens=4), model)
    whole = counted(tiny_model(block_size=16))
    assert_one_line_error(TypeError, "suffix must be token ids, not text",
                   lambda: bd3lm.generate(whole, input_ids=[[1, 2]], suffix="the end", max_new_tokens=4), whole)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, True, "7", torch.tensor(3.0)])
def test_bad_seeds_are_refused(seed):
    model = counted(tiny_model())
    assert_one_line_error(ValueError, r"seed must be an integer in \[0, 2\*\*63\) or None; got",
                   lambda: bd3lm.generate(model, max_new_tokens=4, seed=seed), model)
    whole = counted(tiny_model(block_size=16))
    assert_one_line_error(ValueError, "seed must be an integer",
                   lambda: bd3lm.generate(whole, input_ids=[[1, 2]], suffix=[3], max_new_tokens=4, seed=seed), whole)


def test_seeds_at_the_ends_of_the_range_run_and_reproduce():
    model = tiny_model()
    for seed in (0, 2**63 - 1):
        a = bd3lm.generate(model, max_new_tokens=4, seed=seed).sequences
        b = bd3lm.generate(model, max_new_tokens=4, seed=seed).sequences
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("ids", [torch.ones(1, 3), torch.ones(3, dtype=torch.float64), [[1.0, 2.0]]])
def test_float_ids_in_generate(ids):
    model = counted(tiny_model())
    assert_one_line_error(ValueError, "integer token ids",
                   lambda: bd3lm.generate(model, input_ids=ids, max_new_tokens=4), model)


def test_float_ids_in_nelbo_and_the_losses():
    model = counted(tiny_model())
    x = torch.randint(0, 32, (2, 16)).float()
    assert_one_line_error(ValueError, "input_ids must hold integer token ids .*got dtype torch.float32",
                   lambda: bd3lm.nelbo(model, x), model)
    assert_one_line_error(TypeError, "input_ids must be a \\(batch, length\\) tensor of token ids; got list",
                   lambda: bd3lm.nelbo(model, x.long().tolist()), model)
    assert_one_line_error(ValueError, "x0 must hold integer token ids", lambda: bd3lm.loss(model, x), model)
    sedd = counted(tiny_model(loss="score_entropy"))
    assert_one_line_error(ValueError, "x0 must hold integer token ids", lambda: bd3lm.loss(sedd, x), sedd)
    assert_one_line_error(ValueError, "input_ids must hold integer token ids", lambda: bd3lm.nelbo(sedd, x), sedd)


@pytest.mark.parametrize("num_samples", [0, -1, 1.5, 2.0, True, False, "2", None])
def test_bad_num_samples_in_nelbo(num_samples):
    x = torch.randint(0, 32, (2, 16))
    for kw in ({}, dict(loss="score_entropy")):
        model = counted(tiny_model(**kw))
        assert_one_line_error(ValueError, r"num_samples must be an integer >= 1; got",
                       lambda m=model: bd3lm.nelbo(m, x, num_samples=num_samples), model)


def sigma_zero_warnings(caught) -> int:
    return sum("conditions it on sigma = 0" in str(w.message) for w in caught)


def run(model, n_calls: int = 2, **kw) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(n_calls):
            bd3lm.generate(model, max_new_tokens=4, seed=i, **kw)
    return sigma_zero_warnings(caught)


@pytest.mark.parametrize("sampler", ["first_hitting", "ddpm", "confidence"])
def test_time_conditioned_model_with_a_sigma_zero_rule_warns_once_per_model(sampler):
    assert run(tiny_model(time_conditioning=True), sampler=sampler) == 1
    assert run(tiny_model(time_conditioning=True), sampler=sampler) == 1  # a new model warns again


def test_no_sigma_zero_warning_when_sigma_is_fed_or_not_read():
    assert run(tiny_model(), sampler="first_hitting") == 0  # not time-conditioned
    for sampler in ("analytic", "euler", None):  # the score rules feed each step's σ (None: analytic here)
        assert run(tiny_model(time_conditioning=True), sampler=sampler, steps=1) == 0
    ar = tiny_model(time_conditioning=True, causal=True, adaln=False, cross_attn=False)
    assert run(ar, bos_token_id=0) == 0  # AR: trained at σ = 0 too


def test_infilling_warns_once_too():
    model = tiny_model(block_size=16, time_conditioning=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (0, 1):
            bd3lm.generate(model, input_ids=[[1, 2]], suffix=[3, 4], max_new_tokens=4, seed=seed,
                           sampler="first_hitting")
        bd3lm.generate(tiny_model(block_size=16, time_conditioning=True), input_ids=[[1, 2]], suffix=[3],
                       max_new_tokens=4, sampler="analytic")
    assert sigma_zero_warnings(caught) == 1
