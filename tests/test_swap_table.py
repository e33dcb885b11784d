"""The optimizer swap as a table: every (source optimizer, target) pair, what is carried, dropped (with
one warning), changed in meaning (warned) or refused; momentum-cycling schedulers retargeted or
refused; the LearningRateMonitor's metric names kept; the issue's three failures as real fits."""

import ast
import csv
import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.translate import constructor_defaults
from lowmem_lightning.optim import build_optimizer, optimizer_class

transformers = pytest.importorskip("transformers")
from transformers.optimization import Adafactor as HFAdafactor  # noqa: E402

# each source with typical non-default settings (as a real project writes them)
SOURCES = {
    "Adam": lambda p: torch.optim.Adam(p, lr=2e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-4),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=1e-4, momentum=0.5,
                                             centered=True),
    "HF Adafactor": lambda p: HFAdafactor(p, lr=2e-3, relative_step=False, scale_parameter=False, beta1=0.8,
                                          clip_threshold=0.5, decay_rate=-0.5, weight_decay=0.01, eps=(1e-29, 2e-3)),
    "adamw_8bit": lambda p: build_optimizer("adamw_8bit", p, lr=2e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "paged_adamw_8bit": lambda p: build_optimizer("paged_adamw_8bit", p, lr=2e-3, betas=(0.8, 0.95), eps=1e-6,
                                                  weight_decay=0.1),
    "sgd": lambda p: build_optimizer("sgd", p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-4,
                                     momentum_dtype="int8"),
    "adafactor": lambda p: build_optimizer("adafactor", p, lr=2e-3, relative_step=False, scale_parameter=False,
                                           beta1=0.8, clip_threshold=0.5, decay_rate=-0.5, weight_decay=0.01,
                                           eps=(1e-29, 2e-3), momentum_dtype="int8"),
    "came": lambda p: build_optimizer("came", p, lr=2e-3, betas=(0.8, 0.95, 0.99), eps=(1e-29, 1e-15),
                                      clip_threshold=0.5, weight_decay=0.01, momentum_dtype="int8"),
    "lion": lambda p: build_optimizer("lion", p, lr=2e-4, betas=(0.8, 0.95), weight_decay=0.5),
    "ademamix": lambda p: build_optimizer("ademamix", p, lr=2e-3, betas=(0.8, 0.95, 0.999), alpha=8.0, t_alpha=100,
                                          t_beta3=100, eps=1e-6, weight_decay=0.1),
    "muon": lambda p: build_optimizer("muon", p, lr=2e-2, momentum=0.8, nesterov=False, weight_decay=0.05,
                                      adamw_betas=(0.8, 0.95), adamw_eps=1e-6, momentum_dtype="int8"),
}
TARGETS = ["adamw", "adamw_8bit", "adamw_4bit", "paged_adamw_8bit", "sgd", "adafactor", "came",
           "lion", "lion_8bit", "ademamix", "ademamix_8bit", "muon", "muon_8bit"]

