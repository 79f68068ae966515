"""The multi-node launch scripts in launchers/, checked without starting Ray, SLURM or DeepSpeed.

Most tests run a script with DRY_RUN=1, which prints each command it would run on one line,
shell-quoted and prefixed "+ ". The SLURM script is also run for real against stand-in `srun`,
`scontrol`, `ray`, `python` and `rlhf` commands, to check its teardown on success, on failure,
on a cluster that never comes up, and on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
# _common.sh is sourced by the others, never run on its own.
SCRIPTS = sorted(p for p in [*LAUNCHERS.glob("*.sh"), *LAUNCHERS.glob("*.sbatch")] if not p.name.startswith("_"))
SCRIPT_NAMES = [p.name for p in SCRIPTS]


# ---- helpers -------------------------------------------------------------------------------

_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="rlhf-launcher-tests-"))
TOKEN_FILE = _TOKEN_DIR / "auth_token"
TOKEN_FILE.write_text("launcher-test-token")
"""The Ray auth token the scripts find by default in these tests (as a node that was given the
head's token would); the token tests below take it away."""


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without anything the scripts read, plus `extra`."""
    read_by_scripts = re.compile(r"^(RAY_|SLURM_|DRY_RUN$|HOSTFILE$|NUM_GPUS$|NUM_NODES$|GPUS_PER_NODE$|"
                                 r"WORKERS_PER_NODE$|FIT_ALLOCATION$|STRATEGY$|"
                                 r"CONFIG$|MASTER_|DS_LAUNCHER$|RLHF_|PYTHON$|STOP_GRACE$)")
    env = {k: v for k, v in os.environ.items() if not read_by_scripts.match(k)}
    env["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)
    env.update(extra)
    return env


def run(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
        timeout: float = 30) -> subprocess.CompletedProcess:
    """Run launchers/SCRIPT in its own process group. `.leftover` says whether anything it
    started was still running once it exited; whatever was is then killed."""
    proc = subprocess.Popen([str(LAUNCHERS / script), *args], cwd=cwd, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        leftover = _group_alive(proc.pid)
    finally:
        _kill_group(proc.pid)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    res.leftover = leftover
    return res


def _group_alive(pgid: int, wait: float = 1.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def dry(script: str, *args: str, cwd: Path = REPO, **env: str) -> list[list[str]]:
    """The commands SCRIPT prints with DRY_RUN=1, each split into its words; it must succeed."""
    res = run(script, *args, env=clean_env(DRY_RUN="1", **env), cwd=cwd)
    assert res.returncode == 0, res.stderr
    return commands(res.stdout)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def opt(cmd: list[str], name: str) -> str | None:
    """The value of option NAME in cmd: `NAME VALUE` or `NAME=VALUE`; None when absent."""
    for i, word in enumerate(cmd):
        if word == name:
            return cmd[i + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    return None


def after(cmd: list[str], *prefix: str) -> list[str]:
    """The words of cmd after the first occurrence of the words PREFIX (which must occur)."""
    n = len(prefix)
    for i in range(len(cmd) - n + 1):
        if cmd[i:i + n] == list(prefix):
            return cmd[i + n:]
    raise AssertionError(f"{' '.join(prefix)!r} not in {cmd}")


def has(cmd: list[str], *words: str) -> bool:
    n = len(words)
    return any(cmd[i:i + n] == list(words) for i in range(len(cmd) - n + 1))


# ---- every script --------------------------------------------------------------------------

def test_the_expected_scripts_exist():
    assert set(SCRIPT_NAMES) == {"ray_head.sh", "ray_worker.sh", "slurm_ray.sbatch", "submit.sh",
                                 "deepspeed_multinode.sh"}


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_bash_syntax(name):
    res = subprocess.run(["bash", "-n", str(LAUNCHERS / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_executable_with_header_and_strict_mode(name):
    path = LAUNCHERS / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    assert "set -euo pipefail" in lines
    header = lines[1:lines.index("set -euo pipefail")]
    assert header and all(line.startswith("#") for line in header), "header must be one comment block"
    text = "\n".join(header)
    assert name in text and "Usage" in text and "Example" in text
    assert "DRY_RUN" in text


@pytest.mark.parametrize("name", [n for n in SCRIPT_NAMES if n.endswith(".sh")])
def test_help_prints_the_header(name):
    res = run(name, "--help", env=clean_env(DRY_RUN="1"))
    assert res.returncode == 0
    assert "Usage" in res.stdout and not commands(res.stdout)


@pytest.mark.parametrize("script, args, env", [
    ("ray_head.sh", (), {}),
    ("ray_head.sh", ("--block",), {"RAY_HEAD_IP": "10.1.2.3", "RAY_DASHBOARD": "1"}),
    ("ray_worker.sh", ("10.0.0.1:6379",), {"RAY_NUM_CPUS": "4"}),
    ("ray_worker.sh", ("10.0.0.1:6379", "--block"), {}),
    ("submit.sh", ("ppo", "--config", "configs/ppo.yaml", "ppo.kl_coef=0.05"), {}),
    ("deepspeed_multinode.sh", ("rm",), {"HOSTFILE": "launchers/hostfile.example", "NUM_GPUS": "2"}),
])
def test_dry_run_shows_exactly_what_a_real_run_executes(tmp_path, script, args, env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "deepspeed"):   # record the command line, one word per line
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "%s\\n" "$(basename "$0")" "$@" >> {tmp_path}/ran\n')
        (bin_dir / tool).chmod(0o755)
    real = run(script, *args, env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **env))
    assert real.returncode == 0, real.stderr
    ran = (tmp_path / "ran").read_text().splitlines()
    assert ran == [word for cmd in dry(script, *args, **env) for word in cmd]


def test_readme_covers_every_script():
    readme = (LAUNCHERS / "README.md").read_text()
    for name in [*SCRIPT_NAMES, "hostfile.example"]:
        assert name in readme, f"launchers/README.md does not mention {name}"
    assert "127.0.0.1" in readme and "RAY_HEAD_IP" in readme


# ---- ray_head.sh ---------------------------------------------------------------------------

def test_head_binds_loopback_by_default_without_dashboard():
    [cmd] = dry("ray_head.sh")
    assert cmd[:3] == ["ray", "start", "--head"]
    assert opt(cmd, "--node-ip-address") == "127.0.0.1"
    assert opt(cmd, "--port") == "6379"
    assert "--disable-usage-stats" in cmd
    assert opt(cmd, "--include-dashboard") == "false"
    assert opt(cmd, "--dashboard-host") is None
    assert "--block" not in cmd and opt(cmd, "--num-gpus") is None


def test_head_dashboard_stays_on_loopback_when_the_head_ip_is_set():
    [cmd] = dry("ray_head.sh", RAY_DASHBOARD="1", RAY_HEAD_IP="10.1.2.3")
    assert opt(cmd, "--node-ip-address") == "10.1.2.3"
    assert opt(cmd, "--include-dashboard") == "true"
    assert opt(cmd, "--dashboard-host") == "127.0.0.1"
    assert opt(cmd, "--dashboard-port") == "8265"


def test_head_uses_the_environment_and_prints_the_join_address():
    res = run("ray_head.sh", "--block", env=clean_env(
        DRY_RUN="1", RAY_HEAD_IP="10.1.2.3", RAY_PORT="6380", RAY_NUM_CPUS="16", RAY_NUM_GPUS="8",
        RAY_DASHBOARD="1", RAY_DASHBOARD_HOST="10.1.2.3", RAY_DASHBOARD_PORT="8300"))
    assert res.returncode == 0, res.stderr
    [cmd] = commands(res.stdout)
    assert opt(cmd, "--node-ip-address") == "10.1.2.3" and opt(cmd, "--port") == "6380"
    assert opt(cmd, "--num-cpus") == "16" and opt(cmd, "--num-gpus") == "8"
    assert opt(cmd, "--dashboard-host") == "10.1.2.3" and opt(cmd, "--dashboard-port") == "8300"
    assert "--block" in cmd and "--disable-usage-stats" in cmd
    assert "ray_worker.sh 10.1.2.3:6380" in res.stdout


@pytest.mark.parametrize("env, args", [({"RAY_PORT": "63x"}, ()), ({"RAY_DASHBOARD": "yes"}, ()),
                                       ({"RAY_NUM_GPUS": "-1"}, ()), ({}, ("--blok",))])
def test_head_rejects_bad_settings_before_running_anything(env, args):
    res = run("ray_head.sh", *args, env=clean_env(DRY_RUN="1", **env))
    assert res.returncode != 0 and not commands(res.stdout)


# ---- ray_worker.sh -------------------------------------------------------------------------

def test_worker_without_an_address_fails_with_usage():
    res = run("ray_worker.sh", env=clean_env(DRY_RUN="1"))
    assert res.returncode != 0
    assert "Usage" in res.stderr and "HEAD_IP:PORT" in res.stderr
    assert not commands(res.stdout)


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", ":6379", "10.0.0.1:port"])
def test_worker_rejects_an_address_without_host_and_port(address):
    res = run("ray_worker.sh", address, env=clean_env(DRY_RUN="1"))
    assert res.returncode != 0 and not commands(res.stdout)


def test_worker_joins_the_given_head():
    [cmd] = dry("ray_worker.sh", "10.0.0.1:6380", RAY_NODE_IP="10.0.0.2", RAY_NUM_GPUS="4")
    assert cmd[:2] == ["ray", "start"] and "--head" not in cmd
    assert opt(cmd, "--address") == "10.0.0.1:6380"
    assert opt(cmd, "--node-ip-address") == "10.0.0.2"
    assert opt(cmd, "--num-gpus") == "4"
    assert "--disable-usage-stats" in cmd


def test_worker_leaves_the_node_ip_to_ray_unless_given():
    [cmd] = dry("ray_worker.sh", "10.0.0.1:6379", "--block")
    assert opt(cmd, "--node-ip-address") is None
    assert "--block" in cmd


# ---- submit.sh -----------------------------------------------------------------------------

def submitted(*args: str, **env: str) -> tuple[list[str], list[str], dict]:
    """(ray job submit options, entrypoint, runtime env) of submit.sh ARGS. Before it, only the
    query of the cluster's nodes may run (when the allocation is not given)."""
    *before, cmd = dry("submit.sh", *args, **env)
    assert before in ([], [["ray", "list", "nodes", "--detail", "--format", "json",
                            "--address", env.get("RAY_JOB_ADDRESS", "http://127.0.0.1:8265")]])
    assert cmd[:3] == ["ray", "job", "submit"]
    split = cmd.index("--")
    options, entrypoint = cmd[:split], cmd[split + 1:]
    return options, entrypoint, json.loads(opt(options, "--runtime-env-json"))


@pytest.mark.parametrize("stage", ["bogus", "generate", "data", "SFT"])
def test_submit_rejects_an_unknown_stage(stage):
    res = run("submit.sh", stage, env=clean_env(DRY_RUN="1"))
    assert res.returncode != 0
    assert stage in res.stderr and "sft" in res.stderr and "pipeline" in res.stderr
    assert not commands(res.stdout)


def test_submit_without_a_stage_fails():
    res = run("submit.sh", env=clean_env(DRY_RUN="1"))
    assert res.returncode != 0 and not commands(res.stdout)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "pipeline"])
