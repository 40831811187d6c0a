"""Run configuration: one pydantic tree parsed once from Flower's flat run config.

The defaults live here and only here: pyproject.toml's ``[tool.flwr.app.config]`` (what
``flwr run`` starts from) is :func:`defaults_table`, and a test fails when the two differ.
They are the CPU default run; ``conf/paper-fmnist.toml`` sets every key where the paper differs.

Flower hands every app a flat mapping of dotted, kebab-case keys (``train.local-epochs``).
We unflatten it and validate it here, so a bad value stops the run before any training,
with one line that names the key, the value and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        frozen=True,
        strict=True,  # Flower passes typed TOML values: "3" or true is not a round count
        allow_inf_nan=False,
    )


class ModelConfig(_Section):
    """UNet size. ``dim`` = image side reproduces the paper's model."""

    dim: int = Field(16, ge=4, le=512)  # the paper: 28 (= image side), conf/paper-fmnist.toml
    dim_mults: str = "1,2,4"

    @field_validator("dim_mults")
    @classmethod
    def _check_mults(cls, value: str) -> str:
        try:
            mults = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("must be comma-separated positive integers, e.g. '1,2,4'") from None
        if not mults or any(m < 1 for m in mults):
            raise ValueError("must be comma-separated positive integers, e.g. '1,2,4'")
        return ",".join(str(m) for m in mults)

    @property
    def mults(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.dim_mults.split(","))


class DiffusionConfig(_Section):
    """Noise schedule and loss; the authors' defaults."""

    timesteps: int = Field(1000, ge=2, le=10000)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    loss: Literal["huber", "mse"] = "huber"
    clip_sample: bool = True  # the authors' sampler does not clip x0 (conf/paper-fmnist.toml)
    # Min-SNR-γ loss weighting (Hang et al. 2023): each image's loss times min(SNR(t), γ) / SNR(t),
    # so the many easy low-noise timesteps stop dominating the gradient. 0: unweighted, as the paper.
    min_snr_gamma: float = Field(5.0, ge=0)


class DataConfig(_Section):
    """Which images, and how they are split over clients."""

    name: Literal["fashion-mnist", "cifar10", "celeba", "folder"] = "fashion-mnist"
    root: str = ""
    download: bool = True
    image_size: int = Field(0, ge=0, le=1024)
    max_train_examples: int = Field(10000, ge=0)  # 0: the whole split, as the paper
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    partitioner: Literal["iid", "label-skew", "quantity-skew", "pathological"] = "iid"
    alpha: float = Field(0.5, gt=0)
    min_partition_size: int = Field(10, ge=1)
    classes_per_client: int = Field(2, ge=1)
    num_partitions: int = Field(0, ge=0)
    cache: bool = True  # keep each client's decoded share on disk (deployed nodes restart per message)


class TrainConfig(_Section):
    """Federated and local training."""

    rounds: int = Field(5, ge=1)  # the paper: 15
    local_epochs: int = Field(1, ge=1)  # the paper: 5
    batch_size: int = Field(16, ge=1)  # the paper: 128
    lr: float = Field(2e-3, gt=0, le=1)  # the paper: 1e-4
    # The training recipe (docs/RESULTS.md measures each part on and off). The paper: all off, a
    # fresh Adam per round. Warm-up: the lr rises linearly over the first warmup-steps optimizer steps
    # of a client (of each round's fresh Adam when optimizer-state = "fresh").
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # the global gradient norm is clipped to this; 0: off
    # The lr falls along a half cosine over the run (all rounds) to lr * final-lr-ratio; 1: flat.
    final_lr_ratio: float = Field(1.0, gt=0, le=1)
    # persist: each client's Adam moments and step count outlive the round (on the node's disk, like
    # private parts, and through a resume); fresh: a new Adam every round, as the paper.
    optimizer_state: Literal["fresh", "persist"] = "persist"
    # An EMA of the weights samples and evaluations use (diffusers' EMAModel); 0: off, sample the
    # trained weights. Full and USplit: the server keeps it over the global model, one update a round
    # standing for that round's local steps; ULatDec, UDec, CollaFuse's clients and the centralized
    # baseline: over every optimizer step of the model they train (on the node's disk). Off by default:
    # at make run's 5 rounds the server's EMA cost FD-CNN on each of 3 sample seeds (docs/BENCHMARKS.md);
    # conf/demo.toml, 10 rounds, turns it on (0.995).
    ema_decay: float = Field(0.0, ge=0, lt=1)
    ema_power: float = Field(2 / 3, gt=0)  # EMAModel's warm-up: decay = 1 - (1 + step) ** -power, capped
    max_steps_per_round: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_threads: int = Field(0, ge=0)
    scope: Literal["all", "shared"] = "all"
    node_state_dir: str = ""


