"""Gemma 2 configuration: the real numbers of a checkpoint, and the published presets."""

from __future__ import annotations

import dataclasses
import json
import os

from gemma_keras import conventions

_HF_MODEL_TYPE = "gemma2"


class ConfigError(ValueError):
    """A config that is not Gemma 2, or whose values contradict each other."""


@dataclasses.dataclass
class Gemma2Config:
    """Hyper-parameters of a Gemma 2 model, named as in transformers' `Gemma2Config`.

    Example:
    >>> cfg = Gemma2Config.preset("gemma2_2b")
    >>> cfg.num_hidden_layers, cfg.hidden_size
    (26, 2304)
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    # "sliding_attention" or "full_attention" per layer; None means Gemma 2's
    # alternation: sliding on even-indexed layers, global on odd ones.
    layer_types: list[str] | None = None
    pad_token_id: int = conventions.PAD_ID
    eos_token_id: int = conventions.EOS_ID
    bos_token_id: int = conventions.BOS_ID
    start_of_turn_id: int = conventions.START_OF_TURN_ID
    end_of_turn_id: int = conventions.END_OF_TURN_ID

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        else:
            self.layer_types = list(self.layer_types)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        """Raise ConfigError naming the first field that is invalid or contradicts another."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
            "max_position_embeddings", "query_pre_attn_scalar", "rope_theta", "rms_norm_eps",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Gemma2Config.{name} must be a positive number, got {value!r}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"Gemma2Config.{name} must be positive or None, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"Gemma2Config.num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"Gemma2Config.head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"Gemma2Config.layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise ConfigError(f"Gemma2Config.layer_types has unknown entries {bad}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id",
                     "start_of_turn_id", "end_of_turn_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"Gemma2Config.{name}={value} is outside the vocabulary [0, {self.vocab_size})"
                )

    # ---------------------------------------------------------- derived values
    @property
    def num_query_groups(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    def is_sliding(self, layer_index: int) -> bool:
        return self.layer_types[layer_index] == "sliding_attention"

    def num_parameters(self) -> int:
        """Parameter count (the tied embedding counted once)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 4 * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h

    # ------------------------------------------------------------- conversion
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown Gemma2Config fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Gemma2Config":
        """Build from a transformers config.json dict; raise ConfigError if it is not Gemma 2."""
        model_type = d.get("model_type")
        if model_type != _HF_MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gemma2'")
        fields = {f.name for f in dataclasses.fields(cls)}
        nullable = ("attn_logit_softcapping", "final_logit_softcapping", "layer_types")
        kwargs = {k: d[k] for k in fields if k in d and (d[k] is not None or k in nullable)}
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing Gemma 2 fields {missing}")
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # generation configs may list several
                kwargs[key] = kwargs[key][0]
        kwargs.setdefault("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        activation = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ConfigError(f"{source}: hidden_activation {activation!r} is not supported, "
                              "Gemma 2 uses 'gelu_pytorch_tanh'")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A transformers `Gemma2Config` dict, as written in config.json."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in ("start_of_turn_id", "end_of_turn_id")}
        d.update(
            model_type=_HF_MODEL_TYPE,
            architectures=["Gemma2ForCausalLM"],
            hidden_activation="gelu_pytorch_tanh",
            hidden_act="gelu_pytorch_tanh",
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            tie_word_embeddings=True,
            use_cache=True,
            cache_implementation="hybrid",
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Gemma2Config":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "Gemma2Config":
        """One of `PRESETS`: gemma2_2b, gemma2_9b, gemma2_27b."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "gemma2_2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      query_pre_attn_scalar=256),
    "gemma2_9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      query_pre_attn_scalar=256),
    "gemma2_27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       query_pre_attn_scalar=144),
}
