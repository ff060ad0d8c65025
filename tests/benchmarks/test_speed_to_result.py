"""benchmarks/speed_to_result.py's pieces that need no training: arm commands, seeds' folders, load records."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed_to_result as s2r  # noqa: E402


def test_seed_zero_keeps_folder_and_command_other_seed_gets_its_own():
    assert s2r.arm_dir_name("fast", 0) == "fast" and s2r.arm_dir_name("fast", 1) == "fast-s1"
    a0 = s2r.train_args("fast", Path("r/fast"), 0)
    a1 = s2r.train_args("fast", Path("r/fast-s1"), 1)
    assert "seed=1" not in " ".join(a0) and a1[a1.index("seed=1") - 1] == "--set"
    assert a0[-2:] == ["--out", "r/fast"] and "--preset" in a0 and "max_rounds=10" in a0


def test_paper_arm_is_the_official_settings_and_rounds_override_applies():
    args = s2r.train_args("paper", Path("r/paper"), 0)
    assert "max_rounds=40" in args and "--preset" not in args and "lr=" not in " ".join(args)
    assert "max_rounds=2" in s2r.train_args("paper", Path("r/paper"), 0, rounds_override=2)
    assert "keep_top=0.25" in s2r.train_args("keep_top0.25", Path("r/k"), 0)


def test_load_during_counts_only_samples_inside_the_phase():
    s2r.LOAD_SAMPLES[:] = [(10.0, 4.0), (20.0, 6.0), (30.0, 11.0), (40.0, 2.0)]
    try:
        assert s2r.load_during(15.0, 35.0) == {"samples": 2, "min": 6.0, "mean": 8.5, "max": 11.0}
        assert s2r.load_during(50.0, 60.0) == {"samples": 0}
    finally:
        s2r.LOAD_SAMPLES.clear()


def test_sampler_records_at_least_one_sample_and_stops():
    import threading
    stop = threading.Event()
    s2r.LOAD_SAMPLES.clear()
    t = threading.Thread(target=s2r.sample_load, args=(stop, 0.01))
    t.start()
    time.sleep(0.05)
    stop.set()
    t.join(1.0)
    try:
        assert not t.is_alive() and len(s2r.LOAD_SAMPLES) >= 1 and s2r.LOAD_SAMPLES[0][1] >= 0.0
    finally:
        s2r.LOAD_SAMPLES.clear()
