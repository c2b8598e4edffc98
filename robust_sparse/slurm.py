"""``backend: slurm`` of ``robust-sparse sweep``: every run is one Slurm job (one job array for the sweep),
submitted through submitit, with no surprise:

* no ``sbatch`` (or ``srun``) on PATH: a one-line refusal, never submitit's silent fall-back to this machine
  (``slurm: {debug: true}`` runs the jobs one by one in the sweep's own process, for debugging);
* the ``slurm:`` mapping takes submitit's names: its shared ones (``timeout_min``, ``mem_gb``, ``nodes``,
  ``tasks_per_node``, ``gpus_per_node``, ``cpus_per_task``, ``name``, ``stderr_to_stdout``) and
  ``slurm_<sbatch option>`` (``slurm_partition``, ``slurm_qos``, ...); a bare sbatch name (``partition``) is
  translated with a warning, anything else is refused; the sbatch script is built once to check the values;
* a job of N tasks (``nodes`` x ``tasks_per_node``, one per GPU) trains one run with torch.distributed
  initialised from submitit's job environment (SLURM_PROCID, SLURM_NTASKS, the job's first node), through the
  same DDP path as ``torchrun`` (robust_sparse.distributed); ``gpus_per_node: 4`` alone means 4 tasks per node;
* job ids are recorded in ``SWEEP_DIR/slurm/jobs.json`` (atomically, right after submission); a rerun asks
  Slurm (sacct through submitit, then squeue) for their state, waits on a job that is pending or running
  instead of submitting it again, and reports a job that failed, was cancelled or timed out, with its log,
  before submitting the (resumable) run again.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from robust_sparse.checkpoint import write_atomic
from robust_sparse.config import coerce
from robust_sparse.errors import ConfigError

log = logging.getLogger(__name__)

# submitit's names shared by its executors (AutoExecutor), with their types
SHARED = {"name": str, "timeout_min": int, "mem_gb": float, "nodes": int, "cpus_per_task": int, "gpus_per_node": int,
          "tasks_per_node": int, "stderr_to_stdout": bool}
OWN = {"debug": bool}  # ours: run the jobs in this process (submitit's debug executor)
RECORD = "jobs.json"  # in SWEEP_DIR/slurm/: the job id of every submitted run, by stage
# Slurm states of a job that is still queued or running: a rerun waits on it and never submits it again
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "READY", "PREEMPTED"}
POLL_SECONDS = 60.0  # between two state queries while the sweep waits on its jobs
STAGES = {"status": "train", "eval": "eval"}  # the runs.csv column a stage writes -> its key in jobs.json


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep backend slurm needs submitit: pip install 'robust-sparse[cluster]'") from None
    return submitit


def _sbatch_options() -> dict[str, Any]:
    """The sbatch options submitit's Slurm executor knows (``slurm_<name>``), with their defaults."""
    from submitit.slurm.slurm import _get_default_parameters

    return dict(_get_default_parameters())


def parameters(raw: dict[str, Any], where: str = "sweep slurm") -> dict[str, Any]:
    """The sweep file's ``slurm:`` mapping as submitit's AutoExecutor takes it, checked: one line per problem.
    Without submitit it is kept as it is: :func:`check_submission` refuses the sweep before it runs."""
    try:
        options = _sbatch_options()
    except ImportError:
        return dict(raw)
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key == "cluster":
            raise ConfigError(f"{where}.cluster: not used; backend: slurm submits to Slurm, backend: local runs on "
                              f"this machine, slurm: {{debug: true}} runs the jobs in the sweep's process")
        if key in OWN or key in SHARED:
            checked[key] = coerce(value, {**OWN, **SHARED}[key], f"{where}.{key}")
            continue
        name = key.removeprefix("slurm_")
        if name == "array_parallelism":
            raise ConfigError(f"{where}.{key}: set the sweep's parallel instead (jobs of the array at once)")
        if name not in options:
            known = ", ".join([*OWN, *SHARED, "slurm_<sbatch option>"])
            raise ConfigError(f"{where}.{key}: unknown; known: {known} (options: {', '.join(sorted(options))})")
        if name == key:  # a bare sbatch name
            log.warning("%s.%s: submitit's name is slurm_%s; translated (write slurm_%s to silence this)", where,
                        key, key, key)
        checked[f"slurm_{name}"] = value
    # as submitit reads them: the cluster-specific name wins over the shared one
    gpus = checked.get("slurm_gpus_per_node", checked.get("gpus_per_node"))
    tasks = checked.get("slurm_ntasks_per_node", checked.get("tasks_per_node"))
    nodes = checked.get("slurm_nodes", checked.get("nodes"))
    for name, number in (("nodes", nodes), ("tasks_per_node", tasks), ("gpus_per_node", gpus)):
        if number is not None and (not isinstance(number, int) or number < (0 if name == "gpus_per_node" else 1)):
            raise ConfigError(f"{where}.{name} = {number!r}: must be an integer >= "
                              f"{0 if name == 'gpus_per_node' else 1}")
    if gpus and tasks is None and "slurm_gpus_per_task" not in checked:
        checked["tasks_per_node"] = tasks = gpus  # one rank per GPU
    if gpus and tasks and gpus != tasks and "slurm_gpus_per_task" not in checked:
        raise ConfigError(f"{where}: tasks_per_node = {tasks} with gpus_per_node = {gpus}; each task is one rank "
                          f"on one GPU, so give them the same value (or only gpus_per_node)")
    _sbatch_script(checked, Path(tempfile.gettempdir()), "true", map_count=2)  # submitit's own checks of the values
    return checked


