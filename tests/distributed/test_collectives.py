"""cladapt.distributed's collectives and the rank-0-only helpers in a real 2-process gloo group."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import collective_worker


def test_single_process_collectives_are_identities() -> None:
    from cladapt import distributed as dist

    t = torch.tensor([1.5, 2.0])
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert torch.equal(dist.all_reduce_sum(t), t)
    assert dist.broadcast_json({"a": [1, "x"]}) == {"a": [1, "x"]}
    assert list(dist.share(5)) == [0, 1, 2, 3, 4] and not dist.split_evenly(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.multiprocess
def test_two_process_collectives_and_rank_zero_outcomes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from collective_worker import worker

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["sum"] == r1["sum"] == [10.0, 12.0, 14.0]
    assert (r0["share"], r1["share"]) == ([0, 2, 4], [1, 3])
    assert r0["few"] == r1["few"] == [[0], False]  # fewer items than processes: each takes all, no summing
    assert r0["json"] == r1["json"] == {"from": 0, "text": "é"}
    assert (r0["first"], r1["first"]) == (0, 1)
    assert r0["published"] == r1["published"] == {"ref": "v@1"}
    # process 0 raises its own error; process 1 leaves with the same exit code and names it
    assert r0["failed"][:2] == ["DataError", 1]
    assert r1["failed"][0] == "ProcessFailed" and r1["failed"][1] == 1
    assert "process 0 failed: DataError" in r1["failed"][2] and "f.jsonl:3" in r1["failed"][2]
