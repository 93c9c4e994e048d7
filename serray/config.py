"""Typed configuration for every serray stage.

The schema is a tree of dataclasses (one per section, named after the stage that consumes it);
``configs/base.yaml`` holds the same keys with their documented defaults. A run's config is
``schema <- YAML file <- key=value overrides`` merged with OmegaConf, so an unknown or misspelt key
or a value of the wrong type is a :class:`~serray.errors.ConfigError` that names the key (and the
closest valid key). Every run saves its fully resolved config next to its outputs
(:func:`save_config`).

Public keys that scripts rely on (keep them stable): ``output_dir``, ``data.root``,
``encoder.name``, ``features.dir``, ``adapter.mask_ratio``, ``adapter.ema_decay``,
``adapter.ema_decay_end``, ``adapter.num_clusters``, ``adapter.num_layers``, ``adapter.d_model``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from serray.errors import ConfigError
from serray.storage import redact as _redact

BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"


@dataclass
class RayConfig:
    """How to reach Ray. ``address`` None starts a local Ray (or joins $RAY_ADDRESS)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None  # logical CPUs of a local Ray; None = all cores
    progress_bars: Optional[bool] = None  # Ray Data progress bars; None = on unless $CI is set
    resource_timeout_s: float = 120.0  # no node can host a training worker (CPUs/GPUs asked) within this: a clear error


@dataclass
class DataConfig:
    """The corpus and its manifest."""

    corpus: str = "iemocap"  # iemocap | crema-d | ravdess | emodb | msp-podcast | csv | pooled (serray.data.corpora)
    root: str = "${output_dir}/synthetic/IEMOCAP_full_release"
    manifest: str = "${output_dir}/manifest.parquet"
    merge_excited: bool = True  # the standard 4-class setup merges excited into happy (IEMOCAP)
    sessions: Optional[List[int]] = None  # fold groups used (None: every group of the corpus's protocol)
    num_folds: int = 5  # speaker-grouped k-fold corpora (crema-d, ravdess, csv): k
    classes: Any = "four"  # four | native | [class names] (serray.data.corpora.base.label_space)
    label_map: Dict[str, str] = field(default_factory=dict)  # raw label -> a class of data.classes, or '' to drop
    protocol: Optional[str] = None  # None: the corpus's own; leave_one_speaker_out (IEMOCAP: 10 folds)
    corpora: List[Any] = field(default_factory=list)  # data.corpus=pooled: [{corpus, root, label_map}, ...]


@dataclass
class SyntheticConfig:
    """The built-in synthetic corpus (IEMOCAP layout, learnable emotions)."""

    enabled: bool = True  # `serray pipeline` writes it to data.root when that does not exist
    preset: str = "demo"  # demo | benchmark (local events, channels, unlabelled pool, oracle; own sizes)
    seed: int = 0
    dialogs_per_session: int = 4
    utterances_per_dialog: int = 10
    min_duration: float = 1.0
    max_duration: float = 2.5
    sample_rate: int = 16000
    drop_fraction: float = 0.15
    excited_fraction: float = 0.3
    scale: float = 1.0  # benchmark preset only: its sizes x this (a smaller study corpus to try the commands on)
    unlabelled_factor: float = 10.0  # benchmark preset only: the unlabelled pool's hours / the four-class audio's
    classes: Optional[List[str]] = None  # demo preset: raw labels the kept share is balanced over (None: the four,
    # or, when data.classes asks for more, every class data.corpus's layout has)


@dataclass
class EncoderConfig:
    """The frozen upstream: ``egemaps`` (default), ``compare``, ``fbank``, ``fbank_pitch``, or a Hugging Face HuBERT / wav2vec2 / WavLM name or directory."""

    name: str = "egemaps"
    layers: List[int] = field(default_factory=list)  # hidden_states indices to keep; [] = last layer
    sample_rate: int = 16000
    num_mel_bins: int = 80  # fbank only
    local_files_only: bool = False  # Hugging Face: never touch the network
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class FeaturesConfig:
    """Featurization with Ray Data (audio -> frozen encoder -> partitioned Parquet)."""

    dir: str = "${output_dir}/features"
    batch_size: int = 8  # utterances per encoder forward (length-bucketed)
    concurrency: int = 1  # encoder actors (the pool's minimum)
    max_concurrency: Optional[int] = None  # the pool grows to this (null: one actor per GPU in the cluster when num_gpus > 0, else one per num_cpus of its CPUs)
    num_cpus: float = 1.0  # per encoder actor
    num_gpus: float = 0.0  # per encoder actor (use 1 on a GPU node)
    min_seconds: float = 0.1  # shorter audio is skipped and reported
    max_seconds: float = 120.0  # longer audio is skipped and reported (decoding stops there: bounded memory)
    cache_max_mb: float = 512.0  # training: feature sets below this size are cached in the Ray object store
    max_restarts: int = 2  # an encoder actor that dies is restarted (and its batch retried) at most this often
    resource_timeout_s: float = 120.0  # wait this long for a node that can host an encoder actor, then fail
    fault_utt: Optional[str] = None  # fault injection (tests): the encoder actor dies (os._exit) on this utterance


@dataclass
class AdapterConfig:
    """The adapter: WAP-Transformer student/teacher, masking, EMA and local attributes (k-means)."""

    d_model: int = 96
    num_layers: int = 3  # Transformer layers (3 in the paper)
    num_heads: int = 4
    ff_dim: int = 192
    dropout: float = 0.1  # residual and feed-forward dropout of the student
    attention_dropout: float = 0.0  # on the attention weights (costs ~40 % of a CPU step; measured in the docstring)
    mask_ratio: float = 0.5  # share of valid frames the student sees masked
    mask_span_ms: float = 200.0  # length of a mask span in milliseconds (frames = ms x frame rate)
    pos_conv_ms: float = 640.0  # width of the convolutional positional embedding (wav2vec 2.0 / data2vec)
    pos_conv_groups: int = 16  # groups of that convolution (must divide d_model)
    ema_decay: float = 0.996  # teacher EMA decay at step 0 ...
    ema_decay_end: float = 0.9999  # ... rising to this by a cosine schedule (DINO / data2vec) ...
    ema_half_life: Optional[float] = None  # guard, off by default: cap the decay so the teacher's half-life is at most this share of the run
    ema_layers_only: bool = False  # data2vec: the EMA covers the Transformer layers; input projection and positional conv are the student's
    num_clusters: int = 32  # K local attributes
    kmeans_decay: float = 0.99  # online k-means: EMA of per-cluster sums and counts
    w_mask: float = 1.0  # mask prediction loss weight (0 disables it)
    w_distill: float = 1.0  # self-distillation loss weight
    w_cluster: float = 1.0  # local-attribute (cluster id) loss weight (cross-entropy / ln K)
    distill_top_k: Optional[int] = None  # teacher layers averaged into the target (None: all)