def _executor_parameters(checked: dict[str, Any]) -> dict[str, Any]:
    """The Slurm executor's own parameters for an AutoExecutor mapping, as submitit translates them."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    equivalent = SlurmExecutor._equivalence_dict()
    translated = {equivalent[key]: value for key, value in checked.items() if key in SHARED}
    if "mem" in translated:
        translated["mem"] = _convert_mem(translated["mem"])
    translated.update({key.removeprefix("slurm_"): value for key, value in checked.items()
                       if key.startswith("slurm_")})  # the cluster-specific name wins, as in submitit
    return translated


def _sbatch_script(checked: dict[str, Any], folder: Path, command: str, map_count: int | None = None,
                   parallel: int | None = None) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    extra = {"array_parallelism": parallel} if parallel is not None else {}
    try:
        return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **extra,
                                   **_executor_parameters({k: v for k, v in checked.items() if k not in OWN}))
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(f"sweep slurm: submitit refuses these parameters: {error}") from None


def tasks(checked: dict[str, Any]) -> tuple[int, int]:
    """(nodes, tasks per node) of every training job."""
    nodes = checked.get("slurm_nodes", checked.get("nodes", 1))
    return int(nodes), int(checked.get("slurm_ntasks_per_node", checked.get("tasks_per_node", 1)) or 1)


def _named(checked: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The jobs named after the sweep directory in squeue, unless the sweep file names them."""
    if "name" in checked or "slurm_job_name" in checked:
        return dict(checked)
    return {**checked, "name": f"robust-sparse-{out_dir.name}"}


def _single_task(checked: dict[str, Any]) -> dict[str, Any]:
    """The evaluation stage runs one process per run: one task on one node, at most one GPU."""
    single = {key: value for key, value in checked.items()
              if key not in ("nodes", "tasks_per_node", "slurm_nodes", "slurm_ntasks_per_node")}
    for key in ("gpus_per_node", "slurm_gpus_per_node"):
        if key in single:
            single[key] = min(int(single[key]), 1)
    return single


def check_submission(checked: dict[str, Any], dry_run: bool = False) -> None:
    """Before anything is written or submitted: submitit is installed and, unless only checking (``dry_run``) or
    debugging in-process, the Slurm commands it needs are on PATH."""
    _submitit()
    if checked.get("debug") or dry_run:
        return
    for command in ("sbatch", "srun"):
        if shutil.which(command) is None:
            raise ConfigError(f"sweep backend slurm: {command} is not on PATH (not a Slurm login node?); run "
                              f"here with backend: local, or with slurm: {{debug: true}} (jobs in this process)")


def _train_command(config_path: Path, run_dir: Path) -> list[str]:
    from robust_sparse.sweep import _command

    return _command(config_path, run_dir, "auto")


