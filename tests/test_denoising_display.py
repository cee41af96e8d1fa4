"""The ``on_step`` hook of generate() (bd3lm.sampling.steps.DenoisingStep) and its terminal view
(bd3lm.sampling.display.DenoisingDisplay).

Oracles: the reported states replayed step by step against the absorbing process (masks only ever filled, a
filled token frozen, one position per step for first_hitting, each rule's step count), the blocks that
on_block and the returned sequences hold, the samples of the same seed without the hook, and plain lines
written by hand for a hand-made vocabulary.
"""

from __future__ import annotations

import io
from collections import defaultdict

import pytest
import torch

import bd3lm
from bd3lm.sampling import generate
from bd3lm.sampling.display import DenoisingDisplay, DenoisingStep
from bd3lm.tokenizer import train_bpe_tokenizer
from tests.conftest import randomize, tiny_config, tiny_model

BS = 4
MASK = 32  # tiny_config: vocab_size 33, mask_index = vocab_size - 1
PROMPTS = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7]), torch.tensor([8, 9, 10, 11, 12, 13, 14, 15])]
MAX_NEW = 11  # the last block of every sequence is cut; prompt 3 + 11 tokens slides past the 16-token window

RULES = {
    "first_hitting": dict(sampler="first_hitting"),
    "ddpm-T3": dict(sampler="ddpm", steps=3),
    "ddpm-T6": dict(sampler="ddpm", steps=6),
    "ddpm-T1": dict(sampler="ddpm", steps=1),
    "confidence": dict(sampler="confidence", threshold=0.5),
    "analytic": dict(sampler="analytic", steps=2),
    "euler": dict(sampler="euler", steps=3),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def _score_model(graph: str, loss: str, p_m=None, **kw) -> bd3lm.BD3LM:
    torch.manual_seed(0)
    return randomize(bd3lm.BD3LM(tiny_config(graph=graph, loss=loss, p_m=p_m, **kw)), 0, scale=0.3).eval()


def _run(model, prompts=PROMPTS, max_new=MAX_NEW, **kw):
    """generate() with on_step and on_block recording into one event list."""
    events: list[tuple[str, object]] = []
    res = generate(
        model,
        prompts,
        max_new,
        seed=3,
        num_samples=2,
        on_step=lambda s: events.append(("step", s)),
        on_block=lambda i, new: events.append(("block", (i, new.clone()))),
        **kw,
    )
    return res, events


def _check_run(res, events, prompts, *, absorbing: bool, masks_ever: bool = True):
    """Checks every rule shares; returns the steps grouped by (seq, block) in report order."""
    blocks: dict[tuple[int, int], list[DenoisingStep]] = defaultdict(list)
    order: dict[int, list[int]] = defaultdict(list)  # per sequence, its blocks in report order
    committed: dict[int, list[torch.Tensor]] = defaultdict(list)
    open_block: dict[int, int | None] = {}
    for kind, ev in events:
        if kind == "step":
            assert isinstance(ev.block_ids, torch.Tensor) and ev.block_ids.device.type == "cpu"
            assert ev.block_ids.shape == ev.newly_filled.shape and ev.newly_filled.dtype == torch.bool
            if not order[ev.seq] or order[ev.seq][-1] != ev.block:
                assert open_block.get(ev.seq) is None, "a block started before the previous one was committed"
                order[ev.seq].append(ev.block)
            blocks[(ev.seq, ev.block)].append(ev)
            open_block[ev.seq] = ev.block if not ev.final else None
        else:
            seq, new = ev
            # the block's final step comes right before its on_block
            assert open_block.get(seq) is None and blocks[(seq, order[seq][-1])][-1].final
            last = blocks[(seq, order[seq][-1])][-1]
            assert torch.equal(last.block_ids, new)
            committed[seq].append(new)
    n_seq = len(res.sequences)
    assert sorted(order) == list(range(n_seq))
    for seq in range(n_seq):
        p_len = len(prompts[seq // 2])
        first = p_len // BS
        assert order[seq] == list(range(first, first + len(order[seq]))), "blocks are committed one after another"
        gen = res.sequences[seq][p_len:]
        finals = [blocks[(seq, b)][-1].block_ids for b in order[seq]]
        assert torch.equal(torch.cat(finals), gen) and torch.equal(torch.cat(committed[seq]), gen)
        for b in order[seq]:
            steps = blocks[(seq, b)]
            assert [s.step for s in steps] == list(range(len(steps)))
            assert [s.final for s in steps] == [False] * (len(steps) - 1) + [True]
            assert all(s.start == (p_len % BS if b == first else 0) for s in steps)
            assert all(s.mask_id == MASK for s in steps)
            assert not bool(steps[-1].masked.any())
            prev = None
            for s in steps:
                if prev is not None:
                    assert torch.equal(s.newly_filled, s.block_ids != prev.block_ids)
                    assert int(s.masked.sum()) <= int(prev.masked.sum())  # masks are never re-introduced
                    if absorbing:  # a filled token is frozen
                        assert torch.equal(s.block_ids[~prev.masked], prev.block_ids[~prev.masked])
                elif masks_ever:  # the block starts all-mask
                    assert torch.equal(s.newly_filled, ~s.masked)
                prev = s
    return blocks


@pytest.mark.parametrize("name", sorted(RULES))
def test_steps_replay_the_absorbing_process_and_end_in_the_committed_blocks(name):
    kw = RULES[name]
    score = kw["sampler"] in ("analytic", "euler")
    model = _score_model("absorbing", "score_entropy", block_size=BS) if score else tiny_model(block_size=BS)
    res, events = _run(model, **kw)
    blocks = _check_run(res, events, PROMPTS, absorbing=True)
    for steps in blocks.values():
        n_gen, n = len(steps[0].block_ids), len(steps)
        filled = torch.stack([s.newly_filled for s in steps]).sum(0)
        assert bool((filled == 1).all()), "every position is filled exactly once"
        if name == "first_hitting":
            assert n == n_gen and all(s.total_steps == n_gen for s in steps)
            assert all(int(s.newly_filled.sum()) == 1 for s in steps)
        elif name.startswith("ddpm"):
            t = kw["steps"]
            assert n <= t and all(s.total_steps == t for s in steps)
            assert bool(steps[-1].newly_filled.any())  # the block ends at the step that fills its last mask
        elif name == "confidence":
            assert n <= n_gen and all(s.total_steps is None for s in steps)
            assert all(bool(s.newly_filled.any()) for s in steps)
        else:
            assert n == kw["steps"] + 1 and all(s.total_steps == n for s in steps)


@pytest.mark.parametrize(("graph", "loss", "p_m"), [("uniform", "cedd", None), ("roulette", "cedd", 0.7)])
@pytest.mark.parametrize("sampler", ["analytic", "euler"])
def test_rewriting_rules_report_every_call_and_rewritten_tokens(graph, loss, p_m, sampler):
    model = _score_model(graph, loss, p_m, block_size=BS, time_conditioning=True)
    res, events = _run(model, sampler=sampler, steps=3)
    blocks = _check_run(res, events, PROMPTS, absorbing=False, masks_ever=graph != "uniform")
    rewritten = 0
    for steps in blocks.values():
        assert len(steps) == 4 and all(s.total_steps == 4 for s in steps)
        if graph == "uniform":
            assert not any(bool(s.masked.any()) for s in steps)
        for a, b in zip(steps, steps[1:], strict=False):
            rewritten += int((b.newly_filled & ~a.masked).sum())
    assert rewritten > 0, "a rewriting rule changes decoded tokens, and the hook reports them"


def test_autoregressive_models_report_one_step_per_token():
    model = tiny_model(causal=True, cross_attn=False, adaln=False, block_size=1)
    events: list[DenoisingStep] = []
    res = generate(model, torch.tensor([1, 2, 3]), 6, seed=0, on_step=events.append)
    assert [s.block for s in events] == list(range(3, 9))
    assert all(s.step == 0 and s.total_steps == 1 and s.final and s.start == 0 for s in events)
    assert all(bool(s.newly_filled.all()) for s in events)
    assert torch.equal(torch.cat([s.block_ids for s in events]), res.sequences[0][3:])


def test_stop_ids_cut_on_block_but_not_the_final_step():
    model = tiny_model(block_size=BS)
    finals: dict[int, list[torch.Tensor]] = defaultdict(list)
    news: dict[int, list[torch.Tensor]] = defaultdict(list)

    def on_step(s: DenoisingStep) -> None:
        if s.final:
            finals[s.seq].append(s.block_ids)

    res = generate(
        model,
        torch.tensor([1, 2, 3, 4, 5]),
        40,
        seed=0,
        num_samples=6,
        stop=[7, 9, 11],
        window=16,
        on_step=on_step,
        on_block=lambda i, new: news[i].append(new.clone()),
    )
    assert "eos" in res.stop_reasons
    for seq in range(6):
        assert len(finals[seq]) == len(news[seq])
        for full, new in zip(finals[seq], news[seq], strict=True):
            assert torch.equal(full[: len(new)], new)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("kv_cache", [True, False])
def test_the_hook_never_changes_the_samples(name, kv_cache):
    kw = RULES[name]
    score = kw["sampler"] in ("analytic", "euler")
    model = _score_model("absorbing", "score_entropy", block_size=BS) if score else tiny_model(block_size=BS)
    common = dict(seed=11, num_samples=2, kv_cache=kv_cache, stop_entropy=0.5, **kw)
    plain = generate(model, PROMPTS, MAX_NEW, **common)
    n_steps = []
    hooked = generate(model, PROMPTS, MAX_NEW, on_step=n_steps.append, **common)
    assert n_steps
    assert [s.tolist() for s in plain.sequences] == [s.tolist() for s in hooked.sequences]
    assert plain.nfe == hooked.nfe and plain.stop_reasons == hooked.stop_reasons


def test_the_hook_is_refused_for_infilling():
    model = tiny_model(block_size=16)
    with pytest.raises(ValueError, match="on_step"):
        generate(model, torch.tensor([1, 2]), 4, suffix=[3], on_step=lambda s: None)


# -- the renderer ------------------------------------------------------------------------------------------


class WordTokenizer:
    """A hand-made vocabulary: id -> word; a list decodes to its words joined by spaces (a word-level decoder)."""

    VOCAB = ["the", "king", "is", "dead", "long", "live", "\n", "queen", "<eos>"]

    def decode(self, ids):
        return " ".join(self.VOCAB[i] for i in ids)


W = {w: i for i, w in enumerate(WordTokenizer.VOCAB)}
M = 99  # the mask id of the hand-made steps


def _step(seq, block, step, total, ids, new, final=False, start=0):
    return DenoisingStep(
        seq=seq,
        block=block,
        step=step,
        total_steps=total,
        start=start,
        block_ids=torch.tensor(ids),
        newly_filled=torch.tensor(new),
        mask_id=M,
        final=final,
    )


def _fake_run():
    """Two 4-token blocks of one sequence (the prompt fills the first block's first position), then a third."""
    return [
        _step(0, 2, 0, 3, [W["king"], M, M], [True, False, False], start=1),
        _step(0, 2, 1, 3, [W["king"], M, W["dead"]], [False, False, True], start=1),
        _step(0, 2, 2, 3, [W["king"], W["is"], W["dead"]], [False, True, False], final=True, start=1),
        _step(0, 3, 0, None, [M, M, M, M], [False] * 4),
        _step(0, 3, 1, None, [W["long"], M, M, W["\n"]], [True, False, False, True]),
        _step(0, 3, 2, None, [W["long"], W["live"], W["the"], W["\n"]], [False, True, True, False], final=True),
    ]


def test_plain_lines_of_a_hand_made_run_read_as_written():
    out = io.StringIO()
    display = DenoisingDisplay(WordTokenizer(), "the", file=out)  # a StringIO is no TTY: plain lines
    assert not display.live
    for s in _fake_run():
        display(s)
    assert out.getvalue().splitlines() == [
        "block 2 step 1/3: king ░ ░",
        "block 2 step 2/3: king ░ dead",
        "block 2 step 3/3: king is dead",
        "block 3 step 1: ░ ░ ░ ░",
        "block 3 step 2: long ░ ░ ↵",
        "block 3 step 3: long live the ↵",
    ]
    assert display.text(0) == "theking is dead long live the \n"  # the prompt, then the committed blocks
    assert display.steps == 6


def test_plain_lines_name_the_sequence_and_stop_ids_cut_the_committed_text():
    out = io.StringIO()
    display = DenoisingDisplay(WordTokenizer(), ["A:", None], file=out, mask_glyph="_", stop=W["<eos>"])
    display(_step(1, 0, 0, 2, [M, W["<eos>"]], [False, True]))
    display(_step(0, 0, 0, 2, [W["queen"], M], [True, False]))
    display(_step(1, 0, 1, 2, [W["long"], W["<eos>"]], [True, False], final=True))
    display(_step(0, 0, 1, 2, [W["queen"], W["<eos>"]], [False, True], final=True))
    assert out.getvalue().splitlines() == [
        "seq 1 block 0 step 1/2: _ <eos>",
        "seq 0 block 0 step 1/2: queen _",
        "seq 1 block 0 step 2/2: long <eos>",
        "seq 0 block 0 step 2/2: queen <eos>",
    ]
    assert display.text(1) == "long <eos>" and display.text(0) == "A:queen <eos>"
    display(_step(1, 1, 0, 1, [W["the"]], [True], final=True))  # after the stop id nothing is committed
    assert display.text(1) == "long <eos>" and display.committed[1] == [W["long"], W["<eos>"]]


def test_the_live_view_draws_masks_and_highlights_the_new_tokens():
    from rich.console import Console

    display = DenoisingDisplay(WordTokenizer(), "P:", live=True, file=io.StringIO())
    for s in _fake_run()[:4]:
        display(s)
    console = Console(width=60, record=True, file=io.StringIO(), color_system="truecolor")
    console.print(display.render())
    text = console.export_text()
    assert "sequence 0 · block 3 · step 1" in text and "P:king is dead░░░░" in text
    display(_fake_run()[4])
    console.print(display.render())
    styled = console.export_text(styles=True)
    assert "░" in styled and "long" in styled
    spans = {str(span.style) for span in display.render().renderables[0].renderable.spans}
    assert {"bold", "dim", "bold black on green"} <= spans
    display.close()
    assert display._live is None


def test_partial_blocks_of_a_byte_level_bpe_never_reach_the_decoder_with_the_mask():
    tok = train_bpe_tokenizer(["plain ascii words and more words"] * 4, vocab_size=300)
    mask = tok.mask_token_id
    ids = tok("naïve café ☃", add_special_tokens=False)["input_ids"]
    assert len(ids) > 6  # the multi-byte characters are split into byte tokens
    out = io.StringIO()
    display = DenoisingDisplay(tok, "> ", file=out)
    half = [t if i % 2 else mask for i, t in enumerate(ids)]
    for k, state in enumerate([[mask] * len(ids), half, ids]):
        block = torch.tensor(state)
        display(
            DenoisingStep(
                seq=0,
                block=0,
                step=k,
                total_steps=3,
                start=0,
                block_ids=block,
                newly_filled=block != mask,
                mask_id=mask,
                final=k == 2,
            )
        )
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].count("░") == len(ids) and lines[1].count("░") == (len(ids) + 1) // 2
    assert "<|mask|>" not in out.getvalue()
    assert display.text(0) == "> naïve café ☃"


def test_generate_drives_the_display_one_line_per_step():
    model = tiny_model(block_size=BS)

    class Tok:
        def decode(self, ids):
            return "".join(f" t{i}" for i in ids)

    out = io.StringIO()
    steps: list[DenoisingStep] = []
    display = DenoisingDisplay(Tok(), "go:", file=out)

    def both(s):
        steps.append(s)
        display(s)

    res = generate(model, torch.tensor([1, 2, 3]), 9, sampler="confidence", threshold=0.6, seed=0, on_step=both)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(steps) and lines[0].startswith("block 0 step 1: ")
    cells = " ".join(f"t{i}" for i in steps[-1].block_ids.tolist())
    assert lines[-1] == f"block 2 step {steps[-1].step + 1}: {cells}"
    assert display.text(0) == "go:" + Tok().decode(res.sequences[0][3:].tolist())


def test_bad_display_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="delay"):
        DenoisingDisplay(WordTokenizer(), delay=-1)
    with pytest.raises(ValueError, match="prompts"):
        DenoisingDisplay(WordTokenizer(), ["a", "b"], num_sequences=3)
    display = DenoisingDisplay(WordTokenizer(), file=io.StringIO())
    with pytest.raises(ValueError, match="num_sequences=1"):
        display(_step(1, 0, 0, 1, [W["the"]], [True], final=True))