@dataclass
class TrainerConfig:
    """What every Ray Train stage shares: optimisation, scaling and fault tolerance."""

    epochs: int = 10
    batch_size: int = 16
    backend: str = "auto"  # ray: a Ray Train TorchTrainer | local: in the driver / Tune trial | auto: ray when num_workers > 1
    lr: float = 1e-3
    lr_end: float = 0.0
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    max_frames: Optional[int] = 300  # random crop for training (None: whole utterances)
    bf16: bool = True  # bf16 autocast on GPU
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional, so Ray Data keeps CPUs to read with
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # Ray Train workers: PACK | SPREAD (one per node) | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 1  # FailureConfig: worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2
    fail_at_step: Optional[int] = None  # fault injection (tests): one worker fails once at this step


@dataclass
class PretrainConfig(TrainerConfig):
    """Task-agnostic adapter pre-training (labels are never read)."""

    dir: str = "${output_dir}/pretrain"
    per_fold: bool = True  # one adapter per LOSO fold, pre-trained without the fold's test session (inductive)
    sessions: Optional[List[int]] = None  # per_fold=false only (transductive) (None: data.sessions)
    epochs: int = 10
    steps: Optional[int] = None  # pre-train for exactly this many steps (overrides epochs; pool size then costs nothing)
    lr: float = 1e-3
    use_unlabelled: bool = True  # manifest keeps every utterance whatever its label (fine-tuning: the 4 classes)
    extra_audio: List[str] = field(default_factory=list)  # audio dirs or .csv/.tsv/.txt/.lst manifests; pre-training only


@dataclass
class FinetuneConfig(TrainerConfig):
    """SER fine-tuning with SAP, 5-fold leave-one-session-out."""

    dir: str = "${output_dir}/finetune"
    mode: str = "finetune"  # frozen: adapter fixed | finetune: adapter trained too | none: no adapter (baseline)
    branch: str = "teacher"  # adapter branch used downstream (DINO evaluates the teacher)
    init: str = "pretrained"  # pretrained: the adapter from pre-training | random: the same body, random init (control)
    init_from: Optional[str] = None  # an adapter directory ({fold} is replaced); None: pretrain.dir's adapter(s)
    folds: Optional[List[int]] = None  # test groups to run (None: the corpus's, e.g. IEMOCAP sessions 1-5)
    val_split: str = "speaker"  # validation from the training groups: speaker | dialog | random | group
    val_groups: List[int] = field(default_factory=list)  # val_split=group: these groups are the validation set
    val_fraction: float = 0.15  # share of training-session speakers / dialogs / utterances held out for validation
    label_fraction: float = 1.0  # share of training labels used per class (label-efficiency runs)
    body_lr_scale: float = 1.0  # learning rate of the pre-trained body = lr x this (the new head gets lr)
    freeze_epochs: int = 0  # epochs at the start with the body frozen (head warm-up)
    patience: Optional[int] = None  # early stop after this many epochs without a better validation UA
    class_weighting: str = "loss"  # loss: inverse-frequency weighted cross-entropy | none
    max_concurrent_folds: int = 2  # folds run as parallel Tune trials
    attention_dim: int = 64  # SAP attention size
    hidden_dim: int = 128  # classifier MLP
    head_dropout: float = 0.1
    epochs: int = 10
    lr: float = 1e-3
    max_frames: Optional[int] = None
    keep_checkpoints: int = 1
    register: bool = True  # put the result into the model registry (the fold model with the best val UA)
    task: str = "categorical"  # categorical (4 classes) | dimensional (V/A/D regression) | multitask (both heads)
    dimensions: List[str] = field(default_factory=lambda: ["valence", "arousal", "dominance"])  # dimensional targets
    dim_loss: str = "ccc"  # ccc: 1 - CCC per dimension | mse
    dim_loss_weight: float = 1.0  # multitask: loss = cross-entropy + this x dimensional loss
    select_metric: Optional[str] = None  # epoch selection: val_ua | val_ccc_mean | val_ccc_<dim> (None: the task's)
    epoch_selection: str = "val"  # val: the best epoch on held-out training speakers | inner_cv: the epoch count by
    #                               cross-validation over the training groups, then one model trained on all of them
    select_smooth: int = 1  # val: the selection metric averaged over this many trailing epochs (ties: the later epoch)
    inner_cv_lrs: List[float] = field(default_factory=list)  # inner_cv: learning rates the inner folds choose among
    #                                                           (with the epoch count); empty: finetune.lr only


def _default_search_space() -> Dict[str, Any]:
    return {"adapter": {"mask_ratio": {"choice": [0.3, 0.5, 0.7]}, "ema_decay": {"choice": [0.99, 0.996]},
                        "num_clusters": {"choice": [8, 32]}}}


@dataclass
class TuneConfig:
    """Ray Tune sweep: one trial = pre-training + leave-one-session-out fine-tuning on ``folds``."""

    dir: str = "${output_dir}/tune"
    name: str = "sweep"  # rerunning the same name resumes the sweep (Tuner.restore)
    # Any config key, nested like the config itself; a leaf is one of
    # {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}.
    search_space: Dict[str, Any] = field(default_factory=_default_search_space)
    num_samples: int = 4  # samples of the random forms (grid forms multiply it)
    selection: str = "nested"  # nested: per outer fold, trials ranked on that fold's validation speakers only |
    #                            non_nested: one ranking on `folds` (their validation speakers include other folds'
    #                            test sessions); cheaper, labelled as such, never the registry's best
    metric: str = "val_ua"  # objective: validation UA of the selected epoch (val_wa, val_macro_f1, val_loss); never a test metric
    mode: Optional[str] = None  # max | min; null: the metric's own direction (val_loss: min, the others: max)
    folds: Optional[List[int]] = None  # nested: the outer folds (null: finetune.folds); non_nested: the folds trials are ranked on
    final_folds: Optional[List[int]] = None  # non_nested only: the chosen config is run on these and registered (null: finetune.folds)
    scheduler: str = "asha"  # asha | fifo
    scheduler_metric: str = "val_ua"  # what ASHA compares every fine-tuning epoch (its direction is the metric's own)
    grace_period: int = 2  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 0.0  # the trial driver itself; its Ray Train workers take {pre,fine}tune.cpus_per_worker
    gpus_per_trial: float = 0.0
    register_best: bool = True  # put the best trial into the model registry


def _default_arms() -> List[str]:
    return ["none", "random_init", "no_local", "full"]


