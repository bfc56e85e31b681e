"""`comet-megatron tune`: pick the fused kernels' launch knobs per MoE shape and GPU, and cache them.

Comet's adaptive workload assignment: how many programs (thread blocks) of each fused kernel
communicate, and which GEMM tiles the rest use, depends on the shape and the parallel layout. The
tuner times one fused forward + backward round (`moe_forward` + `moe_backward` of
`comet_megatron.kernels`, weight-gradient GEMMs excluded: they do not depend on these knobs) on random
data over emulated ranks (`EmulatedGroup`; world size 1 by default) for a small set of candidates and
stores the fastest in a JSON cache. `comet_megatron.fused.kernel_config` reads it when a knob is
"auto".

Search (coordinate descent, few candidates):
    1. tiles: (block_m, block_n, block_k, num_warps, num_stages) with the default comm counts
       (gemm_combine on the same block_n and num_stages)
    2. combine tiles: (combine_block_n, combine_num_stages) of gemm_combine, with the best tiles
    3. bwd tiles: (bwd_block_n, bwd_num_stages) of layer 0's backward GEMM, each with its activation
       backward in the GEMM's epilogue and (GPU) as a separate pass, with the best of 2
    4. num_comm_dispatch over the comm grid, with the best of 3
    5. num_comm_combine over the comm grid, with the best of 4
    6. (world size 1 on Hopper) layer 1 through the Gluon kernel or gemm_combine (`gluon_layer1` True /
       False), with the best of 5
Every candidate is timed with `triton.testing.do_bench` (median; CPU interpreter: wall-clock median).
A candidate that fails (too much shared memory, a compile error, a timed-out wait) is recorded and
skipped. The search stops at `budget_s` seconds or `max_candidates` timings, keeping the best so far;
stages 1 to 3 may only use part of `budget_s` (`STAGE_BUDGET_SHARES`) so the comm counts are always
searched.

Cache file (`CometConfig.tune_cache`, default ~/.cache/comet-megatron/tune.json), see docs/TUNING.md:
    {"version": 1, "entries": {KEY_STRING: {"key": {...}, "config": {...}, "ms": .., ...}}}
Written atomically (temporary file + os.replace). A corrupt file gives a warning, is moved aside to
`<path>.corrupt` on the next write and rebuilt; it never raises.

Only the standard library is imported at module level (the CLI stays fast); torch and triton are
imported where needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger("comet_megatron")

CACHE_VERSION = 1
# KernelConfig fields a cache entry may set (the tuner searches the first thirteen: `Candidate`'s fields;
# an entry without combine_* / bwd_* fields means those GEMMs on block_n / num_stages).
TUNED_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "num_comm_dispatch",
                "num_comm_combine", "combine_block_n", "combine_num_stages", "bwd_block_n", "bwd_num_stages",
                "fused_act_backward", "gluon_layer1",
                "group_m", "group_n")
BOOL_FIELDS = ("fused_act_backward",)
OPTIONAL_BOOL_FIELDS = ("gluon_layer1",)  # True / False, or None (the kernels' own rule)
BLOCK_FIELDS = ("block_m", "block_n", "block_k", "combine_block_n", "bwd_block_n")  # powers of two >= 16
MAX_COMM_PROGRAMS = 64  # the workspaces' `max_comm_programs` (comet_megatron.transport.workspace)
CPU_GPU_NAME = "cpu-interpreter"
# Of --budget-s, elapsed from the start: the tiles stage runs until TILE_BUDGET_SHARE, the combine-tiles
# stage until COMBINE_BUDGET_SHARE, the bwd-tiles stage until BWD_BUDGET_SHARE; the comm stages get the
# rest (they always get searched).
TILE_BUDGET_SHARE = 0.6
COMBINE_BUDGET_SHARE = 0.7
BWD_BUDGET_SHARE = 0.8

# (block_m, block_n, block_k, num_warps, num_stages), most promising first (the budget may cut the
# tail). The first entry is KernelConfig's defaults: the baseline the result is compared with.
GPU_TILES = (
    (64, 64, 32, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 256, 32, 8, 3),
    (64, 64, 64, 4, 4),
)
# (combine_block_n, combine_num_stages) tried with the best tiles; the best tiles' own (block_n,
# num_stages), gemm_combine's default, is the stage's base (already timed). 256-wide chunks with 3 stages
# made gemm_combine 1.1-1.2x faster on an H100 (fused.GPU_UNTUNED_DEFAULT).
GPU_COMBINE = ((256, 3), (256, 4), (128, 3), (256, 2))
# (bwd_block_n, bwd_num_stages) of dispatch_gemm_backward tried next: with the activation backward out of
# its epilogue, a 256-wide column block (one accumulator, like the forward's gate + up pair) with 3
# stages made layer 0's backward 1.14-1.20x faster on an H100 (fused.GPU_UNTUNED_DEFAULT).
GPU_BWD = ((256, 3), (256, 4), (128, 3))
# ... each with the activation backward in the GEMM's epilogue (on 64-column sub-blocks: equal to the
# separate pass on Qwen2-MoE / Phi-3.5-MoE, 1.04x on Mixtral at 256 x 3, docs/BENCHMARKS.md) and without
GPU_BWD_FUSED = (True, False)
GPU_COMM_AT_132_SMS = (8, 16, 24, 32, 48)  # scaled by SMs / 132 (Comet: 18..46 of 132 SMs)
CPU_TILES = ((64, 64, 32, 4, 3), (16, 16, 16, 1, 1))
CPU_COMBINE = ((16, 1), (32, 1))
CPU_BWD = ((16, 1), (32, 1))
CPU_COMM = (1, 2)


# ------------------------------------------------------------------------------------------ key
@dataclass(frozen=True)
class TuneKey:
    """What a tuned choice depends on. `tokens_bucket`: tokens per rank rounded up to a power of two."""

    hidden: int
    ffn: int
    experts: int
    topk: int
    gated: bool
    world: int
    tokens_bucket: int
    dtype: str
    gpu: str
    triton: str

    def string(self) -> str:
        kind = "glu" if self.gated else "mlp"
        return (f"h{self.hidden}-f{self.ffn}-e{self.experts}-k{self.topk}-{kind}-w{self.world}-"
                f"t{self.tokens_bucket}-{self.dtype}|{self.gpu}|triton-{self.triton}")

    def shape_string(self) -> str:
        return self.string().split("|")[0]


def tokens_bucket(tokens: int) -> int:
    """The power of two >= tokens (>= 1)."""
    return 1 << max(int(tokens) - 1, 0).bit_length()


def gpu_name(device) -> str:
    """torch.cuda.get_device_name for CUDA devices; "cpu-interpreter" otherwise."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return CPU_GPU_NAME


