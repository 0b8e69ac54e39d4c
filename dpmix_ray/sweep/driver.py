"""The sweep driver: plan, then one Ray Tune experiment holding every (method, ε) study, then the report.

Before Ray starts: the sweep is checked, N is read, and under repeat_and_select every group's
privacy plan is fixed (an infeasible budget stops here, with nothing written). Then one Tuner: a
single Tune controller sees every pending trial of every ε, so whenever a trial slot frees up
anywhere on the cluster the next trial of *any* study takes it (no ε waits for another, no slot
idles at a study's tail), actors are reused across studies, and there is one experiment checkpoint
to resume from; :mod:`dpmix_ray.sweep.search` makes that one experiment behave like independent
studies. As trials finish, :class:`SweepCallback` writes the ledger and keeps each group's best
model so far (the release candidate). With ``final.audit``, once every group is done, each private
group's released recipe is audited (:mod:`dpmix_ray.sweep.audits`) while Ray is still up.

Ray is imported here, in :mod:`dpmix_ray.sweep.search`, :mod:`dpmix_ray.sweep.trial` and
:mod:`dpmix_ray.sweep.audits` only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from ray import tune

from dpmix_ray import storage as shared
from dpmix_ray.config import ResourcesConfig, SweepConfig, config_hash
from dpmix_ray.errors import ConfigError
from dpmix_ray.sweep import state as S
from dpmix_ray.sweep import audits, selection
from dpmix_ray.cost import data_shape, duration
from dpmix_ray.sweep.estimate import describe_sweep, estimate_sweep, estimate_summary, plan_budget, trial_wall_seconds, with_trials
from dpmix_ray.sweep.budget import TrialPlan, check_within_budget, identity, plan_groups, training_size
from dpmix_ray.sweep.outcome import METRIC, PROGRESS, Outcome, Status
from dpmix_ray.sweep.plan import Group, build_groups, check_sweep, early_stopping, final_seeds, trial_counts
from dpmix_ray.sweep.search import GroupedScheduler, GroupedSearcher
from dpmix_ray.sweep.trial import MODEL_FILE, run_trial

STORAGE_ENV = "DPMIX_RAY_STORAGE_PATH"
# A crashed worker's trial is retried from its last epoch checkpoint this many times.
MAX_RETRIES = 2
log = logging.getLogger(__name__)


def _ledger_record(trial: Any, status: Status, reason: str) -> dict[str, Any]:
    """A record for a trial that never sent its own outcome (stopped early, or crashed past its retries)."""
    last = trial.last_result or {}
    plan = trial.config["plan"] or {}
    return {
        **identity(trial.config), "trial_id": trial.trial_id, "status": status.value, "reason": reason, "val_accuracy": last.get(METRIC),
        "score": None, "epsilon_spent": last.get("epsilon_spent"), "trial_epsilon": plan.get("trial_epsilon"),
        "search_epsilon": plan.get("search_epsilon"), "epochs_reported": last.get("epoch"), "retries": trial.num_failures,
        "trial_seconds": last.get("trial_seconds"), "trial_cpu_seconds": last.get("trial_cpu_seconds"), "finished_at": time.time(),
    }


def _checkpoint_file(trial: Any, name: str) -> bytes | None:
    """One file of the trial's last checkpoint (wherever Tune's storage is)."""
    ckpt = trial.checkpoint
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        p = Path(d) / name
        return p.read_bytes() if p.is_file() else None


class SweepCallback(tune.Callback):
    """Writes every finished trial to the ledger at once, keeps each group's best model, draws the live progress view."""

    def __init__(self, out: Path, total: int, progress: bool, estimate: dict[str, Any] | None = None):
        self._out = out
        self._total = total
        self._progress = progress
        self._bar: Any = None
        self._estimate = estimate  # estimate.estimate_sweep's record: the time left shown beside the bar
        self._left = estimate["estimated_wall_seconds"] if estimate else None

    def setup(self, **info: Any) -> None:
        if self._progress:
            from tqdm.auto import tqdm

            # disable=None: a live bar on a terminal, only the per-trial lines in a log file.
            self._bar = tqdm(total=self._total, initial=len(S.read_records(self._out)), desc="trials", unit="trial", dynamic_ncols=True, disable=None)

    def _keep_if_released(self, trial: Any, record: dict[str, Any]) -> None:
        """Before the ledger: a trial that is now its group's release candidate (:func:`selection.released`) leaves its
        model in curator/models; the previous candidate's is dropped after the ledger has the new record."""
        if record["status"] != Status.COMPLETED or record.get("proxy"):
            return
        slot = (record["phase"], record["index"])
        mine = [r for r in S.read_records(self._out) if r["group"] == record["group"] and (r["phase"], r["index"]) != slot]
        if selection.released([*mine, record]) is not record:
            return
        weights = _checkpoint_file(trial, MODEL_FILE)
        if weights is not None:
            S.write_file(self._out, S.model_name(record["group"], record["phase"], record["index"]), weights)

    def _drop_superseded(self, group: str) -> None:
        chosen = selection.released([r for r in S.read_records(self._out) if r["group"] == group])
        keep = S.model_name(group, chosen["phase"], chosen["index"]) if chosen is not None else None
        for name in S.list_files(self._out, S.model_dir(group)):
            if name != keep:
                S.remove(self._out, name)

    def _write(self, record: dict[str, Any]) -> None:
        S.append_record(self._out, record)
        if self._bar is not None:
            val = record.get("val_accuracy")
            acc = f"val {val:.4f}" if val is not None else ""
            test = record.get("test_accuracy")
            acc += f" test {test:.4f}" if test is not None and record["phase"] == "final" else ""
            spent = record.get("epsilon_spent")
            eps = f" ε_spent {spent:.3f}" if spent is not None else ""
            why = f" ({record['reason']})" if record.get("reason") else ""
            self._bar.write(f"{record['group']:>22} {record['phase']:6} #{record['index']:<3} {record['status']:9} {acc}{eps}{why}")
            if self._estimate is not None:
                self._left = max(0.0, self._left - trial_wall_seconds(self._estimate, record["group"], record["phase"]))
                self._bar.set_postfix_str(f"≈ {duration(self._left)} left (estimated)", refresh=False)
            self._bar.update(1)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        outcome = Outcome.of(trial.last_result)  # unflattened: it holds the record
        if outcome is not None and outcome.record is not None:
            record = dict(outcome.record) | {"trial_id": trial.trial_id, "retries": trial.num_failures}
        else:
            progress = (trial.last_result or {}).get(PROGRESS)
            record = _ledger_record(trial, Status.STOPPED, f"stopped early by ASHA at {progress or 0:.0f}% of its steps")
        self._keep_if_released(trial, record)
        self._write(record)
        self._drop_superseded(record["group"])

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = trial.get_error()
        reason = str(error).strip().splitlines()[-1] if error is not None else "worker crashed"
        self._write(_ledger_record(trial, Status.FAILED, f"crashed {trial.num_failures}× (retries exhausted): {reason}"))

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self._bar is not None:
            self._bar.write(f"{trial.config['group']:>22} {trial.config['phase']:6} #{trial.config['index']:<3} worker lost: retrying from its last checkpoint")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()