@dataclass
class AblateConfig:
    """``serray ablate``: arms x modes x label fractions x seeds, every fold, paired comparisons."""

    arms: List[str] = field(default_factory=_default_arms)  # none | random_init | no_local | full | classical | oracle
    modes: List[str] = field(default_factory=lambda: ["finetune"])  # finetune | frozen
    seeds: int = 3  # seeds per arm (seed, seed+1, ...), every one on every fold
    label_fractions: List[float] = field(default_factory=lambda: [1.0])  # e.g. [0.1, 0.25, 1.0]
    bootstrap: int = 2000  # paired bootstrap replicates of the comparisons
    max_concurrent: int = 2  # (seed, fold) units running at once
    classical_features: str = "stats"  # classical arm: stats (log-mel / MFCC statistics) | egemaps | compare (openSMILE)
    oracle_file: Optional[str] = None  # synthesis parameters of a synthetic corpus (arm `oracle`); None: beside data.root
    metric: str = "ua"  # what arms are compared on: ua | ccc_mean | ccc_<dimension> (finetune.task dimensional/multitask)
    pretrain_dir: Optional[str] = None  # where the arms' per-fold pre-trainings live (None: output_dir/ablation/pretrain,
    #                                     and pretrain.dir for the full arm of `seed`); share it between ablations


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow (serray.tracking)."""

    enabled: bool = True
    uri: Optional[str] = None  # null: sqlite:///<output_dir>/mlflow.db; or http://server:5000, sqlite:///..., a .db path
    experiment: Optional[str] = None  # null: serray-<command>
    timeout_s: float = 5.0  # a tracking server that does not answer within this: one warning, tracking off


@dataclass
class RegistryConfig:
    """Selected models (what Serve loads)."""

    dir: str = "${output_dir}/registry"
    include_encoder: bool = True  # copy a Hugging Face encoder's files into each entry (Serve replicas on any node load it offline)


@dataclass
class ExportConfig:
    """``serray export --format onnx``: a registry entry as one ONNX graph (docs/export.md)."""

    dir: str = "${output_dir}/export"  # where <entry id>.onnx goes (--out FILE wins)
    include_encoder: bool = True  # the front end inside the graph (false: features in, featurized outside)
    int8: bool = False  # also write <id>.int8.onnx, MatMul/Gemm weights quantised dynamically (onnxruntime)


@dataclass
class ServeConfig:
    """Ray Serve HTTP endpoint."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: Optional[str] = None  # registry entry id (None: the best entry)
    checkpoint: Optional[str] = None  # or a classifier checkpoint directory (wins over `model`)
    route_prefix: str = "/"
    batching: bool = True  # @serve.batch: group concurrent requests into one padded forward
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    num_replicas: int = 1
    autoscaling: bool = False  # when true: min_replicas..max_replicas by ongoing requests
    min_replicas: int = 1
    max_replicas: int = 2
    num_cpus: float = 0.5  # per replica
    num_gpus: float = 0.0  # per replica
    max_body_mb: float = 10.0  # larger bodies get 413
    min_seconds: float = 0.25  # shorter audio gets 400
    max_seconds: float = 30.0  # longer audio gets 400 (checked on the header, before decoding)
    max_channels: int = 8  # more channels get 400 (header)
    min_sample_rate: int = 4000  # other sample rates get 400 (header); every accepted rate is resampled at bounded cost
    max_sample_rate: int = 192000
    body_timeout_s: float = 10.0  # a body not fully received this long after the handler starts reading gets 408
    request_timeout_s: float = 900.0  # Serve's end-to-end HTTP timeout (http_options): 408 after it; above both body timeouts
    max_ongoing_requests: int = 32  # per replica (>= max_batch_size, so a batch can fill)
    max_queued_requests: int = 64  # per deployment, waiting for a replica; beyond it requests get 503 at once
    start_timeout_s: float = 300.0  # resources + replicas must be up within this, else a clear error
    segments_max_body_mb: float = 256.0  # POST /segments: larger bodies get 413 (streamed, never held in memory)
    segments_body_timeout_s: float = 600.0  # POST /segments: the whole body must arrive within this, else 408
    segments_max_seconds: Optional[float] = 7200.0  # POST /segments: more decoded audio gets 413 (None: no limit)
    segments_max_ongoing: int = 2  # POST /segments per replica (receiving, queued or segmenting); more get 503


@dataclass
class SegmentConfig:
    """Long recordings (`serray predict --segments`, POST /segments): see docs/segments.md."""

    vad: str = "silero"  # silero | energy | none (a sliding window of window_s every hop_s)
    window_s: float = 4.0  # longest segment classified; a longer speech region is split into equal parts
    hop_s: float = 2.0  # the sliding window's step (vad=none)
    threshold: float = 0.5  # speech probability that starts a region (ends below threshold - 0.15)
    min_speech_s: float = 0.25  # shorter regions are dropped
    min_silence_s: float = 0.3  # a region ends after this much non-speech
    pad_s: float = 0.1  # added before and after each region
    energy_margin_db: float = 12.0  # vad=energy: a frame is speech this far above the noise floor
    energy_min_db: float = -60.0  # vad=energy: the noise floor is never taken below this (dBFS)
    energy_floor_s: float = 20.0  # vad=energy: the noise floor is the quietest frame of this many seconds
    batch_size: int = 16  # segments per classifier forward


@dataclass
class SerrayConfig:
    """The root of the configuration tree."""

    output_dir: str = "runs/default"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


def _schema() -> DictConfig:
    return OmegaConf.structured(SerrayConfig)


#: Free-form mappings inside the schema (their keys are checked by the stage that reads them).
OPEN_SECTIONS = ("tune.search_space", "data.label_map")


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), f"{full}."))
    return keys


def _unknown_keys(schema: DictConfig, user: Any, prefix: str = "") -> List[str]:
    """Return every dotted key of ``user`` that the schema does not have."""
    unknown = []
    if not isinstance(user, DictConfig):
        return unknown
    for k in user.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            unknown.append(full)
            continue
        sub = schema._get_node(k)
        if full in OPEN_SECTIONS:  # free-form mapping (validated by its consumer)
            continue
        if isinstance(sub, DictConfig) and not sub._is_none():
            if not isinstance(user._get_node(k), DictConfig):
                raise ConfigError(f"config key '{full}' is a section of keys, not a value "
                                  f"(set its keys instead, e.g. {full}.{next(iter(sub.keys()), 'key')}=...)")
            unknown.extend(_unknown_keys(sub, user._get_node(k), f"{full}."))
    return unknown


