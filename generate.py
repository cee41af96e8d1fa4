"""Generate text with a trained BD3-LM checkpoint (Hydra CLI over :func:`bd3lm.sampling.generate`).

    python generate.py checkpoint=DIR [prompt=TEXT | prompts_file=FILE] num_samples=N max_new_tokens=N \\
        sampler=first_hitting|ddpm|confidence|analytic|euler steps=... [suffix=TEXT] threshold=... \\
        temperature=... top_k=... top_p=... \\
        top_p_rule=hf|official seed=... output=FILE.jsonl [show_steps=true step_delay=0.2]

The model is ``BD3LM.from_pretrained(DIR)`` and the tokenizer ``AutoTokenizer.from_pretrained(DIR)`` (the
training pipeline saves one there). ``prompt=``, ``suffix=``, ``checkpoint=``, ``prompts_file=`` and ``output=``
are taken verbatim from the command line (everything after the first ``=``: commas, colons, quotes, ``${...}``
are text, not Hydra syntax), so ``prompt="To be, or not to be"`` needs only the shell's quotes. A prompt longer
than the attention window (``window``, default ``model_length``) works: the sampler is given its last tokens,
exactly those its sliding window attends for the first block (``prompt_ids_unread`` counts the others; see
:func:`generate_args.unread_prompt_tokens`).

Text is printed block by block as blocks are committed (a live ``rich`` view on a terminal, plain text
otherwise: one sample streams, several are printed as each one finishes). ``show_steps=true`` draws every
denoising step instead (:class:`bd3lm.sampling.display.DenoisingDisplay`): the current block's masked positions
(``░``) filling in, step by step, before it is committed; ``step_delay=`` slows it down to follow by eye.

``output=`` writes one JSON record per sample: ``index``, ``prompt``, ``text`` (generated text), ``token_ids``
(generated ids), ``prompt_ids`` (the tokenized prompt, BOS included), ``prompt_ids_unread``, ``stop_reason``,
``nfe``; the file is replaced atomically (a temporary file beside it, then a rename). Ctrl-C keeps the samples
finished so far (written to ``output=``), prints ``interrupted: wrote K of N samples to FILE`` and exits with code
130. Nothing else is written (Hydra's run directory and logs are disabled, see ``configs/generate.yaml``). Bad input
is one ``error:`` line on stderr and exit code 2, reported before the model is loaded whenever it can be.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from generate_args import (
    DTYPES,
    CLIError,
    check_checkpoint_files,
    check_options,
    check_output_path,
    check_overrides,
    one_line,
    read_prompts,
    split_text_args,
    unread_prompt_tokens,
)

#: Absolute, so that Hydra finds it whether this file runs as a script or is imported.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: The verbatim text options of the current command line (Hydra's config is composed without them).
TEXT_ARGS: dict[str, str] = {}


def _values(cfg: DictConfig, text: dict[str, str] | None) -> dict[str, object]:
    """The options as plain Python values: Hydra's (resolved) config, then the verbatim text options."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        raise CLIError(f"cannot resolve the options: {one_line(exc)}") from None
    values.update(text or {})
    return values


def resolve_checkpoint(name: str) -> str:
    """``name`` if it is a local path, else the directory of Hub model ``name`` in the Hugging Face cache
    (:func:`bd3lm.hub.resolve_model_dir`: downloaded only when not offline); one-line :class:`CLIError`s."""
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return path  # not a Hub id: check_checkpoint_files says the directory does not exist
    from bd3lm.hub import resolve_model_dir

    try:
        return str(resolve_model_dir(name))
    except OSError as exc:  # FileNotFoundError included: not cached while offline, download failed
        raise CLIError(one_line(exc)) from None


def load(ckpt: str, device, dtype, tokenizer: str | None = None):
    """``(tokenizer, model)`` of ``ckpt`` on ``device``; any loading failure is a one-line :class:`CLIError`.
    ``tokenizer``: ``gpt2`` or a tokenizer directory instead of the checkpoint's own."""
    from transformers import AutoTokenizer

    import bd3lm
    from bd3lm.tokenizer import load_tokenizer

    try:
        if tokenizer is None:
            tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
        else:
            tok = load_tokenizer(tokenizer if tokenizer == "gpt2" else os.path.expanduser(tokenizer))
    except Exception as exc:  # noqa: BLE001 - any loading failure is a one-line user error
        hint = "" if tokenizer else " (the official BD3-LM checkpoints ship none: add tokenizer=gpt2)"
        raise CLIError(f"could not load a tokenizer from {tokenizer or ckpt!r}{hint}: {one_line(exc)}") from None
    try:
        model = bd3lm.BD3LM.from_pretrained(ckpt)
    except ValueError as exc:  # BD3LM's checks (damaged, mismatched, non-finite weights): one line already
        raise CLIError(one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"could not load the model from {ckpt!r}: {one_line(exc)}") from None
    if len(tok) > model.config.vocab_size:
        raise CLIError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is {model.config.vocab_size}")
    try:
        return tok, model.to(device, dtype).eval()
    except RuntimeError as exc:  # e.g. out of device memory
        raise CLIError(f"could not move the model to {device} ({dtype}): {one_line(exc)}") from None


