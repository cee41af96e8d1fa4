"""Run a child process while polling the memory of its whole process tree (for :mod:`eval.data_scale`).

:func:`run_child` starts the command in its own process group; :class:`TreeMonitor` reads, every ``interval``
seconds, the memory of the child and of all its descendants from ``/proc`` (psutil lists the descendants; psutil's
RSS is the fallback off Linux). Memory is in MB (10^6 bytes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from eval.common import ROOT, log


def _proc_mem(pid: int) -> dict[str, int] | None:
    """RSS, peak RSS (VmHWM), anonymous RSS, PSS and anonymous PSS of ``pid`` in bytes (Linux /proc; psutil's RSS
    elsewhere). File-backed pages (libraries, memory-mapped Arrow files and shards) are in RSS and PSS, not in the
    anonymous figures: the kernel can drop them under memory pressure."""
    import psutil

    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon):\s+(\d+) kB", f.read(), re.M)}
    except OSError:
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
        return {"rss": rss, "hwm": rss, "anon": rss, "pss": rss, "pss_anon": rss}
    if "VmRSS" not in kb:  # a zombie
        return None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            roll = {k: int(v) * 1024 for k, v in re.findall(r"^(Pss|Pss_Anon):\s+(\d+) kB", f.read(), re.M)}
    except OSError:
        roll = {}
    anon = kb.get("RssAnon", kb["VmRSS"])
    return {"rss": kb["VmRSS"], "hwm": kb.get("VmHWM", kb["VmRSS"]), "anon": anon,
            "pss": roll.get("Pss", kb["VmRSS"]), "pss_anon": roll.get("Pss_Anon", anon)}


def _name(proc) -> str:
    try:
        return " ".join(proc.cmdline()[:3])[:80] or proc.name()
    except Exception:  # noqa: BLE001 - gone, or not readable: no name
        return "?"


class TreeMonitor(threading.Thread):
    """Polls the memory of process ``pid`` and all its descendants every ``interval`` seconds; ``peak`` holds
    the maxima in MB: ``main_rss`` (VmHWM of ``pid``), ``main_anon``, ``tree_rss`` / ``tree_pss`` /
    ``tree_pss_anon`` (largest sum over the processes alive at one poll) and ``processes`` (most processes at
    once); ``at_peak`` lists the processes (pid, command, RSS, PSS) of the poll with the largest RSS sum."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self._halt = pid, interval, threading.Event()
        self.peak = {"main_rss": 0.0, "main_anon": 0.0, "tree_rss": 0.0, "tree_pss": 0.0, "tree_pss_anon": 0.0,
                     "processes": 0}
        self.samples, self.at_peak = 0, []

    def sample(self) -> None:
        import psutil

        try:
            procs = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return
        mems = {p: m for p in procs if (m := _proc_mem(p.pid))}
        if not mems:
            return
        pk, main = self.peak, mems.get(procs[0], {"hwm": 0, "anon": 0})
        pk["main_rss"] = max(pk["main_rss"], main["hwm"] / 1e6)
        pk["main_anon"] = max(pk["main_anon"], main["anon"] / 1e6)
        tree = sum(m["rss"] for m in mems.values()) / 1e6
        if tree > pk["tree_rss"]:  # which processes made the peak
            pk["tree_rss"] = tree
            self.at_peak = [{"pid": p.pid, "name": _name(p), "rss_mb": m["rss"] / 1e6, "pss_mb": m["pss"] / 1e6}
                            for p, m in mems.items()]
        pk["tree_pss"] = max(pk["tree_pss"], sum(m["pss"] for m in mems.values()) / 1e6)
        pk["tree_pss_anon"] = max(pk["tree_pss_anon"], sum(m["pss_anon"] for m in mems.values()) / 1e6)
        pk["processes"] = max(pk["processes"], len(mems))
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def halt(self) -> None:
        self._halt.set()
        self.join()


def run_child(cmd: list[str], *, poll_s: float, timeout_s: float, name: str) -> dict[str, Any]:
    """Run ``cmd`` (cwd: the repository) in its own process group while :class:`TreeMonitor` polls it; stdout and
    stderr lines are kept with their time since the start. Returns the exit code, wall time, lines, memory peaks
    and ``maxrss_mb`` (the kernel's peak RSS of the largest process of the tree, from ``wait4``)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)
    mon = TreeMonitor(proc.pid, poll_s)
    mon.start()
    lines: dict[str, list] = {"stdout": [], "stderr": []}

    def pump(stream, sink: list) -> None:
        for line in stream:
            sink.append((round(time.monotonic() - t0, 3), line.rstrip("\n")))

    pumps = [threading.Thread(target=pump, args=(getattr(proc, k), v), daemon=True) for k, v in lines.items()]
    for p in pumps:
        p.start()
    timed_out = False
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not timed_out and time.monotonic() - t0 > timeout_s:
                timed_out = True
                log(f"  {name}: over timeout_s={timeout_s:g}; killing its process group")
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
    except BaseException:  # Ctrl-C reaches only this process (the child has its own session): stop the child too
        os.killpg(proc.pid, signal.SIGKILL)
        os.waitpid(proc.pid, 0)
        mon.halt()
        raise
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    mon.halt()
    for p in pumps:
        p.join(timeout=10)
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": wall, **lines,
            "peak_mb": mon.peak, "samples": mon.samples, "at_peak": mon.at_peak,
            "maxrss_mb": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e6}