def _explain_unknown(unknown: Sequence[str], valid: Sequence[str], where: str) -> str:
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        lines.append(f"  unknown config key '{key}'{hint}")
    return f"invalid configuration in {where}:\n" + "\n".join(lines)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build a run's config: schema defaults <- YAML file <- ``key=value`` overrides.

    Args:
        path: a YAML file; None uses ``configs/base.yaml``.
        overrides: OmegaConf dotlist, e.g. ``["data.root=/data/IEMOCAP_full_release", "seed=1"]``.

    Returns:
        The merged, interpolation-resolved, read-only config.

    Raises:
        ConfigError: missing file, unknown keys (all of them listed, with suggestions), bad values.
    """
    schema = _schema()
    valid = _all_keys(schema)
    layers = []
    cfg_path = Path(path) if path is not None else BASE_CONFIG
    if not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    try:
        file_cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # YAML syntax errors come in many types
        raise ConfigError(f"cannot parse config file {cfg_path}: {e}") from None
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"config file {cfg_path} must hold a mapping of sections, not {type(file_cfg).__name__}")
    layers.append((file_cfg, str(cfg_path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    try:
        dot = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None
    layers.append((dot, "command-line overrides"))
    for user, where in layers:
        unknown = _unknown_keys(schema, user)
        if unknown:
            raise ConfigError(_explain_unknown(unknown, valid, where))
    if OmegaConf.select(file_cfg, "tune.search_space", default=None) is not None:
        schema.tune.search_space = {}  # a file's search space replaces the default one (overrides merge into it)
    try:
        cfg = OmegaConf.merge(schema, *[u for u, _ in layers])
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid value for config key '{key}': {str(e).splitlines()[0]}") from None
    _resolve_corpus(cfg)
    _validate(cfg)
    _absolute_paths(cfg)
    _validate_paths(cfg)
    _resolve_tracking(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


#: Path keys made absolute at load time: Ray Tune trials and Ray jobs do not run in the caller's cwd.
PATH_KEYS = ("output_dir", "data.root", "data.manifest", "features.dir", "pretrain.dir", "finetune.dir",
             "finetune.init_from", "tune.dir", "registry.dir", "serve.checkpoint", "ablate.pretrain_dir",
             "ablate.oracle_file", "export.dir")


#: Storage keys that also accept a pyarrow filesystem URI (s3://, gs://, hdfs://, file://); see
#: :mod:`serray.storage`. The other path keys are local (or a shared mount).
URI_KEYS = ("features.dir", "pretrain.dir", "finetune.dir", "finetune.init_from", "registry.dir", "serve.checkpoint")


def _absolute_paths(cfg: DictConfig) -> None:
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and "://" in value and key not in URI_KEYS:
            raise ConfigError(f"{key}={_redact(value)} must be a local path (or a shared mount); storage URIs "
                              f"are accepted by {', '.join(URI_KEYS)}")
        if isinstance(value, str) and "://" in value:
            # an interpolation such as ${pretrain.dir}/adapter appends after a URI's query string
            m = re.match(r"^([^?]*)\?([^/]*)(/.*)$", value)
            if m:
                OmegaConf.update(cfg, key, f"{m.group(1).rstrip('/')}{m.group(3)}?{m.group(2)}")
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)))
    extra = OmegaConf.select(cfg, "pretrain.extra_audio")
    if extra:  # local paths only (checked by _validate)
        OmegaConf.update(cfg, "pretrain.extra_audio", [os.path.abspath(os.path.expanduser(p)) for p in extra], merge=False)


def derive(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A resolved config with some keys changed (same checks as :func:`load_config`).

    The input is already resolved, so keys derived by interpolation (e.g. ``finetune.init_from`` from
    ``pretrain.dir``) must be overridden explicitly.
    """
    schema = _schema()
    try:
        dot = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None
    unknown = _unknown_keys(schema, dot)
    if unknown:
        raise ConfigError(_explain_unknown(unknown, _all_keys(schema), "overrides"))
    try:
        out = OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=True), dot)
        OmegaConf.resolve(out)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid value for config key '{getattr(e, 'full_key', None)}': {str(e).splitlines()[0]}") from None
    _validate(out)
    _absolute_paths(out)
    _validate_paths(out)
    _resolve_tracking(out)
    OmegaConf.set_readonly(out, True)
    return out


#: Outputs and inputs that features.dir must not hold (``--overwrite`` clears features.dir).
OTHER_OUTPUTS = ("output_dir", "data.root", "data.manifest", "pretrain.dir", "finetune.dir", "tune.dir", "registry.dir")


def _within(inner: str, outer: str) -> bool:
    """Whether path ``inner`` is ``outer`` or lies under it (string paths, local or URIs)."""
    a, b = inner.rstrip("/").split("?", 1)[0], outer.rstrip("/").split("?", 1)[0]
    return a == b or a.startswith(b + "/")


def _validate_paths(cfg: DictConfig) -> None:
    """features.dir holds features only: equal to, or above, another output or input is an error (a
    re-featurization with ``--overwrite`` clears it)."""
    features = str(cfg.features.dir)
    for key in OTHER_OUTPUTS:
        other = OmegaConf.select(cfg, key)
        if isinstance(other, str) and other and _within(other, features):
            raise ConfigError(f"invalid configuration: features.dir ({_redact(features)}) must not be {key} or "
                              f"a directory above it ({_redact(other)}): it holds features only")


def _resolve_tracking(cfg: DictConfig) -> None:
    """``tracking.uri`` as MLflow takes it (null: the embedded store under ``output_dir``), absolute:
    Tune trials and Ray Train workers do not run in the caller's cwd."""
    from serray.tracking import resolve_uri

    try:
        cfg.tracking.uri = resolve_uri(cfg.tracking.uri, cfg.output_dir)
    except ValueError as e:
        raise _invalid([str(e)]) from None


def _resolve_corpus(cfg: DictConfig) -> None:
    """Fill ``data.sessions`` and ``finetune.folds`` left null with the corpus's protocol."""
    from serray.data import corpora

    corpus = corpora.get(str(cfg.data.corpus))  # an unknown name lists the known ones
    if str(cfg.data.root) == f"{cfg.output_dir}/synthetic/IEMOCAP_full_release":
        # the default root names the built-in corpus's release directory: in another layout, that layout's name
        cfg.data.root = f"{cfg.output_dir}/synthetic/{corpora.RELEASE_DIRS[str(cfg.data.corpus)]}"
    if cfg.data.sessions is None:
        cfg.data.sessions = corpus.groups(cfg.data)
    if cfg.finetune.folds is None:
        cfg.finetune.folds = [g for g in corpus.default_folds(cfg.data) if g in cfg.data.sessions]
    if cfg.pretrain.sessions is None:
        cfg.pretrain.sessions = list(cfg.data.sessions)


