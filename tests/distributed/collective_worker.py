"""The body of each process of tests/distributed/test_collectives.py (spawned: must be importable)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from cladapt import distributed as dist
    from cladapt.errors import CladaptError, DataError, Issue
    from cladapt.train.distributed import ProcessFailed, main_first, on_main

    report: dict[str, object] = {"rank": dist.rank(), "world": dist.world_size()}
    x = torch.arange(3, dtype=torch.float32) + 10 * rank
    report["sum"] = dist.all_reduce_sum(x).tolist()
    report["share"] = list(dist.share(5))
    report["few"] = [list(dist.share(1)), dist.split_evenly(1)]
    report["json"] = dist.broadcast_json({"from": rank, "text": "é"})
    order: list[str] = []
    report["first"] = main_first(lambda: order.append(f"r{rank}") or rank)
    _, value = on_main(lambda: "v", publish=lambda r: {"ref": r + "@1"})
    report["published"] = value

    def fail() -> None:
        raise DataError([Issue("f.jsonl:3", "bad row")])

    try:
        on_main(fail)
    except ProcessFailed as exc:
        report["failed"] = ["ProcessFailed", exc.exit_code, str(exc)]
    except CladaptError as exc:
        report["failed"] = [type(exc).__name__, exc.exit_code, str(exc)]
    dist.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()
