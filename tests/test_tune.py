"""The tuner (`comet_megatron.tune`, `comet-megatron tune`) and how `kernel_config` uses its cache (CPU).

The end-to-end runs go through the CLI in a subprocess with TRITON_INTERPRET=1 (it must be set before
triton is imported); the rest runs in-process with a fake timing function and never launches a kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from comet_megatron import tune  # noqa: E402
from comet_megatron.config import CometConfig  # noqa: E402
from comet_megatron.fused import kernel_config  # noqa: E402
from comet_megatron.kernels import KernelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=32, ffn=16, experts=4, topk=2, gated=True)
TINY_YAML = """\
megatron:
  hidden_size: 32
  moe_ffn_hidden_size: 16
  num_experts: 4
  moe_router_topk: 2
  swiglu: true
  seq_length: 16
  micro_batch_size: 1
"""


def _cli(*args, cwd):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "comet_megatron.cli", "tune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _layer_config(**shape):
    shape = {**TINY, **shape}
    return SimpleNamespace(
        activation_func=F.silu, gated_linear_unit=shape["gated"], hidden_size=shape["hidden"],
        moe_ffn_hidden_size=shape["ffn"], num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
    )


def _key(tokens=64, world=1, gpu=None, **shape):
    key = tune.make_key(**{**TINY, **shape}, world=world, tokens=tokens, dtype=torch.float32, device="cpu")
    return key if gpu is None else tune.dataclasses.replace(key, gpu=gpu)


TUNED = dict(block_m=32, block_n=128, block_k=64, num_warps=8, num_stages=4, num_comm_dispatch=24,
             num_comm_combine=16)


def _store(path, key, config=TUNED):
    tune.TuneCache(path).store(key, {"config": dict(config), "ms": 1.0})


# ------------------------------------------------------------------ end to end (interpreter, CLI)
def test_tune_end_to_end_then_cached(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    cache = tmp_path / "sub" / "tune.json"
    args = ("--config", str(tmp_path / "tiny.yaml"), "--cache", str(cache), "--tiles",
            "16x16x16x1x1,32x32x16x1x1", "--combine-tiles", "16x1,32x1", "--bwd-tiles", "16x1", "--comm", "1,2",
            "--max-candidates", "3")
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "chose" in first.stdout and "skipped: --max-candidates 3" in first.stdout, first.stdout
    data = json.loads(cache.read_text())
    assert data["version"] == tune.CACHE_VERSION
    [(name, entry)] = data["entries"].items()
    assert entry["key"] == {"hidden": 32, "ffn": 16, "experts": 4, "topk": 2, "gated": True, "world": 1,
                            "tokens_bucket": 16, "dtype": "float32", "gpu": "cpu-interpreter",
                            "triton": tune.triton_version()}
    assert name == tune.TuneKey(**entry["key"]).string()
    assert entry["trials"] == 3 and entry["ms"] > 0
    assert entry["config"]["block_m"] in (16, 32) and set(entry["config"]) == set(tune.TUNED_FIELDS[:13])
    assert set(tune.TUNED_FIELDS[:13]) == {f.name for f in tune.dataclasses.fields(tune.Candidate)}
    assert entry["config"]["combine_block_n"] in (16, 32) and entry["config"]["combine_num_stages"] == 1
    assert entry["config"]["bwd_block_n"] in (16, 32) and entry["config"]["bwd_num_stages"] == 1
    before = cache.read_bytes()
    # second run: served from the cache, nothing timed, file untouched
    second = _cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "cached entry" in second.stdout and "chose" not in second.stdout, second.stdout
    assert cache.read_bytes() == before
    # the layer's "auto" resolution finds it
    kc = kernel_config(CometConfig(tune_cache=str(cache)), _layer_config(), tokens=16, device="cpu",
                       dtype=torch.float32)
    assert kc.block_m == entry["config"]["block_m"] and kc.num_comm_combine == entry["config"]["num_comm_combine"]
    assert kc.combine_kwargs()["block_n"] == entry["config"]["combine_block_n"]


def test_cli_wiring_and_cpu_refuses_big_shapes(tmp_path):
    from comet_megatron.cli import SUBCOMMANDS, build_parser

    assert "tune" in SUBCOMMANDS
    args = build_parser().parse_args(["tune", "--config", "x.yaml", "--tokens", "4096", "8192", "--world", "2",
                                      "--cache", "c.json", "--budget-s", "30"])
    assert args.tokens == [4096, 8192] and args.world == 2 and args.budget_s == 30 and args.cache == "c.json"
    if not torch.cuda.is_available():
        out = _cli("--config", "qwen2-moe-a2.7b", "--tokens", "8192", cwd=REPO)
        assert out.returncode == 2 and "GPU" in out.stderr


# ------------------------------------------------------------------ search (fake timings)
def test_coordinate_descent_order_failures_and_caps(tmp_path):
    grid = tune.Grid(tiles=[(64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 4)], comm=[8, 16, 32],
                     default_comm=16)
    calls = []

    def measure(c):
        calls.append(c)
        if c.block_n == 256:
            raise RuntimeError("OutOfResources: shared memory, Required: 262144, Hardware limit: 232448")
        return 1.0 + (c.block_m == 64) + abs(c.num_comm_dispatch - 8) / 100 + abs(c.num_comm_combine - 32) / 100

    trials = tune.coordinate_descent(measure, grid, budget_s=1e9, max_candidates=100)
    stages = [t.stage for t in trials]
    assert stages == ["tiles"] * 3 + ["comm dispatch"] * 2 + ["comm combine"] * 2  # default 16 not re-timed
    assert len(calls) == len(set(calls)) == 7
    assert trials[2].ms is None and "shared memory" in trials[2].error
    best = min((t for t in trials if t.ms is not None), key=lambda t: t.ms).candidate
    assert (best.block_m, best.num_comm_dispatch, best.num_comm_combine) == (128, 8, 32)
    capped = tune.coordinate_descent(measure, grid, budget_s=1e9, max_candidates=2)
    assert sum(t.ms is not None or not t.error.startswith("skipped") for t in capped) == 2
    out_of_time = tune.coordinate_descent(measure, grid, budget_s=-1, max_candidates=100)
    assert all(t.error.startswith("skipped: budget") for t in out_of_time)


@pytest.mark.parametrize("budget_s, expected", [
    # tiles stop at 60% of the budget (6 s), combine tiles at 70% (7 s): the comm stages still run
    (10, ["tiles", "tiles", "comm dispatch"]),
    # 7.2 s and 8.4 s: one combine option fits, then the comm stages
    (12, ["tiles", "tiles", "combine tiles", "comm dispatch"]),
])
def test_budget_keeps_a_share_for_the_comm_stages(monkeypatch, budget_s, expected):
    clock = [0.0]
    monkeypatch.setattr(tune.time, "monotonic", lambda: clock[0])

    def measure(c):  # every timing costs 4 fake seconds
        clock[0] += 4
        return 1.0

    grid = tune.Grid(tiles=[(64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3)], comm=[8, 16],
                     default_comm=16, combine=[(256, 3), (256, 4)])
    trials = tune.coordinate_descent(measure, grid, budget_s=budget_s, max_candidates=100)
    ran = [t.stage for t in trials if t.ms is not None]
    assert ran == expected
    skipped = {t.stage: t.error for t in trials if t.ms is None}
    assert skipped["tiles"] == f"skipped: budget {budget_s} s (tiles' share)"
    assert skipped["combine tiles"] == f"skipped: budget {budget_s} s (combine tiles' share)"


def test_combine_tiles_stage_keeps_its_best(tmp_path):
    # old-style construction: the combine knobs follow block_n / num_stages, as concrete ints
    cand = tune.Candidate(*(128, 128, 64, 8, 4), num_comm_dispatch=16, num_comm_combine=16)
    assert (cand.combine_block_n, cand.combine_num_stages) == (128, 4)
    assert cand == tune.Candidate(128, 128, 64, 8, 4, 16, 16, 128, 4) and "combine 128 s4" in cand.label()
    assert cand.config()["combine_block_n"] == 128
    grid = tune.Grid(tiles=[(64, 64, 32, 4, 3), (128, 128, 64, 8, 4)], comm=[8, 16], default_comm=16,
                     combine=[(256, 3), (128, 4), (512, 3), (256, 4)])  # (128, 4): the base, not re-timed
    calls = []

    def measure(c):
        calls.append(c)
        if c.combine_block_n == 512:
            raise RuntimeError("OutOfResources: out of registers")
        return (2.0 if c.block_m == 64 else 1.0) - 0.1 * ((c.combine_block_n, c.combine_num_stages) == (256, 3)) \
            + abs(c.num_comm_dispatch - 8) / 100

    trials = tune.coordinate_descent(measure, grid, budget_s=1e9, max_candidates=100)
    assert [t.stage for t in trials] == ["tiles"] * 2 + ["combine tiles"] * 3 + ["comm dispatch", "comm combine"]
    assert len(calls) == len(set(calls)) == 7
    assert [(t.candidate.combine_block_n, t.candidate.combine_num_stages) for t in trials[2:5]] == \
        [(256, 3), (512, 3), (256, 4)]
    assert all(t.candidate.block_m == 128 for t in trials[2:])  # with the best tiles
    assert trials[3].ms is None and "registers" in trials[3].error
    assert all((t.candidate.combine_block_n, t.candidate.num_comm_dispatch) == (256, 8) for t in trials[5:])
    # through tune(): the best is kept, cached with concrete ints, and applied by kernel_config
    cache = str(tmp_path / "tune.json")
    res = tune.tune(**TINY, tokens=64, device="cpu", cache_path=cache, grid=grid, measure=measure, progress=False)
    assert res.best == tune.Candidate(128, 128, 64, 8, 4, 8, 16, 256, 3)
    [entry] = json.loads(Path(cache).read_text())["entries"].values()
    assert entry["config"] == res.best.config() and entry["config"]["combine_block_n"] == 256
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    assert (kc.combine_block_n, kc.combine_num_stages, kc.block_n, kc.num_stages) == (256, 3, 128, 4)
    assert (kc.combine_kwargs()["block_n"], kc.combine_kwargs()["num_stages"]) == (256, 3)
    assert kc.dispatch_kwargs()["block_n"] == 128
    from rich.console import Console

    console = Console(width=150, record=True)
    tune.print_result(res, console)
    text = console.export_text()
    assert "comb n" in text and "combine tiles" in text and "combine 256 s3" in text


def test_tune_api_stores_and_second_call_does_not_time(tmp_path):
    cache = tmp_path / "tune.json"
    grid = tune.Grid(tiles=[(64, 64, 32, 4, 3), (32, 32, 16, 4, 3)], comm=[1, 2], default_comm=2)
    timed = []

    def measure(c):
        timed.append(c)
        return 2.0 if c.block_m == 64 else 1.0

    res = tune.tune(**TINY, tokens=100, device="cpu", cache_path=str(cache), grid=grid, measure=measure,
                    progress=False)
    assert not res.from_cache and res.best.block_m == 32 and res.baseline_ms == 2.0
    assert res.key.tokens_bucket == 128 and len(timed) == 4

    def no_timing(c):
        raise AssertionError("re-timed a cached key")

    again = tune.tune(**TINY, tokens=128, device="cpu", cache_path=str(cache), grid=grid, measure=no_timing,
                      progress=False)
    assert again.from_cache and again.best == res.best
    forced = tune.tune(**TINY, tokens=128, device="cpu", cache_path=str(cache), grid=grid, measure=measure,
                       progress=False, force=True)
    assert not forced.from_cache and len(timed) == 8
    # nothing ran: nothing cached
    failed = tune.tune(**{**TINY, "hidden": 48}, tokens=128, device="cpu", cache_path=str(cache), grid=grid,
                       measure=lambda c: (_ for _ in ()).throw(RuntimeError("boom")), progress=False)
    assert failed.best is None
    assert len(json.loads(cache.read_text())["entries"]) == 1


# ------------------------------------------------------------------ kernel_config and the cache
def test_old_entry_without_combine_fields_loads_and_applies(tmp_path):
    cache = str(tmp_path / "tune.json")
    _store(cache, _key(tokens=64), TUNED)  # written before the combine knobs existed
    [entry] = tune.TuneCache(cache).read().values()
    assert entry["config"] == TUNED
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    assert (kc.combine_block_n, kc.combine_num_stages) == (None, None)  # gemm_combine on block_n / stages
    assert (kc.combine_kwargs()["block_n"], kc.combine_kwargs()["num_stages"]) == (128, 4)
    # the tuner serves it from the cache, as a candidate with the combine knobs resolved
    res = tune.tune(**TINY, tokens=64, device="cpu", cache_path=cache, progress=False,
                    measure=lambda c: (_ for _ in ()).throw(AssertionError("re-timed a cached key")))
    assert res.from_cache and res.best == tune.Candidate(**TUNED, combine_block_n=128, combine_num_stages=4)
    tune.print_result(res)


@pytest.mark.parametrize("bad", [dict(combine_block_n=24), dict(combine_block_n=8), dict(combine_block_n=0),
                                 dict(combine_block_n=True), dict(combine_block_n="256"),
                                 dict(combine_block_n=256.0), dict(combine_num_stages=0),
                                 dict(combine_num_stages=-1), dict(combine_num_stages=None),
                                 dict(fused_act_backward=1), dict(fused_act_backward="yes")])
def test_invalid_combine_fields_are_rejected(tmp_path, bad):
    assert tune._valid_config({**TUNED, "combine_block_n": 256, "combine_num_stages": 3}) is not None
    assert tune._valid_config({**TUNED, "fused_act_backward": True}) == {**TUNED, "fused_act_backward": True}
    assert tune._valid_config({**TUNED, **bad}) is None
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"version": 1, "entries": {
        "bad": {"key": tune.dataclasses.asdict(_key()), "config": {**TUNED, **bad}}}}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert tune.TuneCache(path).read() == {}


def test_combine_tiles_option(tmp_path, capsys):
    def grid(value):
        return tune._parse_grid(SimpleNamespace(tiles=None, comm=None, combine_tiles=value), "cpu")

    assert grid(None).combine == tune.CPU_COMBINE
    assert grid("256x3, 128X4").combine == [(256, 3), (128, 4)]
    for value in ("256", "256x3x1", "ax3", "256x3,", "24x3", "8x1", "256x0"):
        with pytest.raises(ValueError, match="--combine-tiles"):
            grid(value)
    from comet_megatron.cli import build_parser

    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    args = build_parser().parse_args(["tune", "--config", str(tmp_path / "tiny.yaml"), "--cache",
                                      str(tmp_path / "tune.json"), "--combine-tiles", "256-3"])
    assert tune.main(args) == 2
    assert "--combine-tiles '256-3': expected BLOCK_NxSTAGES" in capsys.readouterr().err
    assert not (tmp_path / "tune.json").exists()


def test_kernel_config_auto_uses_cache_explicit_values_win(tmp_path):
    cache = str(tmp_path / "tune.json")
    _store(cache, _key(tokens=64))
    cfg = CometConfig(tune_cache=cache)
    kc = kernel_config(cfg, _layer_config(), tokens=64, device="cpu", dtype=torch.float32)
    assert {k: getattr(kc, k) for k in TUNED} == TUNED
    assert kc.activation == "silu" and kc.gated
    # nearest tokens bucket (100 -> 128, the entry is at 64)
    kc = kernel_config(cfg, _layer_config(), tokens=100, device="cpu", dtype=torch.float32)
    assert kc.block_n == 128
    # explicit values override the tuned ones, the rest still comes from the cache
    cfg = CometConfig(tune_cache=cache, tile_m=64, comm_programs=3)
    kc = kernel_config(cfg, _layer_config(), tokens=64, device="cpu", dtype=torch.float32)
    assert (kc.block_m, kc.num_comm_dispatch, kc.num_comm_combine) == (64, 3, 3)
    assert (kc.block_n, kc.block_k, kc.num_warps) == (128, 64, 8)
    # all explicit: the cache is not consulted (warps/stages stay the kernels' defaults)
    cfg = CometConfig(tune_cache=cache, tile_m=16, tile_n=16, tile_k=16, comm_programs=1)
    kc = kernel_config(cfg, _layer_config(), tokens=64, device="cpu", dtype=torch.float32)
    assert (kc.block_m, kc.num_warps) == (16, KernelConfig().num_warps)
    # an explicit tile width is every GEMM's: a cached layer-1 chunk no longer applies
    _store(cache, _key(), {**TUNED, "combine_block_n": 256, "combine_num_stages": 3})
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu", dtype=torch.float32)
    assert kc.combine_kwargs()["block_n"] == 256
    kc = kernel_config(CometConfig(tune_cache=cache, tile_n=32), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    assert kc.combine_kwargs()["block_n"] == 32 and kc.dispatch_kwargs(backward=True)["block_n"] == 32
    assert kc.combine_kwargs()["num_stages"] == 3  # stages still from the cache
    # another shape, dtype, or no token count: the kernels' defaults
    default = KernelConfig()
    for kwargs in (dict(config=_layer_config(hidden=64), dtype=torch.float32),
                   dict(config=_layer_config(), dtype=torch.bfloat16)):
        kc = kernel_config(CometConfig(tune_cache=cache), kwargs["config"], tokens=64, device="cpu",
                           dtype=kwargs["dtype"])
        assert (kc.block_m, kc.block_n, kc.num_comm_dispatch) == (default.block_m, default.block_n, None)
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config())
    assert kc.block_m == default.block_m and kc.num_comm_dispatch is None


def test_world_size_prefers_exact_then_nearest(tmp_path):
    cache = str(tmp_path / "tune.json")
    _store(cache, _key(world=1), {**TUNED, "block_m": 16})
    _store(cache, _key(world=2), {**TUNED, "block_m": 32})

    def pick(world):
        return kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                             dtype=torch.float32, world_size=world).block_m

    assert (pick(1), pick(2), pick(4)) == (16, 32, 32)


def test_key_includes_gpu_no_leak_across_gpus(tmp_path):
    cache = str(tmp_path / "tune.json")
    h100 = _key(gpu="NVIDIA H100 80GB HBM3")
    _store(cache, h100)
    assert h100.string() != _key().string() and "NVIDIA H100 80GB HBM3" in h100.string()
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    assert kc.block_n == KernelConfig().block_n  # the H100 entry is not used on another device
    found = tune.TuneCache(cache).lookup(h100)
    assert found is not None and found[1] == h100
    # a different triton version does not match either
    assert tune.TuneCache(cache).lookup(tune.dataclasses.replace(h100, triton="0.0")) is None
    # both entries live side by side
    _store(cache, _key())
    assert len(tune.TuneCache(cache).read()) == 2


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"version": 99, "entries": {}}', "\x00\xff"])
def test_corrupt_cache_warns_and_is_rebuilt(tmp_path, content):
    path = tmp_path / "tune.json"
    if content.startswith("\x00"):
        path.write_bytes(b"\x00\xff")
    else:
        path.write_text(content)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        kc = kernel_config(CometConfig(tune_cache=str(path)), _layer_config(), tokens=64, device="cpu",
                           dtype=torch.float32)
    assert kc.block_m == KernelConfig().block_m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _store(str(path), _key())  # the tuner's write: the bad file is moved aside, a fresh one written
    assert (tmp_path / "tune.json.corrupt").exists()
    data = json.loads(path.read_text())
    assert list(data["entries"]) == [_key().string()]
    assert not list(tmp_path.glob(".tune-*"))  # no temporary file left behind


def test_malformed_entry_is_skipped(tmp_path):
    path = tmp_path / "tune.json"
    good = _key()
    path.write_text(json.dumps({"version": 1, "entries": {
        "bad": {"key": {"hidden": "x"}, "config": {}},
        "worse": {"key": tune.dataclasses.asdict(_key(tokens=8)), "config": {"block_m": 24}},
        good.string(): {"key": tune.dataclasses.asdict(good), "config": {"block_m": 32}},
    }}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        entries = tune.TuneCache(path).read()
    assert list(entries) == [good.string()]


def test_tokens_bucket_and_dtype_names():
    assert [tune.tokens_bucket(t) for t in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    assert tune.dtype_name(torch.bfloat16) == tune.dtype_name("bf16") == "bfloat16"
    assert tune.gpu_name("cpu") == "cpu-interpreter"


def test_tune_timing_kernels_end_to_end(tmp_path):
    """`--timing kernels` (each fused kernel timed alone, summed) searches and caches like the round
    timing, and says which timing the entry holds."""
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    cache = tmp_path / "tune.json"
    proc = _cli("--config", str(tmp_path / "tiny.yaml"), "--cache", str(cache), "--tiles",
                "16x16x16x1x1,32x32x16x1x1", "--combine-tiles", "32x1", "--comm", "1,2", "--max-candidates", "3",
                "--timing", "kernels", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [(_, entry)] = json.loads(cache.read_text())["entries"].items()
    assert entry["timing"] == tune.TIMINGS["kernels"] and entry["ms"] > 0 and entry["trials"] == 3
    bad = _cli("--config", str(tmp_path / "tiny.yaml"), "--timing", "nope", cwd=tmp_path)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_bwd_tiles_stage_after_combine_tiles(tmp_path):
    """Stage 3 varies layer 0 backward's (bwd_block_n, bwd_num_stages) around the best so far; the winner
    reaches dispatch_gemm_backward (and only it) through kernel_config."""
    cand = tune.Candidate(128, 128, 64, 8, 4, 16, 16)
    assert (cand.bwd_block_n, cand.bwd_num_stages) == (128, 4) and "bwd 128 s4" in cand.label()
    grid = tune.Grid(tiles=[(64, 64, 32, 4, 3), (128, 128, 64, 8, 4)], comm=[16], default_comm=16,
                     combine=[(256, 3)], bwd=[(256, 3), (128, 4), (512, 3)])  # (128, 4): the base

    def measure(c):
        if c.bwd_block_n == 512:
            raise RuntimeError("OutOfResources: out of registers")
        return (2.0 if c.block_m == 64 else 1.0) - 0.1 * (c.combine_block_n == 256) - 0.2 * (c.bwd_block_n == 256)

    trials = tune.coordinate_descent(measure, grid, budget_s=1e9, max_candidates=100)
    assert [t.stage for t in trials] == ["tiles"] * 2 + ["combine tiles"] + ["bwd tiles"] * 2
    bwd = [t for t in trials if t.stage == "bwd tiles"]
    assert all(t.candidate.combine_block_n == 256 for t in bwd)  # on top of the best combine tiles
    assert bwd[1].ms is None and "registers" in bwd[1].error
    cache = str(tmp_path / "tune.json")
    res = tune.tune(**TINY, tokens=64, device="cpu", cache_path=cache, grid=grid, measure=measure, progress=False)
    assert (res.best.bwd_block_n, res.best.bwd_num_stages, res.best.block_n) == (256, 3, 128)
    kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    fwd, bwd_kw = kc.dispatch_kwargs(), kc.dispatch_kwargs(backward=True)
    assert (fwd["block_n"], fwd["num_stages"]) == (128, 4) and (bwd_kw["block_n"], bwd_kw["num_stages"]) == (256, 3)
    # an explicit --comet-tile-n applies to every GEMM: the tuned bwd block is dropped
    kc = kernel_config(CometConfig(tune_cache=cache, tile_n=64), _layer_config(), tokens=64, device="cpu",
                       dtype=torch.float32)
    assert kc.dispatch_kwargs(backward=True)["block_n"] == 64


@pytest.mark.parametrize("bad", ["256", "256x0", "100x3", "8x2", "axb"])
def test_bwd_tiles_flag_rejects_bad_values(bad):
    ns = argparse.Namespace(tiles=None, combine_tiles=None, bwd_tiles=bad, comm=None)
    with pytest.raises(ValueError, match="--bwd-tiles"):
        tune._parse_grid(ns, "cpu")


def test_old_cache_entry_on_default_tiles_gets_the_default_backward_tiles(tmp_path, monkeypatch):
    """A Hopper cache entry written before the bwd-tiles stage, on the default tiles, runs layer 0's backward
    on the Hopper default's 256 x 3 (measured faster); an entry with its own bwd knobs, or on other tiles,
    is applied as written (bwd on block_n / num_stages)."""
    from comet_megatron import fused

    monkeypatch.setattr(fused, "_is_hopper", lambda device: True)
    default_tiles = {f: fused.GPU_UNTUNED_DEFAULT[f] for f in ("block_m", "block_n", "block_k", "num_warps")}
    cases = [
        ({**default_tiles, "num_stages": 4}, (256, 3)),
        ({**default_tiles, "num_stages": 4, "bwd_block_n": 128, "bwd_num_stages": 4}, (128, 4)),
        ({**default_tiles, "num_stages": 4, "block_n": 64}, (None, None)),
    ]
    for i, (config, want) in enumerate(cases):
        cache = str(tmp_path / f"tune{i}.json")
        _store(cache, _key(), config)
        kc = kernel_config(CometConfig(tune_cache=cache), _layer_config(), tokens=64, device="cpu",
                           dtype=torch.float32)
        assert (kc.bwd_block_n, kc.bwd_num_stages) == want, (config, kc)
        assert kc.block_n == config["block_n"] and kc.num_stages == 4


def test_world_1_grid_tries_few_communication_programs(monkeypatch):
    """At world size 1 gemm_combine's communication programs only raise a signal: the GPU grid starts it at
    one and tries one; dispatch_gemm's copy programs get 4 tried too. Other world sizes keep the grid."""
    monkeypatch.setattr(tune, "sm_count", lambda device: 132)
    one = tune.default_grid("cuda", world=1)
    assert one.default_comm_combine == 1 and one.comm_values("num_comm_combine")[0] == 1
    assert 4 in one.comm_values("num_comm_dispatch") and 1 not in one.comm_values("num_comm_dispatch")
    two = tune.default_grid("cuda", world=2)
    assert two.default_comm_combine is None
    assert two.comm_values("num_comm_combine") == two.comm_values("num_comm_dispatch") == sorted(two.comm)
    trials = tune.coordinate_descent(lambda c: 1.0, one, budget_s=1e9, max_candidates=10**6)
    assert all(t.candidate.num_comm_combine == 1 for t in trials if t.stage == "tiles")
    assert {t.candidate.num_comm_combine for t in trials if t.stage == "comm combine"} >= {8, 16}  # 1: the base
    assert 4 in {t.candidate.num_comm_dispatch for t in trials if t.stage == "comm dispatch"}


