"""Start or join Ray for a run.

With no address a private local Ray starts with the dashboard off, its node address set to
127.0.0.1 and Ray's token authentication on (Ray 2.60's default). Ray's internal services
may still listen on every interface whatever the node address (BENCHMARKS.md, 'Measurements
behind the code'): run on a trusted network, or in a loopback-only network namespace as the
tests do. `auto`, `HOST:PORT` and `ray://HOST:PORT` join a running cluster
(launchers/ray_head.sh starts one).

The workers get the driver's environment settings that shape a run (HF caches and offline
flags, W&B mode and directory, NCCL/GLOO interface choices), never its secrets.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from rlhf.config_sections import RayConfig

FORWARDED_PREFIXES = ("HF_", "NCCL_", "GLOO_", "TORCH_", "VLLM_")
FORWARDED_NAMES = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "TRANSFORMERS_OFFLINE",
                   "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED",
                   "RLHF_TUNE_HOST_MEMORY", "RLHF_CPU_MATMUL",  # kernel overrides (config.yaml records them)
                   "RLHF_CPU_BF16")  # the bf16 probe's override (rlhf/distributed/precision.py)
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
LAST_LINES_WAIT_S = 1.5
"""Seconds the driver waits before shutting Ray down, for the workers' last lines."""
EXCLUDES = [".git", ".venv", "runs", "wandb", "*.safetensors", "*.pt", "__pycache__"]


def forwarded_env(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The driver variables every worker should see, plus `ray.env_vars`; secrets stay behind."""
    chosen = {k: v for k, v in environ.items()
              if (k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES))
              and not any(word in k.upper() for word in SECRET_WORDS)}
    chosen.update(extra)
    return chosen


def runtime_env(cfg: RayConfig, environ: Mapping[str, str] | None = None, code_dirs: Sequence[str] = (),
                probe_shape: Any = None) -> dict:
    """`code_dirs`: package directories shipped to a joined cluster besides `rlhf` itself (the
    stage registry's, which the caller knows). `probe_shape`: the model the driver's bf16
    probe timed (precision.probe_shape of the stage config)."""
    environ = os.environ if environ is None else environ
    env = {"env_vars": forwarded_env(environ, cfg.env_vars)}
    if not cfg.address and "RLHF_CPU_BF16" not in env["env_vars"]:
        # A local Ray's workers share this CPU: they take the driver's bf16 decision, which its
        # config validation used (rollout.reuse_logprobs), instead of timing their own.
        from rlhf.distributed.precision import cpu_bf16_probe

        env["env_vars"]["RLHF_CPU_BF16"] = "1" if cpu_bf16_probe(environ, probe_shape).bf16 else "0"
    if cfg.working_dir:
        env["working_dir"] = str(Path(cfg.working_dir).resolve())
        env["excludes"] = list(EXCLUDES)
    elif cfg.address:
        # A joined cluster may run other code versions: ship ours (small; no data, no weights).
        import rlhf

        env["py_modules"] = [str(Path(rlhf.__file__).parent), *map(str, code_dirs)]
    return env


def join_auth_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """RAY_AUTH_MODE=token for a driver that joins a cluster with a token at hand and no mode
    set: a head started by launchers/ray_head.sh (or any Ray 2.60 head) checks tokens, and a
    driver in Ray's default mode ('disabled') is refused. Ray reads the mode when it is
    imported, so this must run first. The token stays where it is
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): Ray reads it, nothing here
    copies or logs it."""
    environ = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in environ:
        return {}
    default_file = Path(environ.get("HOME", "~")).expanduser() / ".ray" / "auth_token"
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH") or default_file.is_file():
        return {"RAY_AUTH_MODE": "token"}
    return {}


@contextmanager
def ray_session(cfg: RayConfig, code_dirs: Sequence[str] = (), probe_shape: Any = None,
                verbose: bool = False) -> Iterator[None]:
    """Ray initialised for the block (reused when the caller already started it); `probe_shape`
    as for `runtime_env`. Ray's own start-up lines and worker prefixes only with `verbose`
    (logging.verbose; rlhf/logging/quiet.py)."""
    from rlhf.logging.quiet import quiet_ray

    quiet_kwargs = quiet_ray(verbose)  # before Ray is imported: it reads the prefix setting then
    # Ray reads its authentication mode once, when imported: set only before that (a process
    # that imported Ray already, such as one running a local test cluster, keeps its mode).
    if cfg.address and "ray" not in sys.modules:
        os.environ.update(join_auth_env())
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"namespace": cfg.namespace, "runtime_env": runtime_env(cfg, code_dirs=code_dirs, probe_shape=probe_shape),
                    "log_to_driver": True, **quiet_kwargs}
    if cfg.address:
        kwargs["address"] = cfg.address
    else:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                      _node_ip_address="127.0.0.1")
    ray.init(**kwargs)
    from rlhf.training.stop import stop_on_signals

    try:
        # ray.init installs its own SIGTERM handler (exit at once); ours goes back on top so a
        # SIGTERM is relayed to the workers, which checkpoint first.
        with stop_on_signals():
            yield
    finally:
        # Ray forwards the workers' output from their log files every 0.1 s or so, and a
        # shutdown drops what has not arrived: a stage's last lines (its "done" summary) with it.
        time.sleep(LAST_LINES_WAIT_S)
        ray.shutdown()