# (source, target): (hyperparameters of the built group that differ from the target's defaults, i.e. what was
# carried; settings dropped, named in the warning; settings carried with a changed meaning, named in the warning).
# Everything else is the target's default; the lr is always carried. The callback keeps its defaults (lr=None):
# adafactor then computes its own step size (relative_step=True), so the module's lr is dropped.
TABLE = {
    ("Adam", "adamw"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1; amsgrad=True", "", "weight_decay"),
    ("Adam", "adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "amsgrad", "weight_decay"),
    ("Adam", "paged_adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "amsgrad", "weight_decay"),
    ("Adam", "sgd"): ("momentum=0.8; weight_decay=0.1", "eps amsgrad betas[1]", ""),
    ("Adam", "adafactor"): ("beta1=0.8; weight_decay=0.1", "eps amsgrad betas[1] lr", "weight_decay"),
    ("Adam", "came"): ("betas=(0.8, 0.95, 0.9999); weight_decay=0.1", "eps amsgrad", "weight_decay"),
    ("AdamW", "adamw"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("AdamW", "adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("AdamW", "paged_adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("AdamW", "sgd"): ("momentum=0.8; weight_decay=0.1", "eps betas[1]", "weight_decay"),
    ("AdamW", "adafactor"): ("beta1=0.8; weight_decay=0.1", "eps betas[1] lr", ""),
    ("AdamW", "came"): ("betas=(0.8, 0.95, 0.9999); weight_decay=0.1", "eps", ""),
    ("SGD", "adamw"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("SGD", "adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("SGD", "paged_adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("SGD", "sgd"): ("momentum=0.8; nesterov=True; weight_decay=0.0001", "", ""),
    ("SGD", "adafactor"): ("beta1=0.8; weight_decay=0.0001", "nesterov lr", "weight_decay"),
    ("SGD", "came"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("RMSprop", "adamw"): ("betas=(0.5, 0.9); eps=1e-06; weight_decay=0.0001", "centered", "weight_decay"),
    ("RMSprop", "adamw_8bit"): ("betas=(0.5, 0.9); eps=1e-06; weight_decay=0.0001", "centered", "weight_decay"),
    ("RMSprop", "paged_adamw_8bit"): ("betas=(0.5, 0.9); eps=1e-06; weight_decay=0.0001", "centered", "weight_decay"),
    ("RMSprop", "sgd"): ("momentum=0.5; weight_decay=0.0001", "eps centered alpha", ""),
    ("RMSprop", "adafactor"): ("beta1=0.5; weight_decay=0.0001", "eps centered alpha lr", "weight_decay"),
    ("RMSprop", "came"): ("betas=(0.5, 0.9, 0.9999); weight_decay=0.0001", "eps centered", "weight_decay"),
    ("HF Adafactor", "adamw"): ("betas=(0.8, 0.999)", "clip_threshold decay_rate eps[0] eps[1]", ""),
    ("HF Adafactor", "adamw_8bit"): ("betas=(0.8, 0.999)", "clip_threshold decay_rate eps[0] eps[1]", ""),
    ("HF Adafactor", "paged_adamw_8bit"): ("betas=(0.8, 0.999)", "clip_threshold decay_rate eps[0] eps[1]", ""),
    ("HF Adafactor", "sgd"): ("momentum=0.8; weight_decay=0.01",
                              "clip_threshold decay_rate eps[0] eps[1]", "weight_decay"),
    ("HF Adafactor", "adafactor"): ("beta1=0.8; eps=(1e-29, 0.002); clip_threshold=0.5; decay_rate=-0.5; "
                                    "weight_decay=0.01; relative_step=False; scale_parameter=False",
                                    "", ""),
    ("HF Adafactor", "came"): ("betas=(0.8, 0.999, 0.9999); eps=(1e-29, 1e-16); clip_threshold=0.5; "
                               "weight_decay=0.01",
                               "decay_rate eps[1]", ""),
    ("adamw_8bit", "adamw"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("adamw_8bit", "adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("adamw_8bit", "paged_adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("adamw_8bit", "sgd"): ("momentum=0.8; weight_decay=0.1", "eps betas[1]", "weight_decay"),
    ("adamw_8bit", "adafactor"): ("beta1=0.8; weight_decay=0.1", "eps betas[1] lr", ""),
    ("adamw_8bit", "came"): ("betas=(0.8, 0.95, 0.9999); weight_decay=0.1", "eps", ""),
    ("paged_adamw_8bit", "adamw"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("paged_adamw_8bit", "adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("paged_adamw_8bit", "paged_adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "", ""),
    ("paged_adamw_8bit", "sgd"): ("momentum=0.8; weight_decay=0.1", "eps betas[1]", "weight_decay"),
    ("paged_adamw_8bit", "adafactor"): ("beta1=0.8; weight_decay=0.1", "eps betas[1] lr", ""),
    ("paged_adamw_8bit", "came"): ("betas=(0.8, 0.95, 0.9999); weight_decay=0.1", "eps", ""),
    ("sgd", "adamw"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov momentum_dtype", "weight_decay"),
    ("sgd", "adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov momentum_dtype", "weight_decay"),
    ("sgd", "paged_adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.0001", "nesterov momentum_dtype", "weight_decay"),
    ("sgd", "sgd"): ("momentum=0.8; nesterov=True; weight_decay=0.0001; momentum_dtype='int8'", "", ""),
    ("sgd", "adafactor"): ("beta1=0.8; weight_decay=0.0001; momentum_dtype='int8'", "nesterov lr", "weight_decay"),
    ("sgd", "came"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.0001; momentum_dtype='int8'",
                      "nesterov", "weight_decay"),
    ("adafactor", "adamw"): ("betas=(0.8, 0.999)", "clip_threshold decay_rate momentum_dtype eps[0] eps[1]", ""),
    ("adafactor", "adamw_8bit"): ("betas=(0.8, 0.999)", "clip_threshold decay_rate momentum_dtype eps[0] eps[1]", ""),
    ("adafactor", "paged_adamw_8bit"): ("betas=(0.8, 0.999)",
                                        "clip_threshold decay_rate momentum_dtype eps[0] eps[1]", ""),
    ("adafactor", "sgd"): ("momentum=0.8; weight_decay=0.01; momentum_dtype='int8'",
                           "clip_threshold decay_rate eps[0] eps[1]", "weight_decay"),
    ("adafactor", "adafactor"): ("beta1=0.8; eps=(1e-29, 0.002); clip_threshold=0.5; decay_rate=-0.5; "
                                 "weight_decay=0.01; relative_step=False; scale_parameter=False; "
                                 "momentum_dtype='int8'",
                                 "", ""),
    ("adafactor", "came"): ("betas=(0.8, 0.999, 0.9999); eps=(1e-29, 1e-16); clip_threshold=0.5; weight_decay=0.01; "
                            "momentum_dtype='int8'",
                            "decay_rate eps[1]", ""),
    ("came", "adamw"): ("betas=(0.8, 0.95)", "clip_threshold momentum_dtype betas[2] eps[0] eps[1]", ""),
    ("came", "adamw_8bit"): ("betas=(0.8, 0.95)", "clip_threshold momentum_dtype betas[2] eps[0] eps[1]", ""),
    ("came", "paged_adamw_8bit"): ("betas=(0.8, 0.95)", "clip_threshold momentum_dtype betas[2] eps[0] eps[1]", ""),
    ("came", "sgd"): ("momentum=0.8; weight_decay=0.01; momentum_dtype='int8'",
                      "clip_threshold betas[1] betas[2] eps[0] eps[1]", "weight_decay"),
    ("came", "adafactor"): ("beta1=0.8; eps=(1e-29, 0.001); clip_threshold=0.5; weight_decay=0.01; "
                            "momentum_dtype='int8'",
                            "betas[1] betas[2] eps[1] lr", ""),
    ("came", "came"): ("betas=(0.8, 0.95, 0.99); eps=(1e-29, 1e-15); clip_threshold=0.5; weight_decay=0.01; "
                       "momentum_dtype='int8'",
                       "", ""),
    # Into Lion (Chen et al. 2023; bitsandbytes' Lion): betas[0] is the weight of the momentum in the update's sign,
    # as Adam's betas[0] / SGD's momentum weigh it in the update: carried; betas[1] (the momentum's own decay) keeps
    # Lion's 0.99: Adam's betas[1] is a second moment Lion has none of (dropped, warned), and so is eps (no
    # denominator). The lr is carried as it is (the schedule and lr * weight_decay stay the module's), with a
    # "changes meaning" note from an adaptive optimizer: Lion moves every element by lr, the paper uses 3-10x less.
    # From SGD no note: SGD's step scales with the gradient, there is no fixed ratio to name.
    ("Adam", "lion"): ("betas=(0.8, 0.99); weight_decay=0.1", "amsgrad betas[1] eps", "lr weight_decay"),
    ("AdamW", "lion"): ("betas=(0.8, 0.99); weight_decay=0.1", "betas[1] eps", "lr"),
    ("SGD", "lion"): ("betas=(0.8, 0.99); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("RMSprop", "lion"): ("betas=(0.5, 0.99); weight_decay=0.0001", "alpha centered eps", "lr weight_decay"),
    ("HF Adafactor", "lion"): ("betas=(0.8, 0.99); weight_decay=0.01", "clip_threshold decay_rate eps[0] eps[1]", "lr"),
    ("adamw_8bit", "lion"): ("betas=(0.8, 0.99); weight_decay=0.1", "betas[1] eps", "lr"),
    ("paged_adamw_8bit", "lion"): ("betas=(0.8, 0.99); weight_decay=0.1", "betas[1] eps", "lr"),
    ("sgd", "lion"): ("betas=(0.8, 0.99); weight_decay=0.0001", "momentum_dtype nesterov", "weight_decay"),
    ("adafactor", "lion"): ("betas=(0.8, 0.99); weight_decay=0.01",
                            "clip_threshold decay_rate eps[0] eps[1] momentum_dtype", "lr"),
    ("came", "lion"): ("betas=(0.8, 0.99); weight_decay=0.01",
                       "betas[1] betas[2] clip_threshold eps[0] eps[1] momentum_dtype", "lr"),
    ("lion", "lion"): ("betas=(0.8, 0.95); weight_decay=0.5", "", ""),
    ("ademamix", "lion"): ("betas=(0.8, 0.99); weight_decay=0.1", "alpha betas[1] betas[2] eps t_alpha t_beta3", "lr"),
    ("muon", "lion"): ("betas=(0.8, 0.99); weight_decay=0.05", "adamw_betas[0] adamw_eps momentum_dtype nesterov",
                       "lr"),
    # Into AdEMAMix (Pagliardini et al. 2024): Adam's betas[0], betas[1] and eps mean the same there: carried;
    # betas[2] (the slow EMA's decay, not CAME's instability decay), alpha and their warmups keep AdEMAMix's
    # defaults. The lr carries with no note (both adaptive; the paper keeps AdamW's lr), except from Lion.
    ("Adam", "ademamix"): ("betas=(0.8, 0.95, 0.9999); eps=1e-06; weight_decay=0.1", "amsgrad", "weight_decay"),
    ("AdamW", "ademamix"): ("betas=(0.8, 0.95, 0.9999); eps=1e-06; weight_decay=0.1", "", ""),
    ("SGD", "ademamix"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.0001", "nesterov", "weight_decay"),
    ("RMSprop", "ademamix"): ("betas=(0.5, 0.9, 0.9999); eps=1e-06; weight_decay=0.0001", "centered", "weight_decay"),
    ("HF Adafactor", "ademamix"): ("betas=(0.8, 0.999, 0.9999)", "clip_threshold decay_rate eps[0] eps[1]", ""),
    ("adamw_8bit", "ademamix"): ("betas=(0.8, 0.95, 0.9999); eps=1e-06; weight_decay=0.1", "", ""),
    ("paged_adamw_8bit", "ademamix"): ("betas=(0.8, 0.95, 0.9999); eps=1e-06; weight_decay=0.1", "", ""),
    ("sgd", "ademamix"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.0001", "momentum_dtype nesterov", "weight_decay"),
    ("adafactor", "ademamix"): ("betas=(0.8, 0.999, 0.9999)",
                                "clip_threshold decay_rate eps[0] eps[1] momentum_dtype", ""),
    ("came", "ademamix"): ("betas=(0.8, 0.95, 0.9999)", "betas[2] clip_threshold eps[0] eps[1] momentum_dtype", ""),
    ("lion", "ademamix"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.5", "betas[1]", "lr"),
    ("ademamix", "ademamix"): ("betas=(0.8, 0.95, 0.999); alpha=8.0; t_alpha=100; t_beta3=100; eps=1e-06; "
                               "weight_decay=0.1",
                               "", ""),
    ("muon", "ademamix"): ("betas=(0.8, 0.999, 0.9999); eps=1e-06; weight_decay=0.05",
                           "adamw_betas[0] momentum_dtype nesterov", "lr"),
    # Into Muon (issue 28's family): beta1 -> momentum, beta2/eps -> adamw_betas[1]/adamw_eps of the params Muon
    # gives AdamW (embeddings, head); decoupled decay carried; an adaptive or sign lr noted (Muon's default
    # scaling moves hidden matrices by an element RMS of lr / sqrt(cols)).
    ("Adam", "muon"): ("momentum=0.8; momentum_dtype='float32'; adamw_eps=1e-06", "amsgrad", "lr weight_decay"),
    ("AdamW", "muon"): ("momentum=0.8; momentum_dtype='float32'; adamw_eps=1e-06", "", "lr"),
    ("SGD", "muon"): ("weight_decay=0.0001; momentum=0.8; momentum_dtype='float32'", "", "weight_decay"),
    ("RMSprop", "muon"): ("weight_decay=0.0001; momentum=0.5; momentum_dtype='float32'; adamw_betas=(0.9, 0.9); "
                          "adamw_eps=1e-06",
                          "centered", "lr weight_decay"),
    ("HF Adafactor", "muon"): ("weight_decay=0.01; momentum=0.8; momentum_dtype='float32'",
                               "clip_threshold decay_rate eps[0] eps[1]", "lr"),
    ("adamw_8bit", "muon"): ("momentum=0.8; momentum_dtype='float32'; adamw_eps=1e-06", "", "lr"),
    ("paged_adamw_8bit", "muon"): ("momentum=0.8; momentum_dtype='float32'; adamw_eps=1e-06", "", "lr"),
    ("sgd", "muon"): ("weight_decay=0.0001; momentum=0.8; momentum_dtype='int8'", "", "weight_decay"),
    ("adafactor", "muon"): ("weight_decay=0.01; momentum=0.8; momentum_dtype='int8'",
                            "clip_threshold decay_rate eps[0] eps[1]", "lr"),
    ("came", "muon"): ("weight_decay=0.01; momentum=0.8; momentum_dtype='int8'",
                       "betas[2] clip_threshold eps[0] eps[1]", "lr"),
    ("lion", "muon"): ("weight_decay=0.5; momentum=0.8; momentum_dtype='float32'", "betas[1]", "lr"),
    ("ademamix", "muon"): ("momentum=0.8; momentum_dtype='float32'; adamw_eps=1e-06",
                           "alpha betas[2] t_alpha t_beta3", "lr"),
    ("muon", "muon"): ("weight_decay=0.05; momentum=0.8; nesterov=False; momentum_dtype='int8'; "
                       "adamw_betas=(0.8, 0.95); adamw_eps=1e-06",
                       "", ""),
    # From Lion, AdEMAMix and Muon into the other targets: Lion's betas[1], AdEMAMix's slow EMA (betas[2], alpha,
    # t_alpha, t_beta3) and Muon's adamw_betas[0] have no slot there (dropped, warned); Lion's lr is noted into an
    # adaptive target (3-10x too small there, by the paper), Muon's into an adaptive or sign one.
    ("lion", "adamw"): ("betas=(0.8, 0.999); weight_decay=0.5", "betas[1]", "lr"),
    ("lion", "adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.5", "betas[1]", "lr"),
    ("lion", "paged_adamw_8bit"): ("betas=(0.8, 0.999); weight_decay=0.5", "betas[1]", "lr"),
    ("lion", "sgd"): ("momentum=0.8; weight_decay=0.5", "betas[1]", "weight_decay"),
    ("lion", "adafactor"): ("beta1=0.8; weight_decay=0.5", "betas[1] lr", ""),
    ("lion", "came"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.5", "betas[1]", "lr"),
    ("ademamix", "adamw"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1", "alpha betas[2] t_alpha t_beta3", ""),
    ("ademamix", "adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1",
                                 "alpha betas[2] t_alpha t_beta3", ""),
    ("ademamix", "paged_adamw_8bit"): ("betas=(0.8, 0.95); eps=1e-06; weight_decay=0.1",
                                       "alpha betas[2] t_alpha t_beta3", ""),
    ("ademamix", "sgd"): ("momentum=0.8; weight_decay=0.1",
                          "alpha betas[1] betas[2] eps t_alpha t_beta3", "weight_decay"),
    ("ademamix", "adafactor"): ("beta1=0.8; weight_decay=0.1", "alpha betas[1] betas[2] eps lr t_alpha t_beta3", ""),
    ("ademamix", "came"): ("betas=(0.8, 0.95, 0.9999); weight_decay=0.1", "alpha betas[2] eps t_alpha t_beta3", ""),
    ("muon", "adamw"): ("betas=(0.8, 0.999); eps=1e-06; weight_decay=0.05",
                        "adamw_betas[0] momentum_dtype nesterov", "lr"),
    ("muon", "adamw_8bit"): ("betas=(0.8, 0.999); eps=1e-06; weight_decay=0.05",
                             "adamw_betas[0] momentum_dtype nesterov", "lr"),
    ("muon", "paged_adamw_8bit"): ("betas=(0.8, 0.999); eps=1e-06; weight_decay=0.05",
                                   "adamw_betas[0] momentum_dtype nesterov", "lr"),
    ("muon", "sgd"): ("momentum=0.8; weight_decay=0.05; momentum_dtype='int8'",
                      "adamw_betas[0] adamw_eps", "weight_decay"),
    ("muon", "adafactor"): ("beta1=0.8; weight_decay=0.05; momentum_dtype='int8'",
                            "adamw_betas[0] adamw_eps lr nesterov", ""),
    ("muon", "came"): ("betas=(0.8, 0.999, 0.9999); weight_decay=0.05; momentum_dtype='int8'",
                       "adamw_betas[0] adamw_eps nesterov", "lr"),
}
TABLE.update({(source, "adamw_4bit"): TABLE[source, "adamw_8bit"] for source in SOURCES})  # same settings
TABLE.update({(source, f"{name}_8bit"): TABLE[source, name] for source in SOURCES for name in ("lion", "ademamix")})
TABLE.update({(source, "muon_8bit"): (TABLE[source, "muon"][0].replace("dtype='float32'", "dtype='int8'"),
                                      *TABLE[source, "muon"][1:]) for source in SOURCES})  # int8 momentum by default


class Tiny(L.LightningModule):
    """A linear layer (and a frozen one) whose optimizer ``make(params)`` builds; ``schedule(opt)`` adds a
    per-step scheduler config."""

    def __init__(self, make=None, schedule=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 2)
        self.make = make or (lambda p: torch.optim.AdamW(p, lr=1e-3))
        self.schedule = schedule

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = self.make(self.parameters())
        if self.schedule is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.schedule(opt), "interval": "step"}}


def _data():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, x[:, :2].tanh()), batch_size=4)


def _fit(module, name, steps=3, logger=False, callbacks=(), **kwargs):
    callback = LowMemOptimizerCallback(name, print_summary=False, plot=False, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[callback, *callbacks])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _data())
    return trainer, [str(w.message) for w in caught if "LowMemOptimizerCallback(" in str(w.message)]


def _swap(source: str, target: str):
    """The callback's swap of a ``source`` optimizer, as in a fit (no Trainer needed): (new optimizer, warnings)."""
    module = Tiny()
    callback = LowMemOptimizerCallback(target, print_summary=False, plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = callback._swap(module, SOURCES[source](module.parameters()))
    return new, [str(w.message) for w in caught if "LowMemOptimizerCallback(" in str(w.message)]


def _noted(message: str, verb: str) -> set[str]:
    return set(re.findall(rf"  - \S+ (\S+?)=\S+ {verb}", message))


def _values(text: str) -> dict:
    return {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in text.split("; ") if item)}


@pytest.mark.parametrize("source,target", list(TABLE), ids=[f"{s}->{t}" for s, t in TABLE])
def test_swap_table(source, target):
    carried, dropped, changed = TABLE[(source, target)]
    new, messages = _swap(source, target)
    assert type(new) is optimizer_class(target)
    group, defaults = new.param_groups[0], constructor_defaults(optimizer_class(target))
    expected = {**{k: v for k, v in defaults.items() if k in group and k not in ("lr", "params")}, **_values(carried)}
    got = {k: tuple(group[k]) if isinstance(group[k], list) else group[k] for k in expected}
    assert got == pytest.approx(expected) if all(isinstance(v, float) for v in expected.values()) else got == expected
    if target != "adafactor":
        assert group["lr"] == pytest.approx(SOURCES[source]([torch.zeros(1)]).defaults["lr"])  # lr always carried
    if not dropped and not changed:
        assert messages == []
        return
    assert len(messages) == 1  # one warning for the fit, naming everything
    assert _noted(messages[0], "dropped") == set(dropped.split())
    assert _noted(messages[0], "changes meaning") == set(changed.split())


def test_table_covers_every_registered_optimizer():
    from lowmem_lightning.optim import available_optimizers

    assert set(TARGETS) == set(available_optimizers())
    assert {t for _, t in TABLE} == set(TARGETS) and {s for s, _ in TABLE} == set(SOURCES)


def test_defaults_are_replaced_silently_and_chosen_values_are_named_with_their_value():
    module = Tiny()
    callback = LowMemOptimizerCallback("sgd", print_summary=False, plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = callback._swap(module, torch.optim.AdamW(module.parameters(), lr=1e-3))  # all defaults
    assert [w for w in caught if "rebuilt the module's optimizer" in str(w.message)] == []
    assert [str(w.message) for w in caught if "learning rates differ" in str(w.message)] != []  # AdamW lr for SGD
    assert (new.param_groups[0]["momentum"], new.param_groups[0]["weight_decay"]) == (0.0, 0.0)  # sgd's defaults
    _, messages = _swap("Adam", "adamw_8bit")
    assert "amsgrad=True dropped" in messages[0] and "weight_decay=0.1 changes meaning: coupled L2" in messages[0]


def test_relative_step_adafactor_source_needs_an_lr():
    module = Tiny(make=lambda p: HFAdafactor(p))  # lr=None: it computes its own step size
    with pytest.raises(ValueError, match=r"needs a learning rate.*Adafactor has none.*lr=\.\.\."):
        LowMemOptimizerCallback("adamw_8bit", print_summary=False)._swap(module, module.configure_optimizers())
    callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-3, print_summary=False)
    new = callback._swap(module, module.configure_optimizers())
    assert new.param_groups[0]["lr"] == 1e-3
    new = LowMemOptimizerCallback("adafactor", print_summary=False)._swap(module, module.configure_optimizers())
    assert new.param_groups[0]["relative_step"] and new.param_groups[0]["lr"] is None


# ---------------------------------------------------------------- the three failures, as real fits
def test_adamw_llm_betas_into_came_trains():
    trainer, messages = _fit(Tiny(make=lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.95))), "came")
    assert tuple(trainer.optimizers[0].param_groups[0]["betas"]) == (0.9, 0.95, 0.9999)
    assert messages == []  # beta2 has the same meaning in CAME: nothing to warn about


def test_adam_coupled_decay_and_amsgrad_into_adamw_8bit_are_warned_once():
    trainer, messages = _fit(Tiny(make=lambda p: torch.optim.Adam(p, weight_decay=0.1, amsgrad=True)), "adamw_8bit")
    assert len(messages) == 1
    assert _noted(messages[0], "dropped") == {"amsgrad"} and _noted(messages[0], "changes meaning") == {"weight_decay"}


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)


def _cyclic(opt):
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2)


class _Momenta(L.Callback):
    def __init__(self):
        self.values = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = optimizer.param_groups[0]
        self.values.append(group["betas"][0] if "betas" in group else group["momentum"])


@pytest.mark.parametrize("schedule", [_one_cycle, _cyclic], ids=["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("target,key", [("sgd", "momentum"), ("came", "betas"), ("adamw_8bit", "betas"),
                                        ("lion_8bit", "betas")])
def test_momentum_cycling_scheduler_drives_the_new_optimizers_momentum(schedule, target, key):
    make = (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)) if schedule is _cyclic else None
    before, after = _Momenta(), _Momenta()
    _fit(Tiny(make=make, schedule=schedule), "adamw", steps=4, callbacks=[before])
    trainer, messages = _fit(Tiny(make=make, schedule=schedule), target, steps=4, callbacks=[after])
    expected, got = before.values, after.values
    assert key in trainer.optimizers[0].param_groups[0]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert len(set(got)) >= 3  # it cycles, step by step, the key the new optimizer reads
    assert got == pytest.approx(expected)  # exactly as it cycled the module's own optimizer's
    translated = [m for m in messages if "settings it could not carry" in m]  # (not the SGD -> adaptive lr note)
    assert translated == [] or "beta" not in translated[0].split("settings")[1].split("dropped")[0]


@pytest.mark.parametrize("schedule", [_one_cycle, _cyclic], ids=["OneCycleLR", "CyclicLR"])
def test_momentum_cycling_scheduler_is_refused_for_adafactor(schedule):
    module = Tiny(make=lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), schedule=schedule)
    before = module.net.weight.detach().clone()
    name = schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3, momentum=0.9)).__class__.__name__
    with pytest.raises(ValueError, match=rf"{name} cycles momentum.*cycle_momentum=False"):
        _fit(module, "adafactor", lr=1e-3, optimizer_kwargs={"relative_step": False})
    assert torch.equal(module.net.weight, before)  # refused before any step


def test_lr_into_lion_is_carried_with_the_papers_ratio_unless_the_callback_sets_one():
    new, messages = _swap("AdamW", "lion")
    assert new.param_groups[0]["lr"] == 2e-3  # carried as it is: the schedule and lr * weight_decay stay
    assert "AdamW lr=0.002 changes meaning: Lion moves every element by lr" in messages[0]
    assert "lr 3-10x smaller" in messages[0]
    _, messages = _swap("lion", "adamw_8bit")
    assert "Lion lr=0.0002 changes meaning" in messages[0] and "lr 3-10x larger" in messages[0]
    module = Tiny()
    callback = LowMemOptimizerCallback("lion", lr=3e-4, print_summary=False, plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = callback._swap(module, SOURCES["AdamW"](module.parameters()))
    messages = [str(w.message) for w in caught if "LowMemOptimizerCallback(" in str(w.message)]
    assert new.param_groups[0]["lr"] == 3e-4 and len(messages) == 1
    assert _noted(messages[0], "changes meaning") == set()  # the user chose Lion's lr: nothing to note
    assert _noted(messages[0], "dropped") == {"eps", "betas[1]"}


@pytest.mark.parametrize("target", ["lion_8bit", "ademamix_8bit"])
def test_adamw_llm_settings_into_lion_and_ademamix_train(target):
    module = Tiny(make=lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
    before = module.net.weight.detach().clone()
    trainer, messages = _fit(module, target)
    group = trainer.optimizers[0].param_groups[0]
    assert type(trainer.optimizers[0]) is optimizer_class(target) and trainer.global_step == 3
    assert not torch.equal(module.net.weight, before) and torch.isfinite(module.net.weight).all()
    if target == "lion_8bit":  # beta1 carried, beta2 (a second moment Lion lacks) dropped: Lion keeps its 0.99
        assert tuple(group["betas"]) == (0.9, 0.99) and group["weight_decay"] == 0.1
        assert _noted(messages[0], "dropped") == {"betas[1]"} and _noted(messages[0], "changes meaning") == {"lr"}
    else:  # Adam's two betas mean the same in AdEMAMix; its slow EMA keeps its defaults
        assert tuple(group["betas"]) == (0.9, 0.95, 0.9999) and group["alpha"] == 5.0 and messages == []


def test_adamw_one_cycle_into_sgd_no_longer_fails_with_key_error():
    trainer, _ = _fit(Tiny(schedule=_one_cycle), "sgd")
    assert trainer.global_step == 3


# ---------------------------------------------------------------- LearningRateMonitor names
def _lr_columns(logger) -> set[str]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return {c for c in csv.DictReader(f).fieldnames if c.startswith("lr-")}


def test_lr_monitor_keeps_the_module_optimizers_metric_names(tmp_path):
    names = {}
    for name in ("adamw", "adamw_8bit", "sgd"):
        logger = CSVLogger(tmp_path, name=name)
        _fit(Tiny(schedule=_one_cycle), name, logger=logger, callbacks=[LearningRateMonitor(log_momentum=True)])
        names[name] = _lr_columns(logger)
    assert names["adamw"] == {"lr-AdamW", "lr-AdamW-momentum"}  # the module's own optimizer's names
    assert names["adamw_8bit"] == names["sgd"] == names["adamw"]


class _TwoOptimizers(Tiny):
    """Two AdamW (one per tensor), each with a scheduler; the second scheduler named by the module."""

    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad()
        for sched in self.lr_schedulers():
            sched.step()

    def configure_optimizers(self):
        first = torch.optim.AdamW([self.net.weight], lr=1e-3)
        second = torch.optim.AdamW([self.net.bias], lr=1e-3)
        return [first, second], [torch.optim.lr_scheduler.StepLR(first, 1),
                                 {"scheduler": torch.optim.lr_scheduler.StepLR(second, 1), "name": "mine"}]


def test_lr_monitor_names_with_several_optimizers_and_a_named_scheduler(tmp_path):
    columns = {}
    for name in ("adamw", "adamw_8bit"):
        logger = CSVLogger(tmp_path, name=name)
        _fit(_TwoOptimizers(), name, logger=logger, callbacks=[LearningRateMonitor()])
        columns[name] = _lr_columns(logger) | {c for c in _all_columns(logger) if c == "mine"}
    assert columns["adamw"] == {"lr-AdamW", "mine"}
    assert columns["adamw_8bit"] == columns["adamw"]


def _all_columns(logger) -> set[str]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return set(csv.DictReader(f).fieldnames)


def test_frozen_params_the_target_cannot_update_are_left_out_and_named():
    module = Tiny()
    module.table = nn.Parameter(torch.zeros(4, dtype=torch.float64), requires_grad=False)  # could be unfrozen
    module.codes = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)  # never trainable
    callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = callback._swap(module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    kept = {id(p) for g in new.param_groups for p in g["params"]}
    assert id(module.net.weight) in kept and id(module.table) not in kept and id(module.codes) not in kept
    messages = [str(w.message) for w in caught if "LowMemOptimizerCallback(" in str(w.message)]
    assert len(messages) == 1 and "1 frozen torch.float64 param(s) left out" in messages[0]
    assert "uint8" not in messages[0]