def triton_version() -> str:
    try:
        import triton
    except ImportError:  # pragma: no cover
        return "none"
    return str(triton.__version__)


def dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def parse_dtype(name: str):
    import torch

    aliases = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
               "float32": torch.float32, "float": torch.float32}
    if name not in aliases:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(aliases)}")
    return aliases[name]


def make_key(*, hidden: int, ffn: int, experts: int, topk: int, gated: bool, world: int, tokens: int,
             dtype, device) -> TuneKey:
    return TuneKey(hidden=int(hidden), ffn=int(ffn), experts=int(experts), topk=int(topk),
                   gated=bool(gated), world=int(world), tokens_bucket=tokens_bucket(tokens),
                   dtype=dtype_name(dtype), gpu=gpu_name(device), triton=triton_version())


# ------------------------------------------------------------------------------------------ cache
def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _valid_config(cfg: Any) -> dict | None:
    if not isinstance(cfg, dict) or not cfg:
        return None
    out = {}
    for name, value in cfg.items():
        if name in BOOL_FIELDS or name in OPTIONAL_BOOL_FIELDS:
            if not isinstance(value, bool) and not (value is None and name in OPTIONAL_BOOL_FIELDS):
                return None
        elif name not in TUNED_FIELDS or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return None
        out[name] = value
    if out.get("num_comm_dispatch", 1) > MAX_COMM_PROGRAMS or out.get("num_comm_combine", 1) > MAX_COMM_PROGRAMS:
        return None
    for name in BLOCK_FIELDS:
        if name in out and (out[name] < 16 or out[name] & (out[name] - 1)):
            return None
    return out


def _parse_key(data: Any) -> TuneKey | None:
    if not isinstance(data, dict):
        return None
    try:
        key = TuneKey(**data)
    except TypeError:
        return None
    ints = (key.hidden, key.ffn, key.experts, key.topk, key.world, key.tokens_bucket)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or not isinstance(key.gated, bool):
        return None
    if not all(isinstance(v, str) for v in (key.dtype, key.gpu, key.triton)):
        return None
    return key


