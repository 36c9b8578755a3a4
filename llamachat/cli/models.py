"""pull, list, show, verify, rm."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import remotes
from ..engine.config import ModelConfig
from ..engine.errors import EngineError
from ..home import Home
from ..models.catalog import CATALOG
from ..models.errors import StoreError
from ..models.inspect import inspect_folder
from ..models.integrity import FileProblem
from ..models.integrity import verify as verify_files
from ..models.manifest import FileRecord
from ..models.reply_defaults import created_defaults
from ..models.store import BrokenModel, InstalledModel, ModelStore
from .console import CliError, stderr, stdin_is_terminal, stdout, warn
from .options import checked_quantize
from .progress import RichProgress

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def pull(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Catalog name, hf:ORG/REPO[@REVISION], a model folder or a .gguf file."
        ),
    ] = None,
    alias: Annotated[str | None, typer.Option("--as", help="Install under this name.")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="The weight format the model loads in by default: none, int8, int4, fp8 (GPU),"
            " f16 (CPU) or auto. The files stay as downloaded; the format is applied each time the"
            " model loads, and --quantize or the config's quantize override it."
            " [default: auto, or what an earlier pull chose]",
            callback=checked_quantize,
        ),
    ] = None,
    list_catalog: Annotated[
        bool, typer.Option("--list", help="Show the catalog and exit.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Install a model: from the catalog, the Hugging Face Hub, a folder or a GGUF file."""
    if list_catalog:
        _print_catalog(as_json)
        return
    if name is None:
        raise CliError(
            "pull needs a model: a catalog name (see `llamachat pull --list`), "
            "hf:ORG/REPO or a path",
            2,
        )
    from ..models.pull import pull as pull_model  # numpy and the readers: only here

    home = Home.current()
    with RichProgress() as progress:
        result = pull_model(
            name, ModelStore(home.models), home.downloads, alias, progress, quantize
        )
    model = result.model
    recorded = model.manifest.quantization
    loads = f"; it loads as {recorded} by default" if recorded else ""
    if result.already_installed:
        stderr.print(f"{model.name} is already installed and up to date{loads}", markup=False)
    else:
        stderr.print(
            f"installed {model.name}: {_count(model.manifest.parameters)} parameters, "
            f"{_bytes(model.manifest.size)} on disk{loads}",
            markup=False,
        )


def list_models(as_json: JsonOption = False) -> None:
    """List installed models, and those of each remote server (`llamachat remote`)."""
    models = ModelStore(Home.current().models).scan()
    remote = _remote_summaries()
    if as_json:
        stdout.print_json(json.dumps([_summary(model) for model in models] + remote))
        return
    if not models and not remote:
        stderr.print(
            "no models installed: `llamachat pull smollm2` gets the default one", markup=False
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "PARAMS", "SIZE", "WEIGHTS", "CONTEXT", "SOURCE", "STATUS"):
        table.add_column(column, no_wrap=column in ("NAME", "SIZE", "STATUS"))
    problems = []
    for model in models:
        if isinstance(model, BrokenModel):
            table.add_row(model.name, "-", "-", "-", "-", "-", "broken")
            problems.append(str(model.error()))
            continue
        damage = model.size_problems()
        if damage:
            problems.append(str(model.damaged(damage)))
        manifest = model.manifest
        table.add_row(
            model.name,
            _count(manifest.parameters),
            _bytes(manifest.size),
            manifest.weights,
            f"{manifest.context_length}",
            manifest.source,
            "damaged" if damage else "ok",
        )
    for entry in remote:
        context = entry["context_length"]
        table.add_row(entry["name"], "-", "-", "-", f"{context or '-'}", entry["source"], "remote")
    stdout.print(table)
    for problem in problems:
        warn(problem)


def _show_remote(remote: remotes.Remote, model: str, as_json: bool) -> None:
    from ..backends.remote import RemoteBackend

    window = RemoteBackend(remote).window(model)  # refuses a model the server lacks
    details = {
        "name": f"{remote.name}/{model}",
        "remote": remote.name,
        "url": remote.url,
        "model": model,
        "context_length": window,
    }
    if as_json:
        stdout.print_json(json.dumps(details))
        return
    rows = [
        ("remote", f"{remote.name} ({remote.url})"),
        ("model", model),
        ("context length", f"{window}" if window else "not said by the server"),
    ]
    for label, value in rows:
        stdout.print(f"{label + ':':16}{value}", markup=False)