class StrategyConfig(_Section):
    """Which aggregation method, and how many nodes take part."""

    # centralized: the same model, data and epochs in one process, the baseline of every comparison
    # collafuse: split learning over the timesteps (its own section below), not a FedAvg of weights
    name: Literal["full", "usplit", "ulatdec", "udec", "collafuse", "centralized"] = "full"
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0)  # a node that has not replied by then is dropped
    # Before each round, at most this long for min-nodes SuperNodes to connect; then a one-line error.
    node_timeout: float = Field(600.0, gt=0)
    # A reply claiming more examples is dropped: a client must not outweigh the rest by fiat.
    max_num_examples: int = Field(10_000_000, ge=1)
    # Fewer valid replies than this and the round keeps the previous model.
    min_valid_replies: int = Field(1, ge=1)
    # mean: FedAvg, weighted by num-examples. median / trimmed-mean: coordinate-wise and unweighted,
    # over the reporters of each part, so one poisoned client cannot move the model far.
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)  # cut from each end by trimmed-mean


class CollafuseConfig(_Section):
    """CollaFuse: the server's model owns t >= t_c = round(cut_ratio * T), each client's own model t < t_c."""

    cut_ratio: float = Field(0.2, ge=0.0, le=1.0)  # the clients' share of the chain; the authors' code: 0.2
    upload_samples: int = Field(4096, ge=1)  # most (x_t, t, target) triples a client sends per round
    server_epochs: int = Field(1, ge=1)  # passes of the server's optimizer over what it received
    # Kept by each client from its last upload: the server denoises them and the client scores the
    # reconstruction against its real images (the audit of what the server's own model can rebuild).
    audit_samples: int = Field(256, ge=0)

    def cut(self, timesteps: int) -> int:
        """t_c: the first timestep the server owns."""
        return round(self.cut_ratio * timesteps)


class EvalConfig(_Section):
    """What the server and clients measure, and how often."""

    every: int = Field(5, ge=0)
    num_samples: int = Field(64, ge=1, le=4096)
    # Ancestral DDPM on a strided grid of sampler-steps (T: the full chain). bench/eval_cost.py
    # measured DDPM-50 within 0.3 % of DDPM-1000's FD-CNN, 22x faster; DDIM-50 was 4.5x worse.
    sampler: Literal["ddim", "ddpm"] = "ddpm"
    sampler_steps: int = Field(50, ge=1)
    max_val_examples: int = Field(512, ge=0)
    batch_size: int = Field(256, ge=1)
    # Fréchet metrics on eval rounds: N generated images per model (0 turns them off).
    metric_samples: int = Field(256, ge=0, le=100_000)  # the paper's FID: 1000
    fd_cnn: bool = True  # offline: features of fedapp's own Fashion-MNIST classifier
    fd_cnn_weights: str = ""  # the classifier's weights; default: the ones fedapp ships
    fid: Literal["off", "auto", "required"] = "auto"  # Inception FID: auto skips it without weights
    fid_weights: str = ""  # a local pt_inception-2015-12-05 file; tried before the hub cache
    reference_split: Literal["train", "test"] = "test"
    max_reference_examples: int = Field(0, ge=0)  # 0: the whole split; else a seeded subset
    stats_dir: str = ""  # cached real statistics; default <data cache>/frechet-stats

    def is_eval_round(self, server_round: int, rounds: int) -> bool:
        """Grids and metrics every ``every`` rounds and always after the last one."""
        return self.every > 0 and (server_round % self.every == 0 or server_round == rounds)


