"""The start-up timer: phases add up in the order first entered, the rest goes to one phase, the lines sum to
the total, a worker's figures are kept only if they look like figures, and a process knows when it began."""

import subprocess
import sys
import time

from shardllama.phases import Phases, process_start


def test_phases_add_up_in_order():
    p = Phases(start=time.perf_counter() - 1.0)  # a second ago
    with p("read"):
        time.sleep(0.02)
    p.add("convert", 0.5)
    with p("read"):  # entered again: added to the first
        time.sleep(0.02)
    assert list(p.seconds) == ["read", "convert"]
    assert 0.04 <= p.seconds["read"] < 0.5 and p.seconds["convert"] == 0.5
    p.until_now("imports")  # what no phase holds: the second before, and a little
    assert 0.45 < p.seconds["imports"] < 1.0
    assert abs(sum(p.seconds.values()) - p.elapsed()) < 0.05


def test_a_phase_that_raises_is_still_timed():
    p = Phases()
    try:
        with p("load"):
            raise ValueError
    except ValueError:
        pass
    assert "load" in p.seconds


def test_lines_name_every_phase_the_rest_and_the_total():
    p = Phases()
    p.add("python and imports", 1.25)
    p.add("workers ready", 0.5)
    p.details["workers ready"] = "slowest worker's own: kernel library 0.01 s"
    lines = p.lines(2.0)
    assert lines[0].startswith("start-up: python and imports") and lines[0].endswith("1.25 s")
    assert lines[1].endswith("0.50 s  (slowest worker's own: kernel library 0.01 s)")
    assert lines[2].startswith("start-up: other") and lines[2].endswith("0.25 s")
    assert lines[3].startswith("start-up: total to the first token") and lines[3].endswith("2.00 s")
    assert len({line.index(" s") for line in lines if "(" not in line}) == 1  # one column of figures


def test_worker_figures_are_checked():
    assert Phases.worker_figures({"python and imports": 0.02, "kernel library": 1}) == {
        "python and imports": 0.02, "kernel library": 1.0}
    assert Phases.worker_figures({"a": -1, "b": True, "c": "1", "d": float("nan"), 5: 1.0, "e": 2e6}) == {}
    assert Phases.worker_figures(["a", 1]) == {} and Phases.worker_figures(None) == {}
    assert Phases.worker_figures({str(i): 0.1 for i in range(100)}) == {}


def test_process_start_counts_the_interpreters_own_start():
    assert process_start() <= time.perf_counter()
    code = "import time; from shardllama.phases import process_start; print(time.perf_counter() - process_start())"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t
    age = float(out)
    assert 0 < age <= wall + 0.02  # the kernel's start time ticks in 10 ms steps
