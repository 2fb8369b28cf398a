"""One dataclass configures every model (paper §4.1 hyper-parameters as defaults), loadable from YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from seminar_ray.errors import InputError


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of PSU, SEMINAR and the baselines; defaults are the paper's (§4.1) except `loss_norm`,
    which the "paper" preset sets back to the paper's sum."""

    # shared
    d: int = 64  # aligned representation width (paper: 64)
    heads: int = 4  # heads of the multi-head target attention (paper: 4)
    lam: float = 0.5  # λ, weight of the query channel: γ = [λ, (1-λ)·w] (paper: 0.5)
    feature_dim: int = 512  # width of the frozen CLIP text/image features
    gate_hidden: int = 32  # hidden width of the gating network w
    mlp_hidden: tuple[int, ...] = (200, 80)  # CTR / next-pair MLP
    max_len: int = 2000  # L, history length the pipeline pads to
    seed: int = 0
    # PSU (§3.3.1)
    n_chunks: int = 20  # N_ch: the alignment InfoNCE runs within L/N_ch-long chunks
    temperature: float = 0.07  # alignment logits are cos / temperature (≥ 0.025: see psu.clip_loss)
    w_next: float = 1.0
    w_align: float = 1.0
    w_rel: float = 1.0
    # "chance": each task divided by its value at chance, chosen on validation NDCG@10 (README, Tables 2 and 3);
    # "none": the paper's plain sum of the three losses (the "paper" preset keeps it)
    loss_norm: str = "chance"
    use_next: bool = True
    use_align: bool = True
    use_rel: bool = True
    n_neg: int = 4  # sampled negatives per target (C = 1 + n_neg), read by the data pipeline
    # CTR (§3.3.2)
    K: int = 200  # GSU top-K (paper: 200 for L = 1,000-2,000)
    beta_gsu: float = 1.0  # β of L = L_ESU + β·L_GSU (docs/design.md, Model contracts)
    pretrained: bool = True  # restore PSU's embedding tables before fine-tuning
    recent_len: int = 20  # "other features": mean of the most recent behaviours' keys
    dropout: float = 0.0  # dropout on the CTR MLP's inputs in training (the paper states none: 0)
    # dropout on the behaviours' keys [B, N, d] in training, what GSU, ESU and the recent mean read (SASRec's dropout
    # on its input embeddings; the paper states none: 0)
    emb_dropout: float = 0.0
    # True: the MLP also reads target ⊙ lifelong and target ⊙ recent, the inner products an MLP over concatenated
    # vectors learns poorly (not in the paper, whose MLP reads the concatenation: False)
    target_products: bool = False
    # "bce": the paper's click loss, each candidate on its own (§3.3.2); "softmax": cross-entropy over each target's
    # 1 + n_neg candidates, the positive against its own negatives (a sampled softmax, not in the paper)
    ctr_loss: str = "bce"
    # baselines
    din_recent: int = 50  # DIN attends over the most recent behaviours
    qin_k1: int = 400  # QIN: the target query keeps K1 behaviours ...
    qin_k2: int = 200  # ... the target item re-ranks them to K2
    eta_bits: int = 64  # ETA: SimHash signature width
    # optimisation (read by the training jobs)
    lr: float = 1e-3
    weight_decay: float = 0.0  # > 0: AdamW's decoupled weight decay on every parameter (the paper's Adam: 0)
    batch: int = 256
    epochs: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_hidden", tuple(int(h) for h in self.mlp_hidden))
        checks = {
            "d": self.d > 0,
            "heads": self.heads > 0,
            "K": self.K > 0,
            "n_chunks": self.n_chunks > 0,
            "lam": 0.0 <= self.lam <= 1.0,
            "temperature": self.temperature >= 0.025,
            "max_len": self.max_len > 0,
            "qin_k1": self.qin_k1 >= self.qin_k2 > 0,
            "eta_bits": self.eta_bits > 0,
            "din_recent": self.din_recent > 0,
            "recent_len": self.recent_len > 0,
            "n_neg": self.n_neg >= 0,
            "loss_norm": self.loss_norm in ("none", "chance"),
            "ctr_loss": self.ctr_loss == "bce" or (self.ctr_loss == "softmax" and self.n_neg > 0),
            "dropout": 0.0 <= self.dropout < 1.0,
            "emb_dropout": 0.0 <= self.emb_dropout < 1.0,
            "weight_decay": self.weight_decay >= 0.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"ModelConfig: invalid value(s) for {bad}: {[getattr(self, k) for k in bad]}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """'paper': the paper's settings; 'small': tiny sizes for tests and the demo run."""
        if name not in PRESETS:
            raise InputError(f"unknown ModelConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"ModelConfig: unknown key(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ModelConfig:
        """A flat YAML mapping of fields; an optional `preset:` key names the starting point."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of ModelConfig fields, got {type(values).__name__}")
        preset = values.pop("preset", "paper")
        return cls.preset(preset, **{**values, **overrides})

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mlp_hidden"] = list(self.mlp_hidden)
        return out

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)


PRESETS: dict[str, dict] = {
    "paper": {"loss_norm": "none"},
    "small": dict(
        d=16,
        heads=2,
        K=16,
        gate_hidden=16,
        mlp_hidden=(32, 16),
        max_len=200,
        n_chunks=4,
        recent_len=8,
        din_recent=16,
        qin_k1=32,
        qin_k2=16,
        eta_bits=32,
        batch=32,
        n_neg=4,
    ),
}