TransportDtype = Literal["float32", "float16", "bfloat16", "int8", "int4"]


class TransportConfig(_Section):
    """How model arrays travel. Narrow floats halve the bytes, 8- and 4-bit codes quarter and eighth
    them; both ends average and train in float32 (``fedapp.protocol.quantize``, ``.delta``)."""

    dtype: TransportDtype = "float32"
    # weights: the arrays themselves. delta: the change to a reference both ends hold (the seeded
    # initialization first, so the first download costs nothing); FedDiffuse methods only.
    payload: Literal["weights", "delta"] = "weights"
    scales: Literal["channel", "tensor"] = "channel"  # int8/int4: one (lowest, step) per output channel or tensor
    rounding: Literal["stochastic", "nearest"] = "stochastic"  # int8/int4
    # delta: each client keeps what its last upload's quantization dropped and adds it to the next one.
    error_feedback: bool = False
    # Each message's model arrays as one Flower object instead of one per tensor: the same bytes in
    # far fewer requests on every hop of a deployment (fedapp.protocol.packing).
    pack: bool = True

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "int4")


class PrivacyConfig(_Section):
    """Differential privacy (``fedapp.privacy``). Off by default.

    Client level (FedDiffuse methods): each client's update, what it sends minus what it received over
    the parts that travel, is clipped to ``clip`` in L2 norm and Gaussian noise of ``noise-multiplier``
    times the clip is added, by the server to the average (it sees clipped updates in the clear) or
    by each client to its own update (it sees only noised ones). ε at ``delta`` is accounted every round.

    Sample level (``sample-*``): DP-SGD in each client's local training, which bounds what the client's
    model (and so anything it sends) says about any one of its images, whoever looks.
    """

    clip: float = Field(0.0, ge=0)  # client level: the update's L2 bound; 0: off
    noise_multiplier: float = Field(0.0, ge=0)  # σ: the noise std over the clip; 0 with clip > 0: clipping only
    target_epsilon: float = Field(0.0, ge=0)  # > 0: σ is chosen so the run ends at this ε (replaces σ)
    noise: Literal["server", "client"] = "server"  # who adds the client-level noise
    delta: float = Field(1e-5, gt=0, lt=1)
    # Sample level (DP-SGD with Opacus in every client's local training): Poisson batches, each
    # image's gradient clipped to sample-clip, Gaussian noise of sample-noise-multiplier × sample-clip
    # on their sum; each client accounts its own steps.
    sample_clip: float = Field(0.0, ge=0)  # the per-image gradient's L2 bound; 0: off
    sample_noise_multiplier: float = Field(0.0, ge=0)  # σ of DP-SGD; 0 with sample-clip > 0: clipping only
    sample_target_epsilon: float = Field(0.0, ge=0)  # > 0: σ is chosen so each client ends the run at this ε

    @property
    def client_level(self) -> bool:
        return self.clip > 0

    @property
    def sample_level(self) -> bool:
        return self.sample_clip > 0


class OutputConfig(_Section):
    """Where the run directory goes."""

    dir: str = "runs"
    name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$", max_length=200)
    progress: bool = True
    # TensorBoard event files under <run>/tensorboard/, one step per round (fedapp.runs.tracking).
    tensorboard: bool = True
    # A run directory to continue from its last complete round (``fedapp resume RUN`` sets it).
    resume: str = ""


