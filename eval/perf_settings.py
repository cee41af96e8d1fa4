"""The settings of the performance suite (``suite=perf``, :mod:`eval.perf`): the check of every key of the
``perf:`` group of ``configs/eval/speed.yaml``, the cross-key checks, and what makes a run something other than a
measurement at the targets' reference size.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from eval.common import CLIError, integer, list_of, number, optional, output, text
from eval.common import device as device_name
from eval.config_checks import validate

#: The size the targets are stated for (the official tiny model).
REFERENCE_SIZE = {"dim": 256, "layers": 8, "heads": 8, "vocab": 4097, "length": 1024, "block_size": 4}
MIN_REPEATS = 5


#: Every key of the perf: group of configs/eval/speed.yaml and its check (cross-key checks in check_perf).
PERF_KEYS = {
    "repeats": integer(),
    "batches": list_of(integer(), "perf.batches=[8,64]"),
    "long_factor": integer(2),
    "stride_long_factor": integer(2),
    "checkpoint": optional(text),  # missing or unloadable: the confidence row is SKIP, with the reason
    "judge": text,
    "thresholds": list_of(number(0, 1, low_open=True), "perf.thresholds=[0.5,0.9]", single=False),
    "num_samples": integer(),
    "sample_batch": integer(),
    "seed": integer(0),
    "output": optional(output()),
    **{k: integer(2 if k == "vocab" else 1) for k in REFERENCE_SIZE},
}


def check_perf(cfg: DictConfig) -> dict[str, Any]:
    """The validated settings of ``suite=perf`` (plain Python values); raises :class:`CLIError` on bad input."""
    p: dict[str, Any] = validate(cfg.get("perf"), PERF_KEYS, "perf.")
    p["batches"] = sorted(set(p["batches"]))
    p["thresholds"] = list(dict.fromkeys(p["thresholds"]))
    if p["checkpoint"] is not None:
        p["checkpoint"] = os.path.expanduser(p["checkpoint"])
    if p["output"] is not None and p["output"].endswith(".json"):
        output()(p["output"][: -len(".json")] + ".md", "perf.output")
    p["threads"] = optional(integer())(cfg.threads, "threads")
    p["device"] = device_name(cfg.device, "device")
    if p["batches"][0] < 2:
        raise CLIError(f"perf.batches are compared with batch 1; give sizes >= 2; got {p['batches']}")
    if p["block_size"] < 2:
        raise CLIError(f"perf.block_size must be >= 2 (it is compared with block size 1); got {p['block_size']}")
    if p["dim"] % p["heads"]:
        raise CLIError(f"perf.heads {p['heads']} must divide perf.dim {p['dim']}")
    if p["length"] % p["block_size"] or p["length"] < 2 * p["block_size"]:
        raise CLIError(f"perf.block_size {p['block_size']} must divide perf.length {p['length']} at least twice")
    return p


def notes(p: dict[str, Any]) -> list[str]:
    """What makes a run something other than a measurement at the reference size (empty for a real run)."""
    out = []
    if p["repeats"] < MIN_REPEATS:
        out.append(f"repeats={p['repeats']} (< {MIN_REPEATS}: smoke run, not a measurement)")
    if any(p[k] != v for k, v in REFERENCE_SIZE.items()):
        ref = ", ".join(f"{k} {v}" for k, v in REFERENCE_SIZE.items())
        out.append(f"model size differs from the targets' reference size ({ref})")
    return out