def test_submit_entrypoint_runs_the_stage_on_the_cluster(stage):
    options, entrypoint, _ = submitted(stage, "--config", f"configs/{stage}.yaml", "train.lr=1e-5")
    assert opt(options, "--address") == "http://127.0.0.1:8265"
    assert opt(options, "--working-dir") == "."
    assert entrypoint[:5] == ["rlhf", stage, "--config", f"configs/{stage}.yaml", "train.lr=1e-5"]
    assert entrypoint[-1] == "ray.address=auto"
    # sft/rm/ppo only train as Ray actors with ray.enabled=true
    assert ("ray.enabled=true" in entrypoint) == (stage != "pipeline")


def test_submit_excludes_local_state_from_the_upload():
    _, _, runtime_env = submitted("sft", RAY_JOB_ADDRESS="http://10.0.0.1:8265")
    excludes = runtime_env["excludes"]
    pathspec = pytest.importorskip("ray._private.thirdparty.pathspec")
    spec = pathspec.PathSpec.from_lines("gitwildmatch", excludes)   # how Ray reads them
    for dropped in [".venv/bin/python", "runs/quickstart/sft/config.yaml", "data/quickstart/sft.jsonl",
                    ".git/HEAD", "wandb/run-1/files/x", "models/tiny/model.safetensors"]:
        assert spec.match_file(dropped), dropped
    for kept in ["rlhf/data/quickstart.py", "rlhf/cli.py", "configs/sft.yaml",
                 "tests/data/sample.jsonl", "launchers/submit.sh"]:
        assert not spec.match_file(kept), kept


