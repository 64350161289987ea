"""The app's methods: names, labels, one-line help, and the hyperparameter each chooses on validation.

Torch-free on purpose: ``python -m experiments.recsys --help`` imports only this and argparse.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One ``--methods`` name."""

    name: str
    kind: str
    """``TrainConfig.method`` (``mb`` for the three MetaBalance strategies)."""
    label: str
    help: str
    hyper: str | None = None
    """The ``TrainConfig`` field chosen on validation, or None."""
    symbol: str = ""
    """How the hyperparameter appears in the label, e.g. ``r``."""
    real_grid: tuple[float, ...] = ()
    synthetic_grid: tuple[float, ...] = ()
    strategy: str = "C"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mostpop", "mostpop", "MostPop", "no training: items ranked by their target training purchases"),
        Method("single", "single", "Single-Loss", "the target loss only"),
        Method("vanilla", "vanilla", "Vanilla-Multi", "the plain sum of all task losses, one backward"),
        Method(
            "weights",
            "weights",
            "Weights-Tuning",
            "fixed loss weights: target 1, every auxiliary w (chosen on validation)",
            "aux_weight",
            "w",
            (0.1, 0.3, 0.5),
            (0.3,),
        ),
        Method(
            "uncertainty",
            "uncertainty",
            "Uncertainty",
            "Kendall et al. 2018: learned log-variances s_t, loss sum exp(-s_t) L_t + s_t/2",
        ),
        Method(
            "gradnorm",
            "gradnorm",
            "GradNorm",
            "Chen et al. 2018: learned loss weights equalising gradient norms on the last shared layer",
            "gradnorm_alpha",
            "alpha",
            (0.5, 1.5),
            (1.5,),
        ),
        Method(
            "dwa",
            "dwa",
            "DWA",
            "Liu et al. 2019, Dynamic Weight Average: weights from the last two epochs' loss ratios",
            "dwa_temperature",
            "T",
            (2.0,),
            (2.0,),
        ),
        Method(
            "mgda",
            "mgda",
            "MGDA",
            "Sener & Koltun 2018: min-norm convex combination of the task gradients (exact, shared parameters)",
        ),
        Method(
            "pcgrad",
            "pcgrad",
            "PCGrad",
            "Yu et al. 2020 (GradSurgery): project out conflicting components of the task gradients",
        ),
        Method(
            "gradsim",
            "gradsim",
            "GradSim",
            "Du et al. 2018: an auxiliary gradient is used only when its cosine with the target's is positive",
        ),
        Method(
            "mtadam",
            "mtadam",
            "MTAdam",
            "Malkiel & Wolf 2021: Adam balancing each term's per-layer gradient magnitude to the target's",
        ),
        *(
            Method(
                f"mb-{s}",
                "mb",
                f"MetaBalance-{s}",
                f"MetaBalance strategy {s}: {why} auxiliary gradients toward the target's magnitude (relax r)",
                "relax_factor",
                "r",
                (0.5, 0.7, 0.9),
                (0.7,),
                strategy=s,
            )
            for s, why in (("A", "shrink larger"), ("B", "enlarge smaller"), ("C", "shrink larger and enlarge smaller"))
        ),
    )
}

DEFAULT_METHODS = ("mostpop", "single", "vanilla", "mb-A", "mb-B", "mb-C")
"""The synthetic main job's default: what ``./run.sh`` has always shown (about two minutes on two cores)."""
BASELINES = ("weights", "uncertainty", "gradnorm", "dwa", "mgda", "pcgrad", "gradsim", "mtadam")


def method_help() -> str:
    """One line per method, for ``--help``."""
    width = max(len(n) for n in METHODS)
    return "\n".join(f"  {m.name.ljust(width)}  {m.help}" for m in METHODS.values())
