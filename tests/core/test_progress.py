"""spobench.core.progress: plain lines (with rate and ETA) when the console is not a terminal, a rich bar
when it is; consoles that are not terminals are never cut to 80 columns; the libraries' own bars stay
quiet while models load. A fake clock drives every timing: no assertion depends on real time."""

import io
import re

import pytest
from rich.console import Console
from rich.table import Table

from spobench.core.errors import InputError
from spobench.core.progress import (
    INTERVAL_ENV,
    WIDE,
    Progress,
    clock_text,
    interval_seconds,
    make_console,
    quiet_libraries,
    rate_text,
    status,
)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _plain():
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=60), buf


def test_plain_lines_at_start_every_interval_and_end():
    console, buf = _plain()
    clock = FakeClock()
    with Progress("spo rounds", total=40, unit="round", console=console, interval=10, clock=clock) as bar:
        for n in range(1, 13):
            clock.t += 2.0  # a round every 2 s
            bar.update(completed=n, info=f"loss {0.7 - n / 100:.4f}")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "spo rounds 0/40  started"
    # a line when 10 s have passed since the last one: after rounds 5 and 10, not after every round
    assert lines[1] == "spo rounds 5/40  0.50 round/s  eta 1:10  loss 0.6500"
    assert lines[2] == "spo rounds 10/40  0.50 round/s  eta 1:00  loss 0.6000"
    assert lines[3] == "spo rounds 12/40  done in 0:24  0.50 round/s  loss 0.5800"
    assert len(lines) == 4


def test_plain_lines_are_never_wrapped_or_cut():
    console, buf = _plain()  # 60 columns: the line is longer
    clock = FakeClock()
    info = "kept 20% score 1.000 loss 0.6931 acc 0.53 " * 3
    with Progress("a long description of the work", total=3, completed=0, console=console, interval=0,
                  clock=clock) as bar:
        clock.t += 1
        bar.update(completed=1, info=info.strip())
    assert f"a long description of the work 1/3  1.00 item/s  eta 0:02  {info.strip()}" in buf.getvalue().splitlines()


def test_interval_zero_prints_every_update_and_resumed_work_counts_this_session_only():
    console, buf = _plain()
    clock = FakeClock()
    with Progress("pretraining", total=100, completed=90, unit="step", console=console, interval=0,
                  clock=clock) as bar:
        for n in (92, 94):
            clock.t += 4.0
            bar.update(completed=n)
    lines = buf.getvalue().splitlines()
    # 2 steps in 4 s (the 90 done before this session are not in the rate)
    assert lines[1:] == ["pretraining 92/100  0.50 step/s  eta 0:16", "pretraining 94/100  0.50 step/s  eta 0:12",
                         "pretraining 94/100  done in 0:08  0.50 step/s"]


def test_unknown_total_and_slow_work():
    console, buf = _plain()
    clock = FakeClock()
    with Progress("scoring held-out pairs", unit="pair", console=console, interval=0, clock=clock) as bar:
        clock.t += 50.0
        bar.update(completed=2)  # no total yet: no ETA
        clock.t += 50.0
        bar.update(completed=4, total=8)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "scoring held-out pairs 0  started"
    assert lines[1] == "scoring held-out pairs 2"  # the rate is measured from the first update
    assert lines[2] == "scoring held-out pairs 4/8  25.0 s/pair  eta 1:40"


def test_work_done_before_the_first_update_is_not_in_the_rate():
    """generate --resume reports the images already there first, then the new ones."""
    console, buf = _plain()
    clock = FakeClock()
    with Progress("generating", total=4, unit="image", console=console, interval=0, clock=clock) as bar:
        clock.t += 30.0  # loading the model
        bar.update(completed=2)
        bar.update(completed=2)  # the same count again: no second line
        clock.t += 5.0
        bar.update(completed=3)
        clock.t += 5.0
        bar.update(completed=4)
    assert buf.getvalue().splitlines() == ["generating 0/4  started", "generating 2/4",
                                           "generating 3/4  0.20 image/s  eta 0:05",
                                           "generating 4/4  done in 0:40  0.20 image/s"]


def test_a_failure_says_stopped():
    console, buf = _plain()
    clock = FakeClock()
    with pytest.raises(RuntimeError):
        with Progress("generating", total=4, unit="image", console=console, clock=clock) as bar:
            clock.t += 3
            bar.update(completed=1)
            raise RuntimeError("boom")
    assert buf.getvalue().splitlines()[-1] == "generating 1/4  stopped in 0:03"


def test_disabled_and_consoleless_progress_print_nothing_but_count():
    console, buf = _plain()
    with Progress("x", total=2, console=console, enabled=False) as bar:
        bar.update(advance=1)
        bar.update(advance=1)
    assert buf.getvalue() == "" and bar.completed == 2
    with Progress("x", total=2, console=None) as bar:
        bar.update(completed=2)
    assert bar.completed == 2