def _fault_pairs(value: str) -> str:
    try:
        pairs = [tuple(int(x) for x in item.split("@")) for item in value.split(",") if item.strip()]
    except ValueError:
        pairs = [()]
    if any(len(p) != 2 or p[0] < 0 or p[1] < 1 for p in pairs):
        raise ValueError("must be comma-separated PARTITION@ROUND pairs, e.g. '1@2,0@3'")
    return ",".join(f"{p}@{r}" for p, r in pairs)


class FaultConfig(_Section):
    """Failures injected on purpose into clients, to test that a deployment survives them. Off by default."""

    crash: str = ""  # PARTITION@ROUND,...: that client raises after training in that round
    hang: str = ""  # PARTITION@ROUND,...: that client sleeps hang-seconds before replying
    hang_seconds: float = Field(0.0, ge=0)

    @field_validator("crash", "hang")
    @classmethod
    def _check_pairs(cls, value: str) -> str:
        return _fault_pairs(value)

    @staticmethod
    def _hits(pairs: str, partition_id: int, server_round: int) -> bool:
        return f"{partition_id}@{server_round}" in pairs.split(",")

    def crashes(self, partition_id: int, server_round: int) -> bool:
        return self._hits(self.crash, partition_id, server_round)

    def hangs(self, partition_id: int, server_round: int) -> bool:
        return self._hits(self.hang, partition_id, server_round)


class FedConfig(_Section):
    """The whole run configuration."""

    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    eval: EvalConfig = EvalConfig()
    transport: TransportConfig = TransportConfig()
    collafuse: CollafuseConfig = CollafuseConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()
    faults: FaultConfig = FaultConfig()

    def flat(self) -> dict[str, Any]:
        """The config as Flower-style dotted kebab keys (what pyproject.toml holds)."""
        return flatten(self.model_dump(by_alias=True))


def defaults_table() -> str:
    """``[tool.flwr.app.config]`` as pyproject.toml must hold it: these models' defaults, one key a line."""
    import tomli_w

    body = "\n".join(f"{key} = {tomli_w.dumps({'v': value}).strip()[4:]}" for key, value in FedConfig().flat().items())
    return f"[tool.flwr.app.config]\n{body}\n"


class ConfigError(ValueError):
    """A run config that cannot be used; its message is one line."""


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; nested tables merge, and any clash is an error."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Mapping):
            for sub, leaf_value in flatten(value).items():
                _put(tree, f"{key}.{sub}", leaf_value)
        else:
            _put(tree, key, value)
    return tree


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}' clashes with the scalar key '{'.'.join(parents[: i + 1])}'")
        node = child
    if leaf in node:
        kind = "table" if isinstance(node[leaf], dict) else "key"
        raise ConfigError(f"config key '{key}' is given twice (or clashes with a {kind} of that name)")
    node[leaf] = value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``k=v`` pairs as TOML values, a bare word taken as a string (``strategy.name=udec``)."""
    import tomllib

    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        try:
            config[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = raw
    return config


def toml_value(value: object) -> str:
    """One value as ``flwr run --run-config`` reads it: its parser allows no quote inside a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' not in text:
        return json.dumps(text, ensure_ascii=False)
    if "'" not in text:
        return f"'{text}'"
    raise ValueError(f"a run-config string cannot hold both quote kinds: {text!r}")