class MirrorCallback(tune.Callback):
    """Shared storage (:mod:`dpmix_ray.storage`): at every experiment snapshot, in this order, all synchronous:
    optuna.db, Tune's snapshot (Tune would upload it in the background), superseded trial checkpoints
    deleted, then the rest of the out dir (ledger last). So the storage never holds a snapshot naming a
    deleted checkpoint, a searcher state newer than optuna.db, or a ledger record newer than the snapshot."""

    def __init__(self, mirror: shared.Mirror):
        self._mirror = mirror
        self._trials: list[Any] = []
        self._pruned: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"_mirror": self._mirror, "_trials": [], "_pruned": {}}

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._trials = trials

    def get_state(self) -> dict[str, Any] | None:
        self._mirror.push(only=(S.OPTUNA_FILE,))
        live = [t for t in self._trials if getattr(t, "storage", None) is not None]
        if live:
            tune_storage = live[0].storage  # a shallow copy of the experiment's: same syncer, same paths
            try:
                tune_storage.syncer.wait()  # Tune's own upload in flight would otherwise land after ours, older
            except Exception as e:  # noqa: BLE001 - Tune logs and carries on in the same case
                log.warning("waiting for Tune's snapshot upload: %s", e)
            fs = tune_storage.storage_filesystem
            shared.upload_snapshot(tune_storage.experiment_driver_staging_path, fs, tune_storage.experiment_fs_path)
            for t in live:
                ckpt = t.checkpoint
                if ckpt is not None and self._pruned.get(t.trial_id) != ckpt.path:
                    shared.prune_checkpoints(fs, t.storage.trial_fs_path, ckpt.path)
                    self._pruned[t.trial_id] = ckpt.path
        self._mirror.push()
        return None