def plan(checked: dict[str, Any], out_dir: Path, parallel: int, index: pd.DataFrame) -> str:
    """What ``sweep --dry-run`` shows for ``backend: slurm``: the submitit parameters, the sbatch options they
    make, and per run to do the command every task of its job runs."""
    todo = index[index["status"].isin(["pending", "partial"])]
    checked = _named(checked, out_dir)
    nodes, per_node = tasks(checked)
    submitted = {key: value for key, value in checked.items() if key not in OWN}
    lines = [f"slurm: {'debug (in this process): ' if checked.get('debug') else ''}{len(todo)} training jobs, at "
             f"most {parallel} at once; submitit parameters: {json.dumps(submitted, sort_keys=True)}",
             f"slurm: each job {nodes * per_node} task(s) ({nodes} node(s) x {per_node}), one rank each"
             + ("; torch.distributed from SLURM_PROCID, SLURM_NTASKS and the job's first node" if nodes * per_node > 1
                else "")]
    script = _sbatch_script(checked, out_dir / "slurm", "COMMAND", map_count=max(len(todo), 1) if len(todo) > 1
                            else None, parallel=parallel)
    lines += ["slurm: sbatch " + " ".join(line.removeprefix("#SBATCH ") for line in script.splitlines()
                                          if line.startswith("#SBATCH"))]
    records = _Records(out_dir / "slurm")
    for _, row in todo.iterrows():
        run_dir = out_dir / "runs" / row["run_id"]
        entry = records.get("train", row["run_id"])
        lines.append(f"{row['run_id']}: {' '.join(_train_command(run_dir / 'requested.yaml', run_dir))}"
                     + (f"  (recorded: slurm job {entry['job_id']}, waited on if still pending or running)"
                        if entry else ""))
    return "\n".join(lines)


def train_task(config_path: Path, run_dir: Path, modules: tuple[str, ...], device: str, threads: int) -> str:
    """One task of a run's Slurm job: this rank's share of ``robust-sparse train``. With several tasks it joins
    the job's process group through torchrun's variables; rank 0 writes the run and reports its outcome."""
    import submitit

    from robust_sparse import sweep

    environment = submitit.JobEnvironment()
    rank = 0
    if environment.num_tasks > 1:
        # MASTER_ADDR (the job's first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK; every
        # task keeps the node's GPUs and picks GPU LOCAL_RANK, as under torchrun
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank = environment.global_rank
    if rank == 0:
        return sweep._run_local(config_path, run_dir, modules, device, threads)
    env, device = sweep._child(device, threads, modules)
    log_path = run_dir / f"train.rank{rank}.log"
    with open(log_path, "a") as logfile:
        code = subprocess.run(sweep._command(config_path, run_dir, device), stdout=logfile,
                              stderr=subprocess.STDOUT, env=env).returncode
    return "done" if code == 0 else f"failed ({code}, see {log_path})"


class _Records:
    """``SWEEP_DIR/slurm/jobs.json``: ``{stage: {run id: {job_id, log}}}``, rewritten atomically."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORD
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError:
            log.warning("%s is unreadable; the jobs it listed are not checked", self.path)
            self.data = {}

    def get(self, stage: str, run: str) -> dict[str, str] | None:
        return self.data.get(stage, {}).get(run)

    def put(self, stage: str, entries: dict[str, dict[str, str]]) -> None:
        self.data.setdefault(stage, {}).update(entries)
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))


def _job(folder: Path, job_id: str):
    """Task 0 of a recorded job (rank 0 reports the run)."""
    from submitit.slurm.slurm import SlurmJob

    return SlurmJob(folder=folder, job_id=job_id, tasks=(0,))


def _squeue_state(job_id: str) -> str | None:
    """The state squeue shows for a job, "" when it no longer lists it, None when squeue does not answer."""
    try:
        result = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    lines = result.stdout.split()
    return lines[0].strip().upper() if lines else ""


def _states(job_ids: list[str], folder: Path) -> dict[str, str]:
    """Every job's Slurm state: sacct through submitit's watcher, squeue for a job sacct does not know; GONE when
    neither lists it any more, UNKNOWN when neither answers."""
    from submitit.slurm.slurm import SlurmJob

    for job_id in job_ids:
        SlurmJob.watcher.register_job(job_id)
    SlurmJob.watcher.update()
    states = {}
    for job_id in job_ids:
        state = SlurmJob.watcher.get_state(job_id, mode="cache").split()[0].upper()  # "CANCELLED by 42"
        if state == "UNKNOWN":
            queued = _squeue_state(job_id)
            state = "UNKNOWN" if queued is None else queued or "GONE"
        states[job_id] = state
    return states


def _log_path(folder: Path, job_id: str) -> Path:
    return _job(folder, job_id).paths.stderr


def _outcome(folder: Path, job_id: str, state: str) -> str:
    """What a finished job says: the run's status from its result, else the Slurm state with the log."""
    job = _job(folder, job_id)
    if job.paths.result_pickle.exists():
        try:
            return str(job.result())
        except Exception as error:  # the job's function raised: submitit's FailedJobError carries the trace
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"failed (slurm job {job_id}: {first}; see {job.paths.stderr})"
    return f"failed (slurm job {job_id} {state}, see {job.paths.stderr})"


