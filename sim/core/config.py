"""One frozen, typed experiment config: TOML presets plus ``--set key=value`` overrides.

Keys are flat and kebab-case (``num-clients``, ``local-steps``), as in Flower's run
config; underscores are accepted too. Unknown keys and bad values fail before any work
starts, naming the key and what is allowed.

The trust boundary starts here. Every key is either **public** (what the server may
know: the recipe, the models, the schemes, the defenses and their parameters, the public
seeds) or **client-side** (:data:`CLIENT_KEYS`: what only the clients know: ``data-seed``,
which draws their private data, and ``client-seed``, the seed of every client's private
randomness). :class:`PublicConfig` holds the public keys only; :class:`ExperimentConfig`
adds the client-side ones. A run folder keeps them apart (``config.toml`` public,
``clients.toml`` client-side; :mod:`sim.engine.clientside` is the only reader of the
second), and the server's view of a run is built from a :class:`PublicConfig`, which has
no attribute that names a client secret.

Component names (schemes, defenses, attacks) are checked against their registries one
layer up (:func:`sim.engine.context.check_components`); this module checks types and ranges.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from sim.core.components import parse_bool
from sim.core.data import DATASET_NAMES, NUM_LFW_FACES
from sim.core.feature_net import WEIGHTS_FILE
from sim.core.local_data import CONDITION_KINDS, check_local_config
from sim.core.models import get_preset

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
DEFAULT_KEEP_FOR_ATTACKS = 4  # round trips kept per scheme when attacks are listed and keep-messages is 0
FRESH = -1  # client-seed: draw a fresh one at run start (kept client-side in clients.toml)
CLIENT_KEYS = ("data-seed", "client-seed")  # client-side: never in config.toml, the run config or the server's view


@dataclass(frozen=True)
class PublicConfig:
    """The public part of a run's configuration: what the server may know (README's config table)."""

    experiment: str = "compare"
    model: str = "tiny"                      # model preset: tiny | sd15
    base_model: str = ""                     # folder of base weights ("" = the committed tiny base)
    schemes: tuple[str, ...] = ("fedavg", "vanilla", "nograd")
    dataset: str = "fill50k"                 # fill50k | faces | a local folder (save_to_disk or imagefolder)
    image_column: str = "image"              # local dataset: target image column (diffusers' train_controlnet default)
    conditioning_image_column: str = "conditioning_image"  # local dataset: condition image column
    caption_column: str = "text"             # local dataset: prompt column
    resolution: int = 0                      # image side in px (resize + centre crop); 0 = the model's own size
    partition_by: str = ""                   # dirichlet: the label column ("" = fg for fill50k)
    condition_kind: str = "auto"             # auto | outline | canny | none: how condition fidelity is re-extracted
    num_samples: int = 2000                  # private training samples, split over the clients
    max_radius: float = 0.25                 # fill50k: largest circle radius / image size (base: 0.35)
    eval_seed: int = 1                       # public held-out eval set and the server's auxiliary data
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
    average_from: float = 1.0                # released weights: the mean at every turn's (round's) end from this fraction of training on (1 = the last weights)
    eval_samples: int = 128                  # held-out conditions sampled per model (paired across models)
    ddim_steps: int = 25
    guidance: float = 20.0                   # classifier-free guidance of the prompt at evaluation
    uncond_control: bool = False             # also apply the ControlNet in guidance's unconditional branch
    control_guidance: float = 7.5            # guidance of the control (= guidance: it rides on the prompt's)
    control_from: int = 0                    # sampling applies the control only at timesteps t >= this
    control_boost: float = 1.0               # the control's guidance x this at the high-noise sampling steps (1 = off)
    control_boost_above: int = 800           # ... those with t > this, where the layout is decided
    release_check: int = 0                   # public aux conditions the server samples to withhold a ControlNet no better than none (0 = off)
    seed: int = 0                            # public: ControlNet init, the clients' batch/t/noise streams, sampling
    threads: int = 1                         # torch threads per job (results are deterministic per value)
    jobs: int = 4                            # worker processes: the schemes and the no-control baseline in parallel
    baseline: bool = True                    # also sample the base model without control (the reference row)
    defenses: tuple[str, ...] = ()           # defense specs or bundles, e.g. ["pp-protected"], ["noise:std=0.5"]
    message_timeout: float = 3600.0          # seconds the server waits for one client's reply (0 = no limit)
    min_reply_fraction: float = 1.0          # fedavg: fewest of a round's clients whose replies are aggregated
    on_client_failure: str = "stop"          # split schemes: stop | skip (the failed client's turn ends, recorded)
    keep_messages: int = 0                   # round trips per scheme whose payloads are saved (seen_<scheme>.pt) for attacks
    keep_from: str = "start"                 # start | end: keep the first or the last keep-messages round trips
    attacks: tuple[str, ...] = ()            # attacks run on the saved round trips after training (keep-messages >= 4 then)
    inception_weights: str = ""              # local TorchScript Inception file -> fid_inception ("" = off)
    clip_weights: str = ""                   # local Hugging Face CLIP folder -> clip_score ("" = off)
    feature_net: str = ""                    # FID (project features) weights from `splitcontrol feature-net` ("" = committed)

    # ---------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # inf and nan pass every range check below, so refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{_kebab(f.name)} must be a finite number, got {v}")
        choices = {"model": ("tiny", "sd15"), "partition": ("iid", "dirichlet"), "condition_kind": CONDITION_KINDS,
                   "keep_from": ("start", "end"), "on_client_failure": ("stop", "skip")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_kebab(key)}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        if not self.schemes or len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes={list(self.schemes)} is not allowed; choose a non-empty list without repeats")
        for key in ("num_samples", "num_clients", "steps", "batch_size", "local_steps", "eval_samples",
                    "ddim_steps", "threads", "jobs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{_kebab(key)} must be >= 1, got {getattr(self, key)}")
        if not 0.15 < self.max_radius <= 0.5:
            raise ValueError(f"max-radius must be in (0.15, 0.5], got {self.max_radius}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"prompt-dropout must be in [0, 1], got {self.prompt_dropout}")
        if not 0 <= self.average_from <= 1:
            raise ValueError(f"average-from must be a fraction of the run in [0, 1] (1 = the last weights), got {self.average_from}")
        if self.high_noise_weight < 1:
            raise ValueError(f"high-noise-weight must be >= 1 (1 = plain epsilon loss), got {self.high_noise_weight}")
        for key, meaning in (("control_guidance", ""), ("control_from", " (a timestep; 0 = every sampling step)"),
                             ("control_boost", " (1 = off)"), ("control_boost_above", " (a timestep)"),
                             ("release_check", " (public conditions sampled; 0 = off)")):
            if getattr(self, key) < 0:
                raise ValueError(f"{_kebab(key)} must be >= 0{meaning}, got {getattr(self, key)}")
        if self.control_boost != 1 and self.uncond_control:
            raise ValueError("control-boost weighs the control's own guidance, which uncond-control=true does not use; "
                             "set one of them back (control-boost=1 or uncond-control=false)")
        for key in ("lr", "dirichlet_alpha", "guidance"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{_kebab(key)} must be > 0, got {getattr(self, key)}")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0 (0 = the model's own image size), got {self.resolution}")
        get_preset(self.model).at_resolution(self.resolution)  # a size the model samples at, or an error naming both
        if self.dataset not in DATASET_NAMES:  # a local folder: resolved, its layout and columns checked now
            object.__setattr__(self, "dataset", check_local_config(self))
        elif self.partition_by and (self.dataset == "faces" or self.partition_by not in ("fg", "bg")):
            raise ValueError(f"partition-by={self.partition_by!r} is not a label of dataset={self.dataset!r}; "
                             + ("fill50k has 'fg' and 'bg'" if self.dataset == "fill50k" else "faces has none"))
        if self.dataset == "faces":
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
        if self.feature_net:  # resolved now, so a Flower app in another folder reads the same file
            path = Path(self.feature_net).expanduser()
            if not (path.is_file() or (path / WEIGHTS_FILE).is_file()):
                raise ValueError(f"feature-net={self.feature_net!r}: no {WEIGHTS_FILE} there; train one with "
                                 "`splitcontrol feature-net --set dataset=PATH --out FOLDER` (\"\" = the committed weights)")
            object.__setattr__(self, "feature_net", str(path.resolve()))
        if not 0 < self.min_reply_fraction <= 1:
            raise ValueError(f"min-reply-fraction must be in (0, 1], got {self.min_reply_fraction}")
        if self.message_timeout < 0:
            raise ValueError(f"message-timeout must be >= 0 (0 = no limit), got {self.message_timeout}")
        if self.keep_messages < 0:
            raise ValueError(f"keep-messages must be >= 0, got {self.keep_messages}")
        if self.attacks and self.keep_messages == 0:
            object.__setattr__(self, "keep_messages", DEFAULT_KEEP_FOR_ATTACKS)
        if self.num_clients > self.num_samples:
            raise ValueError(f"num-clients={self.num_clients} is larger than num-samples={self.num_samples}")

    def to_toml(self) -> str:
        """The keys of this object as TOML (a :class:`PublicConfig`: the public keys only)."""
        return "".join(f"{_kebab(f.name)} = {_toml_value(getattr(self, f.name))}\n"
                       for f in dataclasses.fields(self))


@dataclass(frozen=True)
class ExperimentConfig(PublicConfig):
    """Everything a run depends on: the public keys plus the client-side ones (:data:`CLIENT_KEYS`).

    Only the runner that provisions the clients, the clients themselves and the scorer hold
    one; the server gets :meth:`public`."""

    data_seed: int = 1                       # client-side: the clients' private data (the base model: seed 1000)
    client_seed: int = FRESH                 # client-side: every client's private randomness (-1: drawn fresh)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.client_seed < FRESH:
            raise ValueError(f"client-seed must be >= 0, or {FRESH} to draw a fresh one; got {self.client_seed}")

    @classmethod
    def from_public(cls, public: PublicConfig, **client_side) -> "ExperimentConfig":
        """The whole configuration from its public part and client-side field values."""
        return cls(**{f.name: getattr(public, f.name) for f in dataclasses.fields(PublicConfig)}, **client_side)

    def public(self) -> PublicConfig:
        """The public part: what config.toml, the Flower run config and the server's view hold."""
        return PublicConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PublicConfig)})

    def client_side(self) -> dict[str, int]:
        """The client-side keys (kebab-case), as clients.toml and a SuperNode's node config hold them."""
        return {k: getattr(self, k.replace("-", "_")) for k in CLIENT_KEYS}

    def client_toml(self) -> str:
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.client_side().items())

    def with_client_seed(self, seed: int) -> "ExperimentConfig":
        return dataclasses.replace(self, client_seed=int(seed))


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