def test_submit_uses_the_job_address_and_options_from_the_environment():
    options, entrypoint, _ = submitted("pipeline", RAY_JOB_ADDRESS="http://10.0.0.1:8265",
                                       RAY_JOB_NO_WAIT="1", RAY_JOB_ID="rlhf-1",
                                       RLHF_CMD="python -m rlhf")
    assert opt(options, "--address") == "http://10.0.0.1:8265"
    assert "--no-wait" in options and opt(options, "--submission-id") == "rlhf-1"
    assert entrypoint[:4] == ["python", "-m", "rlhf", "pipeline"]


def test_submit_uploads_the_repository_whatever_the_current_directory(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f'#!/bin/bash\npwd > {tmp_path}/ray_cwd\n')
    (bin_dir / "ray").chmod(0o755)
    res = run("submit.sh", "sft", env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path((tmp_path / "ray_cwd").read_text().strip()) == REPO


# ---- deepspeed_multinode.sh + hostfile.example ---------------------------------------------

def test_hostfile_example_is_a_valid_deepspeed_hostfile():
    hosts = []
    for line in (LAUNCHERS / "hostfile.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        assert m, f"not 'HOST slots=N': {line!r}"
        hosts.append(m.group(1))
    assert len(hosts) >= 2 and len(set(hosts)) == len(hosts)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_deepspeed_builds_the_launcher_command(stage):
    [cmd] = dry("deepspeed_multinode.sh", stage, "train.lr=1e-5",
                HOSTFILE="launchers/hostfile.example", NUM_GPUS="8")
    assert cmd[0] == "deepspeed"
    assert opt(cmd, "--hostfile") == "launchers/hostfile.example"
    assert opt(cmd, "--num_gpus") == "8"
    # launcher options first, then the module and its arguments
    assert after(cmd, "--module") == ["rlhf", stage, "--config", f"configs/{stage}.yaml",
                                      "--config", "configs/strategy/zero2.yaml", "train.lr=1e-5"]


def test_deepspeed_takes_strategy_config_and_rendezvous_from_the_environment():
    [cmd] = dry("deepspeed_multinode.sh", "rm", STRATEGY="configs/strategy/fsdp.yaml",
                CONFIG="configs/examples/rm.yaml", MASTER_ADDR="node1", MASTER_PORT="29600",
                NUM_NODES="2", DS_LAUNCHER="openmpi")
    module_args = after(cmd, "--module")
    assert module_args[:6] == ["rlhf", "rm", "--config", "configs/examples/rm.yaml",
                               "--config", "configs/strategy/fsdp.yaml"]
    launcher = cmd[:cmd.index("--module")]
    assert opt(launcher, "--hostfile") == "launchers/hostfile"
    assert opt(launcher, "--master_addr") == "node1" and opt(launcher, "--master_port") == "29600"
    assert opt(launcher, "--num_nodes") == "2" and opt(launcher, "--launcher") == "openmpi"
    assert opt(launcher, "--num_gpus") is None


@pytest.mark.parametrize("stage", ["ppo", "pipeline", "bogus"])
def test_deepspeed_runs_only_sft_and_rm(stage):
    res = run("deepspeed_multinode.sh", stage, env=clean_env(DRY_RUN="1"))
    assert res.returncode != 0 and not commands(res.stdout)
    if stage in ("ppo", "pipeline"):
        assert "Ray" in res.stderr


def fake_deepspeed(tmp_path: Path) -> dict[str, str]:
    """An environment whose `deepspeed` only records that it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "deepspeed_ran"
    (bin_dir / "deepspeed").write_text(f'#!/bin/bash\necho "$*" > {marker}\n')
    (bin_dir / "deepspeed").chmod(0o755)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("setting", [{"HOSTFILE": "launchers/no-such-hostfile"},
                                     {"HOSTFILE": "EMPTY"},
                                     {"HOSTFILE": "launchers/hostfile.example", "STRATEGY": "configs/strategy/nope.yaml"}])
def test_deepspeed_checks_its_files_before_launching(tmp_path, setting):
    env = fake_deepspeed(tmp_path)
    if setting["HOSTFILE"] == "EMPTY":
        empty = tmp_path / "hostfile"
        empty.write_text("# nothing here\n\n")
        setting = {"HOSTFILE": str(empty)}
    res = run("deepspeed_multinode.sh", "sft", env={**env, **setting})
    assert res.returncode != 0 and res.stderr
    assert not (tmp_path / "deepspeed_ran").exists()


def test_deepspeed_launches_with_valid_files(tmp_path):
    env = fake_deepspeed(tmp_path)
    res = run("deepspeed_multinode.sh", "sft", env={**env, "HOSTFILE": "launchers/hostfile.example"})
    assert res.returncode == 0, res.stderr
    ran = (tmp_path / "deepspeed_ran").read_text().split()
    assert ran[:2] == ["--hostfile", "launchers/hostfile.example"] and "--module" in ran


# ---- slurm_ray.sbatch: dry run -------------------------------------------------------------

NODES = ["node1", "node2", "node3"]


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """Stand-ins for scontrol, srun, ray, python and rlhf; they log to $FAKE_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": f"""
            [[ "$1 $2" == "show hostnames" ]] || exit 1
            printf '%s\\n' {' '.join(NODES)}
        """,
        "srun": """
            node=""
            while [[ $# -gt 0 && "$1" == -* ]]; do
                case "$1" in --nodelist=*) node="${1#--nodelist=}" ;; esac
                shift
            done
            echo "srun node=$node: $*" >> "$FAKE_LOG"
            export FAKE_NODE="$node"
            exec "$@"
        """,
        "ray": """
            echo "ray node=$FAKE_NODE: $*" >> "$FAKE_LOG"
            if [[ "$1" == start && " $* " == *" --block "* ]]; then
                echo $$ > "$FAKE_DIR/ray-$FAKE_NODE.pid"
                trap 'exit 0' TERM
                while :; do sleep 0.05; done
            elif [[ "$1" == stop && -f "$FAKE_DIR/ray-$FAKE_NODE.pid" ]]; then
                kill "$(cat "$FAKE_DIR/ray-$FAKE_NODE.pid")" 2>/dev/null
            fi
            exit 0
        """,
        "python": """
            echo "python RAY_ADDRESS=$RAY_ADDRESS" >> "$FAKE_LOG"
            echo "${FAKE_ALIVE:-3}"
        """,
        "rlhf": """
            echo "rlhf node=${FAKE_NODE:-local} RAY_ADDRESS=$RAY_ADDRESS: $*" >> "$FAKE_LOG"
            case "${FAKE_RLHF:-ok}" in
                ok) exit 0 ;;
                fail) exit 3 ;;
                hang)
                    trap 'echo "rlhf got TERM" >> "$FAKE_LOG"; exit 0' TERM
                    touch "$FAKE_DIR/rlhf.ready"
                    while :; do sleep 0.05; done ;;
            esac
        """,
        "hostname": """
            case "${1:-}" in
                --ip-address) echo "127.0.1.1" ;;
                -I) echo "10.9.8.7 172.17.0.1" ;;
                *) echo "${FAKE_HOSTNAME:-login1}" ;;
            esac
        """,
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + textwrap.dedent(body).strip() + "\n")
        path.chmod(0o755)
    return bin_dir


def slurm_env(fake_bin: Path, **extra: str) -> dict[str, str]:
    tmp = fake_bin.parent
    return clean_env(**{"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-3]",
                        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_PER_NODE": "4",
                        "FAKE_LOG": str(tmp / "log"), "FAKE_DIR": str(tmp), "PYTHON": str(fake_bin / "python"),
                        "RAY_WAIT_INTERVAL": "0.1", "STOP_GRACE": "10", **extra})


def sbatch_dry(fake_bin: Path, *args: str, **extra: str) -> list[list[str]]:
    res = run("slurm_ray.sbatch", *args, env=slurm_env(fake_bin, DRY_RUN="1", **extra))
    assert res.returncode == 0, res.stderr
    return commands(res.stdout)


def srun_node(cmd: list[str]) -> str | None:
    return opt(cmd, "--nodelist") if "srun" in cmd else None


def fit(nodes: int, workers: int | None, gpus: int | None, sections=("sft.", "rm.", "dpo.", "ppo.")) -> list[str]:
    """The resources.* overrides that put each stage on NODES nodes x WORKERS workers of GPUS GPUs."""
    out = []
    for section in sections:
        out.append(f"{section}resources.num_nodes={nodes}")
        if workers is not None:
            out.append(f"{section}resources.workers_per_node={workers}")
        if gpus is not None:
            out.append(f"{section}resources.gpus_per_worker={gpus}")
    return out


def test_sbatch_starts_one_head_then_workers_then_the_pipeline_then_stops_ray(fake_bin):
    cmds = sbatch_dry(fake_bin, "--from", "rm", RAY_HEAD_IP="10.0.0.1")
    starts = [c for c in cmds if has(c, "ray", "start")]
    heads = [c for c in starts if "--head" in c]
    workers = [c for c in starts if "--head" not in c]
    assert len(heads) == 1
    [head] = heads
    assert srun_node(head) == "node1"
    assert opt(after(head, "ray", "start"), "--node-ip-address") == "10.0.0.1"
    assert "--block" in head and "--disable-usage-stats" in head
    assert opt(after(head, "ray", "start"), "--num-gpus") == "4"
    assert opt(after(head, "ray", "start"), "--num-cpus") == "8"
    assert sorted(srun_node(c) for c in workers) == ["node2", "node3"]
    for w in workers:
        assert opt(after(w, "ray", "start"), "--address") == "10.0.0.1:6379"
        assert "--block" in w and "--disable-usage-stats" in w
    [pipeline] = [c for c in cmds if has(c, "rlhf", "pipeline")]
    assert after(pipeline, "rlhf", "pipeline") == ["--config", "configs/pipeline.yaml", "ray.address=auto",
                                                   *fit(3, 4, 1), "--from", "rm"]
    # outside the allocation (this test machine) the driver goes to the head node via srun
    assert srun_node(pipeline) == "node1"
    stops = [c for c in cmds if has(c, "ray", "stop")]
    assert sorted(srun_node(c) for c in stops) == NODES
    order = [cmds.index(c) for c in (head, *workers, pipeline)]
    assert order == sorted(order) and cmds.index(pipeline) < min(cmds.index(c) for c in stops)


def test_sbatch_head_is_the_node_running_the_script(fake_bin):
    cmds = sbatch_dry(fake_bin, CONFIG="configs/ppo.yaml", FAKE_HOSTNAME="node2")
    [head] = [c for c in cmds if has(c, "ray", "start", "--head")]
    assert srun_node(head) == "node2"
    workers = [c for c in cmds if has(c, "ray", "start") and "--head" not in c]
    assert sorted(srun_node(c) for c in workers) == ["node1", "node3"]
    [pipeline] = [c for c in cmds if has(c, "rlhf", "pipeline")]
    assert pipeline[0] == "rlhf", "on the head node itself the driver runs without srun"
    assert opt(pipeline, "--config") == "configs/ppo.yaml"


def test_sbatch_looks_up_the_head_ip_on_the_head_node(fake_bin):
    cmds = sbatch_dry(fake_bin)
    [lookup] = [c for c in cmds if any("hostname" in w for w in c)]
    assert srun_node(lookup) == "node1"
    [head] = [c for c in cmds if has(c, "ray", "start", "--head")]
    assert "node1" in opt(after(head, "ray", "start"), "--node-ip-address")


def test_sbatch_outside_slurm_fails_clearly(fake_bin):
    env = slurm_env(fake_bin, DRY_RUN="1")
    del env["SLURM_JOB_NODELIST"]
    res = run("slurm_ray.sbatch", env=env)
    assert res.returncode != 0 and "sbatch" in res.stderr and not commands(res.stdout)


# ---- slurm_ray.sbatch: run against stand-ins -----------------------------------------------

def fake_log(fake_bin: Path) -> list[str]:
    path = fake_bin.parent / "log"
    return path.read_text().splitlines() if path.exists() else []


def assert_ray_stopped_everywhere(res: subprocess.CompletedProcess, log: list[str]) -> None:
    stopped = sorted(m.group(1) for m in (re.match(r"ray node=(\S+): stop", line) for line in log) if m)
    assert stopped == NODES
    assert not res.leftover, "processes were left running"


def test_sbatch_runs_the_pipeline_on_the_cluster_and_stops_ray(fake_bin):
    res = run("slurm_ray.sbatch", "ppo.kl_coef=0.1",
              env=slurm_env(fake_bin, CONFIG="configs/ppo.yaml", FAKE_HOSTNAME="node1"))
    assert res.returncode == 0, res.stderr
    log = fake_log(fake_bin)
    # the head IP found on the head node: the first non-loopback address
    assert "ray node=node1: start --head --node-ip-address 10.9.8.7 --port 6379 --num-cpus 8 " \
           "--num-gpus 4 --include-dashboard false --disable-usage-stats --block" in log
    for node in ("node2", "node3"):
        assert any(line.startswith(f"ray node={node}: start --address 10.9.8.7:6379") for line in log)
    [rlhf] = [line for line in log if line.startswith("rlhf")]
    assert rlhf == ("rlhf node=local RAY_ADDRESS=10.9.8.7:6379: pipeline --config configs/ppo.yaml "
                    f"ray.address=auto {' '.join(fit(3, 4, 1))} ppo.kl_coef=0.1")
    assert log.index(rlhf) < min(i for i, line in enumerate(log) if ": stop" in line)
    assert_ray_stopped_everywhere(res, log)


def test_sbatch_stops_ray_and_passes_on_the_status_when_the_pipeline_fails(fake_bin):
    res = run("slurm_ray.sbatch", env=slurm_env(fake_bin, CONFIG="configs/ppo.yaml", FAKE_RLHF="fail",
                                                RAY_HEAD_IP="10.0.0.1"))
    assert res.returncode == 3
    assert_ray_stopped_everywhere(res, fake_log(fake_bin))


def test_sbatch_gives_up_when_the_nodes_do_not_join(fake_bin):
    res = run("slurm_ray.sbatch", env=slurm_env(fake_bin, CONFIG="configs/ppo.yaml", FAKE_ALIVE="1",
                                                RAY_WAIT_TIMEOUT="1", RAY_HEAD_IP="10.0.0.1"))
    assert res.returncode != 0
    assert "only 1 of 3" in res.stderr and "RAY_WAIT_TIMEOUT" in res.stderr
    log = fake_log(fake_bin)
    assert not any(line.startswith("rlhf") for line in log)
    assert_ray_stopped_everywhere(res, log)


def test_sbatch_checks_the_config_before_starting_ray(fake_bin):
    res = run("slurm_ray.sbatch", env=slurm_env(fake_bin, CONFIG="configs/no-such.yaml",
                                                RAY_HEAD_IP="10.0.0.1"))
    assert res.returncode != 0 and "configs/no-such.yaml" in res.stderr
    assert not any(" start " in line for line in fake_log(fake_bin))


def test_sbatch_forwards_sigterm_to_the_pipeline_then_stops_ray(fake_bin):
    env = slurm_env(fake_bin, CONFIG="configs/ppo.yaml", FAKE_RLHF="hang", RAY_HEAD_IP="10.0.0.1")
    proc = subprocess.Popen([str(LAUNCHERS / "slurm_ray.sbatch")], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        ready = fake_bin.parent / "rlhf.ready"
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the pipeline never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)    # what SLURM's --signal=B:TERM sends to the batch shell
        out, err = proc.communicate(timeout=30)
        leftover = _group_alive(proc.pid)
    finally:
        _kill_group(proc.pid)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    res.leftover = leftover
    assert res.returncode == 128 + signal.SIGTERM, err
    log = fake_log(fake_bin)
    assert "rlhf got TERM" in log
    first_stop = min(i for i, line in enumerate(log) if ": stop" in line)
    assert log.index("rlhf got TERM") < first_stop, "Ray was stopped before the pipeline could checkpoint"
    assert_ray_stopped_everywhere(res, log)


# ---- Ray token authentication ----------------------------------------------------------------

def no_token_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A machine with no Ray auth token: an empty HOME and no RAY_AUTH_TOKEN(_PATH)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = clean_env(HOME=str(home), **extra)
    env.pop("RAY_AUTH_TOKEN_PATH")
    return env


def recording_ray(tmp_path: Path) -> Path:
    """A fake `ray` that records its arguments and the authentication mode it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f'#!/bin/bash\necho "mode=$RAY_AUTH_MODE $*" >> {tmp_path}/ran\n')
    (bin_dir / "ray").chmod(0o755)
    return bin_dir


