"""The Slurm backend of sweeps against fake Slurm commands: refusal without sbatch, the submitted job array and
its parameters, multi-task jobs, recorded job ids that a rerun waits on instead of resubmitting."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

submitit = pytest.importorskip("submitit", reason="the Slurm backend needs submitit (the cluster extra)")

from robust_sparse.studies import slurm  # noqa: E402
from robust_sparse.cli import main  # noqa: E402
from robust_sparse.errors import ConfigError  # noqa: E402
from robust_sparse.studies.sweep import load_sweep, run_id, run_sweep  # noqa: E402

TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "optim.epochs=1", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "device=cpu"]
CLUSTER = {"slurm_partition": "gpu", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8, "timeout_min": 60}


def _script(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch (keeps each submission script, prints job ids from 101 on), srun, sacct (prints ``states``, then
    swaps in ``next_states`` if there is one, and runs ``after_sacct`` once if there is one: what a job does
    between two queries; lines of JobID|State|ExitCode|Elapsed), scontrol and squeue (know no job) first on
    PATH, ahead of a real Slurm if this machine has one (tests/test_slurm_cluster.py uses that one)."""
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)
    _script(bin_dir / "sbatch", f"""n=$(cat {fake}/counter 2>/dev/null || echo 101)
echo $((n + 1)) > {fake}/counter
cp "$1" {fake}/submission_$n.sh
echo "Submitted batch job $n"
""")
    _script(bin_dir / "srun", "exit 0\n")
    _script(bin_dir / "sacct", f"""echo 'JobID|State|ExitCode|Elapsed'
cat {fake}/states 2>/dev/null
if [ -f {fake}/next_states ]; then mv {fake}/next_states {fake}/states; fi
if [ -f {fake}/after_sacct ]; then sh {fake}/after_sacct; rm {fake}/after_sacct; fi
""")
    _script(bin_dir / "squeue", "exit 0\n")
    _script(bin_dir / "scontrol", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "POLL_SECONDS", 0.0)
    submitit.SlurmJob.watcher.clear()
    return fake


def _sweep_file(tmp_path, seeds=(0, 1), **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, "grid": {"seed": list(seeds)},
                                    "backend": "slurm", "parallel": 2, "slurm": CLUSTER, **extra}))
    return path


def _submissions(fake):
    return sorted(fake.glob("submission_*.sh"))