def _shared_storage(cfg: SweepConfig, out: Path, resume: bool) -> shared.Mirror | None:
    """``storage`` / $DPMIX_RAY_STORAGE_PATH given: the sweep's home there, fetched first on ``--resume``."""
    base = shared.base_location(cfg.storage)
    if base is None:
        return None
    mirror = shared.Mirror(out, shared.sweep_root(base, out))
    shared.check_reachable(mirror.root)
    shared.prepare_out(mirror, resume=resume)
    return mirror


def _trial_name(trial: Any) -> str:
    c = trial.config
    return f"{c['group']}-{c['phase']}{c['index']}-{trial.trial_id}".replace("=", "")


def _check_local_resources(res: ResourcesConfig) -> None:
    """Before starting a local Ray: a trial must fit this machine."""
    cpus = os.cpu_count() or 1
    import torch

    gpus = torch.cuda.device_count()
    if res.cpu > cpus or res.gpu > gpus:
        raise ConfigError(f"resources: a trial asks for {res.cpu:g} CPU / {res.gpu:g} GPU but this machine has {cpus} CPU / {gpus} GPU")


def _slots(shape: dict[str, float], res: ResourcesConfig) -> int:
    """How many trials of ``res`` fit on one node of ``shape``."""
    fits = [shape.get("CPU", 0) // res.cpu] + ([shape.get("GPU", 0) // res.gpu] if res.gpu > 0 else [])
    return int(min(fits))


def _cluster_slots(res: ResourcesConfig) -> int:
    """Trial slots on the live nodes plus on every node the autoscaler may still start.

    Raises ConfigError when a trial fits on no node at all.
    """
    import ray

    live = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    types: list[tuple[dict[str, float], int]] = []
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()  # present on a head started by `ray up`
    if bootstrap.is_file():
        for t in ((yaml.safe_load(bootstrap.read_text()) or {}).get("available_node_types") or {}).values():
            types.append((dict(t.get("resources") or {}), int(t.get("max_workers", 0))))
    shapes = live + [shape for shape, _ in types]
    if not any(_slots(s, res) >= 1 for s in shapes):
        offered = ", ".join(f"{s.get('CPU', 0):g} CPU/{s.get('GPU', 0):g} GPU" for s in shapes) or "none"
        raise ConfigError(f"resources: a trial asks for {res.cpu:g} CPU / {res.gpu:g} GPU, more than any node offers ({offered})")
    return sum(_slots(s, res) for s in live) + sum(n * _slots(s, res) for s, n in types)


def _check_storage(storage: str) -> None:
    """A multi-node Tune run needs storage every node reaches; a node-local path fails on the workers."""
    import ray

    if "://" not in storage and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        raise ConfigError(f"{STORAGE_ENV}: a multi-node cluster needs shared trial storage (s3://…, gs://…), not the local path {storage}")


def _needs_synthetic(cfg: SweepConfig, groups: list[Group]) -> bool:
    return cfg.base.mix.synthetic == "synth" and any(g.method == "dpmix_diff" for g in groups)


def _generate_synthetic(cfg: SweepConfig) -> str:
    """Generated once per sweep, before any trial; its path is stored so a resume never regenerates it.

    A generator that saw the private dataset, or a set with no provenance not vouched for as public, is refused here.
    """
    from dpmix_ray.synth import generate_for

    synth_cfg = cfg.synth or cfg.base.synth
    return str(generate_for(synth_cfg, cfg.base.data, synthetic_is_public=cfg.base.mix.synthetic_is_public))


def _init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns whether this call started it, so only then is it shut down."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--address {address}: Ray Client needs {e.name}: pip install 'ray[client]=={ray.__version__}'") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address {address}: {str(e).strip().splitlines()[0]}") from None
    return True