def run(cfg: DictConfig, text: dict[str, str] | None = None) -> int:
    """Check the options, load, generate, display and write the samples; returns the exit code (0, or 130 when
    interrupted). ``text``: the verbatim text options (they override ``cfg``). Raises :class:`CLIError` /
    ``ValueError`` on bad input."""
    opts = check_options(_values(cfg, text))
    prompts = read_prompts(opts)
    out = None if opts.output is None else check_output_path(opts.output)
    ckpt = check_checkpoint_files(resolve_checkpoint(opts.checkpoint))

    import torch
    from transformers.utils import logging as hf_logging

    from bd3lm.atomic import write_text_atomic
    from bd3lm.sampling import generate
    from bd3lm.sampling.layout import default_stride
    from eval.bench import resolve_device
    from generate_view import Display, Progress

    hf_logging.disable_progress_bar()  # keep stderr to the summary line (or the one error line)
    hf_logging.set_verbosity_error()
    tok, model = load(ckpt, resolve_device(opts.device), getattr(torch, DTYPES[opts.dtype]), opts.tokenizer)
    mc = model.config
    causal = bool(mc.causal)
    bs = 1 if causal else int(mc.block_size)

    bos = tok.bos_token_id if opts.add_bos else None
    n_samples = opts.num_samples
    suffix = None
    if opts.suffix is not None:
        suffix = tok(opts.suffix, add_special_tokens=False)["input_ids"]
        if not suffix:
            raise CLIError("suffix is empty; omit suffix= to continue the prompt instead of infilling")
    window = opts.window or int(mc.model_length)
    stride = opts.window_stride or default_stride(window, bs, opts.streaming)
    slides = suffix is None and window % bs == 0 and stride % bs == 0 and stride <= window  # else generate() errs
    if prompts is None:
        full_ids, input_ids, shown = [[] if bos is None else [bos]], None, [None] * n_samples
        unread = [0]
    else:
        full_ids = [([] if bos is None else [bos]) + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        unread = [unread_prompt_tokens(len(ids), bs, window, stride, causal) if slides else 0 for ids in full_ids]
        input_ids = [torch.tensor(ids[d:], dtype=torch.long) for ids, d in zip(full_ids, unread, strict=True)]
        shown = [p for p in prompts for _ in range(n_samples)]
        if any(unread):
            print(f"note: {sum(map(bool, unread))} prompt(s) longer than the {window}-token window: the model reads "
                  "only their last tokens (JSONL field prompt_ids_unread)", file=sys.stderr)
    fed = [len(ids) - d for ids, d in zip(full_ids, unread, strict=True)]  # prompt tokens given to the sampler
    if suffix is not None and mc.block_size == mc.model_length and not causal:
        total = len(full_ids[0]) + (opts.max_new_tokens or 1) + len(suffix)
        if total > mc.model_length:
            raise CLIError(
                f"prompt ({len(full_ids[0])} tokens) + max_new_tokens ({opts.max_new_tokens}) + suffix "
                f"({len(suffix)} tokens) = {total} tokens exceed the model's length {mc.model_length}; shorten the "
                "prompt or the suffix, or lower max_new_tokens"
            )
    stop = tok.eos_token_id if opts.stop_at_eos and tok.eos_token_id is not None and suffix is None else None

    n = len(shown)
    progress = Progress(n, opts.max_new_tokens or int(mc.model_length), stop, opts.stop_entropy)
    steps_view = None
    if opts.show_steps:
        if suffix is not None:
            raise CLIError("show_steps=true cannot draw infilling (suffix=); drop one of the two")
        from bd3lm.sampling.display import DenoisingDisplay

        steps_view = DenoisingDisplay(tok, shown, delay=opts.step_delay, stop=stop)
    display = Display(tok, progress, shown, enabled=opts.stream and suffix is None and steps_view is None)

    def on_block(i: int, new_ids) -> None:
        progress.add(i, new_ids.tolist())
        display.on_block(i)

    def record(i: int, new_ids: list[int], reason: str, nfe: int, suffix_ids: list[int] | None) -> dict:
        k = i // n_samples
        rec = {"index": i, "prompt": shown[i], "text": tok.decode(new_ids, skip_special_tokens=True),
               "token_ids": new_ids, "prompt_ids": full_ids[k], "prompt_ids_unread": unread[k],
               "stop_reason": reason, "nfe": nfe}
        if suffix_ids is not None:
            rec.update(suffix=opts.suffix, suffix_ids=suffix_ids)
        return rec

    def write(records: list[dict]) -> None:
        try:
            write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        except OSError as exc:
            raise CLIError(f"could not write output {str(out)!r}: {one_line(exc)} (the previous file, if any, is "
                           "unchanged)") from None

    try:
        result = generate(
            model, input_ids, max_new_tokens=opts.max_new_tokens, sampler=opts.sampler, steps=opts.steps,
            threshold=opts.threshold, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
            top_p_rule=opts.top_p_rule, kv_cache=opts.kv_cache, stop=stop, stop_entropy=opts.stop_entropy,
            seed=opts.seed, window=opts.window, window_stride=opts.window_stride, streaming=opts.streaming,
            num_samples=n_samples, bos_token_id=bos, suffix=suffix,
            on_block=on_block if suffix is None else None, on_logits=progress.on_logits if suffix is None else None,
            on_step=steps_view,
        )
    except KeyboardInterrupt:
        if steps_view is not None:
            steps_view.close()
        display.abort()
        done = [i for i in range(n) if progress.reasons[i]]
        records = [record(i, progress.ids[i], progress.reasons[i], progress.nfe[i], None) for i in done]
        if out is not None and records:
            write(records)
            print(f"interrupted: wrote {len(done)} of {n} samples to {opts.output}", file=sys.stderr)
        elif out is not None:
            print(f"interrupted: no sample had finished ({n} started); {opts.output} was not written", file=sys.stderr)
        else:
            print(f"interrupted: {len(done)} of {n} samples had finished (no output= to write them to)",
                  file=sys.stderr)
        return 130
    except BaseException:
        if steps_view is not None:
            steps_view.close()
        display.abort(quiet=True)
        raise
    if steps_view is not None:
        steps_view.close()
    display.finish(result.stop_reasons)
    if suffix is not None and opts.stream:
        for i, seq in enumerate(result.sequences):
            start = fed[i // n_samples]
            span = tok.decode(seq[start : start + result.num_new_tokens[i]].tolist(), skip_special_tokens=True)
            print(f"[{i}] {shown[i] or ''}[{span}]{opts.suffix}")

    if out is not None:
        records = []
        for i, seq in enumerate(result.sequences):
            start = fed[i // n_samples]
            end = start + result.num_new_tokens[i]
            records.append(record(i, seq[start:end].tolist(), result.stop_reasons[i], result.nfe_per_sequence[i],
                                  None if suffix is None else seq[end:].tolist()))
        write(records)
    total = sum(result.num_new_tokens)
    print(
        f"{len(result.sequences)} samples, {total} new tokens, NFE {result.nfe}, "
        f"{result.tokens_per_forward:.2f} tokens/forward, {result.seconds:.2f} s"
        + (f", wrote {opts.output}" if out is not None else ""),
        file=sys.stderr,
    )
    return 0


def _fail(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra's entry point: :func:`run` with the verbatim text options; one-line errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = run(cfg, TEXT_ARGS)
    except (CLIError, ValueError, OSError) as exc:
        _fail(f"error: {one_line(exc)}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if code:
        sys.exit(code)


def cli(argv: list[str] | None = None) -> None:
    """The command line ``argv`` (default ``sys.argv``): the text options are removed before Hydra parses the
    rest, and the rest is checked first so that every usage error is one line (exit code 2)."""
    argv = list(sys.argv if argv is None else argv)
    saved = sys.argv
    try:
        rest, text = split_text_args(argv[1:])
        check_overrides(rest)
        TEXT_ARGS.clear()
        TEXT_ARGS.update(text)
        sys.argv = [argv[0], *rest]
        main()
    except CLIError as exc:
        _fail(f"error: {one_line(exc)}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    cli()
