"""`bench layer`'s interleaved rounds: every (variant, mode) timed once per round in a fixed order, the first
round with the full warm-up; the figure is the median over rounds and `spread` their range; a machine that
drifts during the run moves every variant alike; `--rounds 0` refused before any GPU work."""

from __future__ import annotations

import pytest

from statistics import median

from comet_megatron.bench import Record, add_auto, print_table, time_interleaved


def test_rounds_interleave_every_closure_and_take_the_median():
    calls = []
    drift = iter(range(100))  # the machine slows down by 1 ms per figure taken

    def timer(run, warmup_ms, rep_ms):
        calls.append((run(), warmup_ms, rep_ms))
        return 10.0 * (1 + ord(run()) - ord("a")) + next(drift)

    runs = {("a", "fwd"): lambda: "a", ("b", "fwd"): lambda: "b", ("c", "fwd"): lambda: "c"}
    ticks = []
    out = time_interleaved(runs, 3, timer=timer, advance=lambda: ticks.append(1))
    assert [c[0] for c in calls] == list("abcabcabc")  # round-major: a drift reaches every variant
    assert [c[1] for c in calls] == [100] * 3 + [25] * 6
    assert len(ticks) == 9 and all(c[2] == calls[0][2] for c in calls)
    assert out[("a", "fwd")] == [10, 13, 16] and out[("c", "fwd")] == [32, 35, 38]
    # c is measured 2 figures after a in every round: the drift biases their difference by 2 ms (one round's
    # worth), where timing all of a's repetitions and then all of c's would bias it by 6 (the whole run's)
    assert median(out[("c", "fwd")]) - median(out[("a", "fwd")]) == 20 + 2
    with pytest.raises(ValueError, match="at least one round"):
        time_interleaved(runs, 0, timer=timer)


def test_table_shows_the_spread_and_auto_rows_keep_it(capsys):
    recs = [Record("s", 8, "comet-reference", "fwd", 2.0, 1.0, rounds_ms=[1.9, 2.0, 2.2], spread=0.15),
            Record("s", 8, "comet-fused", "fwd", 3.0, 1.0, rounds_ms=[3.0, 3.0, 3.0], spread=0.0)]
    add_auto(recs)
    auto = [r for r in recs if r.picks]
    assert len(auto) == 1 and auto[0].spread == 0.15 and auto[0].rounds_ms == [1.9, 2.0, 2.2]
    print_table(recs, {"gpu": "GPU", "rounds": 3})
    text = capsys.readouterr().out
    assert "3 interleaved rounds" in text and "15%" in text and "spread" in text


def test_rounds_flag_refused_below_one(capsys):
    from comet_megatron.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--rounds", "0"])
    assert exit_info.value.code == 2 and "--rounds 0: at least 1" in capsys.readouterr().err
