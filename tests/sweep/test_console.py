"""The console (core/console.py): wsg's lines reach the terminal, every other
write of the process and of its children goes to the run's log file; the grid
watch reads the cells' progress files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from wsg.core import rundir
from wsg.core.console import GridWatch
from wsg.core.layout import RunLayout


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def test_third_party_output_goes_to_the_log_and_wsg_lines_to_the_terminal(tmp_path):
    logs = tmp_path / "logs"
    out = _run(f"""
        import os, subprocess, sys
        from wsg.core.console import RunConsole, say, progress
        with RunConsole({str(logs)!r}) as con:
            say("wsg: stage one")
            print("a library's print")
            sys.stderr.write("a library's warning\\n")
            os.write(1, b"a raw write to fd 1\\n")
            subprocess.run(["echo", "a child process"])
            with progress(3, "units") as bar:
                for _ in range(3):
                    bar.advance()
        print("after the console")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    term = out.stdout.splitlines()
    assert term[0] == "wsg: stage one" and "  units: 3/3" in term and term[-1] == "after the console"
    assert not any("library" in line or "raw write" in line or "child" in line for line in term)
    assert out.stderr == ""
    log = (logs / "wsg.log").read_text()
    for want in ("a library's print", "a library's warning", "a raw write to fd 1", "a child process"):
        assert want in log
    assert "wsg: stage one" not in log


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    out = _run(f"""
        from wsg.core.console import RunConsole, say
        with RunConsole({str(tmp_path / 'logs')!r}, verbose=True):
            say("wsg: line")
            print("a library's print")
    """, tmp_path)
    assert out.stdout.splitlines() == ["wsg: line", "a library's print"]
    assert not (tmp_path / "logs" / "wsg.log").exists()


def test_an_uncaught_error_reaches_the_terminal_whole(tmp_path):
    out = _run(f"""
        from wsg.core.console import RunConsole
        with RunConsole({str(tmp_path / 'logs')!r}):
            print("noise")
            raise RuntimeError("the real problem")
    """, tmp_path)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "RuntimeError: the real problem" in out.stderr


def test_grid_watch_counts_cells_and_reads_running_progress(tmp_path):
    layout = RunLayout.of(str(tmp_path / "run"))
    ids = ["sft-s42-lr1e-04", "dpo-s42-lr1e-05", "rft-s42-lr1e-04"]
    rundir.mark_complete(layout.cell(ids[0]).root, {})
    rundir.write_json(layout.cell(ids[1]).progress, {"step": 3, "max_steps": 12, "loss": 0.69, "tokens_per_s": 210.0})
    rundir.write_text(layout.cell(ids[2]).failed, "boom\n")
    watch = GridWatch(layout, ids)
    snap = watch.snapshot()
    assert snap["done"] == ids[:1] and snap["failed"] == ids[2:]
    assert [c for c, _ in snap["running"]] == [ids[1]] and snap["running"][0][1]["step"] == 3
    lines = watch.render(snap)
    assert lines[0].startswith("  cells: 1/3 done, 1 running, 1 failed")
    assert "dpo-s42-lr1e-05" in lines[1] and "3/12" in lines[1] and "0.6900" in lines[1]
    assert os.path.exists(layout.cell(ids[1]).progress)


def test_ray_worker_lines_land_in_the_log_even_at_shutdown(tmp_path):
    """A real local Ray under the console: a task's print is forwarded by Ray
    to the driver, also the last one before the run ends (it used to reach
    the terminal after wsg had given it back); `session(dashboard=True)` shuts down
    the Ray it started while the console still holds the terminal."""
    logs = tmp_path / "logs"
    out = _run(f"""
        import ray
        from wsg.core.console import RunConsole, say
        from wsg.core.session import session
        with RunConsole({str(logs)!r}), session(None, dashboard=True):
            @ray.remote
            def loud(i):
                print(f"worker line {{i}}", flush=True)
                return i
            assert ray.get([loud.remote(i) for i in range(4)]) == list(range(4))
            # Ray's log monitor forwards worker output asynchronously; on a loaded box it can lag the
            # task by seconds, so wait (bounded) for it to arrive rather than race the shutdown.
            import os, time
            log, t0 = os.path.join({str(logs)!r}, "wsg.log"), time.monotonic()
            while time.monotonic() - t0 < 60 and "worker line" not in open(log).read():
                time.sleep(0.2)
            say("wsg: finished")
        print("ray up after:", ray.is_initialized())
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["wsg: finished", "ray up after: False"]
    assert "worker line" not in out.stderr
    log = (logs / "wsg.log").read_text()
    assert sum(f"worker line {i}" in log for i in range(4)) >= 1  # Ray dedups repeated lines
