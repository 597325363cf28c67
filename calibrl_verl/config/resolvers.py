"""The OmegaConf resolvers of CalibRL's configs, all registered here (``register``, run on import of
``calibrl_verl.config``).

The recipes (``recipes/*.yaml``) read their environment variables in YAML: ``${oc.env:NAME,default}`` where a string
is all that is needed (``MODEL_PATH``, ``PROJECT``, ``EXP``), and these resolvers where a value needs more:

- ``${calibrl_env_files:NAME,default,...}``: a list of files, ``TRAIN_FILES`` / ``VAL_FILES``. The variable's value
  is split at commas, spaces and Hydra-style brackets and quotes, each path made absolute against the current
  directory; unset or empty, the defaults, each taken under ``<repo>``. Absolute because verl opens the files in Ray
  workers whose working directory may differ. URLs (``hdfs://...``) are kept as they are.
- ``${calibrl_env_dir:NAME,default}``: one directory, ``OUTPUT_DIR``, made absolute the same way.
- ``${calibrl_env_int:NAME,default}``: a positive integer, ``NNODES`` / ``N_GPUS_PER_NODE``; anything else stops
  with ``NNODES='two' must be a positive integer``.
- ``${calibrl_loggers:console,tensorboard}``: the loggers, plus ``wandb`` when wandb can log: ``WANDB_API_KEY`` is
  set, or ``wandb login`` stored a key for api.wandb.ai in the netrc file (``$NETRC``, else ``~/.netrc``).
- ``${calibrl_root:}``: ``<repo>``, the folder above the recipes folder the config came from (``--config-dir``,
  which ``main_calibrl`` records with ``set_recipes_dir``); without one, the checkout this package lives in.
- ``${calibrl_rollout_n:...}``: ``actor_rollout_ref.rollout.n`` from ``calibrl.n_onpolicy`` (``calibrl_base.yaml``;
  ``calibrl_verl.config.rollout_n``).

verl's TaskRunner resolves the config again in a Ray process, where these resolvers are not registered and where
the environment may differ (another node, started by ``ray start``). So ``main_calibrl.prepare_config`` replaces
every value that uses one of them, or ``oc.env``, by its resolved value on the driver (``resolve_on_driver``; the
rollout size by ``set_rollout_n``): what Ray receives, and what ``--dry-run`` prints, holds plain values only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from calibrl_verl.config import CalibRLConfigError

# the checkout this package lives in: <repo>/calibrl_verl/config/resolvers.py
CHECKOUT = Path(__file__).resolve().parents[2]
WANDB_HOST = "api.wandb.ai"
_SEPARATORS = re.compile(r"[\s,\[\]\"']+")
_POSITIVE_INT = re.compile(r"[1-9][0-9]*")
_recipes_dir: Path | None = None


class EnvValueError(CalibRLConfigError):
    """An environment variable read by a recipe has a value the config cannot take; the message names both."""


def set_recipes_dir(path: str | os.PathLike[str] | None) -> None:
    """Record the recipes folder of this launch (``--config-dir``): ``<repo>`` is the folder above it.

    Not resolved through symbolic links, as the run scripts' ``cd ... && pwd`` did not: a folder of linked recipe
    files keeps its own ``<repo>``. ``None``: back to the checkout.
    """
    global _recipes_dir
    _recipes_dir = None if path is None else Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def repo_root() -> str:
    """``<repo>`` (the ``calibrl_root`` resolver): the folder above the recipes folder, else the checkout."""
    return str(_recipes_dir.parent if _recipes_dir is not None else CHECKOUT)


def current_dir() -> str:
    """The directory relative paths are taken from: where the launch started (also under ``hydra.job.chdir``)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def absolute(path: str, base: str) -> str:
    """``path`` made absolute against ``base`` (``~`` expanded); URLs (``scheme://...``) unchanged."""
    if "://" in path:
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _env(name: Any) -> str | None:
    """The variable's value, or None when it is unset or empty (the run scripts treated both alike)."""
    if not isinstance(name, str) or not name:
        raise EnvValueError(f"expected the name of an environment variable, got {name!r}")
    value = os.environ.get(name, "")
    return value if value.strip() else None


