"""Which cell the grid's GroupWait names when a placement group waits
(sweep/capacity.py): read from the cells' files alone, no Ray needed."""
from __future__ import annotations

import os
import time

from wsg.core import rundir
from wsg.core.layout import RunLayout
from wsg.sweep.capacity import GroupWait

IDS = ["online_grpo-s42-lr3e-04", "online_dapo-s42-lr3e-04", "dpo-s42-lr3e-05", "sft-s42-lr3e-04"]


def _touch(path: str, t: float) -> None:
    rundir.write_json(path, {"t": t})
    os.utime(path, (t, t))


def test_a_shared_cell_that_trains_is_not_named_the_next_to_start_is(tmp_path):
    """The eighth session's default printed "cell online_grpo has waited 300 s"
    while online_grpo trained in its shared worker and online_dapo's trial
    waited for the CPUs: a training cell writes progress.json, not a
    placement group, so it is not waiting; the next cell in start order is."""
    layout = RunLayout.of(str(tmp_path / "run"))
    watch = GroupWait(layout, IDS, set(), wait_s=300.0)
    assert watch.waiting_cells() == ["online_grpo-s42-lr3e-04 (next to start)"]
    now = time.time() + 10
    grpo = layout.cell(IDS[0])
    _touch(grpo.spec, now)
    # started, no worker and no step yet: it waits for its resources itself
    assert watch.waiting_cells() == ["online_grpo-s42-lr3e-04"]
    _touch(grpo.progress, now + 1)
    assert watch.waiting_cells() == ["online_dapo-s42-lr3e-04 (next to start)"]
    # a non-shared cell whose Ray Train worker group got its placement: not waiting either
    dapo = layout.cell(IDS[1])
    _touch(dapo.spec, now + 2)
    _touch(dapo.placement_group, now + 3)
    assert watch.waiting_cells() == ["dpo-s42-lr3e-05 (next to start)"]
    # complete cells are never named
    for cid in IDS[2:]:
        rundir.write_json(os.path.join(layout.cell(cid).root, rundir.COMPLETE_MARKER), {})
    assert watch.waiting_cells() == []