class TuneCache:
    """The JSON cache file of tuned kernel configs."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.corrupt = False  # set by read() when the file existed but could not be used

    def read(self) -> dict[str, dict]:
        """{key string: entry}; a missing file is empty, a corrupt one warns and reads as empty."""
        self.corrupt = False
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            _warn(f"comet tune cache {self.path}: cannot read ({exc}); using kernel defaults.")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._bad(f"not valid JSON ({exc})")
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return self._bad("no 'entries' mapping")
        if data.get("version") != CACHE_VERSION:
            return self._bad(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        entries = {}
        for name, entry in data["entries"].items():
            key = _parse_key(entry.get("key")) if isinstance(entry, dict) else None
            config = _valid_config(entry.get("config")) if key is not None else None
            if key is None or config is None:
                _warn(f"comet tune cache {self.path}: ignoring malformed entry {name!r}.")
                continue
            entries[key.string()] = {**entry, "config": config}
        return entries

    def _bad(self, why: str) -> dict:
        self.corrupt = True
        _warn(f"comet tune cache {self.path} is corrupt ({why}); ignoring it (kernel defaults until "
              f"`comet-megatron tune` rebuilds it; the bad file is kept as {self.path}.corrupt).")
        return {}

    def lookup(self, key: TuneKey, entries: dict | None = None) -> tuple[dict, TuneKey] | None:
        """The entry for `key`, else the one of the nearest tokens bucket (then nearest world size)
        with every other field equal; (entry, its key) or None."""
        entries = self.read() if entries is None else entries
        best, best_rank = None, None
        for entry in entries.values():
            k = _parse_key(entry["key"])
            if k is None or dataclasses.replace(k, tokens_bucket=0, world=0) != \
                    dataclasses.replace(key, tokens_bucket=0, world=0):
                continue
            rank = (abs(math.log2(k.world) - math.log2(key.world)),
                    abs(math.log2(k.tokens_bucket) - math.log2(key.tokens_bucket)),
                    -k.tokens_bucket)
            if best_rank is None or rank < best_rank:
                best, best_rank = (entry, k), rank
        return best

    def store(self, key: TuneKey, entry: dict) -> None:
        """Add/replace one entry: re-read (other writers), merge, write atomically."""
        entries = self.read()
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        if self.corrupt:
            try:
                os.replace(self.path, self.path + ".corrupt")
            except OSError:
                pass
        entries[key.string()] = {**entry, "key": dataclasses.asdict(key)}
        data = {"version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json.tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# ----------------------------------------------------------------------- use at run time (auto)
_LOGGED: set = set()
_READS: dict = {}  # path -> ((mtime_ns, size), entries): one parse per file version


def _cached_entries(cache: TuneCache) -> dict:
    try:
        st = os.stat(cache.path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        return {}
    hit = _READS.get(cache.path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    entries = cache.read()
    _READS[cache.path] = (stamp, entries)
    return entries


def cached_config(path: str, key: TuneKey) -> tuple[dict | None, str]:
    """(KernelConfig fields from the cache or None, a sentence saying which) for `key`. Never raises."""
    cache = TuneCache(path)
    try:
        found = cache.lookup(key, _cached_entries(cache))
    except Exception as exc:  # noqa: BLE001 - a broken cache must never stop training
        _warn(f"comet tune cache {cache.path}: unusable ({type(exc).__name__}: {exc}).")
        found = None
    if found is None:
        return None, (f"kernel defaults (no entry for {key.shape_string()} on {key.gpu} in {cache.path}; "
                      f"`comet-megatron tune` fills it)")
    entry, k = found
    how = "exact entry" if k == key else f"nearest entry (tokens {k.tokens_bucket}, world {k.world})"
    return dict(entry["config"]), f"tuned config from {cache.path}, {how}: {entry['config']}"


def log_once(key: TuneKey, message: str) -> None:
    if (key, message) not in _LOGGED:
        _LOGGED.add((key, message))
        log.info("comet: kernel config for %s: %s", key.string(), message)


# ----------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One point of the search: `KernelConfig` fields. combine_* / bwd_* left out (None) become block_n /
    num_stages when built, so a candidate (and its cache entry) always holds concrete ints and equal
    configs compare equal."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    num_comm_dispatch: int
    num_comm_combine: int
    combine_block_n: int = None  # type: ignore[assignment] # None -> block_n
    combine_num_stages: int = None  # type: ignore[assignment] # None -> num_stages
    bwd_block_n: int = None  # type: ignore[assignment] # None -> block_n
    bwd_num_stages: int = None  # type: ignore[assignment] # None -> num_stages
    fused_act_backward: bool = False  # layer 0 backward: activation backward in the epilogue (else a pass)
    gluon_layer1: bool | None = None  # world size 1: the Gluon layer-1 kernel (None: where K <= 4096)

    def __post_init__(self) -> None:
        for name, base in (("combine_block_n", self.block_n), ("combine_num_stages", self.num_stages),
                           ("bwd_block_n", self.block_n), ("bwd_num_stages", self.num_stages)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, base)

    @classmethod
    def from_config(cls, cfg: dict) -> Candidate | None:
        """The candidate of a cache entry's config (old entries lack the combine / bwd fields); None when a
        field without a default is missing."""
        fields = dataclasses.fields(cls)
        if not all(f.name in cfg for f in fields if f.default is dataclasses.MISSING):
            return None
        return cls(**{f.name: cfg[f.name] for f in fields if f.name in cfg})

    def config(self) -> dict:
        return dataclasses.asdict(self)

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages} "
                f"combine {self.combine_block_n} s{self.combine_num_stages} "
                f"bwd {self.bwd_block_n} s{self.bwd_num_stages}{' fused' if self.fused_act_backward else ''} "
                f"comm {self.num_comm_dispatch}/{self.num_comm_combine}"
                + ("" if self.gluon_layer1 is None else f" L1 {'gluon' if self.gluon_layer1 else 'triton'}"))


@dataclass
class Grid:
    tiles: Sequence[tuple[int, int, int, int, int]]
    comm: Sequence[int]
    default_comm: int
    combine: Sequence[tuple[int, int]] = ()  # (combine_block_n, combine_num_stages) options
    bwd: Sequence[tuple[int, int]] = ()  # (bwd_block_n, bwd_num_stages) options
    bwd_fused: Sequence[bool] = (False,)  # fused_act_backward options tried with each bwd option
    default_comm_combine: int | None = None  # gemm_combine's comm count in the tile stages (None: default_comm)
    comm_dispatch_extra: Sequence[int] = ()  # more num_comm_dispatch values (world size 1)
    comm_combine_extra: Sequence[int] = ()  # more num_comm_combine values (world size 1)
    layer1: Sequence[bool] = ()  # gluon_layer1 values tried last (world size 1 on Hopper)

    def comm_values(self, name: str) -> list[int]:
        extra = self.comm_dispatch_extra if name == "num_comm_dispatch" else self.comm_combine_extra
        return sorted(set(self.comm) | set(extra))


def sm_count(device) -> int | None:
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_grid(device, world: int = 1) -> Grid:
    """The search grid on this device. At world size 1 nothing leaves the rank: gemm_combine's
    communication programs only raise its arrival signal (one is enough: 1.03-1.12x faster layer 1 on an
    H100 than 16, the whole rest of the GPU computes), and dispatch_gemm's copy the receive rows for the
    weight gradients (4 suit large experts, 16 small ones: docs/BENCHMARKS.md), hence those extra values
    and gemm_combine on one communication program in the tile stages."""
    sms = sm_count(device)
    if sms is None:
        return Grid(tiles=CPU_TILES, comm=CPU_COMM, default_comm=2, combine=CPU_COMBINE, bwd=CPU_BWD)
    limit = min(MAX_COMM_PROGRAMS, sms // 2)
    comm = sorted({min(limit, max(1, round(c * sms / 132))) for c in GPU_COMM_AT_132_SMS})
    if world == 1:
        return Grid(tiles=GPU_TILES, comm=comm, default_comm=max(1, sms // 8), combine=GPU_COMBINE, bwd=GPU_BWD,
                    bwd_fused=GPU_BWD_FUSED, default_comm_combine=1, comm_dispatch_extra=(4,),
                    comm_combine_extra=(1,), layer1=(True, False) if gluon_layer1_possible(device) else ())
    return Grid(tiles=GPU_TILES, comm=comm, default_comm=max(1, sms // 8), combine=GPU_COMBINE, bwd=GPU_BWD,
                bwd_fused=GPU_BWD_FUSED)


def gluon_layer1_possible(device) -> bool:
    """The Gluon layer-1 kernel can run on this device (Hopper, a Triton with Gluon, not the interpreter, not
    turned off)."""
    from comet_megatron.kernels.gluon_gemm import gluon_unavailable

    return gluon_unavailable(device) is None


@dataclass
class Trial:
    stage: str
    candidate: Candidate
    ms: float | None = None
    error: str | None = None  # why it failed, or "skipped: ..." when the budget ran out
    seconds: float = 0.0  # wall time spent on it (compilation included)


@dataclass
class TuneResult:
    key: TuneKey
    cache_path: str
    best: Candidate | None
    best_ms: float | None
    baseline_ms: float | None  # the first candidate (default grid: the kernels' defaults)
    trials: list[Trial] = field(default_factory=list)
    from_cache: bool = False
    cached_entry: dict | None = None
    timing: str = "round"  # key of TIMINGS: what `ms` measures


STAGE_BUDGET_SHARES = {"tiles": TILE_BUDGET_SHARE, "combine tiles": COMBINE_BUDGET_SHARE,
                       "bwd tiles": BWD_BUDGET_SHARE}


def coordinate_descent(measure: Callable[[Candidate], float], grid: Grid, *, budget_s: float,
                       max_candidates: int, on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Tiles with default comm counts, then gemm_combine's (combine_block_n, combine_num_stages), then
    layer 0 backward's (bwd_block_n, bwd_num_stages), then num_comm_dispatch, then num_comm_combine, then
    (grid.layer1) the Gluon layer 1 on and off.

    The tiles stage runs until `TILE_BUDGET_SHARE` of `budget_s` has elapsed, the combine-tiles stage
    until `COMBINE_BUDGET_SHARE`, the bwd-tiles stage until `BWD_BUDGET_SHARE`, so that the comm counts
    (Comet's adaptive assignment) are always searched.

    `measure(candidate) -> ms` may raise: the candidate is recorded as failed. A candidate already
    measured is not measured again. Returns every trial in order (failed and skipped included).
    """
    start = time.monotonic()
    trials: list[Trial] = []
    seen: dict[Candidate, Trial] = {}

    def attempt(stage: str, cand: Candidate) -> None:
        if cand in seen:
            return
        trial = Trial(stage, cand)
        seen[cand] = trial
        measured = sum(1 for t in trials if t.error is None or not t.error.startswith("skipped"))
        share = STAGE_BUDGET_SHARES.get(stage)
        if measured >= max_candidates:
            trial.error = f"skipped: --max-candidates {max_candidates}"
        elif time.monotonic() - start > budget_s * (share or 1.0):
            trial.error = f"skipped: budget {budget_s:g} s" + (f" ({stage}' share)" if share else "")
        else:
            t0 = time.monotonic()
            try:
                trial.ms = float(measure(cand))
                if not math.isfinite(trial.ms):
                    raise ValueError(f"timing {trial.ms}")
            except Exception as exc:  # noqa: BLE001 - any failure skips the candidate
                trial.ms, trial.error = None, short_error(exc)
            trial.seconds = time.monotonic() - t0
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)

    def best() -> Candidate | None:
        ok = [t for t in trials if t.ms is not None]
        return min(ok, key=lambda t: t.ms).candidate if ok else None

    dc = grid.default_comm
    dcc = grid.default_comm_combine or dc
    for tile in grid.tiles:
        attempt("tiles", Candidate(*tile, num_comm_dispatch=dc, num_comm_combine=dcc))
    base = best()
    for combine_block_n, combine_num_stages in (grid.combine if base is not None else ()):
        attempt("combine tiles", dataclasses.replace(base, combine_block_n=combine_block_n,
                                                     combine_num_stages=combine_num_stages))
    base = best()
    for bwd_block_n, bwd_num_stages in (grid.bwd if base is not None else ()):
        for fused in grid.bwd_fused:
            attempt("bwd tiles", dataclasses.replace(base, bwd_block_n=bwd_block_n, bwd_num_stages=bwd_num_stages,
                                                     fused_act_backward=fused))
    for name, stage in (("num_comm_dispatch", "comm dispatch"), ("num_comm_combine", "comm combine")):
        base = best()
        if base is None:
            break
        for c in grid.comm_values(name):
            attempt(stage, dataclasses.replace(base, **{name: c}))
    base = best()
    for use in (grid.layer1 if base is not None else ()):
        attempt("layer 1 kernel", dataclasses.replace(base, gluon_layer1=use))
    return trials


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if name == "OutOfResources":
        name = "out of resources (shared memory / registers)"
    return f"{name}: {text}"[:120]