def submit(sweep, todo: list[tuple], index: pd.DataFrame, column: str, job, write_index) -> None:
    """Run ``todo`` (rows of ``index``, as sweep._launch gives them) as Slurm jobs; outcomes into ``column``."""
    submitit = _submitit()
    checked = _named(sweep.slurm, sweep.out_dir)
    debug = checked.pop("debug", False)
    stage = STAGES[column]
    if stage == "eval":
        checked = _single_task(checked)
    function = train_task if stage == "train" else job
    folder = sweep.out_dir / "slurm"
    threads = int(checked.get("cpus_per_task", checked.get("slurm_cpus_per_task", 1)) or 1)
    if debug:  # in this process, one job after the other; nothing to record
        executor = submitit.AutoExecutor(folder=str(folder), cluster="debug")
        for row, *arguments in todo:
            index.loc[row, column] = executor.submit(function, *arguments, "auto", threads).result()
            write_index()
        return
    check_submission(checked)
    from submitit.slurm.slurm import SlurmJob

    SlurmJob.watcher.clear()  # submitit keeps the states of finished jobs per process: ask Slurm afresh
    records = _Records(folder)
    recorded = {row: records.get(stage, index.loc[row, "run_id"]) for row, *_ in todo}
    ids = [entry["job_id"] for entry in recorded.values() if entry]
    states = _states(ids, folder) if ids else {}
    waiting: dict[int, str] = {}  # row -> job id
    fresh = []
    for row, *arguments in todo:
        run, entry = index.loc[row, "run_id"], recorded[row]
        state = states.get(entry["job_id"]) if entry else None
        if state == "UNKNOWN":  # neither sacct nor squeue answers: it may still train, so no second job
            index.loc[row, column] = (f"unknown (slurm job {entry['job_id']}: neither sacct nor squeue answers; not "
                                      f"submitted again, remove it from {records.path} to resubmit)")
            log.warning("%s: %s", run, index.loc[row, column])
            continue
        if state in ACTIVE:  # never a second job for a run whose job is queued or training: wait on it
            log.info("%s: slurm job %s is %s; waiting on it, not submitting it again", run, entry["job_id"],
                     state.lower())
            index.loc[row, column] = f"{state.lower()} (slurm job {entry['job_id']})"
            waiting[row] = entry["job_id"]
            continue
        if entry:  # ended without finishing the run (failed, cancelled, timed out, or the training failed)
            log.warning("%s: previous attempt: %s; submitting the run again", run,
                        _outcome(folder, entry["job_id"], state))
        fresh.append((row, arguments))
    if fresh:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        executor.update_parameters(slurm_array_parallelism=sweep.parallel, **checked)
        with executor.batch():  # one job array; each job runs the same resumable command as the local backend
            jobs = [(row, executor.submit(function, *arguments, "auto", threads)) for row, arguments in fresh]
        records.put(stage, {index.loc[row, "run_id"]: {"job_id": submitted.job_id,
                                                        "log": str(_log_path(folder, submitted.job_id))}
                            for row, submitted in jobs})
        for row, submitted in jobs:
            log.info("%s: submitted as slurm job %s", index.loc[row, "run_id"], submitted.job_id)
            index.loc[row, column] = f"submitted (slurm job {submitted.job_id})"
            waiting[row] = submitted.job_id
    write_index()  # a killed sweep leaves the job ids in runs.csv too
    _wait(waiting, folder, index, column, write_index)


def _wait(waiting: dict[int, str], folder: Path, index: pd.DataFrame, column: str, write_index) -> None:
    """Until every job has ended: its outcome into ``column`` as it ends."""
    while waiting:
        states = _states(list(waiting.values()), folder)
        for row, job_id in list(waiting.items()):
            state = states[job_id]
            if _job(folder, job_id).paths.result_pickle.exists() or state not in ACTIVE | {"UNKNOWN"}:
                index.loc[row, column] = _outcome(folder, job_id, state)
                log.info("%s: %s %s", index.loc[row, "run_id"], column, index.loc[row, column])
                del waiting[row]
                write_index()
            elif index.loc[row, column] != f"{state.lower()} (slurm job {job_id})":
                index.loc[row, column] = f"{state.lower()} (slurm job {job_id})"
                write_index()
        if waiting:
            time.sleep(POLL_SECONDS)

