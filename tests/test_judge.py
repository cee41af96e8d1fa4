"""The judge (bd3lm.evaluation.judge): window arithmetic, scoring against a token-by-token oracle, offline
loading of SmolLM2 and of our AR checkpoints, one-line errors."""

import math
import random

import pytest
import torch
from conftest import randomize
from test_sampling_cli import tiny_tokenizer

import bd3lm
from bd3lm.evaluation import judge as judge_mod
from bd3lm.evaluation import load_judge, score_texts, sliding_window_nll, windows

PARAGRAPH = (
    "The village stood at the edge of a wide valley, where the river turned slowly toward the sea. Every morning "
    "the farmers walked down the narrow road to their fields, and in the evening they returned to sit by the fire "
    "and talk about the weather, the harvest and the news from the town. Children played in the square until "
    "their mothers called them home for supper, and the old church bell rang the hours as it had for centuries."
)


def window_start(p: int, context: int, stride: int) -> int:
    """Closed form: the window that scores target p starts at k*stride, k = 0 if p < C else ceil((p-C+1)/S)."""
    return 0 if p < context else math.ceil((p - context + 1) / stride) * stride


@pytest.mark.parametrize("context,stride", [(2, 1), (4, 2), (5, 3), (8, 4), (8, 7), (16, 1), (1024, 512)])
def test_windows_score_every_position_after_the_first_exactly_once(context, stride):
    for n in [0, 1, 2, 3, 5, 8, 9, 17, 100, 2500]:
        seen = [0] * n
        for start, end, first in windows(n, context, stride):
            assert end - start <= context and start < first <= end
            for p in range(first, end):
                seen[p] += 1
                assert start == window_start(p, context, stride)
                assert p - start >= min(p, context - stride)  # enough context once past the first window
        assert seen[1:] == [1] * (n - 1) and (n == 0 or seen[0] == 0)


def test_bad_window_arguments():
    with pytest.raises(ValueError, match=r"^stride must be in \[1, context - 1\] = \[1, 3\]; got 4$"):
        windows(10, 4, 4)
    with pytest.raises(ValueError, match=r"^judge context must be >= 2; got 1$"):
        windows(10, 1, 1)


@pytest.fixture(scope="module")
def ar_judge_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ar_judge")
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    cfg = bd3lm.BD3LMConfig(vocab_size=len(tok), model_length=64, block_size=1, causal=True, cross_attn=False,
                            adaln=False, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    randomize(bd3lm.BD3LM(cfg), 0, scale=0.3).save_pretrained(path)
    return path


def oracle_nll(model, ids, context, stride, skip):
    """-log p(ids[p] | ids[start(p):p]) by one forward per target, the window start from the closed form."""
    total, count = 0.0, 0
    for p in range(1, len(ids)):
        if ids[p] in skip:
            continue
        s = window_start(p, context, stride)
        x = torch.tensor([ids[s:p]])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, -1].double()
        logits[model.config.mask_index] = -math.inf
        total -= logits.log_softmax(-1)[ids[p]].item()
        count += 1
    return total, count


@pytest.mark.parametrize("context,stride", [(None, None), (6, 3), (5, 1)])
def test_ar_judge_reproduces_a_hand_computed_perplexity(ar_judge_dir, context, stride):
    judge = load_judge(str(ar_judge_dir), context=context)
    model = bd3lm.BD3LM.from_pretrained(ar_judge_dir).eval()
    text = "to be or not to be, that is the question"
    ids = [judge.sep_id, *judge.encode(text)]
    c = context or 64
    s = stride or c // 2
    total, count = oracle_nll(model, ids, c, s, judge.skip_ids)
    score = score_texts(judge, [text], context=c, stride=s)[0]
    assert score.tokens == count == len(ids) - 1
    assert score.nll == pytest.approx(total, abs=1e-5 * count)  # float32 logits, one forward vs many
    assert score.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_separator_targets_are_not_counted(ar_judge_dir):
    judge = load_judge(str(ar_judge_dir))
    ids = [judge.sep_id, *judge.encode("hello world"), judge.sep_id, *judge.encode("hello block")]
    nll, counted = sliding_window_nll(judge, ids)
    assert counted.tolist() == [False] + [t != judge.sep_id for t in ids[1:]]
    assert (nll[~counted] == 0).all() and (nll[counted] > 0).all()


def test_smollm2_loads_offline_and_prefers_real_english():
    judge = load_judge("smollm2")
    assert judge.context == 1024
    words = PARAGRAPH.split()
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    real, mixed = score_texts(judge, [PARAGRAPH, " ".join(shuffled)])
    assert real.tokens > 60 and mixed.tokens > 60
    assert real.ppl < 30 and mixed.ppl > 5 * real.ppl, (real.ppl, mixed.ppl)


def test_judge_errors_are_one_line(tmp_path, monkeypatch, ar_judge_dir):
    with pytest.raises(FileNotFoundError, match=r"^judge GGUF file '.*missing.gguf' does not exist$"):
        load_judge(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"^judge 'nobody/no-such-model' cannot be loaded offline"):
        load_judge("nobody/no-such-model")
    diffusion = tmp_path / "diffusion"
    tiny_tokenizer().save_pretrained(diffusion)
    bd3lm.BD3LM(bd3lm.BD3LMConfig(vocab_size=303, model_length=16, block_size=4, hidden_dim=32, cond_dim=16,
                                  n_blocks=1, n_heads=4)).save_pretrained(diffusion)
    with pytest.raises(ValueError, match=r"^judge context must be an integer in \[2, 64\] for .*; got 65$"):
        load_judge(str(ar_judge_dir), context=65)
    with pytest.raises(ValueError, match=r"is not autoregressive \(config.causal is false\)$"):
        load_judge(str(diffusion))
    monkeypatch.setattr(judge_mod.importlib.util, "find_spec", lambda name: None)
    load_judge.cache_clear()
    with pytest.raises(ImportError, match=r"install the optional extra 'judge'"):
        load_judge("smollm2")
    load_judge.cache_clear()