def run_config_arg(config: Mapping[str, object]) -> str:
    """``k=v`` pairs for ``flwr run --run-config``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def _allowed(loc: tuple[Any, ...]) -> str:
    """The keys a section accepts, for an 'unknown key' message."""
    model: type[BaseModel] = FedConfig
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if _kebab(n) == part), None)
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return ", ".join(_kebab(name) for name in model.model_fields)


def _one_line(error: ValidationError) -> str:
    errors = error.errors()
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed(loc)
        hint = f"; allowed here: {allowed}" if allowed else ""
        return f"unknown config key '{key}'{hint}{more}"
    return f"invalid config: {key} = {first.get('input')!r}: {first['msg']}{more}"


def parse_config(run_config: Mapping[str, Any]) -> FedConfig:
    """Validate a Flower run config (flat dotted keys or nested tables)."""
    try:
        cfg = FedConfig.model_validate(unflatten(run_config))
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    if cfg.diffusion.beta_end <= cfg.diffusion.beta_start:
        raise ConfigError(
            f"invalid config: diffusion.beta-end = {cfg.diffusion.beta_end!r}: "
            f"must be greater than diffusion.beta-start ({cfg.diffusion.beta_start!r})"
        )
    tr = cfg.transport
    if cfg.strategy.name == "collafuse" and (tr.quantized or tr.payload == "delta"):
        raise ConfigError(
            f"invalid config: transport.dtype = {tr.dtype!r} with transport.payload = {tr.payload!r}: CollaFuse "
            "sends training triples, not model arrays; use float32, float16 or bfloat16 weights"
        )
    if tr.error_feedback and tr.payload != "delta":
        raise ConfigError(
            "invalid config: transport.error-feedback = true needs transport.payload = \"delta\" "
            "(the residual is carried into the next update)"
        )
    _check_privacy(cfg)
    ev = cfg.eval
    if cfg.diffusion.timesteps % ev.sampler_steps:  # also catches steps > T
        raise ConfigError(
            f"invalid config: eval.sampler-steps = {ev.sampler_steps}: sampler steps must divide "
            f"diffusion.timesteps ({cfg.diffusion.timesteps}), e.g. 10, 20, 50, 100"
        )
    if ev.metric_samples and ev.metric_samples < 2:
        raise ConfigError(
            f"invalid config: eval.metric-samples = {ev.metric_samples}: a covariance needs at least 2 "
            "images (use 0 to turn the Fréchet metrics off)"
        )
    return cfg


def _check_privacy(cfg: FedConfig) -> None:
    """Privacy needs a method whose clients send model updates, and an average whose sensitivity it bounds."""
    pv = cfg.privacy
    if (pv.sample_noise_multiplier or pv.sample_target_epsilon) and not pv.sample_level:
        raise ConfigError("invalid config: privacy.sample-noise-multiplier or privacy.sample-target-epsilon is set "
                          "but privacy.sample-clip is 0 (DP-SGD's noise is calibrated to the per-image clip)")
    if pv.sample_target_epsilon and pv.sample_noise_multiplier:
        raise ConfigError("invalid config: privacy.sample-target-epsilon and privacy.sample-noise-multiplier are "
                          "both set; give one (the target chooses the multiplier)")
    if pv.sample_level and cfg.strategy.name not in ("full", "usplit", "ulatdec", "udec"):
        raise ConfigError(f"invalid config: privacy.sample-clip with strategy.name = {cfg.strategy.name!r}: DP-SGD "
                          "runs in the FedDiffuse methods' local training (full, usplit, ulatdec, udec)")
    if (pv.noise_multiplier or pv.target_epsilon) and not pv.client_level:
        raise ConfigError("invalid config: privacy.noise-multiplier or privacy.target-epsilon is set but "
                          "privacy.clip is 0 (the noise is calibrated to the clipping bound)")
    if not pv.client_level:
        return
    if cfg.strategy.name not in ("full", "usplit", "ulatdec", "udec"):
        raise ConfigError(f"invalid config: privacy with strategy.name = {cfg.strategy.name!r}: differential "
                          "privacy covers the FedDiffuse methods (full, usplit, ulatdec, udec)")
    if cfg.strategy.aggregation != "mean":
        raise ConfigError(f"invalid config: privacy.clip with strategy.aggregation = {cfg.strategy.aggregation!r}: "
                          "the noise is calibrated to a mean's sensitivity; use \"mean\"")
    if pv.target_epsilon and pv.noise_multiplier:
        raise ConfigError("invalid config: privacy.target-epsilon and privacy.noise-multiplier are both set; "
                          "give one (the target chooses the multiplier)")
