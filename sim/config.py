"""One frozen, typed experiment config: TOML presets plus ``--set key=value`` overrides.

Keys are flat and kebab-case (``num-clients``, ``local-steps``), as in Flower's run
config; underscores are accepted too. Unknown keys and bad values fail before any work
starts, naming the key and what is allowed. The resolved config is saved with every
result (``config.toml``), so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_KEEP_FOR_ATTACKS = 4  # round trips kept per scheme when attacks are listed and keep-messages is 0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a ``compare`` run depends on (see the README's config table)."""

    experiment: str = "compare"
    model: str = "tiny"                      # model preset: tiny | sd15
    base_model: str = ""                     # folder of base weights ("" = the committed tiny base)
    schemes: tuple[str, ...] = ("fedavg", "vanilla", "nograd")
    dataset: str = "fill50k"                 # fill50k | faces
    num_samples: int = 2000                  # private training samples, split over the clients
    max_radius: float = 0.25                 # fill50k: largest circle radius / image size (base: 0.35)
    data_seed: int = 1                       # client data (the base model was pretrained on seed 1000)
    num_clients: int = 2
    partition: str = "iid"                   # iid | dirichlet
    dirichlet_alpha: float = 0.5
    steps: int = 1000                        # training batches per scheme, all clients together
    batch_size: int = 8
    lr: float = 1e-3                         # AdamW learning rate of the ControlNet
    prompt_dropout: float = 0.5              # fraction of training prompts replaced by "" (ControlNet paper: 0.5)
    high_noise_weight: float = 100.0         # loss weight clamp(1/SNR_t, 1, this) at high noise; 1 = plain MSE
    local_steps: int = 10                    # fedavg: local steps per round; split: steps per client turn
    fedavg_keep_optimizer: bool = True       # fedavg: each client keeps its AdamW moments between rounds (false: fresh per round)
    eval_samples: int = 32
    ddim_steps: int = 50
    guidance: float = 7.5                    # classifier-free guidance at evaluation (SD's default)
    uncond_control: bool = False             # also apply the ControlNet in guidance's unconditional branch
    seed: int = 0
    threads: int = 1                         # torch threads per job (results are deterministic per value)
    jobs: int = 4                            # worker processes: the schemes and the no-control baseline in parallel
    baseline: bool = True                    # also sample the base model without control (the reference row)
    defenses: tuple[str, ...] = ()           # defense specs or bundles, e.g. ["pp-protected"], ["noise:std=0.5"]
    keep_messages: int = 0                   # round trips per scheme whose payloads are saved (seen_<scheme>.pt) for attacks
    keep_from: str = "start"                 # start | end: keep the first or the last keep-messages round trips
    attacks: tuple[str, ...] = ()            # attacks run on the saved round trips after training (keep-messages >= 4 then)
    inception_weights: str = ""              # local TorchScript Inception file -> fid_inception ("" = off)
    clip_weights: str = ""                   # local Hugging Face CLIP folder -> clip_score ("" = off)

    # ---------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        from sim.cuts import SCHEMES

        choices = {"model": ("tiny", "sd15"), "dataset": ("fill50k", "faces"), "partition": ("iid", "dirichlet"),
                   "keep_from": ("start", "end")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_kebab(key)}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        bad = [s for s in self.schemes if s not in SCHEMES]
        if bad or not self.schemes:
            raise ValueError(f"schemes={list(self.schemes)} is not allowed; choose a non-empty subset of {list(SCHEMES)}")
        for key in ("num_samples", "num_clients", "steps", "batch_size", "local_steps", "eval_samples",
                    "ddim_steps", "threads", "jobs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{_kebab(key)} must be >= 1, got {getattr(self, key)}")
        if not 0.15 < self.max_radius <= 0.5:
            raise ValueError(f"max-radius must be in (0.15, 0.5], got {self.max_radius}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"prompt-dropout must be in [0, 1], got {self.prompt_dropout}")
        if self.high_noise_weight < 1:
            raise ValueError(f"high-noise-weight must be >= 1 (1 = plain epsilon loss), got {self.high_noise_weight}")
        for key in ("lr", "dirichlet_alpha", "guidance"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{_kebab(key)} must be > 0, got {getattr(self, key)}")
        if self.dataset == "faces":
            from sim.data import NUM_LFW_FACES

            if self.num_samples + self.eval_samples > NUM_LFW_FACES:
                raise ValueError(f"dataset='faces' has {NUM_LFW_FACES} images, split disjointly into training and "
                                 f"evaluation: num-samples={self.num_samples} + eval-samples={self.eval_samples} "
                                 f"must be <= {NUM_LFW_FACES}")
            if self.partition == "dirichlet":
                raise ValueError("partition='dirichlet' needs colour labels, which dataset='faces' does not have; "
                                 "use partition='iid'")
        for key, kind, ok in (("inception_weights", "TorchScript file", Path.is_file),
                              ("clip_weights", "Hugging Face CLIP folder", Path.is_dir)):
            path = getattr(self, key)
            if path and not ok(Path(path)):
                what = "is not a" if Path(path).exists() else "does not exist; expected a"
                raise ValueError(f"{_kebab(key)}={path!r} {what} {kind} (local weights only; nothing is downloaded)")
        if self.keep_messages < 0:
            raise ValueError(f"keep-messages must be >= 0, got {self.keep_messages}")
        if self.attacks:
            from attacks import make_attack

            for spec in self.attacks:
                make_attack(spec)  # unknown names and bad parameters fail here
            if self.keep_messages == 0:
                object.__setattr__(self, "keep_messages", DEFAULT_KEEP_FOR_ATTACKS)
        if self.defenses:
            from defenses import DefenseStack

            for scheme in self.schemes:  # fails naming the defense and why it cannot serve the scheme
                DefenseStack(self.defenses, scheme)
        if self.num_clients > self.num_samples:
            raise ValueError(f"num-clients={self.num_clients} is larger than num-samples={self.num_samples}")

    def to_toml(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            lines.append(f"{_kebab(f.name)} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
_TYPES = typing.get_type_hints(ExperimentConfig)


def _coerce(key: str, value):
    """Turn a TOML value or a ``--set`` string into the field's type, or fail naming the key."""
    typ = _TYPES[key]
    try:
        if typ is bool:
            from .components import parse_bool

            return parse_bool(value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if typ is int and isinstance(value, str):
                return int(value)
            return typ(value)
        # tuple[str, ...]
        if isinstance(value, str):
            value = tomllib.loads(f"v = {value}")["v"] if value.strip().startswith("[") else value.split(",")
        return tuple(str(x).strip() for x in value if str(x).strip())
    except (TypeError, ValueError, tomllib.TOMLDecodeError):
        raise ValueError(f"bad value {value!r} for key {_kebab(key)!r}: expected {typ}") from None


def _field_name(key: str) -> str:
    name = key.strip().replace("-", "_")
    if name not in _FIELDS:
        raise ValueError(f"unknown config key {key!r}; known keys: {sorted(_kebab(k) for k in _FIELDS)}")
    return name


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(preset: str = "default", overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load ``preset`` (a name in sim/presets or a path to a TOML file), then apply ``key=value`` overrides."""
    path = Path(preset)
    if not path.suffix == ".toml":
        path = PRESET_DIR / f"{preset}.toml"
    if not path.exists():
        raise ValueError(f"unknown preset {preset!r}; choose one of {list_presets()} or give a .toml path")
    values = {}
    for key, value in tomllib.loads(path.read_text()).items():
        name = _field_name(key)
        values[name] = _coerce(name, value)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        name = _field_name(key)
        values[name] = _coerce(name, value.strip())
    return ExperimentConfig(**values)


# Keys added after runs were written without them, whose default is not the behaviour those
# runs had: a run's config.toml that lacks the key was made with this value.
BEHAVIOUR_BEFORE_KEY = {"fedavg-keep-optimizer": "false"}  # FedAvg clients were stateless before the key


def load_run_config(run_dir: str | Path, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """The configuration a finished run was made with (its ``config.toml``), then ``overrides``.

    Unlike :func:`load_config` on a preset, keys missing from an older run's file take the
    behaviour the run had (:data:`BEHAVIOUR_BEFORE_KEY`), not today's default."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.toml: is it a results folder of `splitcontrol compare`?")
    present = set(tomllib.loads(path.read_text()))
    legacy = [f"{k}={v}" for k, v in BEHAVIOUR_BEFORE_KEY.items() if k not in present]
    return load_config(str(path), legacy + list(overrides))


# ----------------------------------------------------------------------------- Flower run config
def to_run_config(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """The config as a Flower run config: kebab-case keys, scalar values (lists as TOML list strings,
    since defense specs may contain commas)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        # single-quoted TOML literal strings: the value must itself fit in a double-quoted string
        # (`flwr run --run-config 'schemes="[...]"'`)
        out[_kebab(f.name)] = "[" + ", ".join(f"'{x}'" for x in v) + "]" if isinstance(v, tuple) else v
    return out


def from_run_config(run_config: typing.Mapping) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a Flower run config (as ``flwr run`` or the in-process grid give it).

    Keys that are not config keys (Flower's own, e.g. an ``out`` folder) are ignored;
    values are coerced and validated as ``--set`` overrides are.
    """
    values = {}
    for key, value in run_config.items():
        name = key.strip().replace("-", "_")
        if name in _FIELDS:
            values[name] = _coerce(name, value)
    return ExperimentConfig(**values)