@contextmanager
def _tune_settings(pending: int) -> Iterator[None]:
    """Tune settings for one fit (a user's own environment variables win), restored afterwards."""
    wanted = {
        "RAY_AIR_NEW_OUTPUT": "0",  # our progress view replaces Tune's console output
        # Tune keeps one trial pending for a custom searcher: on a fresh cluster every slot would wait for the
        # previous trial's actor to start, and the autoscaler would see demand for one node at a time.
        "TUNE_MAX_PENDING_TRIALS_PG": str(pending),
        # num_to_keep=1 snapshots the experiment at every trial checkpoint on purpose; don't warn about it.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    ours = {k: v for k, v in wanted.items() if k not in os.environ}
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    os.environ.update(ours)
    tune_log.setLevel(logging.ERROR)  # e.g. warnings about result files of trials re-run after a resume
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)
        tune_log.setLevel(level)


def _tuner(cfg: SweepConfig, out: Path, state: S.SweepState, groups: list[Group], progress: bool, mirror: shared.Mirror | None = None,
           estimate: dict[str, Any] | None = None) -> tune.Tuner:
    trainable = tune.with_resources(run_trial, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    path = f"{state.storage_path.rstrip('/')}/{S.EXPERIMENT}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    total = sum(state.counts.values()) + sum(final_seeds(cfg, g) for g in groups if state.counts[g.key] > 0)
    plans = {k: TrialPlan.from_dict(p) for k, p in state.plans.items()}
    searcher = GroupedSearcher(cfg, groups, state.counts, S.path(out, S.OPTUNA_FILE), plans=plans, synthetic=state.synthetic,
                               n_train=state.n_train, compute=state.compute, stops=S.path(out, S.BUDGET_STOPS))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=GroupedScheduler(cfg.search.grace) if early_stopping(cfg) else None,
            num_samples=-1,  # the searcher says when it is done (random trial counts, then finals)
            max_concurrent_trials=cfg.search.max_concurrent,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=S.EXPERIMENT,
            storage_path=state.storage_path,
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
            # num_to_keep=1 also makes Tune snapshot the experiment after every trial checkpoint (each epoch and
            # each trial's end), so a kill loses at most the epoch in flight.
            # With shared storage, MirrorCallback deletes superseded checkpoints itself, after the snapshot that no
            # longer names them is uploaded (Tune deletes first and uploads in the background).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if mirror else 1),
            callbacks=[SweepCallback(out, total, progress, estimate), *([MirrorCallback(mirror)] if mirror else [])],
            verbose=0,
        ),
    )


def _sweep_on_head(cfg_json: str, out: str, resume: bool, storage: str | None = None) -> dict[str, bytes]:
    """Runs inside a Ray task on the head: the whole sweep, then its outputs (without Tune's files) as bytes."""
    cfg = SweepConfig.model_validate_json(cfg_json).model_copy(update={"storage": storage})  # storage is not in the JSON
    done = run_sweep(cfg, out=Path(out).expanduser(), resume=resume, address="auto", progress=False)
    files = (p.relative_to(done).as_posix() for p in done.rglob("*") if p.is_file())
    return {rel: S.path(done, rel).read_bytes() for rel in files if not rel.startswith(f"{S.TUNE_DIR}/")}


def run_on_head(cfg: SweepConfig, *, out: Path, resume: bool, address: str, progress: bool) -> Path:
    """``--address ray://…``: Ray Client would run Tune's driver on the head anyway, with ``out`` meaning a
    path there. So the whole sweep runs on the head (a relative ``out`` under the head's home), and its
    outputs are copied back into ``out`` here; ``--resume`` continues the head's copy."""
    import ray
    from ray.exceptions import RayTaskError

    from dpmix_ray.errors import DPMixError

    check_sweep(cfg)
    started = _init_ray(address)
    try:
        head_out = out.as_posix() if out.is_absolute() else f"~/{out.as_posix()}"
        task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_sweep_on_head)
        try:
            files = ray.get(task.remote(cfg.model_dump_json(), head_out, resume, cfg.storage))
        except RayTaskError as e:
            if isinstance(e.cause, DPMixError):
                raise e.cause from None
            raise
    finally:
        if started:
            ray.shutdown()
    out = out.resolve()
    for rel, data in files.items():
        S.write_file(out, rel, data)
    if progress:
        from dpmix_ray.report import summary_table

        print(summary_table(out))
    return out