def _read_values(path: Path, overrides: typing.Iterable[str] = ()) -> dict:
    """Typed field values from a TOML file and ``key=value`` overrides (unknown keys fail naming the file)."""
    try:
        loaded = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    values = {}
    for key, value in loaded.items():
        name = _field_name(key)
        values[name] = _coerce(name, value)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        name = _field_name(key)
        values[name] = _coerce(name, value.strip())
    return values


def _client_side(names) -> list[str]:
    return [_kebab(n) for n in names if _kebab(n) in CLIENT_KEYS]


def load_config(preset: str = "default", overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load ``preset`` (a name in sim/presets or a path to a TOML file), then apply ``key=value`` overrides.

    A preset may pin the client-side keys (so its numbers reproduce); the result holds both
    parts, and only the runner that provisions the clients should hold it."""
    path = Path(preset)
    if not path.suffix == ".toml":
        path = PRESET_DIR / f"{preset}.toml"
    if not path.exists():
        raise ValueError(f"unknown preset {preset!r}; choose one of {list_presets()} or give a .toml path")
    return ExperimentConfig(**_read_values(path, overrides))


# Keys added after runs were written without them, whose default is not the behaviour those
# runs had: a run's config.toml that lacks the key was made with this value.
BEHAVIOUR_BEFORE_KEY = {"fedavg-keep-optimizer": "false"}  # FedAvg clients were stateless before the key


def public_values(run_dir: str | Path, overrides: typing.Iterable[str] = ()) -> dict:
    """The public field values of a finished run (its ``config.toml``), then ``overrides``.

    Keys missing from an older run's file take the behaviour the run had
    (:data:`BEHAVIOUR_BEFORE_KEY`), not today's default. A client-side key in config.toml
    or in ``overrides`` fails: the public file never holds one."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.toml: is it a results folder of `splitcontrol compare`?")
    try:
        present = set(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    legacy = [f"{k}={v}" for k, v in BEHAVIOUR_BEFORE_KEY.items() if k not in present]
    values = _read_values(path, legacy + list(overrides))
    leaked = _client_side(values)
    if leaked:
        raise ValueError(f"{path} (or the overrides) names the client-side key(s) {leaked}; they belong in "
                         "clients.toml, never in the public config")
    return values


def load_public_config(run_dir: str | Path, overrides: typing.Iterable[str] = ()) -> PublicConfig:
    """The public configuration of a finished run: what the server knew (config.toml only)."""
    return PublicConfig(**public_values(run_dir, overrides))


# ----------------------------------------------------------------------------- Flower run config
def to_run_config(cfg: PublicConfig) -> dict[str, bool | int | float | str]:
    """The public config as a Flower run config: kebab-case keys, scalar values (lists as TOML list
    strings, since defense specs may contain commas). Client-side keys never enter it."""
    if isinstance(cfg, ExperimentConfig):
        cfg = cfg.public()
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        # single-quoted TOML literal strings: the value must itself fit in a double-quoted string
        # (`flwr run --run-config 'schemes="[...]"'`)
        out[_kebab(f.name)] = "[" + ", ".join(f"'{x}'" for x in v) + "]" if isinstance(v, tuple) else v
    return out


def from_run_config(run_config: typing.Mapping) -> PublicConfig:
    """A :class:`PublicConfig` from a Flower run config (as ``flwr run`` or the in-process grid give it).

    Keys that are not config keys (Flower's own, e.g. an ``out`` folder) are ignored;
    values are coerced and validated as ``--set`` overrides are. A client-side key fails:
    under Flower's engines those travel in each SuperNode's node config, never here.
    """
    leaked = _client_side(k.strip().replace("-", "_") for k in run_config)
    if leaked:
        raise ValueError(f"the run config names the client-side key(s) {leaked}: the ServerApp would see them. "
                         "Give them in each SuperNode's node config (--node-config \"data-seed=... client-seed=...\")")
    values = {}
    for key, value in run_config.items():
        name = key.strip().replace("-", "_")
        if name in _FIELDS:
            values[name] = _coerce(name, value)
    return PublicConfig(**values)
