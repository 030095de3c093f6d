"""`spafit predict`: one task, or several at once (fan-out), on a service."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import clip, emit, main, num, remote, table

PREDICT_CHUNK = 32  # inputs per request: under the service's default limit of 64


@main.command()
@click.argument("args", nargs=-1, metavar="[TASK] [TEXT]...")
@click.option("--file", "file", type=click.File("r"), default=None,
              help="Inputs, one per line: plain text, or JSON Lines (a string or {text, text_pair}; all texts or all "
                   "pairs, the service takes one kind per request); - for stdin.")
@click.option("--tasks", default=None, metavar="A,B,...",
              help="Ask several tasks at once (fan-out); then every argument is a text.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Class scores per input [default: all].")
@remote
def predict(client: Any, args: tuple[str, ...], file: Any, tasks: str | None, top_k: int | None,
            as_json: bool) -> None:
    """Predict with a service: `spafit predict TASK "text" ...`, `spafit predict TASK --file inputs.jsonl`,
    or `spafit predict --tasks a,b "text"` for several tasks at once."""
    task_names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if task_names is None:
        if not args:
            raise click.UsageError("name a TASK (or --tasks a,b)")
        task, texts = args[0], list(args[1:])
    else:
        task, texts = None, list(args)
    inputs: list[Any] = [*texts, *(_read_inputs(file) if file is not None else [])]
    if not inputs:
        raise click.UsageError("give texts as arguments or --file")
    chunks = [inputs[i: i + PREDICT_CHUNK] for i in range(0, len(inputs), PREDICT_CHUNK)]
    if task_names is None:
        answers = [client.tasks.predict(task, chunk, top_k=top_k) for chunk in chunks]
        merged = {"task": task, "version": answers[0].version,
                  "predictions": [p.model_dump(mode="json") for a in answers for p in a.predictions]}
        rows = [[p["label"] if p["label"] is not None else "", num(p["score"]), clip(x)]
                for x, p in zip(inputs, merged["predictions"], strict=True)]
        emit(merged, as_json, table(["label", "score", "input"], rows))
        return
    answers = [client.predict_many(task_names, chunk, top_k=top_k) for chunk in chunks]
    results = []
    for i, name in enumerate(task_names):
        parts = [a.results[i] for a in answers]
        results.append({"task": name, "version": parts[0].version,
                        "predictions": [p.model_dump(mode="json") for part in parts for p in part.predictions]})
    rows = [[clip(x), *(f"{r['predictions'][j]['label']} ({r['predictions'][j]['score']:.3f})" for r in results)]
            for j, x in enumerate(inputs)]
    emit({"results": results}, as_json, table(["input", *task_names], rows))


def _read_inputs(file: Any) -> list[Any]:
    out: list[Any] = []
    try:
        lines = list(file)
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"not UTF-8 text ({e.reason} at byte {e.start})", param_hint="--file") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line[0] in "{\"":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise click.BadParameter(f"line {n} is not valid JSON: {e}", param_hint="--file") from None
            if isinstance(value, dict) and "text" not in value:
                raise click.BadParameter(f"line {n}: an object needs `text` (and optionally `text_pair`)",
                                         param_hint="--file")
            out.append(value)
        else:
            out.append(line)
    return out