# ------------------------------------------------------------------------------ measuring rounds
class RoundBench:
    """Random MoE data on emulated ranks; `measure(candidate)` times one forward + backward round."""

    def __init__(self, *, hidden: int, ffn: int, experts: int, topk: int, gated: bool, world: int,
                 tokens: int, dtype, device, seed: int = 1234, timeout=None):
        import torch

        if experts % world:
            raise ValueError(f"{experts} experts do not split over world size {world}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.world, self.tokens, self.topk, self.hidden = world, tokens, topk, hidden
        self.experts = experts
        self.timeout = timeout
        self.activation = "silu" if gated else "gelu"
        self.gated = gated
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        el, f1 = experts // world, (2 * ffn if gated else ffn)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

        self.xs, self.idx, self.probs, self.w1, self.w2, self.grads = [], [], [], [], [], []
        for _ in range(world):
            self.xs.append(rnd(tokens, hidden))
            self.grads.append(rnd(tokens, hidden))
            scores = torch.rand(tokens, experts, generator=g, device=dev)
            self.idx.append(scores.topk(topk, dim=1).indices.sort(dim=1).values.to(torch.int32))
            self.probs.append(torch.softmax(torch.randn(tokens, topk, generator=g, device=dev), 1))
            # as the layer stores them ([El, F1, H], [El, H, F]) and passes transposed views
            self.w1.append(rnd(el, f1, hidden, scale=hidden ** -0.5).transpose(1, 2))
            self.w2.append(rnd(el, hidden, ffn, scale=ffn ** -0.5).transpose(1, 2))
        self.group = None

    def _new_group(self):
        from comet_megatron.kernels import EmulatedGroup

        self.group = EmulatedGroup(self.world, capacity_tokens=self.tokens, topk=self.topk, hidden=self.hidden,
                                   num_experts=self.experts, dtype=self.dtype, device=self.device,
                                   max_comm_programs=MAX_COMM_PROGRAMS, timeout=self.timeout)

    def kernel_config(self, cand: Candidate):
        from comet_megatron.kernels import KernelConfig

        return KernelConfig(activation=self.activation, gated=self.gated, **cand.config())

    def round(self, kc) -> None:
        from comet_megatron.kernels import moe_backward, moe_forward, run_ranks

        views = self.group.views
        fwd = run_ranks([moe_forward(v, self.xs[r], self.idx[r], self.probs[r], self.w1[r], self.w2[r], kc)
                         for r, v in enumerate(views)], views)
        run_ranks([moe_backward(v, fwd[r][1], self.grads[r], self.w1[r], self.w2[r], kc)
                   for r, v in enumerate(views)], views)

    def measure(self, cand: Candidate, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 2) -> float:
        import torch

        if self.device.type == "cuda":
            sms = sm_count(self.device)
            for nc in (cand.num_comm_dispatch, cand.num_comm_combine):
                if nc >= sms:
                    raise ValueError(f"{nc} comm programs leave no compute program on {sms} SMs")
        kc = self.kernel_config(cand)
        if self.group is None:
            self._new_group()
        try:
            self.round(kc)  # compiles; a failure here skips the candidate
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                import triton.testing

                return float(triton.testing.do_bench(lambda: self.round(kc), warmup=warmup_ms, rep=rep_ms,
                                                     return_mode="median"))
            times = []
            for _ in range(cpu_reps):
                t0 = time.perf_counter()
                self.round(kc)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        except BaseException:
            self.group = None  # flags of a half-run round: start the next candidate on fresh buffers
            raise


class KernelTimingBench:
    """`--timing kernels`: a candidate's time is the sum of the CUDA-event medians of the four fused
    kernels of rank 0 (`comet-megatron bench kernels`'s measurement), without a round's host-side work
    (publish, layout, host sync, launches), which does not depend on the knobs but made round timings
    noisy on small shapes (docs/TUNING.md)."""

    def __init__(self, *, hidden: int, ffn: int, experts: int, topk: int, gated: bool, world: int, tokens: int,
                 dtype, reps: int = 10, warmup: int = 2):
        from comet_megatron.bench import Shape
        from comet_megatron.bench_kernels import KernelBench

        self.gated, self.reps, self.warmup = gated, reps, warmup
        self.bench = KernelBench(Shape("tune", hidden, ffn, experts, topk, gated), tokens, world=world,
                                 dtype=dtype)
        self.burned_in = False

    def measure(self, cand: Candidate) -> float:
        from comet_megatron.kernels import KernelConfig

        kc = KernelConfig(activation="silu", gated=self.gated, **cand.config())
        if not self.burned_in:  # the first candidate once untimed: no first-position bias on the baseline
            self.bench.fused(kc, 2, 1, kernels_only=True)
            self.burned_in = True
        times = self.bench.fused(kc, self.reps, self.warmup, kernels_only=True)
        return float(sum(times.values()))


TIMINGS = {"round": "forward+backward round (no wgrad), median ms",
           "kernels": "sum of the four fused kernels' medians (CUDA events, rank 0), ms"}


# ------------------------------------------------------------------------------------------ tune
def tune(*, hidden: int, ffn: int, experts: int, topk: int, gated: bool, tokens: int, world: int = 1,
         dtype=None, device=None, cache_path: str | None = None, grid: Grid | None = None,
         budget_s: float = 150.0, max_candidates: int = 26, force: bool = False,
         measure: Callable[[Candidate], float] | None = None, progress: bool = True,
         timing: str = "round") -> TuneResult:
    """Tune one shape at one token count; store the best in the cache and return what was tried.

    With an entry for exactly this key in the cache (and not `force`), nothing is timed. `measure`
    replaces the real timing (tests).
    """
    import torch

    from comet_megatron.config import DEFAULT_TUNE_CACHE

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    key = make_key(hidden=hidden, ffn=ffn, experts=experts, topk=topk, gated=gated, world=world,
                   tokens=tokens, dtype=dtype, device=device)
    cache = TuneCache(cache_path or DEFAULT_TUNE_CACHE)
    if not force:
        entries = cache.read()
        if key.string() in entries:
            entry = entries[key.string()]
            cand = Candidate.from_config(entry["config"])
            return TuneResult(key, cache.path, cand, entry.get("ms"), entry.get("baseline_ms"), [],
                              from_cache=True, cached_entry=entry)
    grid = grid or default_grid(device, world)
    if timing not in TIMINGS:
        raise ValueError(f"timing {timing!r} not in {sorted(TIMINGS)}")
    if measure is None and timing == "kernels":
        measure = KernelTimingBench(hidden=hidden, ffn=ffn, experts=experts, topk=topk, gated=gated, world=world,
                                    tokens=tokens, dtype=dtype).measure
    if measure is None:
        bench = RoundBench(hidden=hidden, ffn=ffn, experts=experts, topk=topk, gated=gated, world=world,
                           tokens=tokens, dtype=dtype, device=device,
                           timeout=5_000_000_000 if device.type == "cuda" else None)
        measure = bench.measure
    trials = _run_search(measure, grid, budget_s=budget_s, max_candidates=max_candidates, progress=progress,
                         title=f"tuning {key.shape_string()}")
    ok = [t for t in trials if t.ms is not None]
    best = min(ok, key=lambda t: t.ms) if ok else None
    baseline_ms = trials[0].ms if trials else None  # the first tile candidate at the default comm counts
    result = TuneResult(key, cache.path, best.candidate if best else None, best.ms if best else None,
                        baseline_ms, trials, timing=timing)
    if best is not None:
        cache.store(key, {
            "config": best.candidate.config(), "ms": round(best.ms, 6),
            "baseline_ms": None if baseline_ms is None else round(baseline_ms, 6),
            "trials": len([t for t in trials if not (t.error or "").startswith("skipped")]),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokens": int(tokens), "timing": TIMINGS[timing],
        })
    return result


def _run_search(measure, grid, *, budget_s, max_candidates, progress, title) -> list[Trial]:
    total = min(max_candidates, len(grid.tiles) + len(grid.combine) + len(grid.bwd) * len(grid.bwd_fused)
                + len(grid.comm_values("num_comm_dispatch")) + len(grid.comm_values("num_comm_combine")))
    if not progress:
        return coordinate_descent(measure, grid, budget_s=budget_s, max_candidates=max_candidates)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), transient=not sys.stdout.isatty()) as bar:
        task = bar.add_task(title, total=total, last="")

        def on_trial(t: Trial) -> None:
            if t.error and t.error.startswith("skipped"):
                return
            last = f"{t.candidate.label()}: " + (f"{t.ms:.3f} ms" if t.ms is not None else "failed")
            bar.update(task, advance=1, last=last)

        return coordinate_descent(measure, grid, budget_s=budget_s, max_candidates=max_candidates,
                                  on_trial=on_trial)