def test_head_makes_a_private_token_once_and_never_prints_it(tmp_path):
    bin_dir = recording_ray(tmp_path)
    env = no_token_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    first = run("ray_head.sh", env=env)
    assert first.returncode == 0, first.stderr
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token not in first.stdout + first.stderr and str(token_file) in first.stderr
    assert (tmp_path / "ran").read_text().startswith("mode=token start --head")
    again = run("ray_head.sh", env=env)  # a second start keeps the token the workers were given
    assert again.returncode == 0 and token_file.read_text() == token


@pytest.mark.parametrize("script, args", [("ray_worker.sh", ("10.0.0.1:6379",)), ("submit.sh", ("sft",))])
def test_a_node_without_the_token_stops_before_running_anything_and_says_where_it_goes(tmp_path, script, args):
    bin_dir = recording_ray(tmp_path)
    res = run(script, *args, env=no_token_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert res.returncode != 0
    assert "auth_token" in res.stderr and "RAY_AUTH_TOKEN_PATH" in res.stderr
    assert not (tmp_path / "ran").exists()


def test_a_worker_with_the_token_joins_in_token_mode(tmp_path):
    bin_dir = recording_ray(tmp_path)
    res = run("ray_worker.sh", "10.0.0.1:6379", env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ran").read_text().startswith("mode=token start --address 10.0.0.1:6379")
    assert TOKEN_FILE.read_text() not in res.stdout + res.stderr


def test_auth_can_be_turned_off_with_a_warning_but_not_mistyped(tmp_path):
    off = run("ray_worker.sh", "10.0.0.1:6379", env=no_token_env(tmp_path, DRY_RUN="1", RAY_AUTH_MODE="disabled"))
    assert off.returncode == 0 and "warning" in off.stderr
    typo = run("ray_head.sh", env=clean_env(DRY_RUN="1", RAY_AUTH_MODE="tokens"))
    assert typo.returncode != 0 and "RAY_AUTH_MODE" in typo.stderr


# ---- the allocation: resources.* from SLURM or the cluster ---------------------------------

def _pipeline_args(cmds: list[list[str]]) -> list[str]:
    [pipeline] = [c for c in cmds if has(c, "rlhf", "pipeline")]
    return after(pipeline, "ray.address=auto")


@pytest.mark.parametrize("extra, expected", [
    ({}, fit(3, 4, 1)),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, fit(3, 8, 1)),
    ({"SLURM_GPUS_PER_NODE": "8", "WORKERS_PER_NODE": "4"}, fit(3, 4, 2)),
    ({"RAY_NUM_GPUS": "0", "SLURM_GPUS_PER_NODE": ""}, fit(3, None, 0)),
    ({"RAY_NUM_GPUS": "0", "SLURM_GPUS_PER_NODE": "", "WORKERS_PER_NODE": "2"}, fit(3, 2, 0)),
    ({"SLURM_GPUS_PER_NODE": ""}, fit(3, None, None)),   # GPUs unknown: Ray counts them
    ({"FIT_ALLOCATION": "0"}, []),
])
def test_sbatch_sizes_every_stage_to_the_allocation_before_the_callers_arguments(fake_bin, extra, expected):
    assert _pipeline_args(sbatch_dry(fake_bin, "ppo.resources.num_nodes=1", **extra)) == \
        [*expected, "ppo.resources.num_nodes=1"]


def test_sbatch_refuses_workers_that_do_not_split_the_gpus(fake_bin):
    res = run("slurm_ray.sbatch", env=slurm_env(fake_bin, DRY_RUN="1", WORKERS_PER_NODE="3"))
    assert res.returncode != 0 and not commands(res.stdout)
    assert "WORKERS_PER_NODE=3" in res.stderr and "4 GPUs" in res.stderr


@pytest.mark.parametrize("env, expected", [
    ({"NUM_NODES": "2", "GPUS_PER_NODE": "8"}, fit(2, 8, 1, sections=("",))),
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"}, fit(4, 8, 1, sections=("",))),
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_PER_NODE": "a100:4", "NUM_NODES": "2", "GPUS_PER_NODE": "2"},
     fit(2, 2, 1, sections=("",))),
    ({"NUM_NODES": "2", "GPUS_PER_NODE": "8", "FIT_ALLOCATION": "0"}, []),
])
def test_submit_sizes_the_stage_to_the_allocation_before_the_callers_arguments(env, expected):
    _, entrypoint, _ = submitted("ppo", "--config", "configs/ppo.yaml", **env)
    assert entrypoint[:2 + len(expected)] == ["rlhf", "ppo", *expected]
    assert entrypoint[2 + len(expected):4 + len(expected)] == ["--config", "configs/ppo.yaml"]


