"""Training with several processes: launch detection, one registry write per run, quiet followers.

A run started by ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu
--num_processes N`` is N copies of ``cladapt train``. They share the training (the Trainer's DDP
or DeepSpeed engine) but must not share the writing: only process 0 creates the registry, stages
and commits the version, evaluates it and logs; the others wait and leave with process 0's exit
status. State computed from data is pooled with :mod:`cladapt.distributed` (InfLoRA's
covariances) or computed once by process 0 and read back by the others (GeRe's record, through
the registry).

The trap this module closes: on a machine without CUDA, ``accelerate`` treats each of the N
processes as a run of its own unless told to use the CPU (``ACCELERATE_USE_CPU=1`` /
``TrainingArguments(use_cpu=True)``): every process then trains alone on all the data and commits
its own version. :func:`start` sets the CPU flag itself there and refuses any state where the
launcher's world size and the training world size differ.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from cladapt import distributed
from cladapt.errors import CladaptError, ConfigError, Issue

if TYPE_CHECKING:
    from cladapt.registry.store import Store, VersionRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: how long the other processes wait for process 0's work alone (evaluation, signature, commit):
#: the process group's timeout, longer than accelerate's 30-minute default for long evaluations
WAIT_SECONDS = 6 * 3600

#: the bundled DeepSpeed presets (``--deepspeed zero2``); their files live in configs/deepspeed/
DEEPSPEED_PRESETS = ("zero2", "zero3")


@dataclass(frozen=True)
class Launch:
    """What the launcher asked for, read from its environment variables."""

    world_size: int
    rank: int
    local_rank: int
    launcher: str  # "torchrun" (also accelerate launch --multi_gpu), "mpi", or "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise CladaptError(f"environment variable {name}={value!r} is not an integer") from exc
    return default


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The launch this process belongs to (world size 1 when started directly)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    rank = _env_int(env, "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    local = _env_int(env, "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    if "WORLD_SIZE" in env:
        launcher = "torchrun"
    elif world > 1:
        launcher = "mpi"
    else:
        launcher = "none"
    return Launch(world_size=world, rank=rank, local_rank=local, launcher=launcher)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def start(*, cuda: bool | None = None) -> Launch:
    """Join the process group of a distributed launch (no-op for a single process).

    Without CUDA the CPU flag is set (``ACCELERATE_USE_CPU=1``, gloo) so the N processes train
    as one; the result is checked against the launcher's world size either way.

    Raises:
        CladaptError: the processes would each train alone (world size mismatch).
    """
    launch = detect_launch()
    if not launch.distributed:
        return launch
    from accelerate import PartialState

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and not _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        if launch.rank == 0:
            logger.info("no CUDA device: training the %d processes together on CPU (gloo)", launch.world_size)
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read again by the Trainer's own accelerator
    state = PartialState(cpu=not cuda, timeout=timedelta(seconds=WAIT_SECONDS))
    check_world(launch, state.num_processes, distributed.world_size())
    quiet_followers()
    return launch


def check_world(launch: Launch, accelerate_processes: int, group_size: int) -> None:
    """Refuse a run whose processes would not train together."""
    if accelerate_processes == launch.world_size and group_size == launch.world_size:
        return
    raise CladaptError(
        f"the launcher started {launch.world_size} processes but training would see "
        f"{accelerate_processes} (process group: {group_size}): each process would train alone and "
        "commit its own version",
        hint="on a machine without CUDA set ACCELERATE_USE_CPU=1 (or use `accelerate launch --multi_gpu "
        "--num_processes N` with it); `accelerate launch --cpu --num_processes N` starts one process only",
    )


def quiet_followers() -> None:
    """Logs and progress bars from process 0 only: the others report warnings and errors."""
    if distributed.is_main():
        return
    logging.getLogger("cladapt").setLevel(logging.WARNING)
    os.environ["DISABLE_TQDM"] = "1"
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


class ProcessFailed(CladaptError):
    """Raised in the other processes when process 0 failed in work only it does."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(f"process 0 failed: {message}", hint="see process 0's output for the cause")
        self.exit_code = exit_code


def on_main(fn: Callable[[], T], *, publish: Callable[[T], Any] = lambda _: None) -> tuple[T | None, Any]:
    """Run ``fn`` in process 0 only; every process gets ``publish(result)`` (a JSON value).

    The others wait (in the broadcast) and, when ``fn`` failed, raise :class:`ProcessFailed`
    with the same exit code, so the launcher reports one failure and no process hangs.

    Returns:
        (``fn()`` in process 0, None elsewhere; the published value)
    """
    if distributed.world_size() == 1:
        result = fn()
        return result, publish(result)
    if distributed.is_main():
        try:
            result = fn()
            shared = publish(result)
        except BaseException as exc:
            code = exc.exit_code if isinstance(exc, CladaptError) else 1
            distributed.broadcast_json({"ok": False, "error": f"{type(exc).__name__}: {exc}", "exit_code": code})
            raise
        distributed.broadcast_json({"ok": True, "value": shared})
        return result, shared
    outcome = distributed.broadcast_json(None)
    if not outcome["ok"]:
        raise ProcessFailed(outcome["error"], int(outcome["exit_code"]))
    return None, outcome["value"]


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` in every process, process 0 first (it creates what the others then only read)."""
    result, _ = on_main(fn)
    if not distributed.is_main():
        result = fn()
    return result  # type: ignore[return-value]


def commit_once(store: Store, commit: Callable[[], VersionRecord]) -> VersionRecord:
    """Process 0 commits; every process returns the committed version's record."""
    record, ref = on_main(commit, publish=lambda r: f"{r.task}@{r.version}")
    return record if record is not None else store.get(ref)


def deepspeed_config(name_or_path: str) -> str:
    """A ``--deepspeed`` value -> the JSON file: a bundled preset (``zero2``, ``zero3``) or a path."""
    if name_or_path in DEEPSPEED_PRESETS:
        from importlib import resources

        return str(resources.files("cladapt.configs").joinpath("deepspeed", f"{name_or_path}.json"))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            [Issue(str(path), f"DeepSpeed config not found (presets: {', '.join(DEEPSPEED_PRESETS)})")],
            hint="pass a JSON file or a preset name",
        )
    return str(path.resolve())


def require_deepspeed(config: str) -> None:
    """Refuse ``--deepspeed`` clearly when the package is missing or the config shards the base.

    ZeRO-3 partitions every parameter, the frozen base included. Training runs under it, but what
    follows training here needs the whole model in one process: process 0 evaluates the version,
    embeds its routing signature and saves the adapter while the others wait. Until those steps
    run on all processes together, ZeRO-3 is refused for every method (``supports_zero3`` keeps
    marking the methods that could run sharded at all); ZeRO-2 shards only gradients and optimizer
    state, which for adapters on a frozen base is where the memory goes.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise CladaptError(
            f"--deepspeed needs the deepspeed package ({exc})",
            hint="pip install 'cladapt[deepspeed]' (on a machine without CUDA: DS_BUILD_OPS=0)",
        ) from exc
    stage = (json.loads(Path(config).read_text()).get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        raise CladaptError(
            f"DeepSpeed ZeRO-3 ({config}) shards the frozen base, but evaluation, the routing signature and the "
            "save after training run in process 0 alone and need it whole",
            hint="use --deepspeed zero2 (gradients and optimizer state sharded; the base stays whole)",
        )