def test_layer1_kernel_stage_and_cache_field(monkeypatch, tmp_path):
    """World size 1 on Hopper: the last stage times the Gluon layer 1 on and off on the best config; the choice
    is cached (True / False / None valid, anything else rejects the entry) and reaches KernelConfig."""
    monkeypatch.setattr(tune, "sm_count", lambda device: 132)
    monkeypatch.setattr(tune, "gluon_layer1_possible", lambda device: True)
    grid = tune.default_grid("cuda", world=1)
    assert tuple(grid.layer1) == (True, False)
    assert tune.default_grid("cuda", world=2).layer1 == ()
    monkeypatch.setattr(tune, "gluon_layer1_possible", lambda device: False)
    assert tune.default_grid("cuda", world=1).layer1 == ()

    def measure(c):  # the Gluon layer 1 is fastest; otherwise prefer 128-row tiles
        return 1.0 - 0.5 * (c.gluon_layer1 is True) + 0.1 * (c.block_m == 64)

    trials = tune.coordinate_descent(measure, grid, budget_s=1e9, max_candidates=10**6)
    assert [t.stage for t in trials][-2:] == ["layer 1 kernel"] * 2
    assert all(t.candidate.gluon_layer1 is None for t in trials if t.stage != "layer 1 kernel")
    best = min((t for t in trials if t.ms is not None), key=lambda t: t.ms).candidate
    assert best.gluon_layer1 is True and best.block_m == 128 and "L1 gluon" in best.label()
    assert tune.Candidate.from_config(best.config()) == best
    old = {k: v for k, v in best.config().items() if k != "gluon_layer1"}  # an entry from before the field
    assert tune.Candidate.from_config(old).gluon_layer1 is None
    for value, ok in ((True, True), (False, True), (None, True), ("yes", False), (1, False)):
        assert (tune._valid_config({"block_m": 128, "gluon_layer1": value}) is not None) == ok, value
    from comet_megatron.kernels import KernelConfig
    assert KernelConfig(**best.config()).gluon_layer1 is True
