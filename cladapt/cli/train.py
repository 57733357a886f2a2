"""Training commands: ``cladapt train``, ``cladapt forget`` (forgetting methods, GS-LoRA) and ``cladapt config``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from cladapt.cli.common import (
    DATA_HELP,
    config_options,
    console,
    data_split_option,
    flat_items,
    open_store,
    registry_option,
    scalar,
)


def _flag_overrides(**flags: object) -> list[str]:
    """Translate convenience flags into ``--set`` overrides (flags win over config files)."""
    out: list[str] = []
    if flags.get("base_model"):
        out.append(f"base_model={flags['base_model']}")
    if flags.get("seed") is not None:
        out.append(f"train.seed={flags['seed']}")
    if flags.get("asd"):
        out.append("asd.enabled=true")
    if flags.get("asd_generator"):
        out.append(f"asd.generator={flags['asd_generator']}")
    if flags.get("replay"):
        out.append("replay.enabled=true")
    if flags.get("replay_loss"):
        out.append(f"replay.loss={flags['replay_loss']}")
    if flags.get("replay_ratio") is not None:
        out.append(f"replay.ratio={flags['replay_ratio']}")
    if flags.get("eval_on_history"):
        out.append("eval.on_history=true")
    if flags.get("eval_every"):
        out.append(f"eval.every={flags['eval_every']}")
    if flags.get("deepspeed"):
        from cladapt.train.distributed import deepspeed_config

        out.append(f"train.deepspeed={deepspeed_config(str(flags['deepspeed']))}")
    if flags.get("load_in_4bit") and flags.get("load_in_8bit"):
        raise click.UsageError("--load-in-4bit and --load-in-8bit exclude each other")
    if flags.get("load_in_4bit") or flags.get("load_in_8bit"):
        out.append(f"train.quantization={'4bit' if flags.get('load_in_4bit') else '8bit'}")
    return out


@click.command("train")
@click.option("--task", required=True, help="task name (letters, digits, '-', '_'); each run adds a version")
@click.option(
    "--data", "data", required=True, multiple=True, type=click.Path(path_type=Path),
    help=f"training data: {DATA_HELP} (repeatable)",
)
@data_split_option
@click.option("--method", default=None, help="continual-learning method (see `cladapt methods`) [default: lora]")
@config_options
@registry_option
@click.option("--base-model", default=None, help="Hugging Face id or folder [default: smollm2-135m-instruct]")
@click.option("--seed", type=int, default=None, help="shortcut for --set train.seed=N")
@click.option("--resume", is_flag=True, help="continue an interrupted run of the same task, data and config")
@click.option("--asd", is_flag=True, help="answer-style diversification of the task data (docs/methods.md §4.1)")
@click.option("--asd-generator", type=click.Choice(["base", "none"]), default=None, help="who writes explanations")
@click.option("--replay", type=click.Choice(["general"]), default=None, help="GeRe general-sample replay")
@click.option("--replay-loss", type=click.Choice(["tm", "lf", "kl", "l1", "l2"]), default=None)
@click.option("--replay-ratio", type=float, default=None, help="replay share of every batch (default: concatenate)")
@click.option(
    "--eval-data", multiple=True, type=click.Path(path_type=Path),
    help="held-out data of this task, scored after training and kept for later tasks' --eval-on-history",
)
@click.option("--eval-on-history", is_flag=True, help="after training, re-score every earlier task")
@click.option("--eval-every", type=int, default=None, help="score seen tasks every N steps (stability-gap curves)")
@click.option(
    "--deepspeed", default=None, metavar="FILE",
    help="DeepSpeed JSON config, or the bundled preset zero2 (adapters on a frozen base; ZeRO-3 is refused)",
)
@click.option("--load-in-4bit", is_flag=True, help="QLoRA: the frozen base in 4-bit NF4 (bitsandbytes); plain LoRA saved")
@click.option("--load-in-8bit", is_flag=True, help="the frozen base in 8-bit (bitsandbytes LLM.int8)")
@click.option("--json", "as_json", is_flag=True, help="print the new version's record as JSON")
def train_cmd(
    task: str,
    data: tuple[Path, ...],
    method: str | None,
    configs: tuple[str, ...],
    overrides: tuple[str, ...],
    registry: Path | None,
    resume: bool,
    data_split: str | None,
    eval_data: tuple[Path, ...],
    as_json: bool,
    **flags: object,
) -> None:
    """Train a task adapter and commit it as a new registry version.

    \b
    cladapt train --task sentiment --data sentiment.jsonl
    cladapt train --task topics --data topics.csv --config cpu-small --set lora.r=16
    cladapt train --task amazon --data amazon.jsonl --method olora --asd --replay general
    cladapt train --task imdb --data imdb --data-split train   # a dataset datasets.load_dataset knows

    Nothing is written to the registry unless the run finishes; an interrupted run can be
    continued with --resume. Under torchrun / accelerate launch the processes train together
    and process 0 alone commits one version and prints it.
    """
    from cladapt import distributed
    from cladapt.config import load_config
    from cladapt.data.sources import with_split
    from cladapt.train.distributed import main_first, start
    from cladapt.train.run import train_from_config

    start()  # several processes: join them (one process: nothing to do)
    cfg, _ = load_config(method=method, files=configs, overrides=[*overrides, *_flag_overrides(**flags)])
    store = main_first(lambda: open_store(registry, create=True))
    record = train_from_config(store, task, with_split(data, data_split), cfg,
                               eval_data=with_split(eval_data, data_split) or None, resume=resume)
    if not distributed.is_main():
        return
    if as_json:
        click.echo(json.dumps(record.manifest.model_dump(mode="json"), indent=2))
        return
    stats = record.manifest.train_stats
    color = {"active": "green", "rejected": "red"}.get(record.status, "yellow")
    console.print(
        f"[bold]{record.task}@{record.version}[/] committed as [{color}]{record.status}[/] "
        f"({record.method}, r={record.r}, {stats.get('steps')} steps, loss {scalar(stats.get('train_loss'))}, "
        f"{stats.get('wall_seconds')} s)"
    )
    scalars = {k: v for k, v in record.manifest.metrics.items() if isinstance(v, (int, float, str))}
    if scalars:
        console.print("metrics: " + "  ".join(f"{k} {scalar(v)}" for k, v in scalars.items()), highlight=False)
    if record.status == "rejected":
        reasons = record.manifest.metrics.get("gate", {}).get("reasons", [])
        console.print(f"[red]rejected by the admission gate[/]: {'; '.join(reasons)}", highlight=False)
        console.print(f"override with: cladapt promote {record.task}@{record.version}")
    console.print(f"details: cladapt show {record.task}@{record.version}; accuracy matrix: cladapt history")


@click.command("forget")
@click.option("--task", required=True, help="name of the forgetting version (e.g. forget-sentiment)")
@click.option(
    "--forget",
    "forget",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="rows whose knowledge is removed (.jsonl/.json/.csv/...; repeatable)",
)
@click.option(
    "--retain",
    "retain",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="rows whose knowledge must be kept (repeatable)",
)
@click.option("--prototypes", is_flag=True, help="GS-LoRA++: add the prototype losses (method.prototypes=true)")
@click.option("--method", default="gslora", show_default=True, help="a forgetting method (see `cladapt methods`)")
@config_options
@registry_option
@click.option("--base-model", default=None, help="Hugging Face id or folder [default: smollm2-135m-instruct]")
@click.option("--seed", type=int, default=None, help="shortcut for --set train.seed=N")
@click.option("--resume", is_flag=True, help="continue an interrupted run of the same request")
@click.option("--json", "as_json", is_flag=True, help="print the new version's record as JSON")
def forget_cmd(
    task: str,
    forget: tuple[Path, ...],
    retain: tuple[Path, ...],
    prototypes: bool,
    method: str,
    configs: tuple[str, ...],
    overrides: tuple[str, ...],
    registry: Path | None,
    base_model: str | None,
    seed: int | None,
    resume: bool,
    as_json: bool,
) -> None:
    """Train a forgetting adapter (GS-LoRA, docs/methods.md §8) and commit it as a new version.

    \b
    cladapt forget --task forget-topics --forget topics.jsonl --retain sentiment.jsonl
    cladapt forget --task forget-topics --forget topics.jsonl --retain sentiment.jsonl --prototypes

    The adapter joins the active sum of adapters; groups (layers) it barely uses are pruned to
    exactly zero. gslora.json records forget/retain CE and accuracy before and after.
    """
    from cladapt import distributed
    from cladapt.config import load_config
    from cladapt.train.distributed import main_first, start
    from cladapt.train.run import train_from_config

    start()  # several processes (torchrun): join them; process 0 alone commits and prints
    extra = [f"base_model={base_model}"] if base_model else []
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if prototypes:
        extra.append("method.prototypes=true")
    cfg, _ = load_config(method=method, files=configs, overrides=[*overrides, *extra])
    store = main_first(lambda: open_store(registry, create=True))
    record = train_from_config(store, task, [str(p) for p in retain], cfg, forget_data=[str(p) for p in forget],
                               resume=resume)
    if not distributed.is_main():
        return
    if as_json:
        click.echo(json.dumps(record.manifest.model_dump(mode="json"), indent=2))
        return
    stats = record.manifest.train_stats
    console.print(
        f"[bold]{record.task}@{record.version}[/] committed as {record.status} "
        f"({record.method}, {stats.get('steps')} steps, loss {scalar(stats.get('train_loss'))})"
    )
    if record.manifest.metrics:
        table = Table("metric", "value")
        for key, value in flat_items(record.manifest.metrics):
            table.add_row(key, value)
        console.print(table)


@click.group("config")
def config_group() -> None:
    """Inspect and validate run configurations."""


@config_group.command("check")
@click.argument("files", nargs=-1)
@click.option("--method", default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def config_check(files: tuple[str, ...], method: str | None, overrides: tuple[str, ...]) -> None:
    """Validate config files (and overrides) without training; print the resolved config."""
    import yaml

    from cladapt.config import load_config

    cfg, prov = load_config(method=method, files=files, overrides=overrides)
    click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    console.print("[green]config OK[/]")


@config_group.command("presets")
def config_presets() -> None:
    """List the bundled presets."""
    from cladapt.presets import preset_names

    for kind in ("train", "methods"):
        click.echo(f"{kind}: {', '.join(preset_names(kind))}")


commands: list[click.Command] = [train_cmd, forget_cmd, config_group]