def test_terminal_gets_the_rich_bar_not_plain_lines():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    clock = FakeClock()
    with Progress("spo rounds", total=4, unit="round", console=console, interval=0, clock=clock) as bar:
        for n in range(1, 5):
            clock.t += 1
            bar.update(completed=n, info="loss 0.5")
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    assert "spo rounds" in text and "4/4" in text and "loss 0.5" in text
    assert "started" not in text and "round/s" not in text and "eta " not in text


def test_status_plain_and_terminal():
    console, buf = _plain()
    clock = FakeClock()
    with status(console, "drawing 200 tiny-world pairs", clock=clock):
        clock.t += 75
    assert buf.getvalue().splitlines() == ["drawing 200 tiny-world pairs ...",
                                           "drawing 200 tiny-world pairs: done in 1:15"]
    with pytest.raises(ValueError):
        with status(console, "scoring", clock=clock):
            raise ValueError("x")
    assert buf.getvalue().splitlines()[-1] == "scoring ..."  # no "done" after a failure
    with status(None, "nothing"):
        pass


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_seconds() == 10.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_seconds() == 2.5
    assert Progress("x", console=None).interval == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(InputError, match=INTERVAL_ENV):
            interval_seconds()


def test_text_helpers():
    assert clock_text(0) == "0:00" and clock_text(80) == "1:20" and clock_text(7384) == "2:03:04"
    assert rate_text(0.35, "round") == "0.35 round/s"
    assert rate_text(0.02, "round") == "50.0 s/round"
    assert rate_text(250, "image") == "250 image/s"
    assert rate_text(0, "image") == "- image/s"


def _wide_table() -> Table:
    t = Table(title="results")
    for i in range(8):
        t.add_column(f"metric_number_{i} (mean [95% CI])")
    t.add_row(*[f"0.{i}000 [0.{i}000, 0.{i}999]" for i in range(8)])
    return t


def test_console_that_is_not_a_terminal_is_wide(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    buf = io.StringIO()
    c = make_console(file=buf)
    assert not c.is_terminal and c.width == WIDE
    c.print(_wide_table())
    header = [ln for ln in buf.getvalue().splitlines() if "metric_number_0" in ln]
    assert len(header) == 1 and "metric_number_7 (mean [95% CI])" in header[0]  # one line, no column cut
    assert "…" not in buf.getvalue()
    # an explicit width (or COLUMNS) still wins, and a terminal keeps its own width
    assert make_console(file=io.StringIO(), width=70).width == 70
    assert make_console(file=io.StringIO(), force_terminal=True, width=90).width == 90
    monkeypatch.setenv("COLUMNS", "123")
    assert make_console(file=io.StringIO()).width == 123


def test_quiet_libraries_turns_the_bars_off_and_puts_them_back():
    transformers_log = pytest.importorskip("transformers.utils.logging")
    diffusers_log = pytest.importorskip("diffusers.utils.logging")
    from huggingface_hub.utils import are_progress_bars_disabled

    before = (transformers_log.is_progress_bar_enabled(), diffusers_log.is_progress_bar_enabled(),
              are_progress_bars_disabled(), transformers_log.get_verbosity(), diffusers_log.get_verbosity())
    with quiet_libraries():
        assert not transformers_log.is_progress_bar_enabled() and not diffusers_log.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
        assert transformers_log.get_verbosity() >= 40 and diffusers_log.get_verbosity() >= 40  # ERROR
    after = (transformers_log.is_progress_bar_enabled(), diffusers_log.is_progress_bar_enabled(),
             are_progress_bars_disabled(), transformers_log.get_verbosity(), diffusers_log.get_verbosity())
    assert after == before


def test_loading_a_transformers_model_shows_no_bar(tmp_path, capfd):
    """transformers 5 draws "Loading weights" (tqdm, on stderr) in every from_pretrained; the one loader
    (core.weights.load_pretrained) runs inside quiet_libraries."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from spobench.core.weights import load_pretrained

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=8, projection_dim=8)
    with quiet_libraries():
        CLIPTextModel(cfg).save_pretrained(tmp_path / "m")
    capfd.readouterr()
    load_pretrained(CLIPTextModel, tmp_path / "m")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err


def test_the_libraries_own_switch_keeps_their_bars(monkeypatch):
    transformers_log = pytest.importorskip("transformers.utils.logging")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    before = transformers_log.is_progress_bar_enabled()
    with quiet_libraries():
        assert transformers_log.is_progress_bar_enabled() == before


def test_a_download_keeps_its_bar_on_a_terminal_only(monkeypatch):
    transformers_log = pytest.importorskip("transformers.utils.logging")
    from huggingface_hub.utils import are_progress_bars_disabled

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    before = are_progress_bars_disabled()
    monkeypatch.setattr("sys.stderr", Tty())
    with quiet_libraries(downloads=True):
        assert are_progress_bars_disabled() == before  # a terminal watches the download
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with quiet_libraries(downloads=True):
        assert are_progress_bars_disabled() and not transformers_log.is_progress_bar_enabled()
    assert are_progress_bars_disabled() == before
