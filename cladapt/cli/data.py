"""``cladapt data check``, ``cladapt asd preview``, ``cladapt replay init|show``: the data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.text import Text

from cladapt.cli.common import console, data_split_option, echo_json, open_store, registry_option

_BASE_HELP = "Hugging Face id or folder [default: smollm2-135m-instruct]"


def _tokenizer(base_model: str | None) -> Any:
    """Only the tokenizer of ``base_model`` (no weights are loaded)."""
    from cladapt.base_model import DEFAULT_BASE_MODEL, load_tokenizer

    return load_tokenizer(base_model or DEFAULT_BASE_MODEL)


# ---------------------------------------------------------------------------------- data


@click.group("data")
def data_group() -> None:
    """Validate training data."""


@data_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--base-model", default=None, help=f"tokenizer for token lengths; {_BASE_HELP}")
@click.option("--no-tokens", is_flag=True, help="skip token-length statistics (no tokenizer is loaded)")
@click.option("--max-length", type=int, default=512, show_default=True, help="report rows longer than this")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@data_split_option
def data_check(files: tuple[Path, ...], base_model: str | None, no_tokens: bool, max_length: int, as_json: bool,
               data_split: str | None) -> None:
    """Validate FILES and print statistics: rows, token lengths, labels, duplicates.

    FILES are data files, dataset folders or dataset names (see `cladapt train --help`). Every bad
    row is reported with file and line (or dataset, split and row); the exit status is 1 if any is bad.

    \b
    cladapt data check train.jsonl dev.jsonl
    cladapt data check data.csv --max-length 256 --json
    cladapt data check ./my-dataset --data-split test
    """
    from cladapt.data.rows import load_examples
    from cladapt.errors import DataError
    from cladapt.train.data_check import describe

    try:
        loaded = load_examples(files, split=data_split)
    except DataError as exc:
        if as_json:
            echo_json({"ok": False, "issues": [str(i) for i in exc.issues]})
        else:  # plain echo: rich would wrap long file:line locations
            click.echo(str(exc), err=True)
        raise SystemExit(1) from exc
    report = describe(loaded, tokenizer=None if no_tokens else _tokenizer(base_model), max_length=max_length)
    if as_json:
        echo_json({"ok": True, **report})
        return
    _render_check(report)


def _render_check(report: dict[str, Any]) -> None:
    for f, n in report["files"].items():
        console.print(f"{f}: {n} rows", highlight=False)
    console.print(f"[bold]{report['rows']} rows[/], sha256 {report['sha256'][:16]}…")
    tokens = report.get("tokens")
    if tokens:
        t, a = tokens["total"], tokens["answer"]
        console.print(
            f"tokens per row: min {t.get('min')} mean {t.get('mean')} p95 {t.get('p95')} max {t.get('max')}; "
            f"answer tokens: mean {a.get('mean')} max {a.get('max')}",
            highlight=False,
        )
        over = report["overlong"]
        if over:
            console.print(f"[yellow]{len(over)} rows longer than {tokens['max_length']} tokens[/] (the prompt's start is cut):")
            for o in over[:10]:
                console.print(f"  {o['where']}: {o['tokens']} tokens", highlight=False)
    labels = report["labels"]
    shown = ", ".join(f"{k!r}: {v}" for k, v in list(labels["top"].items())[:10])
    console.print(f"{labels['distinct']} distinct answers; most common: {shown}", highlight=False)
    for key, what in (("duplicates", "duplicate rows"), ("conflicts", "prompts repeated with a different answer")):
        items = report[key]
        if items:
            console.print(f"[yellow]{len(items)} {what}[/]:")
            for d in items[:10]:
                console.print(f"  {d['where']} repeats {d['first']}", highlight=False)
    console.print("[green]data OK[/]")


# ----------------------------------------------------------------------------------- asd


@click.group("asd")
def asd_group() -> None:
    """Answer-style diversification (docs/methods.md §4.1)."""


@asd_group.command("preview")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--n", "n", type=int, default=10, show_default=True, help="converted rows to show")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--percent", type=float, default=20.0, show_default=True, help="share of rows converted (X)")
@click.option("--style", "original_style", type=click.Choice(["SA", "YN", "MCQ", "BE", "DE"]), default="SA",
              show_default=True, help="the task's own answer style")
@click.option("--generator", type=click.Choice(["none", "base"]), default="none", show_default=True,
              help="who writes BE/DE explanations (base: the base model, greedy)")
@click.option("--base-model", default=None, help=f"tokenizer (and generator); {_BASE_HELP}")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the whole converted file as JSON Lines (explanations for all BE/DE rows)")
@click.option("--json", "as_json", is_flag=True, help="print the rows and the report as JSON")
def asd_preview(
    file: Path, n: int, seed: int, percent: float, original_style: str, generator: str,
    base_model: str | None, output: Path | None, as_json: bool,
) -> None:
    """Show what ASD makes of FILE: N converted rows (all styles) and the asd.json report.

    \b
    cladapt asd preview amazon.jsonl --n 8
    cladapt asd preview amazon.jsonl --generator base --output amazon.asd.jsonl
    """
    from cladapt.data.rows import load_examples
    from cladapt.train.asd import asd, base_model_generator, plan, target_styles, to_jsonl_rows

    examples = load_examples([file]).examples
    gen, gen_id, tokenizer = None, "none", None
    if generator == "base":
        from cladapt.base_model import DEFAULT_BASE_MODEL, load

        model, tokenizer, info = load(base_model or DEFAULT_BASE_MODEL)
        gen, gen_id = base_model_generator(model, tokenizer), f"base:{info.id}@{info.fingerprint[:12]}:greedy"
    else:
        tokenizer = _tokenizer(base_model)
    styles = target_styles(original_style, with_explanations=gen is not None)
    planned = plan(len(examples), percent, seed, styles)
    by_style = {s: sorted(i for i, st in planned.items() if st == s) for s in styles}
    # round-robin over the styles, so a short preview still shows every style
    shown = sorted([i for k in range(n) for s in styles for i in by_style[s][k : k + 1]][:n])
    result = asd(
        examples, percent=percent, seed=seed, original_style=original_style, generator=gen, generator_id=gen_id,
        count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]),
        only=None if output else shown,
    )
    if output:
        output.write_text("".join(line + "\n" for line in to_jsonl_rows(result.examples)))
    rows = [(planned[i], result.examples[i]) for i in shown]
    report = result.report.to_json()
    if as_json:
        echo_json({
            "rows": [{"where": r.where, "planned": p, "converted": "style" in r.meta, "messages": r.messages, **r.meta}
                     for p, r in rows],
            "report": report,
        })
        return
    for p, r in rows:
        console.rule(f"{r.where}  [bold]{p}[/]" + ("" if "style" in r.meta else " (not converted, see below)"))
        console.print(Text.assemble(("user: ", "dim"), r.prompt_text))
        console.print(Text.assemble(("assistant: ", "bold"), r.answer))
    console.rule()
    scope = "whole file" if output else f"{len(shown)} previewed rows"
    console.print(f"converted ({scope}): {report['counts']}; skipped: {len(report['skipped'])}", highlight=False)
    for s in report["skipped"]:
        console.print(f"  [yellow]{s['where']}[/] ({s['style']}): {s['reason']}", highlight=False)
    if report["redistributed"]:
        console.print("no explanation generator: the BE/DE quota goes to " + "/".join(report["redistributed"]["to"]))
    if output:
        console.print(f"wrote {len(result.examples)} rows to {output}")


# -------------------------------------------------------------------------------- replay


@click.group("replay")
def replay_group() -> None:
    """GeRe general-sample replay: record and inspect the base model's activation statistics."""