def test_submit_pipeline_sizes_every_stage():
    _, entrypoint, _ = submitted("pipeline", NUM_NODES="2", GPUS_PER_NODE="8")
    assert entrypoint[2:-1] == fit(2, 8, 1)


def _fake_ray_listing(tmp_path: Path, listing: str) -> dict[str, str]:
    """An environment whose `ray list nodes` prints LISTING and whose `ray job submit` records its words."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        if [[ "$1 $2" == "list nodes" ]]; then cat <<'JSON'
        {listing}
        JSON
        else printf '%s\\n' "$@" > {tmp_path}/submitted; fi
        """))
    (bin_dir / "ray").chmod(0o755)
    import sys
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, PYTHONPATH=str(REPO))


def test_submit_asks_the_cluster_for_its_nodes_and_gpus(tmp_path):
    nodes = [{"state": "ALIVE", "is_head_node": True, "resources_total": {"CPU": 8.0}},
             {"state": "ALIVE", "resources_total": {"CPU": 64.0, "GPU": 8.0}},
             {"state": "ALIVE", "resources_total": {"CPU": 64.0, "GPU": 8.0}},
             {"state": "DEAD", "resources_total": {"CPU": 64.0, "GPU": 8.0}}]
    res = run("submit.sh", "sft", "train.lr=1e-5", env=_fake_ray_listing(tmp_path, json.dumps(nodes)))
    assert res.returncode == 0, res.stderr
    words = (tmp_path / "submitted").read_text().splitlines()
    assert after(words, "--", "rlhf", "sft")[:4] == [*fit(2, 8, 1, sections=("",)), "train.lr=1e-5"]


