"""The ``jungletrap`` command line: the pipeline, each stage, the demo data, predict, submit/status/cancel.

Every command resolves and validates the config before any work (a bad key exits with status 2 naming it),
opens the cluster (a local one, or ``--scheduler``/``--scheduler-file``), prints the dashboard link, and calls
one library function. Exit codes: 0 ok, 1 failed videos under ``--strict`` or a stage error, 2 bad config,
input files that do not fit each other, or no cluster; 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from jungletrap.config import STAGES, ConfigError, JobConfig, load_config
from jungletrap.interrupt import EXIT_INTERRUPTED, stop_on_signals

__all__ = ["app", "execute"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Camera-trap video classification on Dask.")
log = logging.getLogger("jungletrap")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (conf/*.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value.")]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", help="Run directory, a path or URL (default "
                                                                    "run.root/run.name).")]
StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage-options", help='fsspec options (JSON) for remote locations, e.g. \'{"endpoint_url": "http://h:9000"}\'; '
                              "credentials come from the environment or a profile.")]
SchedOpt = Annotated[Optional[str], typer.Option("--scheduler", help="Existing scheduler, e.g. tcp://host:8786.")]
SchedFileOpt = Annotated[Optional[Path], typer.Option("--scheduler-file", help="Scheduler file of a cluster.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit non-zero when any video failed.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run stages already done (embed still keeps whole parts).")]


class _DropInterruptedSyncNoise(logging.Filter):
    """Drop one known false alarm: when Ctrl-C/SIGTERM interrupts a wait, distributed's ``sync()`` runs its own
    ``cancel`` callback, which fails with a NameError inside distributed and tornado logs that traceback.
    The interruption itself is handled (exit 130, manifest updated); the traceback would only alarm users.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "sync.<locals>.cancel" not in record.getMessage()


def _setup_logging() -> None:
    """Our INFO lines on stderr; Dask's own chatter only from WARNING (it sets its levels when imported)."""
    import distributed  # noqa: F401  (import first so that its logging config does not override ours)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("distributed", "bokeh", "tornado", "matplotlib", "xgboost"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("tornado.application").addFilter(_DropInterruptedSyncNoise())


def _storage_options(text: str | None) -> dict[str, Any]:
    import json

    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--storage-options must be a JSON object ({err.msg})") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return options


def _load(config: Path | None, sets: list[str] | None, run_dir: str | None) -> tuple[JobConfig, Any]:
    cfg = load_config(config, sets or [])
    from jungletrap.pipeline import check_run_dir  # the whole library (torch, xgboost): only for a valid config
    from jungletrap.storage import run_path

    resolved = run_path(run_dir, cfg.run.storage_options) if run_dir is not None else cfg.run_dir()
    check_run_dir(resolved)
    return cfg, resolved


def _summary(run_dir: Any, results: dict[str, Any], failed: int) -> None:
    embed = results.get("embed", {})
    if embed:
        warned = f", {embed['warnings']} truncated or partly corrupt (see the warning column)" if embed.get(
            "warnings") else ""
        typer.echo(f"videos: {embed.get('embedded', 0)} embedded, {embed.get('skipped', 0)} skipped, "
                   f"{failed} failed{warned}")
    if "ensemble" in results:
        ens = results["ensemble"]
        typer.echo(f"submission: {run_dir / 'submission.csv'}")
        typer.echo(f"metrics:    {run_dir / 'metrics.json'}")
        typer.echo(f"report:     {run_dir / 'report.html'}")
        typer.echo(f"out-of-fold mean log loss: blend {ens['blend_oof_log_loss']:.5f} "
                   f"(class-prior baseline {ens['prior_oof_log_loss']:.5f})")


def _failed_count(cfg: JobConfig, run_dir: Any) -> int:
    """Error rows in the run's embedding parts, all of them: the embed stage's own count (it reads every part,
    those of earlier invocations included), else, for a stage recorded by an older version that counted
    only its last invocation, or none recorded, counted from the parts here."""
    from jungletrap.embed import count_failures
    from jungletrap.manifest import Manifest
    from jungletrap.train import embed_dir

    rec = Manifest(run_dir).stage("embed")
    if rec is not None and rec.status == "done" and "videos" in rec.counts:
        return int(rec.counts["failed"])
    parts = embed_dir(cfg, run_dir)
    return count_failures(parts) if parts.is_dir() else 0