@replay_group.command("init")
@registry_option
@click.option("--base-model", default=None, help=_BASE_HELP)
@click.option("--texts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="general texts: .jsonl/.json rows with a 'text' field, or .txt one per line")
@click.option("--self-generate", "self_generate", type=int, default=None, metavar="N",
              help="let the base model write N general texts from cladapt's seed prompts (offline default)")
@click.option("--n", "n", type=int, default=None, help="replay texts to keep [default: 256, or N]")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="tokens per text (right truncation)")
@click.option("--chunk", is_flag=True, help="split long texts into max-tokens pieces instead of truncating")
@click.option("--k-sigma", type=float, default=1.0, show_default=True, help="band half-width in standard deviations")
@click.option("--states", is_flag=True, help="also store raw fp16 states (needed by --replay-loss l1/l2)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --self-generate")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="replace an existing record for this base model")
def replay_init(
    registry: Path | None, base_model: str | None, texts: Path | None, self_generate: int | None, n: int | None,
    max_tokens: int, chunk: bool, k_sigma: float, states: bool, seed: int, batch_size: int, dtype: str, force: bool,
) -> None:
    """Record the original base model's last-layer statistics on a general replay set.

    Stored once per base model (and tokenizer) in the registry; every `cladapt train --replay
    general` on that base uses it.

    \b
    cladapt replay init --texts general.jsonl --n 256
    cladapt replay init --self-generate 256
    """
    from cladapt.base_model import DEFAULT_BASE_MODEL
    from cladapt.train.replay_record import init_record

    if (texts is None) == (self_generate is None):  # before the default registry is created
        raise click.UsageError("give exactly one of --texts FILE and --self-generate N")
    store = open_store(registry, create=True)
    rec, path, info = init_record(store, base_model or DEFAULT_BASE_MODEL, texts=texts, self_generate=self_generate, n=n,
                                  max_tokens=max_tokens, chunk=chunk, k_sigma=k_sigma, states=states, seed=seed,
                                  batch_size=batch_size, dtype=dtype, force=force)
    m = rec.meta
    console.print(
        f"recorded [bold]{m['n']}[/] texts ({m['tokens']} tokens, width {m['width']}, d={m['hidden_size']}) "
        f"for {info.id} in {m['seconds']} s -> {path}",
        highlight=False,
    )


@replay_group.command("show")
@registry_option
@click.option("--base-model", default=None, help="only the record of this base model")
@click.option("--texts", "n_texts", type=int, default=0, help="also print the first N replay texts")
@click.option("--json", "as_json", is_flag=True)
def replay_show(registry: Path | None, base_model: str | None, n_texts: int, as_json: bool) -> None:
    """List the replay records in the registry (one per base model and tokenizer)."""
    from cladapt.train.replay_record import recorded, recorded_texts

    store = open_store(registry)
    records = recorded(store, base=base_model)
    texts = {key: recorded_texts(store, key, n_texts) for key, _ in records} if n_texts else {}
    if as_json:
        echo_json([{"key": k, **m, **({"texts": texts[k]} if k in texts else {})} for k, m in records])
        return
    if not records:
        console.print("no replay records; create one with `cladapt replay init`")
        return
    for key, m in records:
        src = m["source"]
        origin = src.get("path") or src["kind"]
        console.print(
            f"[bold]{m['base']['id']}[/] ({key[:12]}…): {m['n']} texts × ≤{m['max_tokens']} tokens "
            f"({m['tokens']} tokens), d={m['hidden_size']}, k_sigma={m['k_sigma']}, states={m['states']}, "
            f"from {origin}, recorded {m['created']}",
            highlight=False,
        )
        for t in texts.get(key, []):
            console.print(f"  • {t[:200]!r}", highlight=False)


commands: list[click.Command] = [data_group, asd_group, replay_group]