def _remote_summaries() -> list[dict[str, Any]]:
    """`list`'s entries for the remotes' models, each remote asked with a short timeout; one
    that cannot be asked is said on stderr, and the others are still listed."""
    from ..backends.base import BackendError
    from ..backends.remote import RemoteBackend

    home = Home.current()
    try:
        known = remotes.load(home.remotes_file)
    except remotes.RemoteError as error:
        warn(str(error))
        return []
    entries = []
    for remote in known.values():
        try:
            served = RemoteBackend(remote).served()
        except BackendError as error:
            warn(str(error))
            continue
        for model, context in served.items():
            entries.append(
                {
                    "name": f"{remote.name}/{model}",
                    **dict.fromkeys(_SUMMARY_FIELDS),
                    "context_length": context,
                    "source": remote.url,
                    "path": None,
                    "status": "remote",
                    "problem": None,
                }
            )
    return entries


def show(
    name: Annotated[str, typer.Argument(help="An installed model.")],
    as_json: JsonOption = False,
) -> None:
    """Show a model's architecture, context, KV-cache cost, chat format and files; for a
    remote's model (NAME/MODEL), what its server says of it."""
    home = Home.current()
    known = remotes.load(home.remotes_file)
    if (remote_model := remotes.split_model(name, known)) is not None:
        _show_remote(*remote_model, as_json)
        return
    store = ModelStore(home.models)
    model = store.get(name)
    damage = model.size_problems()
    try:
        details = _details(model, damage, _base_weights(store, model))
    except (StoreError, EngineError):
        if damage:  # what cannot be read is most likely what was damaged: say that
            raise model.damaged(damage) from None
        raise
    if damage:
        warn(str(model.damaged(damage)))
    if as_json:
        stdout.print_json(json.dumps(details))
        return
    rows = [
        (
            "source",
            f"{details['source']}" + (f" @ {details['revision']}" if details["revision"] else ""),
        ),
        ("installed", details["installed_at"]),
        ("architecture", details["architecture"]),
        ("parameters", f"{_count(details['parameters'])} ({details['parameters']:,})"),
        ("weights", details["weights"]),
        ("weight format", details["quantization"]),
        ("layers", f"{details['layers']}"),
        ("hidden size", f"{details['hidden_size']}"),
        ("attention", _attention(details)),
        ("head dim", f"{details['head_dim']}"),
        ("MLP hidden", f"{details['intermediate_size']}"),
        ("context length", f"{details['context_length']}"),
        ("rope", _rope(details)),
        ("vocabulary", f"{details['vocab_size']}"),
        (
            "KV cache",
            f"{_bytes(details['kv_bytes_per_token'])} per token in bf16 "
            f"({_bytes(details['kv_bytes_full_context'])} for the full context), "
            f"{_bytes(2 * details['kv_bytes_per_token'])} in fp32",
        ),
        ("chat format", details["chat_format"]),
        ("files", _integrity(model, damage)),
    ]
    if details["lineage"] is not None:
        rows.insert(1, ("made from", _lineage(details["lineage"])))
    for key, value in (details["defaults"] or {}).items():
        rows.append((f"default {key.replace('_', ' ')}", f"{value}"))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    stdout.print(f"[bold]{name}[/bold]")
    stdout.print(table)
    stdout.print("\n[bold]chat template[/bold]")
    stdout.print(details["chat_template"], markup=False, highlight=False)
    files = Table(box=None, pad_edge=False)
    for column in ("FILE", "SIZE", "SHA256", "ON DISK"):
        files.add_column(column, no_wrap=True)
    for record in details["files"]:
        on_disk = record["problem"] or "size as recorded"
        files.add_row(record["path"], _bytes(record["size"]), record["sha256"], on_disk)
    stdout.print()
    stdout.print(files)


