"""Generate text with a trained BD3-LM checkpoint (Hydra CLI over :func:`bd3lm.sampling.generate`).

    python generate.py checkpoint=DIR [prompt="text" | prompts_file=FILE] num_samples=N max_new_tokens=N \\
        sampler=first_hitting|ddpm|confidence|analytic|euler steps=... [suffix=TEXT] threshold=... \\
        temperature=... top_k=... top_p=... \\
        top_p_rule=hf|official seed=... output=FILE.jsonl

The model is ``BD3LM.from_pretrained(DIR)`` and the tokenizer ``AutoTokenizer.from_pretrained(DIR)`` (the
training
pipeline saves one there). Text is printed block by block as blocks are committed (a live ``rich`` view on a
terminal, plain text otherwise: one sample streams, several are printed when done). ``output=`` writes one
JSON
record per sample: ``index``, ``prompt``, ``text`` (generated text), ``token_ids`` (generated ids),
``prompt_ids``, ``stop_reason``, ``nfe``. Nothing is written to the working directory (Hydra's run directory
and
logs are disabled, see ``configs/generate.yaml``). Bad input is one ``error:`` line on stderr and exit code 2.
Values with commas, colons or quotes need Hydra quoting: ``'prompt="Hello, world"'``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
MAX_PANELS = 8
TOP_P_RULES = ("hf", "official")  # bd3lm.sampling.processing.TOP_P_RULES (not imported: it pulls in torch)


class CLIError(Exception):
    """A user error reported as one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_prompts(cfg: DictConfig) -> list[str] | None:
    """The prompt texts, or ``None`` for unconditional generation."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise CLIError("give either prompt= or prompts_file=, not both")
    if cfg.prompt is not None:
        text = str(cfg.prompt)
        if not text.strip():
            raise CLIError("prompt is empty; omit prompt= for unconditional generation")
        return [text]
    if cfg.prompts_file is not None:
        path = Path(str(cfg.prompts_file))
        if not path.is_file():
            raise CLIError(f"prompts_file {str(path)!r} does not exist")
        prompts = [
            line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if not prompts:
            raise CLIError(f"prompts_file {str(path)!r} contains no prompts (one per non-empty line)")
        return prompts
    return None


class Display:
    """Prints samples block by block: ``rich`` live panels on a TTY, plain text otherwise."""

    def __init__(self, tok, n: int, prompts: list[str | None], enabled: bool) -> None:
        self.tok, self.n, self.prompts = tok, n, prompts
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.shown = [""] * n
        self.done = [False] * n
        self.enabled = enabled
        self.rich = enabled and sys.stdout.isatty()
        self.live = None
        self.streamed_plain = enabled and not self.rich and n == 1
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            self.live = Live(self._render(), console=self.console, refresh_per_second=8)
            self.live.start()
        elif self.streamed_plain and prompts[0]:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()

    def text(self, i: int) -> str:
        """Decoded generated text of sample i, without a trailing incomplete UTF-8 sequence."""
        return self.tok.decode(self.ids[i], skip_special_tokens=False).rstrip("\ufffd")

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        if self.n > MAX_PANELS:
            return Text(
                f"{sum(self.done)}/{self.n} samples finished, "
                f"{sum(len(x) for x in self.ids)} tokens generated"
            )
        panels = []
        for i in range(self.n):
            body = Text(self.prompts[i] or "", style="bold")
            body.append(self.shown[i][-2000:])
            panels.append(Panel(body, title=f"sample {i}", border_style="green" if self.done[i] else "blue"))
        return Group(*panels)

    def on_block(self, i: int, new_ids) -> None:
        self.ids[i].extend(int(t) for t in new_ids)
        if not self.enabled:
            return
        text = self.text(i)
        if self.streamed_plain:
            delta = text[len(self.shown[i]) :] if text.startswith(self.shown[i]) else "\n" + text
            sys.stdout.write(delta)
            sys.stdout.flush()
        self.shown[i] = text
        if self.live is not None:
            self.live.update(self._render())

    def finish(self, reasons: list[str]) -> None:
        if not self.enabled:
            return
        self.done = [True] * self.n
        for i in range(self.n):
            self.shown[i] = self.text(i)
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            if self.n > MAX_PANELS:
                for i in range(self.n):
                    self.console.rule(f"sample {i} ({reasons[i]})")
                    self.console.print((self.prompts[i] or "") + self.shown[i], markup=False, highlight=False)
        elif self.streamed_plain:
            sys.stdout.write("\n")
        else:
            for i in range(self.n):
                print(f"===== sample {i} ({reasons[i]}) =====")
                print((self.prompts[i] or "") + self.shown[i])
        sys.stdout.flush()


def run(cfg: DictConfig) -> int:
    """Load, generate, display and write the samples; raises :class:`CLIError` / ``ValueError`` on bad
    input."""
    if cfg.checkpoint is None:
        raise CLIError("checkpoint=DIR is required (a directory written by save_pretrained)")
    ckpt = str(cfg.checkpoint)
    if not os.path.isdir(ckpt):  # checked before the slow imports below
        raise CLIError(f"checkpoint directory {ckpt!r} does not exist")
    prompts = read_prompts(cfg)
    if str(cfg.dtype) not in DTYPES:
        raise CLIError(f"dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    top_p_rule = cfg.get("top_p_rule", "hf")
    if top_p_rule not in TOP_P_RULES:  # same check and message as bd3lm.sampling.processing, without torch
        raise CLIError(f"top_p_rule must be 'hf' or 'official'; got {top_p_rule!r}")

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import bd3lm
    from bd3lm.checkpoint import check_checkpoint_dir
    from bd3lm.sampling import generate
    from eval.bench import resolve_device

    hf_logging.disable_progress_bar()  # keep stderr to the summary line (or the one error line)
    hf_logging.set_verbosity_error()
    check_checkpoint_dir(ckpt)
    torch_device = resolve_device(str(cfg.device))
    try:
        tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a one-line user error
        raise CLIError(f"could not load a tokenizer from {ckpt!r}: {_one_line(exc)}") from None
    model = bd3lm.BD3LM.from_pretrained(ckpt).to(torch_device, getattr(torch, DTYPES[str(cfg.dtype)])).eval()
    vocab = model.config.vocab_size
    if len(tok) > vocab:
        raise CLIError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}")

    bos = tok.bos_token_id if cfg.add_bos else None
    n_samples = int(cfg.num_samples)
    if prompts is None:
        input_ids, shown_prompts = None, [None] * n_samples
    else:
        input_ids = []
        for text in prompts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            input_ids.append(torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long))
        shown_prompts = [p for p in prompts for _ in range(n_samples)]
    stop = tok.eos_token_id if cfg.stop_at_eos and tok.eos_token_id is not None else None
    suffix_text = cfg.get("suffix")
    suffix = None
    if suffix_text is not None:
        suffix = tok(str(suffix_text), add_special_tokens=False)["input_ids"]
        if not suffix:
            raise CLIError("suffix is empty; omit suffix= to continue the prompt instead of infilling")
        stop = None  # the span's length is fixed by the suffix's position

    display = Display(tok, len(shown_prompts), shown_prompts, enabled=bool(cfg.stream) and suffix is None)
    try:
        result = generate(
            model,
            input_ids,
            max_new_tokens=cfg.max_new_tokens,
            sampler=cfg.sampler,
            steps=cfg.steps,
            threshold=cfg.threshold,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            top_p_rule=top_p_rule,
            kv_cache=bool(cfg.kv_cache),
            stop=stop,
            stop_entropy=cfg.stop_entropy,
            seed=cfg.seed,
            window=cfg.window,
            window_stride=cfg.window_stride,
            streaming=bool(cfg.streaming),
            num_samples=n_samples,
            on_block=display.on_block if suffix is None else None,
            bos_token_id=bos,
            suffix=suffix,
        )
    except BaseException:
        if display.live is not None:
            display.live.stop()
        raise
    display.finish(result.stop_reasons)
    n_suffix = 0 if suffix is None else len(suffix)
    if suffix is not None and cfg.stream:
        for i, seq in enumerate(result.sequences):
            end = len(seq) - n_suffix
            span = tok.decode(seq[end - result.num_new_tokens[i] : end].tolist(), skip_special_tokens=True)
            print(f"[{i}] {shown_prompts[i] or ''}[{span}]{suffix_text}")

    if cfg.output is not None:
        out = Path(str(cfg.output))
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            for i, seq in enumerate(result.sequences):
                n_new = result.num_new_tokens[i]
                end = len(seq) - n_suffix
                new_ids = seq[end - n_new : end].tolist()
                record = {
                    "index": i,
                    "prompt": shown_prompts[i],
                    "text": tok.decode(new_ids, skip_special_tokens=True),
                    "token_ids": new_ids,
                    "prompt_ids": seq[: end - n_new].tolist(),
                    "stop_reason": result.stop_reasons[i],
                    "nfe": result.nfe_per_sequence[i],
                }
                if suffix is not None:
                    record["suffix"] = str(suffix_text)
                    record["suffix_ids"] = seq[end:].tolist()
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    total = sum(result.num_new_tokens)
    print(
        f"{len(result.sequences)} samples, {total} new tokens, NFE {result.nfe}, "
        f"{result.tokens_per_forward:.2f} tokens/forward, {result.seconds:.2f} s"
        + (f", wrote {cfg.output}" if cfg.output is not None else ""),
        file=sys.stderr,
    )
    return 0


@hydra.main(version_base=None, config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(cfg)
    except (CLIError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