def test_submit_goes_on_with_the_configs_resources_when_the_cluster_cannot_tell(tmp_path):
    res = run("submit.sh", "sft", "train.lr=1e-5", env=_fake_ray_listing(tmp_path, "not json"))
    assert res.returncode == 0, res.stderr
    assert "NUM_NODES" in res.stderr   # the warning says how to size it by hand
    words = (tmp_path / "submitted").read_text().splitlines()
    assert after(words, "--", "rlhf", "sft")[0] == "train.lr=1e-5"


@pytest.mark.parametrize("nodes, expected", [
    ([{"state": "ALIVE", "resources_total": {"CPU": 2.0}}] * 3, (3, 0)),
    ([{"state": "ALIVE", "resources_total": {"GPU": 8.0}}, {"state": "ALIVE", "resources_total": {"GPU": 4.0}}], (2, 4)),
    ([{"state": "ALIVE", "resources_total": {"CPU": 8.0}}, {"state": "ALIVE", "resources_total": {"GPU": 8.0}}], (1, 8)),
    ([{"state": "DEAD", "resources_total": {"GPU": 8.0}}, {"state": "ALIVE", "resources_total": {"CPU": 4.0}}], (1, 0)),
])
def test_cluster_allocation_counts_alive_gpu_nodes_and_their_smallest_gpu_count(nodes, expected):
    from rlhf.ray.allocation import cluster_allocation

    assert cluster_allocation(nodes) == expected


