"""Timeline of one fused forward round from the kernels' trace mode (`--comet-trace`).

`events(trace)` turns the raw trace buffers of `dispatch_gemm` and `gemm_combine` (see
docs/KERNELS.md, "Trace mode") into intervals; `plot(events, path)` draws them, one band per
kernel, communication above compute, each band split into lanes (greedy interval packing, so a lane
is what one program could have run): the overlap of communication and GEMM tiles is visible as
bars of both kinds at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Event:
    kernel: str  # dispatch_gemm | gemm_combine
    role: str  # comm | compute
    start: float  # microseconds from the round's first timestamp
    end: float
    item: int


def events(dispatch_trace: torch.Tensor, combine_trace: torch.Tensor, max_tiles: int) -> list[Event]:
    """Intervals of one round. Unused trace rows are -1 and skipped."""
    d = dispatch_trace.cpu().tolist()
    c = combine_trace.cpu().tolist()
    raw: list[tuple[str, str, int, int, int]] = []
    for q, (start, end) in enumerate(d[:max_tiles]):
        if start >= 0 and end >= 0:
            raw.append(("dispatch_gemm", "comm", start, end, q))
    for w, (start, end) in enumerate(d[max_tiles:]):
        if start >= 0 and end >= 0:
            raw.append(("dispatch_gemm", "compute", start, end, w))
    half = len(c) // 2
    for w, (start, end) in enumerate(c[:half]):
        if start >= 0 and end >= 0:
            raw.append(("gemm_combine", "compute", start, end, w))
            delivered = c[half + w][0]
            if delivered >= 0:
                # a chunk's communication runs from its GEMM's end to its delivery at the owner
                raw.append(("gemm_combine", "comm", end, delivered, w))
    if not raw:
        return []
    t0 = min(r[2] for r in raw)
    # %globaltimer ticks are ns on a GPU; interpreter ticks are counts (plotted as-is)
    return [Event(k, role, (s - t0) / 1e3, (e - t0) / 1e3, i) for k, role, s, e, i in raw]


def _lanes(intervals: list[tuple[float, float]]) -> list[int]:
    ends: list[float] = []
    lanes = []
    for start, end in intervals:
        for i, lane_end in enumerate(ends):
            if lane_end <= start:
                ends[i] = end
                lanes.append(i)
                break
        else:
            ends.append(end)
            lanes.append(len(ends) - 1)
    return lanes


def plot(evts: list[Event], path, title: str = "comet fused forward round") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = [("dispatch_gemm", "comm"), ("dispatch_gemm", "compute"),
             ("gemm_combine", "compute"), ("gemm_combine", "comm")]
    colors = {"comm": "tab:orange", "compute": "tab:blue"}
    fig, ax = plt.subplots(figsize=(12, 6))
    base, ticks, labels = 0, [], []
    for kernel, role in bands:
        sel = sorted((e for e in evts if e.kernel == kernel and e.role == role), key=lambda e: e.start)
        lanes = _lanes([(e.start, e.end) for e in sel])
        n = (max(lanes) + 1) if lanes else 1
        for e, lane in zip(sel, lanes):
            ax.barh(base + lane, max(e.end - e.start, 1e-3), left=e.start, height=0.8,
                    color=colors[role], edgecolor="none")
        ticks.append(base + n / 2)
        labels.append(f"{kernel}\n{role} ({len(sel)})")
        base += n + 2
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("time (µs from the first event; interpreter: ticks / 1000)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(evts: list[Event]) -> dict:
    """Per (kernel, role): count, busy span; and how much of each kernel's communication span
    overlaps its compute span."""
    out = {}
    for kernel in ("dispatch_gemm", "gemm_combine"):
        spans = {}
        for role in ("comm", "compute"):
            sel = [e for e in evts if e.kernel == kernel and e.role == role]
            if sel:
                spans[role] = (min(e.start for e in sel), max(e.end for e in sel), len(sel))
        if "comm" in spans and "compute" in spans:
            (cs, ce, _), (ps, pe, _) = spans["comm"], spans["compute"]
            overlap = max(0.0, min(ce, pe) - max(cs, ps))
            out[kernel] = {"comm_span_us": ce - cs, "compute_span_us": pe - ps,
                           "overlap_us": overlap, "items": {r: s[2] for r, s in spans.items()}}
    return out