def verify(
    name: Annotated[str, typer.Argument(help="An installed model.")],
    as_json: JsonOption = False,
) -> None:
    """Check every file of a model against the sha256 its manifest recorded (reads them all)."""
    model = ModelStore(Home.current().models).get(name)
    started = time.monotonic()
    with RichProgress() as progress:
        task = progress.task(f"verifying {name}", model.manifest.size)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            task.update(done)

        checks = verify_files(model.path, model.manifest.files, advance)
        task.finish()
    elapsed = time.monotonic() - started
    problems = [check.problem for check in checks if check.problem is not None]
    if as_json:
        files = [
            {
                "path": check.record.path,
                "size": check.record.size,
                "expected_sha256": check.record.sha256,
                "sha256": check.sha256,
                "status": check.problem.kind if check.problem else "ok",
            }
            for check in checks
        ]
        stdout.print_json(json.dumps({"name": name, "ok": not problems, "files": files}))
    else:
        table = Table(box=None, pad_edge=False)
        for column in ("FILE", "SIZE", "RESULT"):
            table.add_column(column, no_wrap=True)
        for check in checks:
            result = check.problem.detail if check.problem else "sha256 as recorded"
            table.add_row(check.record.path, _bytes(check.record.size), result)
        stdout.print(table)
    if problems:
        raise model.damaged(problems, verified=True)
    rate = f", {model.manifest.size / elapsed / 1e6:.0f} MB/s" if elapsed > 0 else ""
    stderr.print(
        f"{name}: all {len(checks)} files match their recorded sha256 "
        f"({_bytes(model.manifest.size)} read in {elapsed:.1f} s{rate})",
        markup=False,
    )


def rm(
    name: Annotated[str, typer.Argument(help="An installed model.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Remove a base that models created with --no-merge still load from."
        ),
    ] = False,
) -> None:
    """Remove an installed model."""
    store = ModelStore(Home.current().models)
    model = store.entry(name)
    if not force:
        store.check_removable(name)  # before anything is asked
    if not yes:
        if not stdin_is_terminal():
            raise CliError(f"not removing {name} without confirmation: pass --yes", exit_code=2)
        what = "broken" if isinstance(model, BrokenModel) else _bytes(model.manifest.size)
        if not typer.confirm(f"Remove {name} ({what})?", err=True):
            raise typer.Exit(1)
    store.remove(name, force=force)
    stderr.print(f"removed {name}", markup=False)


def _lineage(lineage: dict[str, Any]) -> str:
    parts = [f"{lineage['base']} ({lineage['base_source']})"]
    for adapter in lineage["adapters"]:
        parts.append(
            f"LoRA {adapter['path']} (rank {adapter['rank']}, alpha {adapter['alpha']:g}, "
            f"scaling {adapter['scaling']:g}{', rsLoRA' if adapter['rslora'] else ''}, "
            f"sha256 {adapter['sha256'][:12]}…)"
        )
    merged = "merged into the weights" if lineage["merged"] else "applied on loading"
    return " + ".join(parts) + (f", {merged}" if lineage["adapters"] else "")


def _integrity(model: InstalledModel, damage: list[FileProblem]) -> str:
    if damage:
        return f"damaged: {'; '.join(str(p) for p in damage)} (`llamachat verify {model.name}`)"
    return f"sizes as recorded (`llamachat verify {model.name}` checks every sha256)"


def _base_weights(store: ModelStore, model: InstalledModel) -> Path | None:
    """A created model's base's folder, when the model loads its weights from there."""
    lineage = model.manifest.lineage
    if lineage is None or lineage.merged:
        return None
    try:
        return store.get(lineage.base).path
    except StoreError:
        raise StoreError(
            f"{model.name} loads its weights from {lineage.base}, which is not installed"
        ) from None