def _validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express."""
    domains = _validate_domains(cfg)  # value domains first: the checks below divide by and compare these
    if domains:
        raise _invalid(domains)
    problems = []
    if not cfg.data.sessions:
        problems.append("data.sessions must list at least one session")
    if cfg.segment.vad not in ("energy", "silero", "none"):
        problems.append(f"segment.vad must be energy, silero or none, got '{cfg.segment.vad}'")
    from serray.data import corpora

    corpus = corpora.get(str(cfg.data.corpus))
    if corpus.name == "pooled":
        from serray.data.corpora.pooled import members

        try:
            members(cfg.data)
        except ConfigError as e:
            problems.append(str(e))
    elif cfg.data.get("corpora"):
        problems.append(f"data.corpora lists corpora to pool, but data.corpus={corpus.name}: set data.corpus=pooled")
    from serray.data.corpora.base import LABELS, class_setting

    try:
        setting = class_setting(cfg.data)
    except ConfigError as e:
        problems.append(str(e))
        setting = "four"
    allowed = LABELS if setting == "four" else (setting if isinstance(setting, tuple) else None)
    for raw, cls in (cfg.data.label_map or {}).items():
        if allowed is not None and cls is not None and str(cls) not in (*allowed, ""):
            problems.append(f"data.label_map: {raw!r} -> {cls!r}: a raw label maps to one of {list(allowed)} or to '' "
                            "(dropped)" + (" (data.classes=native or a list takes other classes)" if setting == "four" else ""))
    if cfg.data.protocol is not None and cfg.data.protocol not in (corpus.protocol, *corpus.other_protocols):
        options = ", ".join(corpus.other_protocols) or "none: its own protocol only"
        problems.append(f"data.protocol={cfg.data.protocol} is not a protocol {corpus.title} offers "
                        f"(it runs {corpus.protocol}; data.protocol can choose: {options})")
        raise _invalid(problems)
    held = [g for g in corpus.test_only_groups if g in cfg.data.sessions]
    if held:  # an official test set is tested, never trained, validated or pre-trained on
        names = f"{corpus.title}'s official test set{'s' if len(held) > 1 else ''} {held}"
        if cfg.finetune.val_split == "group" and set(cfg.finetune.val_groups) & set(held):
            problems.append(f"finetune.val_groups {list(cfg.finetune.val_groups)} holds {names}: validation would "
                            "choose epochs on test data")
        if not cfg.pretrain.per_fold and set(cfg.pretrain.sessions or []) & set(held):
            problems.append(f"pretrain.sessions {list(cfg.pretrain.sessions)} holds {names}: the shared adapter "
                            "would be pre-trained on test audio")
        if not [s for s in cfg.data.sessions if s not in corpus.test_only_groups]:
            problems.append(f"data.sessions {list(cfg.data.sessions)} holds nothing to train on beside {names}")
    groups = corpus.groups(cfg.data)
    for s in cfg.data.sessions:
        if s not in groups and s not in corpus.extra_groups:
            problems.append(f"data.sessions: {s} is not a {corpus.group_name_of(cfg.data)} of {corpus.title} "
                            f"({groups[0]}-{groups[-1]}, {corpus.evaluation_name(cfg.data)})")
    if cfg.synthetic.preset not in ("demo", "benchmark"):
        problems.append(f"synthetic.preset must be demo or benchmark, got '{cfg.synthetic.preset}'")
    if cfg.encoder.device not in ("auto", "cpu", "cuda"):
        problems.append(f"encoder.device must be auto, cpu or cuda, got '{cfg.encoder.device}'")
    if cfg.adapter.pos_conv_ms > 0 and (cfg.adapter.pos_conv_groups < 1 or cfg.adapter.d_model % cfg.adapter.pos_conv_groups):
        problems.append(f"adapter.pos_conv_groups ({cfg.adapter.pos_conv_groups}) must divide adapter.d_model ({cfg.adapter.d_model})")
    if cfg.adapter.d_model % cfg.adapter.num_heads:
        problems.append(f"adapter.d_model ({cfg.adapter.d_model}) must be divisible by adapter.num_heads ({cfg.adapter.num_heads})")
    if cfg.finetune.mode not in ("frozen", "finetune", "none"):
        problems.append(f"finetune.mode must be frozen, finetune or none, got '{cfg.finetune.mode}'")
    if cfg.finetune.branch not in ("teacher", "student"):
        problems.append(f"finetune.branch must be teacher or student, got '{cfg.finetune.branch}'")
    if cfg.finetune.epoch_selection not in ("val", "inner_cv"):
        problems.append(f"finetune.epoch_selection must be val or inner_cv, got '{cfg.finetune.epoch_selection}'")
    elif cfg.finetune.epoch_selection != "inner_cv" and len(cfg.finetune.inner_cv_lrs):
        problems.append("finetune.inner_cv_lrs are chosen among by the inner folds: set finetune.epoch_selection=inner_cv")
    elif cfg.finetune.epoch_selection == "inner_cv":
        if cfg.finetune.patience:
            problems.append("finetune.patience (early stopping on a validation part) and finetune.epoch_selection=inner_cv "
                            "(no validation part: the epoch count comes from the inner folds) exclude each other")
        if any(not (isinstance(v, (int, float)) and _finite(v) and v > 0) for v in cfg.finetune.inner_cv_lrs):
            problems.append(f"finetune.inner_cv_lrs must be positive learning rates, got {list(cfg.finetune.inner_cv_lrs)}")
        for f in cfg.finetune.folds or []:
            train = [s for s in cfg.data.sessions if s != f and s not in corpus.test_only_groups]
            if len(train) < 2:
                problems.append(f"finetune.epoch_selection=inner_cv needs at least 2 training groups; fold {f} has {train}")
                break
    if cfg.finetune.class_weighting not in ("loss", "none"):
        problems.append(f"finetune.class_weighting must be loss or none, got '{cfg.finetune.class_weighting}'")
    for section in ("pretrain", "finetune"):
        if cfg[section].backend not in ("auto", "ray", "local"):
            problems.append(f"{section}.backend must be auto, ray or local, got '{cfg[section].backend}'")
        if cfg[section].backend == "local" and cfg[section].num_workers > 1:
            problems.append(f"{section}.backend=local runs one worker; use backend=ray (or auto) for "
                            f"{section}.num_workers={cfg[section].num_workers}")
        strategy = cfg[section].placement_strategy
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            problems.append(f"{section}.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got '{strategy}'")
    if cfg.finetune.val_split not in ("speaker", "dialog", "random", "group"):
        problems.append(f"finetune.val_split must be speaker, dialog, random or group, got '{cfg.finetune.val_split}'")
    if cfg.finetune.val_split == "dialog" and corpus.name != "iemocap":
        problems.append(f"finetune.val_split=dialog needs a corpus with dialogs (IEMOCAP); {corpus.title} has none, "
                        "so its validation part would be empty: use speaker, random or group")
    if cfg.finetune.val_split == "group":
        val_groups = list(cfg.finetune.val_groups)
        if not val_groups or any(g not in cfg.data.sessions for g in val_groups):
            problems.append(f"finetune.val_groups must list groups of data.sessions {list(cfg.data.sessions)} "
                            f"when finetune.val_split=group, got {val_groups}")
        elif any(g in val_groups for g in cfg.finetune.folds):
            problems.append(f"finetune.folds {list(cfg.finetune.folds)} must not test a validation group {val_groups}")
    if cfg.ablate.classical_features not in ("stats", "egemaps", "compare"):
        problems.append(f"ablate.classical_features must be stats, egemaps or compare, got '{cfg.ablate.classical_features}'")
    if cfg.finetune.init not in ("pretrained", "random"):
        problems.append(f"finetune.init must be pretrained or random, got '{cfg.finetune.init}'")
    problems += _validate_tune_and_ablate(cfg)
    for s in cfg.finetune.folds:
        if s not in cfg.data.sessions:
            problems.append(f"finetune.folds: session {s} is not in data.sessions {list(cfg.data.sessions)}")
    for p in cfg.pretrain.extra_audio:  # cheap existence check; contents are checked when featurizing
        if "://" in p:
            problems.append(f"pretrain.extra_audio: {_redact(p)} must be a local path (or a shared mount)")
        elif not os.path.exists(os.path.expanduser(p)) and not _made_with_the_corpus(cfg, p):
            problems.append(f"pretrain.extra_audio: {p} does not exist (an audio directory or a manifest file)")
    problems += _validate_task(cfg, corpus)
    if problems:
        raise _invalid(problems)


def _validate_task(cfg: DictConfig, corpus) -> List[str]:
    """``finetune.task`` and its keys (serray.train.tasks.dimensional)."""
    from serray.data.corpora.base import DIMENSION_COLUMNS

    f, problems = cfg.finetune, []
    if f.task not in ("categorical", "dimensional", "multitask"):
        return [f"finetune.task must be categorical, dimensional or multitask, got '{f.task}'"]
    unknown = [d for d in f.dimensions if d not in DIMENSION_COLUMNS]
    if unknown or not f.dimensions or len(set(f.dimensions)) != len(f.dimensions):
        problems.append(f"finetune.dimensions: unknown or repeated dimension(s) {unknown or list(f.dimensions)} "
                        f"(known: {', '.join(DIMENSION_COLUMNS)})")
    if f.dim_loss not in ("ccc", "mse"):
        problems.append(f"finetune.dim_loss must be ccc or mse, got '{f.dim_loss}'")
    dims = f.task != "categorical"
    if dims and corpus.dimension_range is None:
        problems.append(f"finetune.task={f.task}: corpus {corpus.name} ({corpus.title}) has no emotion dimensions "
                        "(corpora with V/A/D ratings: iemocap, msp-podcast); use finetune.task=categorical")
    allowed = (["val_ua"] if f.task != "dimensional" else []) + (
        ["val_ccc_mean", *(f"val_ccc_{d}" for d in f.dimensions)] if dims else [])
    if f.select_metric is not None and f.select_metric not in allowed:
        problems.append(f"finetune.select_metric for finetune.task={f.task} must be one of {', '.join(allowed)} "
                        f"(or null), got '{f.select_metric}'")
    am = str(cfg.ablate.metric)
    if am != "ua" and am not in ("ccc_mean", *(f"ccc_{d}" for d in f.dimensions)):
        problems.append(f"ablate.metric must be ua, ccc_mean or ccc_<dimension> of finetune.dimensions, got '{am}'")
    elif am != "ua" and not dims:
        problems.append(f"ablate.metric={am} needs finetune.task=dimensional or multitask")
    elif am != "ua" and set(cfg.ablate.arms) & {"classical", "oracle"}:
        problems.append(f"ablate.metric={am}: the reference arms (classical, oracle) are scored on UA only; "
                        "leave them out of ablate.arms")
    for key in ("metric", "scheduler_metric"):
        m = cfg.tune[key]
        if str(m).startswith("val_ccc_") and not dims:
            problems.append(f"tune.{key}={m} needs finetune.task=dimensional or multitask")
    return problems


def _invalid(problems: Sequence[str]) -> ConfigError:
    """One line for one problem (``invalid configuration: <key> must be ...``), one line each for several."""
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    return ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _made_with_the_corpus(cfg: DictConfig, path: str) -> bool:
    """The benchmark preset's unlabelled pool, which ``serray pipeline`` / ``ablate`` write together
    with the corpus when ``data.root`` does not exist yet."""
    if not (cfg.synthetic.enabled and cfg.synthetic.get("preset") == "benchmark"):
        return False
    root = Path(os.path.abspath(os.path.expanduser(str(cfg.data.root))))
    return not root.exists() and Path(os.path.abspath(os.path.expanduser(path))) == root.parent / "synthetic_unlabelled"


#: Metrics a sweep may rank trials on (validation only), and what a test metric there is told.
VAL_METRICS = ("val_ua", "val_wa", "val_macro_f1", "val_loss", "val_ccc_mean", "val_ccc_valence", "val_ccc_arousal",
               "val_ccc_dominance")  # (val_ccc_*: finetune.task dimensional / multitask)
TEST_METRICS = ("ua", "wa", "macro_f1")
ARMS = ("none", "random_init", "no_local", "full", "classical", "oracle")


#: The direction of every metric a sweep may rank on or stop by.
METRIC_MODE = {"val_ua": "max", "val_wa": "max", "val_macro_f1": "max", "val_loss": "min", "val_ccc_mean": "max",
               "val_ccc_valence": "max", "val_ccc_arousal": "max", "val_ccc_dominance": "max"}


def metric_mode(metric: str) -> str:
    """``max`` or ``min``: the direction in which ``metric`` improves."""
    return METRIC_MODE[metric]


def _validate_tune_and_ablate(cfg: DictConfig) -> List[str]:
    problems = []
    t = cfg.tune
    metric = t.metric
    if metric in TEST_METRICS:
        problems.append(f"tune.metric={metric} is a test metric: choosing trials on the test sessions inflates the "
                        f"result it then reports; use one of {', '.join(VAL_METRICS)}")
    elif metric not in VAL_METRICS:
        problems.append(f"tune.metric must be one of {', '.join(VAL_METRICS)}, got '{metric}'")
    elif t.mode is not None and t.mode != metric_mode(metric):
        problems.append(f"tune.mode={t.mode} contradicts tune.metric={metric}, which improves towards "
                        f"{metric_mode(metric)} (leave tune.mode null)")
    if t.mode is not None and t.mode not in ("max", "min"):
        problems.append(f"tune.mode must be max, min or null, got '{t.mode}'")
    if t.scheduler_metric not in VAL_METRICS:
        problems.append(f"tune.scheduler_metric={t.scheduler_metric} is not reported by the fine-tuning epochs; "
                        f"use one of {', '.join(VAL_METRICS)}")
    if t.scheduler not in ("asha", "fifo"):
        problems.append(f"tune.scheduler must be asha or fifo, got '{t.scheduler}'")
    if t.selection not in ("nested", "non_nested"):
        problems.append(f"tune.selection must be nested or non_nested, got '{t.selection}'")
    elif t.selection == "nested" and t.final_folds is not None:
        problems.append("tune.final_folds applies to tune.selection=non_nested only (a nested sweep tests each of "
                        "tune.folds with the configuration chosen for it)")
    for key in ("folds", "final_folds"):
        folds = t[key]
        if folds is not None and (not folds or any(f not in cfg.data.sessions for f in folds)):
            problems.append(f"tune.{key} must be null or a non-empty subset of data.sessions "
                            f"{list(cfg.data.sessions)}, got {list(folds)}")
    a = cfg.ablate
    unknown = [arm for arm in a.arms if arm not in ARMS]
    if unknown or not a.arms:
        problems.append(f"ablate.arms: unknown arm(s) {unknown} (arms: {', '.join(ARMS)})" if unknown
                        else "ablate.arms must not be empty")
    bad_modes = [m for m in a.modes if m not in ("finetune", "frozen")]
    if bad_modes or not a.modes:
        problems.append(f"ablate.modes must be a non-empty list of finetune / frozen, got {list(a.modes)}")
    bad_fracs = [f for f in a.label_fractions if not 0.0 < f <= 1.0]
    if bad_fracs or not a.label_fractions:
        problems.append(f"ablate.label_fractions must be in (0, 1], got {list(a.label_fractions)}")
    return problems


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text, as every saved config and ``serray config`` show it: storage
    URIs without credentials or secret query parameters (:func:`serray.storage.strip_credentials`;
    credentials come from the environment or the instance role)."""
    from serray.storage import strip_credentials

    return OmegaConf.to_yaml(OmegaConf.create(strip_credentials(OmegaConf.to_container(cfg, resolve=True))))


