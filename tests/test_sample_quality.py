"""Generative perplexity (bd3lm.evaluation.sample_quality): conversion to judge tokens, per-sample scores against
a token-by-token oracle, the reported aggregates, entropy in closed form."""

import math

import pytest
import torch
from conftest import randomize
from test_judge import ar_judge_dir, oracle_nll  # noqa: F401 - fixture
from test_sampling_cli import tiny_tokenizer

import bd3lm
from bd3lm.evaluation import load_judge, sample_quality, to_judge_ids, unigram_entropy
from bd3lm.sampling import generate


@pytest.fixture(scope="module")
def model_and_tok():
    tok = tiny_tokenizer()
    cfg = bd3lm.BD3LMConfig(vocab_size=len(tok), model_length=16, block_size=4, hidden_dim=32, cond_dim=16,
                            n_blocks=2, n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    return randomize(bd3lm.BD3LM(cfg), 0).eval(), tok


def test_unigram_entropy_closed_form():
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([7] * 5) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy([1, 1, 2, 2, 2, 2]) == pytest.approx(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3))


def test_to_judge_ids_splits_documents_at_eos(ar_judge_dir):  # noqa: F811
    judge = load_judge(str(ar_judge_dir))
    tok = tiny_tokenizer()
    a, b = tok("hello world", add_special_tokens=False)["input_ids"], tok("the lazy dog", add_special_tokens=False)[
        "input_ids"]
    sep = judge.sep_id
    assert to_judge_ids(a, tok, judge) == [sep, *judge.encode("hello world")]
    assert to_judge_ids(a + [tok.eos_token_id] + b, tok, judge) == [
        sep, *judge.encode("hello world"), sep, *judge.encode("the lazy dog")]


def test_gen_ppl_is_the_mean_of_per_sample_oracle_perplexities(model_and_tok, ar_judge_dir):  # noqa: F811
    model, tok = model_and_tok
    judge = load_judge(str(ar_judge_dir))
    jmodel = bd3lm.BD3LM.from_pretrained(ar_judge_dir).eval()
    res = sample_quality(model, tok, judge, num_samples=5, batch_size=2, max_new_tokens=12, seed=3, top_p=0.9,
                         top_p_rule="official")
    assert len(res.samples) == 5 and res.stop_reasons == {"max_new_tokens": 5}
    assert all(s["new_tokens"] == 12 for s in res.samples) and res.length_max == 12
    ppls, nlls, toks = [], 0.0, 0
    for s in res.samples:
        ids = to_judge_ids(s["token_ids"], tok, judge)
        total, count = oracle_nll(jmodel, ids, judge.context, judge.context // 2, judge.skip_ids)
        assert s["judge_tokens"] == count and s["nll"] == pytest.approx(total, abs=1e-5 * count)
        ppls.append(math.exp(total / count))
        nlls, toks = nlls + total, toks + count
    assert res.gen_ppl == pytest.approx(sum(ppls) / 5, rel=1e-5)  # the paper's number: mean of per-sample PPLs
    assert res.pooled_ppl == pytest.approx(math.exp(nlls / toks), rel=1e-5)
    # the samples are exactly generate()'s under the same seeds and batches
    first = generate(model, [torch.tensor([tok.bos_token_id])], max_new_tokens=12, num_samples=2, seed=3,
                     top_p=0.9, top_p_rule="official")
    assert [s["token_ids"] for s in res.samples[:2]] == [seq[1:].tolist() for seq in first.sequences]
    assert res.samples[0]["nfe"] == first.nfe_per_sequence[0]


def test_a_prompt_is_context_for_the_judge_and_not_scored(model_and_tok, ar_judge_dir):  # noqa: F811
    model, tok = model_and_tok
    judge = load_judge(str(ar_judge_dir))
    jmodel = bd3lm.BD3LM.from_pretrained(ar_judge_dir).eval()
    res = sample_quality(model, tok, judge, num_samples=2, batch_size=2, max_new_tokens=8, seed=1, prompt="hello")
    body = tok("hello", add_special_tokens=False)["input_ids"]
    n_ctx = 1 + len(judge.encode("hello"))
    for s in res.samples:
        ids = to_judge_ids(body + s["token_ids"], tok, judge)
        assert ids[:n_ctx] == [judge.sep_id, *judge.encode("hello")]
        total, count = oracle_nll(jmodel, ids, judge.context, judge.context // 2, judge.skip_ids)
        head, n_head = oracle_nll(jmodel, ids[:n_ctx], judge.context, judge.context // 2, judge.skip_ids)
        assert s["judge_tokens"] == count - n_head and s["nll"] == pytest.approx(total - head, abs=1e-5 * count)


def test_stop_at_eos_reports_lengths(model_and_tok, ar_judge_dir):  # noqa: F811
    model, tok = model_and_tok
    judge = load_judge(str(ar_judge_dir))
    res = sample_quality(model, tok, judge, num_samples=6, batch_size=3, max_new_tokens=40, seed=0, stop_at_eos=True)
    lengths = [s["new_tokens"] for s in res.samples]
    assert sum(res.stop_reasons.values()) == 6 and res.length_max == max(lengths)
    for s in res.samples:
        assert (s["stop_reason"] == "eos") == (s["token_ids"][-1] == tok.eos_token_id)
    with pytest.raises(ValueError, match=r"^num_samples must be an integer >= 1; got 0$"):
        sample_quality(model, tok, judge, num_samples=0)