def _details(
    model: InstalledModel, damage: list[FileProblem], weights_folder: Path | None = None
) -> dict[str, Any]:
    manifest = model.manifest
    problems = {problem.path: problem for problem in damage}
    facts = inspect_folder(model.path, manifest.chat_format, weights_folder)
    config: ModelConfig = facts.config
    scaling = config.rope_scaling
    kv_per_token = config.kv_bytes_per_token(2)
    return {
        "name": manifest.name,
        "source": manifest.source,
        "revision": manifest.revision,
        "installed_at": manifest.installed_at,
        "architecture": config.architecture,
        "parameters": config.parameter_count(),
        "weights": manifest.weights,
        "quantization": manifest.quantization or "auto",
        "layers": config.n_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "gqa_group_size": config.n_groups,
        "head_dim": config.head_dim,
        "context_length": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None
        if scaling is None
        else {"type": scaling.kind, **_scaling_fields(scaling)},
        "vocab_size": config.vocab_size,
        "kv_dtype": "bfloat16",
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_full_context": kv_per_token * config.max_position_embeddings,
        "chat_format": facts.chat_format,
        "chat_template": facts.chat_template,
        "lineage": None if manifest.lineage is None else dataclasses.asdict(manifest.lineage),
        "defaults": created_defaults(model.path),
        "size": manifest.size,
        "status": "damaged" if damage else "ok",
        "problem": str(model.damaged(damage)) if damage else None,
        "files": [_file_details(record, problems.get(record.path)) for record in manifest.files],
    }


def _file_details(record: FileRecord, problem: FileProblem | None) -> dict[str, Any]:
    size_on_disk = record.size if problem is None else problem.size_on_disk
    return {
        "path": record.path,
        "size": record.size,
        "sha256": record.sha256,
        "size_on_disk": size_on_disk,
        "problem": problem.detail if problem else None,
    }


def _scaling_fields(scaling) -> dict[str, Any]:
    fields = {"factor": scaling.factor}
    if scaling.kind == "llama3":
        fields.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    return fields


_SUMMARY_FIELDS = (
    "parameters",
    "size",
    "weights",
    "quantization",
    "context_length",
    "source",
    "revision",
    "installed_at",
    "base",
)


def _summary(model: InstalledModel | BrokenModel) -> dict[str, Any]:
    """One entry of `list --json`; a broken model has the same keys, null where unknown."""
    if isinstance(model, BrokenModel):
        unknown = dict.fromkeys(_SUMMARY_FIELDS)
        problem = str(model.error())
        return {
            "name": model.name,
            **unknown,
            "path": str(model.path),
            "status": "broken",
            "problem": problem,
        }
    manifest = model.manifest
    damage = model.size_problems()
    return {
        "name": model.name,
        "parameters": manifest.parameters,
        "size": manifest.size,
        "weights": manifest.weights,
        "quantization": manifest.quantization or "auto",
        "context_length": manifest.context_length,
        "source": manifest.source,
        "revision": manifest.revision,
        "installed_at": manifest.installed_at,
        "base": manifest.lineage.base if manifest.lineage else None,  # a created model's
        "path": str(model.path),
        "status": "damaged" if damage else "ok",
        "problem": str(model.damaged(damage)) if damage else None,
    }


def _print_catalog(as_json: bool) -> None:
    if as_json:
        entries = [
            {
                "name": e.alias,
                "description": e.description,
                "parameters": e.parameters,
                "download_bytes": e.download_bytes,
                "source": e.source,
                "revision": e.revision or (e.wheel.wheel_sha256 if e.wheel else None),
                "gated": e.gated,
            }
            for e in CATALOG.values()
        ]
        stdout.print_json(json.dumps(entries))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "PARAMS", "DOWNLOAD", "SOURCE", "DESCRIPTION"):
        table.add_column(column, no_wrap=column != "DESCRIPTION")
    for entry in CATALOG.values():
        table.add_row(
            entry.alias,
            entry.parameters,
            _bytes(entry.download_bytes),
            entry.source,
            entry.description,
        )
    stdout.print(table)


def _attention(config: dict[str, Any]) -> str:
    heads, kv_heads = config["heads"], config["kv_heads"]
    kind = "MHA" if heads == kv_heads else "MQA" if kv_heads == 1 else "GQA"
    return f"{kind}: {heads} heads, {kv_heads} kv heads (group of {config['gqa_group_size']})"


def _rope(config: dict[str, Any]) -> str:
    text = f"theta {config['rope_theta']:g}"
    scaling = config["rope_scaling"]
    if scaling:
        details = ", ".join(f"{k} {v:g}" for k, v in scaling.items() if k != "type")
        text += f"; {scaling['type']} scaling ({details})"
    return text


def _count(parameters: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if parameters >= size:
            return f"{parameters / size:.2f}B" if unit == "B" else f"{parameters / size:.1f}{unit}"
    return str(parameters)


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