def save_config(cfg: DictConfig, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config beside a run's outputs and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(to_yaml(cfg))
    return path


#: Keys of a training section that change how a run is executed, not what it computes.
OPERATIONAL_KEYS = ("dir", "max_failures", "fail_at_step", "keep_checkpoints", "cpus_per_worker", "gpus_per_worker",
                    "placement_strategy")


def section_hash(cfg: DictConfig, *keys: str, exclude: Sequence[str] = ()) -> str:
    """A short stable hash of some config sections (used to tell whether stored outputs still match).

    ``exclude`` names keys dropped from every hashed section (e.g. :data:`OPERATIONAL_KEYS`).
    """
    payload = {}
    for k in keys:
        v = as_dict(OmegaConf.select(cfg, k))
        payload[k] = {kk: vv for kk, vv in v.items() if kk not in exclude} if isinstance(v, dict) else v
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def as_dict(node: Any) -> Any:
    """A plain-Python copy of a config node (for Ray, JSON, checkpoints)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


# ---------------------------------------------------------------- value domains

class Domain:
    """A value domain: a predicate, how it reads in an error, and a value outside it (for the tests)."""

    def __init__(self, ok, text: str, outside):
        self.ok, self.text, self.outside = ok, text, outside


def _finite(v) -> bool:
    return v == v and math.isfinite(v)


POSITIVE = Domain(lambda v: _finite(v) and v > 0, "> 0", 0)
NON_NEGATIVE = Domain(lambda v: _finite(v) and v >= 0, ">= 0", -1)
AT_LEAST_ONE = Domain(lambda v: _finite(v) and v >= 1, ">= 1", 0)
AT_LEAST_TWO = Domain(lambda v: _finite(v) and v >= 2, ">= 2", 1)
UNIT_OPEN = Domain(lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)", 1.0)  # [0, 1)
UNIT_CLOSED = Domain(lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]", 1.5)
OPEN_UNIT = Domain(lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]", 0.0)  # (0, 1]
HALF = Domain(lambda v: _finite(v) and 0 < v < 0.5, "in (0, 0.5)", 0.5)
PORT = Domain(lambda v: 1 <= v <= 65535, "in 1..65535", 0)
QUEUE = Domain(lambda v: v == -1 or v >= 1, "-1 (no limit) or >= 1", 0)
ONE_WINDOW = Domain(lambda v: _finite(v) and v >= 0.025, ">= 0.025 (one 25 ms analysis window)", 0.0)
AT_LEAST_100 = Domain(lambda v: _finite(v) and v >= 100, ">= 100", 10)
RATE = Domain(lambda v: _finite(v) and v >= 1000, ">= 1000 (Hz)", 100)

#: (keys, domain). Every numeric key of the schema is here (tests/test_config.py walks them all); a key
#: that is null is not checked (null is the documented "none" / "off" of the optional keys).
_DOMAINS = [
    (("seed", "synthetic.seed"), NON_NEGATIVE),
    (("ray.num_cpus",), AT_LEAST_ONE),
    (("data.num_folds",), AT_LEAST_TWO),
    (("ray.resource_timeout_s",), NON_NEGATIVE),
    (("synthetic.dialogs_per_session", "synthetic.utterances_per_dialog"), AT_LEAST_ONE),
    (("synthetic.min_duration", "synthetic.max_duration"), ONE_WINDOW),
    (("synthetic.sample_rate", "encoder.sample_rate", "serve.min_sample_rate", "serve.max_sample_rate"), RATE),
    (("synthetic.drop_fraction",), UNIT_OPEN),
    (("synthetic.excited_fraction",), UNIT_CLOSED),
    (("synthetic.scale", "synthetic.unlabelled_factor"), POSITIVE),
    (("encoder.num_mel_bins",), AT_LEAST_ONE),
    (("features.batch_size", "features.concurrency", "features.max_concurrency"), AT_LEAST_ONE),
    (("features.num_cpus", "features.max_seconds", "features.resource_timeout_s"), POSITIVE),
    (("features.num_gpus", "features.cache_max_mb", "features.max_restarts"), NON_NEGATIVE),
    (("features.min_seconds", "serve.min_seconds"), ONE_WINDOW),
    (("adapter.d_model", "adapter.num_layers", "adapter.num_heads", "adapter.ff_dim", "adapter.pos_conv_groups",
      "adapter.distill_top_k"), AT_LEAST_ONE),
    (("adapter.dropout", "adapter.attention_dropout", "adapter.mask_ratio", "adapter.kmeans_decay"), UNIT_OPEN),
    (("adapter.mask_span_ms",), POSITIVE),
    (("adapter.pos_conv_ms", "adapter.w_mask", "adapter.w_distill", "adapter.w_cluster"), NON_NEGATIVE),
    (("adapter.ema_decay", "adapter.ema_decay_end"), UNIT_CLOSED),
    (("adapter.ema_half_life",), OPEN_UNIT),
    (("adapter.num_clusters",), AT_LEAST_TWO),
    (("pretrain.lr", "finetune.lr", "pretrain.cpus_per_worker", "finetune.cpus_per_worker"), POSITIVE),
    (("pretrain.lr_end", "finetune.lr_end", "pretrain.weight_decay", "finetune.weight_decay", "pretrain.grad_clip",
      "finetune.grad_clip", "pretrain.gpus_per_worker", "finetune.gpus_per_worker", "finetune.body_lr_scale",
      "pretrain.max_failures", "finetune.max_failures", "finetune.freeze_epochs", "finetune.dim_loss_weight"),
     NON_NEGATIVE),
    (("pretrain.batch_size", "finetune.batch_size", "pretrain.epochs", "finetune.epochs", "pretrain.num_workers",
      "finetune.num_workers", "pretrain.keep_checkpoints", "finetune.keep_checkpoints", "pretrain.max_frames",
      "finetune.max_frames", "finetune.attention_dim", "finetune.hidden_dim", "finetune.max_concurrent_folds",
      "pretrain.steps", "finetune.patience", "pretrain.fail_at_step", "finetune.fail_at_step", "finetune.select_smooth"),
     AT_LEAST_ONE),
    (("pretrain.warmup_frac", "finetune.warmup_frac", "finetune.head_dropout"), UNIT_OPEN),
    (("finetune.val_fraction",), HALF),
    (("finetune.label_fraction",), OPEN_UNIT),
    (("tune.num_samples", "tune.grace_period", "tune.max_concurrent_trials", "ablate.seeds", "ablate.max_concurrent"),
     AT_LEAST_ONE),
    (("tune.reduction_factor",), AT_LEAST_TWO),
    (("tune.cpus_per_trial", "tune.gpus_per_trial"), NON_NEGATIVE),
    (("ablate.bootstrap",), AT_LEAST_100),
    (("serve.port",), PORT),
    (("serve.max_batch_size", "serve.num_replicas", "serve.max_replicas", "serve.max_channels",
      "serve.max_ongoing_requests", "serve.segments_max_ongoing"), AT_LEAST_ONE),
    (("serve.batch_wait_timeout_s", "serve.num_cpus", "serve.num_gpus", "serve.min_replicas"), NON_NEGATIVE),
    (("serve.max_body_mb", "serve.max_seconds", "serve.body_timeout_s", "serve.request_timeout_s",
      "serve.start_timeout_s"), POSITIVE),
    (("serve.max_queued_requests",), QUEUE),
    (("tracking.timeout_s",), POSITIVE),
    (("serve.segments_max_body_mb", "serve.segments_body_timeout_s", "serve.segments_max_seconds", "segment.window_s", "segment.hop_s",
      "segment.energy_floor_s"), POSITIVE),
    (("segment.threshold",), UNIT_OPEN),
    (("segment.min_speech_s", "segment.min_silence_s", "segment.pad_s", "segment.energy_margin_db"), NON_NEGATIVE),
    (("segment.energy_min_db",), Domain(lambda v: _finite(v) and v < 0, "< 0 (dBFS)", 0)),
    (("segment.batch_size",), AT_LEAST_ONE),
]


def domain_of(key: str) -> Optional[Domain]:
    """The domain of a numeric config key (None: not numeric)."""
    return next((d for keys, d in _DOMAINS if key in keys), None)


def _number(cfg: DictConfig, key: str):
    try:
        v = OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:
        return None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _validate_domains(cfg: DictConfig) -> List[str]:
    """The domain of every numeric key (one message per bad key, naming it), plus the order of the
    min / max pairs. Run by :func:`_validate` before its other checks."""
    problems = []
    for keys, domain in _DOMAINS:
        for key in keys:
            v = _number(cfg, key)
            if v is not None and not domain.ok(v):
                problems.append(f"{key} must be {domain.text}, got {v}")
    pairs = [("features.min_seconds", "features.max_seconds", "<"), ("serve.min_seconds", "serve.max_seconds", "<"),
             ("serve.min_replicas", "serve.max_replicas", "<="), ("serve.min_sample_rate", "serve.max_sample_rate", "<="),
             ("serve.max_batch_size", "serve.max_ongoing_requests", "<="),
             ("synthetic.min_duration", "synthetic.max_duration", "<="), ("adapter.ema_decay", "adapter.ema_decay_end", "<="),
             ("features.concurrency", "features.max_concurrency", "<="), ("finetune.freeze_epochs", "finetune.epochs", "<="),
             ("adapter.distill_top_k", "adapter.num_layers", "<="), ("segment.hop_s", "segment.window_s", "<="),
             # a body still arriving when Serve gives up is Serve's plain-text 408, never the route's own
             ("serve.body_timeout_s", "serve.request_timeout_s", "<"),
             ("serve.segments_body_timeout_s", "serve.request_timeout_s", "<")]
    for lo_key, hi_key, rel in pairs:
        lo, hi = _number(cfg, lo_key), _number(cfg, hi_key)
        if lo is None or hi is None or any(f"{k} must" in p for p in problems for k in (lo_key, hi_key)):
            continue
        if not (lo < hi if rel == "<" else lo <= hi):
            problems.append(f"{lo_key} ({lo}) must be {rel} {hi_key} ({hi})")
    window, speech, silence = (_number(cfg, f"segment.{k}") for k in ("window_s", "min_speech_s", "min_silence_s"))
    if None not in (window, speech, silence) and speech + silence > 2 * window and not any(
            f"segment.{k} must" in p for p in problems for k in ("window_s", "min_speech_s", "min_silence_s")):
        # the detector looks back at most two windows: a region it must wait longer for is never closed
        problems.append(f"segment.min_speech_s + segment.min_silence_s ({speech + silence:g}) must be <= "
                        f"2 x segment.window_s ({2 * window:g})")
    sessions = OmegaConf.select(cfg, "data.sessions", default=None) or []
    outside = [s for s in (OmegaConf.select(cfg, "pretrain.sessions", default=None) or []) if s not in sessions]
    if outside:  # checked under per_fold too: a key that names no session is wrong whether or not it is read
        problems.append(f"pretrain.sessions: {outside} not in data.sessions {list(sessions)}")
    return problems