def run_sweep(cfg: SweepConfig, *, out: Path, resume: bool = False, address: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) a sweep into ``out``; returns ``out``.

    Bad input, missing data and (under repeat_and_select) an infeasible budget raise ConfigError /
    DataError / BudgetError before Ray starts or anything is written.
    """
    if address is not None and address.startswith("ray://"):
        return run_on_head(cfg, out=Path(out), resume=resume, address=address, progress=progress)
    out = Path(out).resolve()
    check_sweep(cfg)
    mirror = _shared_storage(cfg, out, resume)
    state = S.check_out_dir(out, cfg, resume=resume)
    if mirror is not None and state is not None and state.storage_path != mirror.tune_uri:
        raise ConfigError(f"storage: this sweep's trials are stored at {state.storage_path}, not under {mirror.root}; resume it with the storage it started with")
    if address is None:
        _check_local_resources(cfg.resources)
    groups = build_groups(cfg)
    estimate, compute = None, None
    if state is None and (progress or cfg.search.budget is not None):  # the cost before paying it, as --dry-run
        estimate = estimate_sweep(cfg, data_shape(cfg.base.data))
        compute = plan_budget(cfg, estimate)
        if progress:
            print("\n".join(describe_sweep(estimate)), flush=True)
            if compute is not None:
                print(f"search.budget: {compute['trials_per_epsilon']} search trials per ε fit it "
                      f"(≈ {duration(compute['estimated_seconds'])} of trials)", flush=True)
    run_cfg = with_trials(cfg, compute["trials_per_epsilon"]) if compute is not None else cfg
    if state is None:
        n_train = training_size(cfg.base.data)
        plans = plan_groups(run_cfg, groups, n_train)  # a resume keeps the stored plans: never re-planned
    audits.check(cfg, state.n_train if state else n_train)
    started = _init_ray(address)
    try:
        slots = _cluster_slots(cfg.resources)
        storage = state.storage_path if state else mirror.tune_uri if mirror else str(S.path(out, S.TUNE_DIR))
        _check_storage(storage)
        if state is None:
            # The trial counts' randomness is part of the privacy mechanism: draw it from the OS, not the config seed.
            counts = trial_counts(run_cfg, groups, np.random.default_rng(secrets.randbits(128)))
            state = S.SweepState(
                name=cfg.name, config_hash=config_hash(cfg), counts=counts, storage_path=storage, n_train=n_train,
                plans={k: p.as_dict() for k, p in plans.items()}, compute=compute,
                estimate=estimate_summary(estimate) if estimate is not None and compute is None else None,  # a budget's plan has its own
            )
            S.write_config(out, run_cfg)  # the trial mean the guarantee is about, under a budget
        else:
            state.resumes += 1
        S.write_state(out, state)
        if state.synthetic is None and _needs_synthetic(cfg, groups):
            state.synthetic = _generate_synthetic(cfg)
            S.write_state(out, state)
        with _tune_settings(max(1, cfg.search.max_concurrent or slots)):
            _tuner(cfg, out, state, groups, progress, mirror, estimate).fit()
        if S.path(out, S.BUDGET_STOPS).is_file():  # per_trial search.budget: the counts it cut or extended are the sweep's
            stops = json.loads(S.read_text(out, S.BUDGET_STOPS))
            state.counts = {k: stops.get(k, c) for k, c in state.counts.items()}
        records = S.read_records(out)
        for record in records:
            if record["status"] == "completed":
                check_within_budget(record)
        state.finished = S.sweep_complete(records, state.counts, {g.key: final_seeds(cfg, g) for g in groups})
        S.write_state(out, state)
        if cfg.final.audit and state.finished:  # only final selections are audited; an interrupted sweep audits on --resume
            audits.run_audits(cfg, out, state, groups, mirror=mirror, progress=progress)
    finally:
        if started:
            import ray

            ray.shutdown()
    from dpmix_ray.report import build_report, summary_table

    build_report(out)
    if mirror is not None:
        mirror.push(prune=True)
    if progress:
        print(summary_table(out))
        if mirror is not None:
            print(f"shared storage: {mirror.root}")
        if not state.finished:
            print(f"sweep interrupted: continue it with --resume (output in {out})")
    return out