def env_files(name: str, *defaults: Any) -> list[str]:
    """``calibrl_env_files``: the files in ``$name`` (against the current directory), else ``defaults`` (under
    ``<repo>``), as absolute paths."""
    value = _env(name)
    if value is None:
        return [absolute(str(path), repo_root()) for path in defaults]
    return [absolute(path, current_dir()) for path in _SEPARATORS.split(value) if path]


def env_dir(name: str, default: Any) -> str:
    """``calibrl_env_dir``: the directory in ``$name`` (against the current directory), else ``default`` (under
    ``<repo>``), absolute."""
    value = _env(name)
    return absolute(str(default), repo_root()) if value is None else absolute(value.strip(), current_dir())


def env_int(name: str, default: Any) -> int:
    """``calibrl_env_int``: ``$name`` as a positive integer, else ``default``."""
    value = _env(name)
    if value is None:
        value = str(default)
        if not _POSITIVE_INT.fullmatch(value):
            raise EnvValueError(f"the default of {name}, {default!r}, must be a positive integer")
    elif not _POSITIVE_INT.fullmatch(value.strip()):
        raise EnvValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def wandb_logged_in() -> bool:
    """wandb can log: ``WANDB_API_KEY`` is set, or ``wandb login``'s entry for api.wandb.ai is in the netrc file."""
    if _env("WANDB_API_KEY") is not None:
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return WANDB_HOST in netrc.read_text(errors="replace")
    except OSError:
        return False


def loggers(*names: Any) -> list[str]:
    """``calibrl_loggers``: ``names``, plus ``wandb`` when wandb can log (``wandb_logged_in``)."""
    out = [str(name) for name in names]
    if "wandb" not in out and wandb_logged_in():
        out.append("wandb")
    return out


def _rollout_n(n_onpolicy: Any, experts_per_group: Any, loss_mode: Any) -> int:
    from calibrl_verl.config import rollout_n

    return rollout_n(n_onpolicy, experts_per_group, loss_mode)


RESOLVERS: dict[str, Callable[..., Any]] = {
    "calibrl_env_files": env_files,
    "calibrl_env_dir": env_dir,
    "calibrl_env_int": env_int,
    "calibrl_loggers": loggers,
    "calibrl_root": repo_root,
    "calibrl_rollout_n": _rollout_n,
}
# interpolations resolved on the driver by resolve_on_driver: those that read the environment or the file system, and
# oc.env (calibrl_rollout_n is main_calibrl.set_rollout_n's, which also checks an explicit rollout.n against it)
DRIVER_RESOLVERS = (*(name for name in RESOLVERS if name != "calibrl_rollout_n"), "oc.env")
_DRIVER_INTERPOLATION = re.compile(r"\$\{\s*(?:" + "|".join(map(re.escape, DRIVER_RESOLVERS)) + r")\s*:")


def register() -> None:
    """Register every resolver; ``replace=True``: a re-import (tests, notebooks) registers the same functions."""
    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def needs_driver(value: Any) -> bool:
    """An unresolved value that calls one of ``DRIVER_RESOLVERS`` (directly or nested)."""
    return isinstance(value, str) and bool(_DRIVER_INTERPOLATION.search(value))


def resolve_on_driver(config: DictConfig | ListConfig) -> list[str]:
    """Replace every value that calls one of ``DRIVER_RESOLVERS`` by its resolved value, in place; returns the keys.

    Other interpolations (verl's ``${oc.select:...}``, ``${trainer.project_name}``) are left for verl: those read
    the config only, and what they point at is plain now. A resolver's error is raised as ``EnvValueError`` with
    the key, e.g. ``trainer.nnodes: NNODES='two' must be a positive integer``.
    """
    done: list[str] = []
    with open_dict(config):
        _resolve(config, "", done)
    return done


def _resolve(node: DictConfig | ListConfig, prefix: str, done: list[str]) -> None:
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        full = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig) and not child._is_interpolation():
            _resolve(child, full, done)
            continue
        raw = child._value() if child is not None else None
        if not needs_driver(raw):
            continue
        try:
            value = node[key]
        except Exception as err:  # OmegaConf wraps the resolver's error; keep its own message
            message = str(err).split("\n", 1)[0]
            message = re.sub(r"^\w+ raised while resolving interpolation: ", "", message)
            raise EnvValueError(f"{full}: {message}") from err
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        node[key] = value
        done.append(full)