def test_without_sbatch_the_slurm_backend_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main(["sweep", str(_sweep_file(tmp_path))]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "sbatch is not on PATH" in error and "backend: local" in error
    assert "debug: true" in error
    assert not (tmp_path / "out").exists()  # refused before anything was written or run


def test_slurm_parameters_take_submitits_names_translate_short_ones_and_refuse_the_rest(caplog):
    with caplog.at_level(logging.WARNING, logger="robust_sparse"):
        checked = slurm.parameters({"partition": "gpu", "slurm_qos": "high", "timeout_min": 90, "gpus_per_node": 4})
    assert checked == {"slurm_partition": "gpu", "slurm_qos": "high", "timeout_min": 90, "gpus_per_node": 4,
                       "tasks_per_node": 4}  # one task per GPU
    assert "slurm_partition" in caplog.text and "translated" in caplog.text
    for bad, message in [({"partitoin": "gpu"}, "partitoin: unknown"), ({"cluster": "local"}, "cluster: not used"),
                         ({"gpus_per_node": 4, "tasks_per_node": 2}, "same value"),
                         ({"timeout_min": "soon"}, "timeout_min"), ({"nodes": 0}, "nodes = 0"),
                         ({"slurm_array_parallelism": 3}, "parallel")]:
        with pytest.raises(ConfigError, match=message):
            slurm.parameters(bad)


def test_dry_run_prints_and_checks_the_submitit_parameters_and_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch needed to check a sweep
    assert main(["sweep", str(_sweep_file(tmp_path)), "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert '"slurm_partition": "gpu"' in output and '"tasks_per_node": 4' in output
    assert "8 task(s) (2 node(s) x 4)" in output
    for flag in ("--array=0-1%2", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--time=60"):
        assert flag in output
    for seed in (0, 1):
        run_dir = tmp_path / "out" / "runs" / f"seed={seed}"
        assert f"seed={seed}: {sys.executable} -m robust_sparse.cli train {run_dir / 'requested.yaml'} --resume " \
               f"--out {run_dir} --device auto" in output
    bad = _sweep_file(tmp_path, slurm={**CLUSTER, "mem_gb": "lots"})
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "sweep slurm.mem_gb" in capsys.readouterr().err


def test_a_sweep_is_one_job_array_of_multi_task_jobs_with_its_ids_recorded(tmp_path, fake_slurm):
    (fake_slurm / "states").write_text("101_0|FAILED|137:0|00:00:07\n101_1|CANCELLED by 1000|0:15|00:00:03\n")
    folder = tmp_path / "out" / "slurm"
    # both jobs started (their logs exist) by the time sacct answers
    (fake_slurm / "after_sacct").write_text(f"touch '{folder}/101_0_0_log.err' '{folder}/101_1_0_log.err'\n")
    sweep = load_sweep(_sweep_file(tmp_path))
    index = run_sweep(sweep)
    (script,) = _submissions(fake_slurm)  # one sbatch call: the array
    text = script.read_text()
    for flag in ("--array=0-1%2", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                 "--partition=gpu", "--time=60", "--job-name=robust-sparse-out"):  # named after the sweep directory
        assert f"#SBATCH {flag}" in text
    recorded = json.loads((folder / "jobs.json").read_text())["train"]
    assert {run: entry["job_id"] for run, entry in recorded.items()} == {"seed=0": "101_0", "seed=1": "101_1"}
    for seed, job_id in ((0, "101_0"), (1, "101_1")):
        submission = submitit.SlurmJob(folder, job_id).submission()  # what each task of the job runs
        assert submission.function is slurm.train_task
        assert submission.args[:2] == (tmp_path / "out" / "runs" / f"seed={seed}" / "requested.yaml",
                                       tmp_path / "out" / "runs" / f"seed={seed}")
    # Slurm's words: the exit code and the signal it stands for; a cancelled job is cancelled, not failed
    assert list(index["status"]) == [
        f"failed (slurm job 101_0 FAILED, exit code 137 (128+9: SIGKILL), see {folder / '101_0_0_log.err'})",
        "cancelled (slurm job 101_1 CANCELLED after 00:00:03; the next sweep run starts it again)"]
    assert list(pd.read_csv(tmp_path / "out" / "runs.csv")["status"]) == list(index["status"])


def test_a_rerun_waits_on_recorded_jobs_that_are_queued_or_running_and_resubmits_a_failed_one(tmp_path, fake_slurm,
                                                                                            caplog):
    path = _sweep_file(tmp_path, seeds=(0, 1, 2))
    sweep = load_sweep(path)
    run_sweep(sweep, dry_run=True)  # the run directories, as a killed sweep left them ...
    folder = tmp_path / "out" / "slurm"
    folder.mkdir()
    (folder / "jobs.json").write_text(json.dumps({"train": {run_id([f"seed={s}"]): {"job_id": f"101_{s}"}
                                                            for s in (0, 1, 2)}}))  # ... with its job ids
    # 101_0 is queued, then cancelled; 101_1 runs, then finishes its run (the marker its rank 0 writes); 101_2
    # failed
    (fake_slurm / "states").write_text("101_0|PENDING|0:0|00:00:00\n101_1|RUNNING|0:0|00:00:04\n"
                                       "101_2|FAILED|1:0|00:00:09\n")
    (fake_slurm / "next_states").write_text("101_0|CANCELLED|0:0|00:00:00\n101_1|COMPLETED|0:0|00:00:10\n"
                                            "102|FAILED|1:0|00:00:02\n")
    (folder / "101_2_0_log.err").touch()  # 101_2 ran and wrote a log, and its run a last.pt
    (tmp_path / "out" / "runs" / "seed=2" / "last.pt").touch()
    (fake_slurm / "after_sacct").write_text(f"echo '{{}}' > '{tmp_path / 'out' / 'runs' / 'seed=1' / 'done.json'}'\n")
    (fake_slurm / "counter").write_text("102")
    with caplog.at_level(logging.INFO, logger="robust_sparse"):
        index = run_sweep(load_sweep(path))
    (script,) = _submissions(fake_slurm)  # only the failed run was submitted again, as one job (not an array)
    assert "--array" not in script.read_text() and "--ntasks-per-node=4" in script.read_text()
    assert "slurm job 101_0 is pending; waiting on it, not submitting it again" in caplog.text
    assert (f"seed=2: previous attempt: failed (slurm job 101_2 FAILED, exit code 1, see "
            f"{folder / '101_2_0_log.err'}); submitting the run again, with --resume from its last.pt") in caplog.text
    # 101_0 never started: no log is named; 102 wrote none either
    assert list(index["status"]) == ["cancelled (slurm job 101_0 CANCELLED while pending; it never started)",
                                     "done", "failed (slurm job 102 FAILED, exit code 1)"]
    assert json.loads((folder / "jobs.json").read_text())["train"]["seed=2"]["job_id"] == "102"


def test_a_task_of_a_multi_task_job_joins_the_run_as_its_rank(tmp_path, monkeypatch):
    """What each task of a job runs: torch.distributed's variables from submitit's Slurm environment, then the
    sweep's training command; rank 0 alone records the run's outcome."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    environment.update({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
                        "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[3-4]",
                        "SLURM_NODEID": "1"})
    monkeypatch.setattr(os, "environ", environment)  # the task exports torch.distributed's variables into it
    launched = []

    def fake_run(command, stdout, stderr, env):
        launched.append((command, env, stdout.name))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert slurm.train_task(run_dir / "requested.yaml", run_dir, (), "auto", 8) == "done"
    ((command, env, log_name),) = launched
    assert command[1:] == ["-m", "robust_sparse.cli", "train", str(run_dir / "requested.yaml"), "--resume", "--out",
                           str(run_dir), "--device", "auto"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu3" and 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert env["OMP_NUM_THREADS"] == "8"
    assert log_name == str(run_dir / "train.rank5.log") and not (run_dir / "done.json").exists()


@pytest.mark.slow  # four interpreters import torch (two tasks, their two training processes): 96 s on a loaded VM
def test_a_two_task_job_trains_one_run_through_ddp(tmp_path):
    """Both tasks of a (simulated) Slurm job on this machine: a gloo process group from submitit's environment,
    one run directory written by rank 0, and nothing printed by rank 1 (the default run checks the glue alone:
    test_a_task_of_a_multi_task_job_joins_the_run_as_its_rank)."""
    import socket

    from robust_sparse.config import load_config, save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, TINY + ["data.batch_size=32", f"out_dir={run_dir}"]), run_dir / "requested.yaml")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys; from pathlib import Path; from robust_sparse.studies.slurm import train_task; "
            "print(train_task(Path(sys.argv[1]) / 'requested.yaml', Path(sys.argv[1]), (), 'cpu', 1))")
    tasks = []
    for rank in (0, 1):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RANK", "WORLD_"))}
        env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="127.0.0.1", SLURM_NODEID="0",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        tasks.append(subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert [output.strip().splitlines()[-1] for output in outputs] == ["done", "done"]
    assert (run_dir / "done.json").is_file() and (run_dir / "last.pt").is_file()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 1 and metrics.loc[0, "images_per_second"] * metrics.loc[0, "train_seconds"] == \
        pytest.approx(256)  # the 256 training images of both ranks, 128 each
    assert "epoch 1/1" in (run_dir / "train.log").read_text()
    assert (run_dir / "train.rank1.log").read_text() == ""  # rank 1 of the group (a lone process would log)


def test_debug_runs_the_jobs_in_the_sweeps_process_without_sbatch(tmp_path, monkeypatch):
    import robust_sparse.studies.local as local_module

    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm at all
    trained = []  # the training command itself is the local backend's (tested there): here, who runs it

    def run_local(config_path, run_dir, modules, device, threads):
        trained.append((config_path, run_dir, os.getpid(), threads))
        return "done"

    monkeypatch.setattr(local_module, "run_training", run_local)
    index = run_sweep(load_sweep(_sweep_file(tmp_path, slurm={"debug": True, "cpus_per_task": 3})))
    assert list(index["status"]) == ["done", "done"]
    runs = tmp_path / "out" / "runs"
    assert trained == [(runs / f"seed={s}" / "requested.yaml", runs / f"seed={s}", os.getpid(), 3) for s in (0, 1)]
    assert not (tmp_path / "out" / "slurm" / "jobs.json").exists()  # nothing was submitted, nothing to wait on


def test_without_submitit_a_slurm_sweep_loads_and_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    for name in [name for name in sys.modules if name == "submitit" or name.startswith("submitit.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    path = _sweep_file(tmp_path)
    assert load_sweep(path).slurm == CLUSTER  # the other sweep checks still run (shipped sweeps validate)
    for arguments in ([], ["--dry-run"]):
        assert main(["sweep", str(path), *arguments]) == 2
        assert "needs submitit: pip install 'robust-sparse[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- inputs from the wide world: a hand-edited jobs.json, crafted pickles, script injection, a failing sbatch ---

class _Payload:
    """What a crafted pickle would run when unpickled: it creates ``path`` (a stand-in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(path, marker):
    """A submitit result file whose payload creates ``marker`` if anything unpickles it."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(("success", _Payload(marker))))


def test_a_crafted_result_pickle_is_never_run_the_runs_own_record_decides(tmp_path, fake_slurm):
    path = _sweep_file(tmp_path)
    run_sweep(load_sweep(path), dry_run=True)
    folder = tmp_path / "out" / "slurm"
    folder.mkdir()
    (folder / "jobs.json").write_text(json.dumps({"train": {"seed=0": {"job_id": "101_0"},
                                                            "seed=1": {"job_id": "101_1"}}}))
    marker = tmp_path / "payload-ran"
    for job_id in ("101_0", "101_1"):  # both ids ordinary: one job ended, one ends while the sweep waits on it
        _crafted(folder / f"{job_id}_0_result.pkl", marker)
    (fake_slurm / "states").write_text("101_0|COMPLETED|0:0|00:00:05\n101_1|RUNNING|0:0|00:00:05\n")
    (fake_slurm / "next_states").write_text("101_0|COMPLETED|0:0|00:00:05\n101_1|COMPLETED|0:0|00:00:09\n"
                                            "102|FAILED|1:0|00:00:01\n")
    (fake_slurm / "counter").write_text("102")
    index = run_sweep(load_sweep(path))
    assert not marker.exists()  # no pickle was unpickled
    runs = tmp_path / "out" / "runs"
    # neither run wrote its marker, so neither counts as done, whatever the pickles claim
    assert list(index["status"]) == ["failed (slurm job 102 FAILED, exit code 1)",
                                     f"failed (slurm job 101_1 COMPLETED without finishing the run, see "
                                     f"{runs / 'seed=1' / 'train.log'})"]


@pytest.mark.parametrize("record, named", [
    ({"train": {"seed=0": {"job_id": "../../x.outside/777"}}}, "'../../x.outside/777'"),
    ({"train": {"seed=0": {"job_id": "/etc/777"}}}, "'/etc/777'"),
    ({"train": {"seed=0": {"job_id": "101; rm -rf ~"}}}, "'101; rm -rf ~'"),
    ({"train": {"seed=0": {"job_id": 777}}}, "777"),
    ({"train": {"seed=0": "101"}}, "None"),
    ({"train": ["101"]}, "'train' is not a stage"),
    (["101"], "not a mapping of stages"),
    (b"\x80\x81\xfe\xff binary", "not the sweep's JSON record"),
    (b'{"train": ', "not the sweep's JSON record"),
])
def test_a_hand_edited_jobs_json_is_refused_in_one_line_before_any_path_is_built(tmp_path, fake_slurm, capsys,
                                                                                 record, named):
    from conftest import one_line_error, snapshot

    path = _sweep_file(tmp_path)
    run_sweep(load_sweep(path), dry_run=True)  # the sweep's directory, as a run left it ...
    folder = tmp_path / "out" / "slurm"
    folder.mkdir()
    (folder / "jobs.json").write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())  # by hand
    outside = tmp_path / "x.outside"  # where the traversal id points: a payload waits there
    marker = tmp_path / "payload-ran"
    _crafted(outside / "777_0_result.pkl", marker)
    (fake_slurm / "states").write_text("777|COMPLETED|node1\n")
    before = snapshot(tmp_path)
    for arguments in ([], ["--dry-run"]):
        line = one_line_error(["sweep", str(path), *arguments], capsys)
        assert str(folder / "jobs.json") in line and named in line
    assert snapshot(tmp_path) == before  # refused before any run was prepared: nothing written, nothing run
    assert not marker.exists() and not _submissions(fake_slurm)


INJECTED = ["gpu\ntouch /tmp/injected #", "gpu; touch /tmp/injected", "gpu' ; touch /tmp/injected '",
            'gpu" #', "gpu\r", "gpu`id`", "gpu$(id)"]


@pytest.mark.parametrize("field", ["slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint",
                                   "slurm_comment", "name", "slurm_job_name", "partition", "slurm_mem",
                                   "slurm_additional_parameters", "slurm_time"])
@pytest.mark.parametrize("value", INJECTED)
def test_no_value_can_add_a_line_to_the_sbatch_script(tmp_path, monkeypatch, capsys, field, value):
    from conftest import one_line_error

    monkeypatch.setenv("PATH", str(tmp_path))
    setting = {"mail-user": value} if field == "slurm_additional_parameters" else value
    path = _sweep_file(tmp_path, slurm={**CLUSTER, field: setting})
    line = one_line_error(["sweep", str(path), "--dry-run"], capsys)
    assert f"sweep slurm.{field}" in line and "add a line to the sbatch script" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("slurm_setup", ["module load cuda", "echo ok\ntouch /tmp/injected"], "sweep slurm.slurm_setup[1]"),
    ("slurm_setup", "module load cuda", "must be a list of strings"),  # submitit would add it letter by letter
    ("slurm_teardown", ["echo done\rtouch /tmp/injected"], "sweep slurm.slurm_teardown[0]"),
    ("slurm_srun_args", ["--cpu-bind=none\ntouch /tmp/injected"], "sweep slurm.slurm_srun_args[0]"),
    ("slurm_additional_parameters", {"mail-user\ntouch /tmp/injected #": "x"}, "option name"),
    ("slurm_partition", ["gpu"], "must be a string, a number or true/false"),
])
def test_shell_lines_are_one_line_per_entry_and_option_names_plain(tmp_path, monkeypatch, capsys, field, value,
                                                                   message):
    from conftest import one_line_error

    monkeypatch.setenv("PATH", str(tmp_path))
    line = one_line_error(["sweep", str(_sweep_file(tmp_path, slurm={**CLUSTER, field: value})), "--dry-run"],
                          capsys)
    assert message in line and field in line
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_would_add_a_line_is_refused_for_slurm(tmp_path, monkeypatch, capsys):
    from conftest import one_line_error

    monkeypatch.setenv("PATH", str(tmp_path))
    path = _sweep_file(tmp_path, out_dir=str(tmp_path / "out\ntouch injected #"))
    line = one_line_error(["sweep", str(path), "--dry-run"], capsys)
    assert "sweep out_dir" in line and "sbatch script" in line
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]


def test_dry_run_shows_the_script_exactly_as_sbatch_receives_it(tmp_path, fake_slurm, capsys):
    setup = ["module load cuda/12.1", "source ~/env.sh; echo 'ready'"]  # shell lines: ';' and quotes are theirs
    path = _sweep_file(tmp_path, slurm={**CLUSTER, "slurm_setup": setup, "slurm_comment": "robust sparse (v1)"})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    shown = capsys.readouterr().out
    (fake_slurm / "states").write_text("101_0|FAILED|node1\n101_1|FAILED|node2\n")
    assert main(["sweep", str(path)]) == 1  # both jobs failed
    (script,) = _submissions(fake_slurm)
    submitted = script.read_text()
    assert submitted.rstrip("\n") in shown
    # submitit's own lines (#SBATCH options, comments, its command) and the setup lines: nothing else
    added = [line for line in submitted.splitlines() if line and not line.startswith(("#", "srun ", "export "))]
    assert added == setup
    assert "#SBATCH --comment='robust sparse (v1)'" in submitted


@pytest.mark.parametrize("sbatch, message", [
    ("echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1\n",
     "sbatch failed (exit 1): sbatch: error: Batch job submission failed: Invalid partition name specified"),
    ("echo 'Welcome to the cluster'\necho '<html>maintenance</html>'\n",
     "sbatch answered without a job id: 'Welcome to the cluster / <html>maintenance</html>'"),
    ("exit 0\n", "sbatch answered without a job id: 'nothing'"),
])
def test_a_failed_submission_is_one_line_with_sbatchs_own_message(tmp_path, fake_slurm, capsys, sbatch, message):
    from conftest import one_line_error

    _script(fake_slurm / "bin" / "sbatch", sbatch)
    line = one_line_error(["sweep", str(_sweep_file(tmp_path))], capsys)
    assert message in line
    folder = tmp_path / "out" / "slurm"
    assert not (folder / "jobs.json").exists()  # nothing recorded: a rerun submits the runs again
    assert not list(folder.glob("*.sh")) and not list(folder.glob("*.pkl"))  # nor leftovers of the attempt


def test_sbatch_and_the_slurm_queries_run_with_a_time_limit(tmp_path, fake_slurm, monkeypatch, capsys):
    from conftest import one_line_error

    monkeypatch.setattr(slurm, "COMMAND_SECONDS", 1.0)
    bin_dir = fake_slurm / "bin"
    _script(bin_dir / "sacct", "sleep 30\n")  # a hung accounting daemon and a hung scontrol: squeue answers
    _script(bin_dir / "scontrol", "sleep 30\n")
    _script(bin_dir / "squeue", "echo '5|RUNNING|0:05'\n")
    start = time.monotonic()
    assert slurm._states(["5"]) == {"5": slurm.JobState("RUNNING", elapsed="0:05")}
    _script(bin_dir / "squeue", "sleep 30\n")
    assert slurm._states(["5"]) == {"5": slurm.UNKNOWN}  # none answers: not resubmitted (see submit)
    _script(bin_dir / "sbatch", "sleep 30\n")
    line = one_line_error(["sweep", str(_sweep_file(tmp_path))], capsys)
    assert "sbatch did not answer within 1 s and was stopped" in line and "check squeue" in line
    assert time.monotonic() - start < 20  # six 30-second hangs, each stopped after 1 s


def test_one_sigterm_stops_a_sweep_while_sbatch_hangs(tmp_path, fake_slurm):
    """The CLI turns SIGTERM into robust_sparse.cli.Terminated, a KeyboardInterrupt subclass; subprocess's
    clean-up waits for its child unless the exception is exactly KeyboardInterrupt: the sbatch (and what it
    started) is killed instead, and the sweep exits at once with SIGTERM's code."""
    import signal

    _script(fake_slurm / "bin" / "sbatch", f"""sleep 120 &
echo $$ $! > {fake_slurm}/sbatch.pids
wait
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sweep = subprocess.Popen([sys.executable, "-m", "robust_sparse.cli", "sweep", str(_sweep_file(tmp_path))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = fake_slurm / "sbatch.pids"
    try:
        deadline = time.monotonic() + 300  # the sweep imports torch and prepares its runs first (slow when busy)
        while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.2)
        assert pids.is_file(), "sbatch never started"
        sent = time.monotonic()
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
        assert time.monotonic() - sent < 10  # promptly: well under sbatch's 120 s
        assert sweep.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines()[-1].startswith("robust-sparse: terminated (SIGTERM)")
        assert "Traceback" not in err
        for pid in map(int, pids.read_text().split()):  # neither sbatch nor what it started is left behind
            assert _gone(pid), f"process {pid} of the fake sbatch is still running"
    finally:  # a failure leaves nothing running
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
        for pid in map(int, pids.read_text().split()) if pids.is_file() else ():
            if not _gone(pid, wait=0):
                os.kill(pid, signal.SIGKILL)


def _gone(pid, wait=5.0):
    """Whether process ``pid`` has ended (a zombie waiting for its parent counts), within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat_file:
                if stat_file.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_a_rerun_says_per_job_what_became_of_it_and_resubmits_it_with_resume(tmp_path, fake_slurm, caplog):
    """Fake commands for states one node of the test cluster (tests/test_slurm_cluster.py) cannot produce:
    NODE_FAIL and PREEMPTED need other nodes or a preemption policy, OUT_OF_MEMORY a memory cgroup."""
    path = _sweep_file(tmp_path, seeds=(0, 1, 2, 3))
    run_sweep(load_sweep(path), dry_run=True)
    folder = tmp_path / "out" / "slurm"
    folder.mkdir()
    (folder / "jobs.json").write_text(json.dumps({"train": {f"seed={s}": {"job_id": f"101_{s}"} for s in range(4)}}))
    for seed in range(4):
        (folder / f"101_{seed}_0_log.err").touch()
        if seed != 2:
            (tmp_path / "out" / "runs" / f"seed={seed}" / "last.pt").touch()
    (fake_slurm / "states").write_text("101_0|NODE_FAIL|0:0|00:03:00\n101_1|PREEMPTED|0:0|00:01:00\n"
                                       "101_2|OUT_OF_MEMORY|0:125|00:00:40\n101_3|TIMEOUT|0:0|01:00:12\n")
    (fake_slurm / "counter").write_text("102")
    with caplog.at_level(logging.INFO, logger="robust_sparse"):
        run_sweep(load_sweep(path))
    kept = "last.pt kept, the next sweep run resumes from it"
    for run, said in [("seed=0", f"node fail (slurm job 101_0 NODE_FAIL after 00:03:00; {kept}"),
                      ("seed=1", f"preempted (slurm job 101_1 PREEMPTED after 00:01:00; {kept}"),
                      ("seed=2", "out of memory (slurm job 101_2 OUT_OF_MEMORY after 00:00:40: raise mem_gb; the "
                                 "next sweep run starts it again"),
                      ("seed=3", f"time limit (slurm job 101_3 TIMEOUT: stopped at its time limit after 01:00:12; "
                                 f"{kept}")]:
        resume = "from the start" if run == "seed=2" else "with --resume from its last.pt"
        assert f"{run}: previous attempt: {said}, see {folder / (run.replace('seed=', '101_') + '_0_log.err')}); " \
               f"submitting the run again, {resume}" in caplog.text
    (script,) = _submissions(fake_slurm)
    assert "--array=0-3" in script.read_text()  # all four again, as one array


def test_without_accounting_states_come_from_scontrol_and_it_is_said_once(tmp_path, fake_slurm, caplog):
    bin_dir = fake_slurm / "bin"
    _script(bin_dir / "sacct", f"echo x >> {fake_slurm}/sacct_calls\n"
                               "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    # scontrol -o: one line per record; the array's pending tasks share one record (ArrayTaskId=1-3%2)
    _script(bin_dir / "scontrol", """echo 'JobId=7 ArrayJobId=7 ArrayTaskId=1-3%2 JobState=PENDING Reason=Resources \
ExitCode=0:0 RunTime=00:00:00'
echo 'JobId=8 ArrayJobId=7 ArrayTaskId=0 JobState=FAILED Reason=NonZeroExitCode ExitCode=0:9 RunTime=00:00:05'
""")
    queries = slurm._Queries(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="robust_sparse"):
        for _ in range(3):
            states = queries.states(["7_0", "7_2", "7_5"])
        slurm._Queries(tmp_path / "out").states(["7_0"])  # the same sweep's evaluation stage
    assert states == {"7_0": slurm.JobState("FAILED", 0, 9, "00:00:05"),
                      "7_2": slurm.JobState("PENDING", 0, None, "00:00:00"), "7_5": slurm.GONE}
    assert caplog.text.count("keeps no accounting") == 1 and "accounting storage is disabled" in caplog.text
    assert (fake_slurm / "sacct_calls").read_text().count("x") == 2  # not asked again by the same queries
    folder = tmp_path / "out" / "slurm"
    assert slurm._outcome(folder, "7_0", states["7_0"], "eval", (tmp_path, None)) == \
        "failed (slurm job 7_0 FAILED, killed by SIGKILL)"


@pytest.mark.parametrize("seen, started, said", [
    ("PENDING", False, "cancelled (slurm job 7_1 CANCELLED while pending; it never started)"),
    ("TIMEOUT", True, "time limit (slurm job 7_1 TIMEOUT: stopped at its time limit; the next sweep run starts it "
                      "again, see {log})"),
    (None, True, "gone (slurm job 7_1: Slurm no longer knows it (it ended more than MinJobAge ago, or was cancelled "
                 "while pending) and the run has not finished; the next sweep run starts it again, see {log})"),
    (None, False, "gone (slurm job 7_1: Slurm no longer knows it (it ended more than MinJobAge ago, or was "
                  "cancelled while pending) and the run has not finished; it never started)"),
])
def test_a_job_slurm_forgot_is_what_the_sweep_saw_last_or_what_the_run_wrote(tmp_path, seen, started, said):
    """Slurm drops a pending array task on scancel at once, and forgets an ended job after MinJobAge without
    accounting; jobs.json keeps the state the sweep saw last ("seen")."""
    folder = tmp_path / "slurm"
    folder.mkdir()
    log = folder / "7_1_0_log.err"
    if started:
        log.touch()
    assert slurm._outcome(folder, "7_1", slurm.GONE, "eval", (tmp_path, None), seen) == said.format(log=log)


def test_the_sweep_looks_soon_then_less_often_and_writes_each_change_at_once(tmp_path, monkeypatch):
    answers = iter(["PENDING"] * 3 + ["RUNNING"] * 6 + ["COMPLETED"])
    slept, written = [], []

    class Queries:
        def states(self, job_ids):
            return {job_id: slurm.JobState(next(answers)) for job_id in job_ids}

    monkeypatch.setattr(slurm.time, "sleep", slept.append)
    index = pd.DataFrame({"run_id": ["a"], "eval": ["submitted (slurm job 5)"]})
    notes = []
    slurm._wait({0: ("5", (tmp_path, None))}, tmp_path, index, "eval",
                lambda: written.append(index.loc[0, "eval"]), Queries(), 10.0, lambda row, state: notes.append(state))
    assert slept == [2, 4, 8, 2, 4, 8, 10, 10, 10]  # back to 2 s at each change, then doubling up to poll_seconds
    assert written == ["pending (slurm job 5)", "running (slurm job 5)",
                       "failed (slurm job 5 COMPLETED without finishing the run, see " f"{tmp_path / 'eval.log'})"]
    assert notes[0] == "PENDING" and notes[-1] == "COMPLETED"


def test_a_time_limit_too_short_for_submitits_warning_is_said_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="robust_sparse"):
        slurm.parameters({"timeout_min": 2})
        slurm.parameters({"timeout_min": 5, "poll_seconds": 5})
    (line,) = caplog.text.strip().splitlines()
    assert "timeout_min = 2: leaves 30 s after submitit's time-limit warning (USR2, 90 s before the limit)" in line
    with pytest.raises(ConfigError, match=r"slurm.poll_seconds = 0.0: must be a number of seconds > 0"):
        slurm.parameters({"poll_seconds": 0})


def test_the_cluster_guides_gpu_sweep_file_is_accepted_as_it_stands(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text()  # the manual's cluster guide
    (body,) = [block for block in readme.split("```yaml\n")[1:] if block.startswith("# gamma_gpu.yaml")]
    data = yaml.safe_load(body.split("```")[0])
    data["base"] = str(Path(__file__).resolve().parents[1] / data["base"])
    data["out_dir"] = str(tmp_path / "out")
    path = tmp_path / "gamma_gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("PATH", str(tmp_path))  # a dry run needs no sbatch
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # the CIFAR-10 copy the cluster would hold (the runs read ./data)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --export=ALL", "#SBATCH --time=720", "module load cuda/12.1"):
        assert line in script
