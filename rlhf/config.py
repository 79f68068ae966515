"""Stage configs: typed dataclasses loaded from YAML files plus dotted `key=value` overrides.

Loading goes schema <- file(s) <- overrides, one layer at a time, so an error says which
file (and line) or which override is wrong. Unknown keys and wrong types are errors that
name the key and list the valid ones. `validate()` then checks cross-field rules.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rlhf.config_sections import (
    DataSourceConfig,
    LoggingConfig,
    ModelConfig,
    StrategyConfig,
    TrainConfig,
    _choice,
)
from rlhf.errors import ConfigError

T = TypeVar("T")


@dataclass
class SFTDataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out set; when its path is empty, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.05
    max_length: int = 512
    """Tokens per sequence (prompt + response) after the chat template."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens (the question is usually at the end)."""
    packing: bool = False
    """Pack several examples into each max_length row (attention does not cross examples)."""
    all_assistant_turns: bool = True
    """Train on every assistant turn of a multi-turn conversation, not only the last one."""
    on_error: str = "raise"
    """raise: stop at the first malformed row; skip: skip and count malformed rows."""

    def validate(self) -> None:
        if not self.train.given:
            raise ConfigError("data.train.path is required")
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("data.eval_fraction must be in [0, 1)")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be > 0 and below "
                f"data.max_length={self.max_length}, so every response keeps some tokens"
            )


@dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token loss on response tokens only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/sft"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ and the exported model/."""
    seed: int = 42

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.strategy, self.logging):
            section.validate()


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig}


# ---------------------------------------------------------------------------------------
# Loading


def _yaml_line(path: str, dotted_key: str) -> int | None:
    """Line (1-based) of `dotted_key` in a YAML file, so errors can point at it."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except Exception:
        return None
    line = None
    for part in dotted_key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def _valid_keys(schema: DictConfig, dotted_key: str) -> list[str]:
    parent = dotted_key.rsplit(".", 1)[0] if "." in dotted_key else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    if isinstance(node, DictConfig):
        return sorted(str(k) for k in node.keys())
    return []


def _explain(exc: OmegaConfBaseException, schema: DictConfig, origin: str, path: str | None) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    where = origin
    if path and key:
        line = _yaml_line(path, key)
        if line:
            where = f"{path}:{line}"
    if isinstance(exc, ConfigKeyError):
        valid = _valid_keys(schema, key)
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return ConfigError(f"{where}: unknown key '{key}'; valid keys in {section}: {', '.join(valid)}")
    message = str(exc).splitlines()[0]
    return ConfigError(f"{where}: key '{key}': {message}")


def load_config(cls: type[T], config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> T:
    """Build a `cls` from YAML files (later ones win) and dotted overrides, then validate it."""
    schema = OmegaConf.structured(cls)
    merged = schema
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            layer = OmegaConf.load(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, path, path) from None
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key=value (e.g. train.lr=1e-5)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"override '{override}'", None) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "config", None) from None
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML next to an output (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default and documentation (for --help)."""
    lines = []
    docs = field_docs(cls)
    instance = cls()
    for item in dataclasses.fields(cls):
        value = getattr(instance, item.name)
        name = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), name + "."))
            continue
        doc = docs.get(item.name, "")
        lines.append(f"  {name} = {value!r}" + (f"  # {doc}" if doc else ""))
    return lines