def test_cluster_allocation_without_alive_nodes_is_an_error():
    from rlhf.ray.allocation import cluster_allocation

    with pytest.raises(ValueError, match="no alive node"):
        cluster_allocation([{"state": "DEAD", "resources_total": {"GPU": 8.0}}])


def test_every_launcher_renders_a_two_node_allocation(tmp_path, fake_bin):
    """A fake allocation of 2 nodes x 8 GPUs (10.0.0.1 and 10.0.0.2), as each launcher sees it:
    the head, the worker that joins it, the SLURM job, a Ray job submitted to it, and DeepSpeed
    over SSH. Every command names the same head address and GPU count, and the training
    processes come to 2 x 8."""
    [head] = [c for c in dry("ray_head.sh", RAY_HEAD_IP="10.0.0.1", RAY_NUM_GPUS="8") if has(c, "ray", "start")]
    assert opt(head, "--node-ip-address") == "10.0.0.1" and opt(head, "--num-gpus") == "8"
    [worker] = [c for c in dry("ray_worker.sh", "10.0.0.1:6379", RAY_NODE_IP="10.0.0.2", RAY_NUM_GPUS="8")
                if has(c, "ray", "start")]
    assert opt(worker, "--address") == "10.0.0.1:6379" and opt(worker, "--node-ip-address") == "10.0.0.2"
    assert opt(worker, "--num-gpus") == "8"

    (fake_bin / "scontrol").write_text("#!/bin/bash\nprintf '%s\\n' node1 node2\n")
    job = sbatch_dry(fake_bin, RAY_HEAD_IP="10.0.0.1", SLURM_GPUS_PER_NODE="8", SLURM_JOB_NODELIST="node[1-2]")
    starts = [c for c in job if has(c, "ray", "start")]
    assert [srun_node(c) for c in starts] == ["node1", "node2"]
    assert all(opt(after(c, "ray", "start"), "--num-gpus") == "8" for c in starts)
    assert opt(after(starts[1], "ray", "start"), "--address") == "10.0.0.1:6379"
    assert _pipeline_args(job) == fit(2, 8, 1)

    _, entrypoint, _ = submitted("ppo", NUM_NODES="2", GPUS_PER_NODE="8")
    assert entrypoint[2:5] == fit(2, 8, 1, sections=("",))

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.0.0.1 slots=8\n10.0.0.2 slots=8\n")
    [ds] = dry("deepspeed_multinode.sh", "sft", HOSTFILE=str(hostfile), MASTER_ADDR="10.0.0.1", NUM_NODES="2")
    assert opt(ds, "--hostfile") == str(hostfile) and opt(ds, "--master_addr") == "10.0.0.1"
    assert opt(ds, "--num_nodes") == "2"