def execute(
    stages: list[str],
    *,
    config: Path | None,
    sets: list[str] | None,
    run_dir: str | Path | None,
    scheduler: str | None,
    scheduler_file: Path | None,
    strict: bool,
    force: bool = False,
) -> int:
    """Validate config, open the cluster, run ``stages``; return the process exit code."""
    _setup_logging()
    try:
        cfg, resolved = _load(config, sets, None if run_dir is None else str(run_dir))
    except (ConfigError, NotADirectoryError) as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    from jungletrap.catalog import InputError, check_inputs

    try:  # input files that do not fit each other: stop before the cluster starts, not in the last stage
        check_inputs(cfg.data)
    except InputError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    from jungletrap.cluster import ClusterError, StageMemoryError, open_client
    from jungletrap.embed import TooManyFailures
    from jungletrap.pipeline import StageContext, run_pipeline

    resume = f"interrupted: run the same command again to resume ({resolved})"
    try:
        with stop_on_signals(cfg.cluster.stop_timeout_s, resume), open_client(
                cfg.cluster, address=scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None
        ) as (client, info):
            typer.echo(f"dask dashboard: {info.dashboard_link} ({info.kind} cluster, {info.n_workers} workers)")
            results = run_pipeline(StageContext(client, cfg, resolved, info), stages=stages, force=force)
    except (ClusterError, InputError, ConfigError) as err:  # ConfigError: e.g. embed.weights missing on workers
        typer.echo(f"error: {err}", err=True)
        return 2
    except (TooManyFailures, StageMemoryError) as err:  # the stage failed for a reason the message says in full
        typer.echo(f"error: {err}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo(resume, err=True)
        return EXIT_INTERRUPTED
    failed = _failed_count(cfg, resolved)
    _summary(resolved, results, failed)
    if failed and (strict or cfg.run.strict):
        typer.echo(f"error: {failed} video(s) failed (see {resolved / 'report.html'} or the embeddings)", err=True)
        return 1
    return 0


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    until: Annotated[Optional[str], typer.Option(help=f"Last stage to run: {', '.join(STAGES)}.")] = None,
    scheduler: SchedOpt = None,
    scheduler_file: SchedFileOpt = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run every stage in order (skipping those already done for this config)."""
    if until is not None and until not in STAGES:
        typer.echo(f"error: --until must be one of {', '.join(STAGES)}, got {until!r}", err=True)
        raise typer.Exit(2)
    stages = list(STAGES[: STAGES.index(until) + 1]) if until else list(STAGES)
    raise typer.Exit(execute(stages, config=config, sets=set_, run_dir=run_dir, scheduler=scheduler,
                             scheduler_file=scheduler_file, strict=strict, force=force))


def _stage_command(stage: str) -> None:
    def command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        run_dir: RunDirOpt = None,
        scheduler: SchedOpt = None,
        scheduler_file: SchedFileOpt = None,
        strict: StrictOpt = False,
        force: ForceOpt = False,
    ) -> None:
        raise typer.Exit(execute([stage], config=config, sets=set_, run_dir=run_dir, scheduler=scheduler,
                                 scheduler_file=scheduler_file, strict=strict, force=force))

    command.__doc__ = f"Run only the {stage} stage (its inputs must exist)."
    app.command(name=stage)(command)


for _stage in STAGES:
    _stage_command(_stage)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/demo"),
    n: Annotated[int, typer.Option(help="Number of clips.")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    jobs: Annotated[int, typer.Option(help="Encoding processes.")] = 2,
    force: Annotated[bool, typer.Option(help="Regenerate even when present.")] = False,
) -> None:
    """Write the synthetic camera-trap demo set (skipped when already complete)."""
    from jungletrap.synthetic import demo_dataset_complete, generate_demo_dataset

    if demo_dataset_complete(out) and not force:
        typer.echo(f"demo data already present in {out} (use --force to regenerate)")
        return
    generate_demo_dataset(out, n_videos=n, seed=seed, n_jobs=jobs)
    typer.echo(f"demo data written to {out}")


@app.command("demo-embeddings")
def demo_embeddings(
    out: Annotated[Path, typer.Option(help="Run directory to create (new or empty).")],
    n: Annotated[int, typer.Option(help="Number of clips (train and test).")],
    dim: Annotated[Optional[int], typer.Option(
        help="Embedding size: a registered backbone's (1280, 3840 or 64). Default 1280.")] = None,
    frames: Annotated[int, typer.Option(help="Most frames a clip (3 fps x frames/3 s).")] = 45,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    videos_per_partition: Annotated[int, typer.Option(help="Clips per embedding part.")] = 32,
    backbones: Annotated[Optional[str], typer.Option(
        help="Several backbones, comma-separated (e.g. efficientnet_lite0,efficientnet_lite1; the first is the "
             "main one): embeddings for each at its own size, with the same clips and independent noise.")] = None,
    scheduler: SchedOpt = None,
    scheduler_file: SchedFileOpt = None,
) -> None:
    """Write a finished catalog + embed stage for N synthetic clips (no video decoded), to rehearse the rest."""
    _setup_logging()
    from jungletrap.cluster import ClusterError, open_client
    from jungletrap.synthetic_embeddings import RehearsalSpec, rehearsal_config, write_rehearsal

    try:
        if dim is not None and backbones:
            raise ValueError("give --dim or --backbones, not both (each backbone has its own embedding size)")
        names = tuple(b.strip() for b in backbones.split(",")) if backbones else None
        spec = RehearsalSpec(n=n, dim=1280 if dim is None else dim, frames=frames, seed=seed,
                             videos_per_partition=videos_per_partition, backbones=names)
        cluster = rehearsal_config(out, spec).cluster
        with open_client(cluster, address=scheduler,
                         scheduler_file=str(scheduler_file) if scheduler_file else None) as (client, info):
            typer.echo(f"dask dashboard: {info.dashboard_link} ({info.kind} cluster, {info.n_workers} workers)")
            counts = write_rehearsal(client, out, spec)
    except (ValueError, FileExistsError, ClusterError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"rehearsal run written to {counts['run_dir']}: {counts['embedded']} clips embedded "
               f"({', '.join(counts['backbones'])}), {counts['failed']} error rows, {counts['partitions']} parts")
    typer.echo(f"continue from features: jungletrap run --config {counts['run_dir']}/config.yaml")


@app.command()
def predict(
    run_dir: Annotated[str, typer.Option("--run-dir", help="A finished run (path or URL).")],
    videos: Annotated[str, typer.Option(help="A video file or a directory of videos (path or URL).")],
    out: Annotated[str, typer.Option(help="Output CSV (path or URL).")],
    proba_threshold: Annotated[Optional[float], typer.Option(help="Also list labels above this.")] = None,
    scheduler: SchedOpt = None,
    scheduler_file: SchedFileOpt = None,
    strict: StrictOpt = False,
    storage_options: StorageOpt = None,
) -> None:
    """Score new videos with a finished run's models; one output row per input file."""
    _setup_logging()
    from jungletrap.cluster import ClusterError, open_client
    from jungletrap.predict import RunMismatch, predict_videos
    from jungletrap.storage import run_path

    try:
        options = _storage_options(storage_options)
        cfg = load_config(run_path(run_dir, options) / "config.yaml")
    except ConfigError as err:
        typer.echo(f"error: {run_dir} is not a finished run: {err}", err=True)
        raise typer.Exit(2) from None
    stopped = f"interrupted: {out} not written"
    try:
        with stop_on_signals(cfg.cluster.stop_timeout_s, stopped), open_client(
                cfg.cluster, address=scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None
        ) as (client, info):
            typer.echo(f"dask dashboard: {info.dashboard_link}")
            frame = predict_videos(client, run_dir, videos, out=out, proba_threshold=proba_threshold,
                                   storage_options=options)
    except (ClusterError, ConfigError, FileNotFoundError, RunMismatch) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(stopped, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    failed = int((frame["status"] != "ok").sum())
    typer.echo(f"predictions: {out} ({len(frame)} videos, {failed} failed)")
    if failed and strict:
        raise typer.Exit(1)


@app.command()
def submit(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    until: Annotated[Optional[str], typer.Option(help=f"Last stage to run: {', '.join(STAGES)}.")] = None,
    scheduler: SchedOpt = None,
    scheduler_file: SchedFileOpt = None,
    force: ForceOpt = False,
) -> None:
    """Send the pipeline to an existing cluster as one task and return at once (follow it with `status`)."""
    _setup_logging()
    if until is not None and until not in STAGES:
        typer.echo(f"error: --until must be one of {', '.join(STAGES)}, got {until!r}", err=True)
        raise typer.Exit(2)
    from jungletrap.submit import absolute_config, submit_run

    try:
        cfg, resolved = _load(config, sets=set_, run_dir=run_dir)
    except (ConfigError, NotADirectoryError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if not (scheduler or scheduler_file or cfg.cluster.address or cfg.cluster.scheduler_file):
        typer.echo("error: submit needs an existing cluster: --scheduler ADDR or --scheduler-file FILE", err=True)
        raise typer.Exit(2)
    cfg = absolute_config(cfg, Path.cwd())
    resolved = resolved if run_dir is not None else cfg.run_dir()
    stages = list(STAGES[: STAGES.index(until) + 1]) if until else list(STAGES)
    from jungletrap.cluster import ClusterError, open_client

    try:
        with open_client(cfg.cluster, address=scheduler,
                         scheduler_file=str(scheduler_file) if scheduler_file else None) as (client, info):
            sub = submit_run(client, cfg, resolved, stages=stages, force=force)
    except ClusterError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"run id:    {sub.run_id}")
    typer.echo(f"run dir:   {sub.run_dir}")
    typer.echo(f"dashboard: {sub.dashboard_link} ({info.n_workers} workers at {sub.scheduler_address})")
    typer.echo(f"follow:    jungletrap status --run-dir {sub.run_dir}")
    typer.echo(f"cancel:    jungletrap cancel --scheduler {sub.scheduler_address} --run-id {sub.run_id}")


@app.command()
def status(
    run_dir: Annotated[str, typer.Option("--run-dir", help="The run directory (path or URL).")],
    storage_options: StorageOpt = None,
) -> None:
    """Print a run's progress from its manifest: each stage's status, seconds, failures and counts; events."""
    from jungletrap.storage import run_path
    from jungletrap.submit import format_status

    try:
        path = run_path(run_dir, _storage_options(storage_options))
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if not path.is_dir():
        typer.echo(f"error: no run directory {run_dir}", err=True)
        raise typer.Exit(2)
    typer.echo(format_status(path))


@app.command()
def cancel(
    run_id: Annotated[str, typer.Option("--run-id", help="The run id printed by submit (its task key).")],
    scheduler: SchedOpt = None,
    scheduler_file: SchedFileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Cancel a submitted run; its manifest then shows the stage in progress as cancelled."""
    _setup_logging()
    from jungletrap.cluster import ClusterError, open_client
    from jungletrap.submit import cancel_run

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if not (scheduler or scheduler_file or cfg.cluster.address or cfg.cluster.scheduler_file):
        typer.echo("error: cancel needs the cluster: --scheduler ADDR or --scheduler-file FILE", err=True)
        raise typer.Exit(2)
    try:
        with open_client(cfg.cluster, address=scheduler,
                         scheduler_file=str(scheduler_file) if scheduler_file else None) as (client, _):
            state = cancel_run(client, run_id)
    except ClusterError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if state is None:
        typer.echo(f"error: the scheduler has no task {run_id} (finished, already cancelled, or unknown)", err=True)
        raise typer.Exit(1)
    typer.echo(f"cancelled {run_id} (it was {state})")


def main() -> None:  # pragma: no cover - console entry point
    app()