# ------------------------------------------------------------------------------------------ report
def print_result(result: TuneResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)
    key = result.key
    if result.from_cache:
        console.print(f"[bold]{key.string()}[/]: cached entry in {result.cache_path} (not re-timed; "
                      f"--force re-tunes): {result.cached_entry['config']}, {result.best_ms} ms")
        return
    table = Table(title=f"{key.shape_string()} on {key.gpu} ({TIMINGS[result.timing]})")
    # BM/BN/BK: block_m/n/k; w: warps; st: stages; "comb n", "comb st": gemm_combine's combine_block_n,
    # combine_num_stages; "bwd n", "bwd st", "bwd f": layer 0 backward's bwd_block_n, bwd_num_stages,
    # fused_act_backward; "comm d",
    # "comm c": communication programs of dispatch_gemm and gemm_combine; "L1": gluon_layer1 (auto / gluon /
    # triton)
    for col in ("#", "stage", "BM", "BN", "BK", "w", "st", "comb n", "comb st",
                "bwd n", "bwd st", "bwd f", "comm d", "comm c", "L1", "ms", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right",
                         min_width={"note": 28, "stage": 13}.get(col), no_wrap=col == "stage")
    for i, t in enumerate(result.trials, 1):
        c = t.candidate
        note = t.error or ""
        if result.best is not None and c == result.best and t.ms == result.best_ms:
            note = "[bold green]chosen[/]"
        elif i == 1 and t.ms is not None:
            note = "baseline"
        table.add_row(str(i), t.stage, str(c.block_m), str(c.block_n), str(c.block_k), str(c.num_warps),
                      str(c.num_stages), str(c.combine_block_n), str(c.combine_num_stages),
                      str(c.bwd_block_n), str(c.bwd_num_stages), "y" if c.fused_act_backward else "n",
                      str(c.num_comm_dispatch), str(c.num_comm_combine),
                      {None: "auto", True: "gluon", False: "triton"}[c.gluon_layer1],
                      "-" if t.ms is None else f"{t.ms:.3f}", note)
    console.print(table)
    if result.best is None:
        console.print("[red]no candidate ran; nothing cached[/]")
        return
    speedup = ""
    if result.baseline_ms:
        speedup = f" ({result.baseline_ms / result.best_ms:.2f}x vs the baseline's {result.baseline_ms:.3f} ms)"
    console.print(f"chose {result.best.label()}: {result.best_ms:.3f} ms{speedup}; "
                  f"cached in {result.cache_path} as {key.string()!r}")


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="pretraining YAML (or a name in configs/); its megatron: section gives the MoE shape")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="tokens per rank to tune for (default: seq_length x micro_batch_size of the YAML)")
    p.add_argument("--world", type=int, default=1,
                   help="expert-parallel ranks to emulate on this device (default 1)")
    p.add_argument("--cache", default=None,
                   help="cache file (default: the YAML's comet.tune_cache, else ~/.cache/comet-megatron/tune.json)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="seconds of search in all (split over the token counts); the best so far is kept")
    p.add_argument("--max-candidates", type=int, default=32, help="most timings per token count")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the YAML's; fp32 on the CPU)")
    p.add_argument("--tiles", default=None,
                   help="tile candidates, comma-separated BMxBNxBKxWARPSxSTAGES (first = baseline)")
    p.add_argument("--combine-tiles", default=None,
                   help="gemm_combine options for the best tiles, comma-separated COMBINE_BNxSTAGES (e.g. 256x3)")
    p.add_argument("--bwd-tiles", default=None,
                   help="layer 0 backward GEMM options for the best tiles, comma-separated BWD_BNxSTAGES (e.g. 256x3)")
    p.add_argument("--comm", default=None, help="comm-program counts to try, comma-separated")
    p.add_argument("--force", action="store_true", help="re-tune even when the cache has this key")
    p.add_argument("--timing", choices=sorted(TIMINGS), default="round",
                   help="round: one fused forward+backward round per candidate (default); kernels: the sum of "
                        "the four fused kernels timed alone with CUDA events (less noise on small shapes)")


def _parse_pairs(text: str, flag: str) -> list[tuple[int, int]]:
    """`--combine-tiles` / `--bwd-tiles`: comma-separated BLOCK_NxSTAGES."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{flag} {item!r}: expected BLOCK_NxSTAGES, e.g. 256x3")
        block_n, stages = (int(p) for p in parts)
        if block_n < 16 or block_n & (block_n - 1) or stages < 1:
            raise ValueError(f"{flag} {item!r}: the column block must be a power of two >= 16 "
                             f"and the stages >= 1, e.g. 256x3")
        pairs.append((block_n, stages))
    return pairs


def _parse_grid(args, device) -> Grid:
    grid = default_grid(device, getattr(args, "world", 1))
    if args.tiles:
        tiles = []
        for item in args.tiles.split(","):
            parts = item.strip().lower().split("x")
            if len(parts) != 5 or not all(p.isdigit() for p in parts):
                raise ValueError(f"--tiles {item!r}: expected BMxBNxBKxWARPSxSTAGES, e.g. 128x128x64x8x3")
            tiles.append(tuple(int(p) for p in parts))
        grid.tiles = tiles
    for attr, flag, what in (("combine_tiles", "--combine-tiles", "combine"), ("bwd_tiles", "--bwd-tiles", "bwd")):
        if getattr(args, attr, None):
            setattr(grid, what, _parse_pairs(getattr(args, attr), flag))
    if args.comm:
        try:
            grid.comm = [int(c) for c in args.comm.split(",")]
        except ValueError:
            raise ValueError(f"--comm {args.comm!r}: expected comma-separated integers") from None
        grid.comm_dispatch_extra = grid.comm_combine_extra = ()  # exactly the values asked for
    return grid


def main(args: argparse.Namespace) -> int:
    import yaml

    from comet_megatron.bench import load_shape

    try:
        shape = load_shape(args.config)
    except SystemExit as exc:
        print(f"comet-megatron tune: {str(exc).removeprefix('bench: ')}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"comet-megatron tune: {args.config}: megatron.{exc.args[0]} is missing (the MoE shape needs "
              "hidden_size, moe_ffn_hidden_size, num_experts, moe_router_topk)", file=sys.stderr)
        return 2
    path = args.config if os.path.exists(args.config) else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{args.config}.yaml")
    doc = yaml.safe_load(open(path)) or {}
    meg, comet = doc.get("megatron") or {}, doc.get("comet") or {}
    tokens_list = args.tokens or [int(meg.get("seq_length", 4096)) * int(meg.get("micro_batch_size", 1))]
    cache_path = args.cache or comet.get("tune_cache") or None

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("comet-megatron tune: no GPU; set TRITON_INTERPRET=1 before triton is imported",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        work = max(tokens_list) * shape.topk * shape.hidden * shape.ffn * args.world
        if work > 2 ** 30:
            print(f"comet-megatron tune: no GPU: the Triton CPU interpreter would take hours for "
                  f"{shape.name} at {max(tokens_list)} tokens (timings on the CPU mean nothing anyway); "
                  "run on the GPU you will train on. The CPU path is for tests with tiny shapes.",
                  file=sys.stderr)
            return 2
    dtype = args.dtype or ("bf16" if meg.get("bf16") else "fp16" if meg.get("fp16") else "fp32")
    if not on_gpu:
        dtype = args.dtype or "fp32"
    device = torch.device("cuda" if on_gpu else "cpu")
    try:
        grid = _parse_grid(args, device)
        parse_dtype(dtype)
    except ValueError as exc:
        print(f"comet-megatron tune: {exc}", file=sys.stderr)
        return 2
    if shape.experts % args.world:
        print(f"comet-megatron tune: --world {args.world} does not divide {shape.experts} experts",
              file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(width=160)
    console.print(f"comet-megatron tune: {shape.name} (hidden {shape.hidden}, ffn {shape.ffn}, "
                  f"{shape.experts} experts, top-{shape.topk}, {'gated' if shape.gated else 'plain'}), "
                  f"world {args.world}, {dtype}, tokens {tokens_list}, on {gpu_name(device)}")
    status = 0
    for tokens in tokens_list:
        result = tune(hidden=shape.hidden, ffn=shape.ffn, experts=shape.experts, topk=shape.topk,
                      gated=shape.gated, tokens=tokens, world=args.world, dtype=dtype, device=device,
                      cache_path=cache_path, grid=grid, budget_s=args.budget_s / len(tokens_list),
                      max_candidates=args.max_candidates, force=args.force, timing=args.timing)
        print_result(result, console)
        if result.best is None:
            status = 1
    return status

