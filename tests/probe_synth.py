"""A probe file's object built by hand, exactly as /work/spec/probe_json.md lays it out
(format ``gradnoise-probe``, version 1), for the tests of its reader and its report section.

Six batch sizes, three seeds each. The steps to the target follow ``S = 12 (1 + 120/B)``
(seed ``k`` takes ``1 + 0.05 k`` times as many); the largest batch never reaches the target
and one of its seeds diverges.
"""
import copy
import math

SIZES = [16, 32, 64, 128, 256, 512]
SEEDS = 3
BUDGET = 8192


def _branch(b, seed):
    steps = BUDGET // b
    reaches = b <= 256
    s_to = 12.0 * (1 + 120.0 / b) * (1 + 0.05 * seed) if reaches else None
    curve = [[i * b, i, 0.41 - 0.1 * (1 - math.exp(-i * b / (1000.0 + 10 * b))) + 0.002 * seed]
             for i in range(0, steps + 1, max(1, steps // 8))]
    return {"batch_size": b, "seed": seed, "lr": 0.001 * (b / 32) ** 0.5, "steps": steps,
            "diverged": b == 512 and seed == 2, "curve": curve, "steps_to_target": s_to,
            "examples_to_target": None if s_to is None else s_to * b, "loss_at_budget": curve[-1][2]}


def probe_object(**overrides):
    """A complete, valid probe object; ``overrides`` replace top-level keys."""
    obj = {
        "format": "gradnoise-probe", "version": 1, "created": "2026-01-02T03:04:05+00:00",
        "task": "digits-mlp", "checkpoint": {"step": 300, "loss": 0.41},
        "optimizer": {"class": "AdamW", "family": "adam", "groups": 1, "lr": 0.001, "betas": [0.9, 0.999],
                      "eps": 1e-08, "weight_decay": 0.01},
        "base_batch": 32, "lr": 0.001, "lr_rule": "sqrt", "budget": BUDGET, "batch_sizes": list(SIZES),
        "seeds": SEEDS,
        "branches": [_branch(b, s) for b in SIZES for s in range(SEEDS)],
        "target_loss": 0.36,
        "mccandlish": {"b_noise": 120.0, "interval": [80.0, 200.0], "s_min": 12.0, "e_min": 1440.0,
                       "points": [[b, 12.0 * (1 + 120.0 / b) * 1.05] for b in SIZES[:-1]], "reason": None},
        "merrill": {"b_crit": 128, "interval": [64, 256], "tolerance": 0.05, "best_loss": 0.31,
                    "losses": [[b, 0.31 + 0.0001 * b, [0.305 + 0.0001 * b, 0.318 + 0.0001 * b]] for b in SIZES],
                    "reason": None},
        "proxy": {"b_simple": 40.0, "b_simple_interval": [30.0, 55.0],
                  "preconditioned": 90.0, "preconditioned_interval": [60.0, 140.0],
                  "ratio": 3.0, "ratio_interval": [1.5, 6.7],
                  "preconditioned_ratio": 1.3333, "preconditioned_ratio_interval": [0.6, 3.3],
                  "batches": 8},
        "seconds": 42.0,
    }
    obj.update(copy.deepcopy(overrides))
    return obj


def undetermined_probe():
    """The branches cannot tell: an SGD run (no preconditioned noise scale), every batch
    size as fast as the next (no McCandlish fit), the bend beyond the sweep (no Merrill
    value), an unknown parent step and an undefined raw B_simple."""
    obj = probe_object(optimizer={"class": "SGD", "family": "sgd", "groups": 1, "lr": 0.1}, lr_rule="linear",
                       checkpoint={"step": None, "loss": 0.41})
    obj["mccandlish"].update(b_noise=None, interval=None, s_min=None, e_min=None,
                             reason="every batch size took the same steps")
    obj["merrill"].update(b_crit=None, interval=[None, None], reason="the bend lies beyond the sweep")
    obj["proxy"].update(b_simple=None, b_simple_interval=None, preconditioned=None, preconditioned_interval=None,
                        ratio=None, ratio_interval=None, preconditioned_ratio=None,
                        preconditioned_ratio_interval=None)
    return obj
