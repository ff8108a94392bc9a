"""The pack-size tuner (pure): measured tokens/s in, pack size out; fake clock, scripted throughput."""

from __future__ import annotations

from rollout_plugin.config.schema import PackControlConfig
from rollout_plugin.pool.policy.packing import PackObservation, initial_pack_state, pack_step, sizes

CFG = PackControlConfig(window_s=5.0, min_gain=0.05, decay=1.0, reprobe_every=1000)


def run(curve, windows: int, start: int = 64, backlog: int = 100, cfg: PackControlConfig = CFG):
    """Drive the tuner with a throughput that depends on the pack size only; return the sizes visited."""
    state, t, tokens, visited, reasons = initial_pack_state(start), 0.0, 0.0, [start], []
    state, _ = pack_step(state, PackObservation(t, tokens, backlog), cfg)
    for _ in range(windows):
        for _ in range(5):  # one observation a second
            t += 1.0
            tokens += curve(state.size)
            state, decision = pack_step(state, PackObservation(t, tokens, backlog), cfg)
            if decision.changed:
                visited.append(decision.size)
                reasons.append(decision.reason)
    return state, visited, reasons


def test_ladder_is_powers_of_two_and_the_maximum():
    assert sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert sizes(1) == [1]


def test_stays_at_the_largest_pack_when_bigger_is_better():
    state, visited, reasons = run(lambda s: 1000 + 10 * s, windows=10)
    assert visited == [64, 32, 64] and state.size == 64  # one probe down, back, then settled
    assert "measuring pack 32" in reasons[0] and "pack 64 measured" in reasons[1]


def test_walks_down_to_the_best_size_when_long_tails_make_big_packs_waste_slots():
    # throughput peaks at 16: above it finished slots idle inside packs, below it per-call overhead
    peak = {1: 400, 2: 600, 4: 800, 8: 900, 16: 1000, 32: 850, 64: 700}
    state, visited, _ = run(peak.__getitem__, windows=12)
    assert state.size == 16 and visited[:4] == [64, 32, 16, 8]


def test_noise_within_min_gain_never_moves_it():
    state, visited, _ = run(lambda s: 1000 if s == 64 else 1030, windows=10)  # +3 % < 5 %
    assert state.size == 64 and visited == [64, 32, 64]


def test_windows_where_the_pool_ran_dry_teach_nothing():
    state, visited, _ = run(lambda s: 1000, windows=10, backlog=0)
    assert visited == [64] and state.scores == ()
