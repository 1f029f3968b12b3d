"""Which average of the weights wins: one step-budget run of the sized default's recipe (the 128 x 4 rung, Muon,
WSD, no dropout) on tinyshakespeare, with several averages of its weights kept along the same trajectory; at the
end the weights as trained and each average are scored on the whole val text (the last 10%, `chargpt eval`'s
windows, fp32).

    python benchmarks/bench_averaging.py [--steps 3200] [--weight-decay 0.1] [--seed 0] [--out out/bench-averaging]

Averages: exponential moving averages with a fixed decay per step (ema0.99 ... ema0.999), with a half-life that
grows with the run (pema0.05: 5% of the steps so far), and the plain mean over the last part of the run
(mean30: the last 30%, WSD's whole final decay; mean15: its second half). One thread; a step budget, so the
machine's load changes the wall time only. The run's own --ema is off: the averages here are kept beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from chargpt.inference.evaluate import evaluate
from chargpt.machine import precision as prec
from chargpt.storage import checkpoint as ckpt
from chargpt.training import loop, sizing
from chargpt.training.settings import make_train_config
from cpuflags import shown_flags

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARGPT_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "data" / "tinyshakespeare.txt"
FIXED = (0.99, 0.995, 0.998, 0.999)  # decay per step
GROWING = (0.05, 0.1, 0.2)  # half-life, as a share of the steps so far
TAILS = (0.3, 0.15)  # the mean over this last share of the steps


class Averages:
    """Every average above, of one model's parameters, updated after each step."""

    def __init__(self, steps: int):
        self.steps, self.kept = steps, {}

    def update(self, params: list[torch.Tensor], step: int) -> None:
        weights = {f"ema{b:g}": 1 - b for b in FIXED}
        weights |= {f"pema{h:g}": 1 - 0.5 ** (1 / max(h * step, 1.0)) for h in GROWING}
        for share in TAILS:
            first = int(self.steps * (1 - share))
            if step > first:
                weights[f"mean{share * 100:.0f}"] = 1 / (step - first)
        for name, weight in weights.items():
            if name not in self.kept:
                self.kept[name] = [p.clone() for p in params]
            else:
                torch._foreach_lerp_(self.kept[name], params, weight)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3200, help="3200: the 900 s default's length here; 6400: 1800 s")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench-averaging")
    a = p.parse_args()
    info = prec.cpu_info()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; cores {os.cpu_count()}; load {os.getloadavg()[0]:.2f}")
    torch.set_num_threads(1)
    rung = sizing.LADDER[0]
    settings = {**rung.settings(), "weight_decay": a.weight_decay, "ema": 0.0, **sizing.evaluation(a.steps)}
    cfg = make_train_config(
        sized=settings, data=str(CORPUS), n_updates=a.steps, out=a.out, threads=1, precision="fp32", seed=a.seed
    )
    averages, model = Averages(a.steps), {}
    step = loop.train_step

    def averaged_step(run: loop.Run, state: loop.RunState) -> torch.Tensor:
        loss = step(run, state)
        averages.update([p.detach() for p in run.model.parameters()], state.step + 1)
        model["live"] = run.model
        return loss

    loop.train_step = averaged_step  # the loop calls it by its module's name
    t0 = time.perf_counter()
    loop.train(cfg, overwrite=True, progress=False)
    live = model["live"]
    _, tokenizer = ckpt.load_model(a.out)
    text = CORPUS.read_text(encoding="utf-8")
    val = text[len(text) - int(len(text) * 0.1) :]
    trained = [p.detach().clone() for p in live.parameters()]

    def score(weights: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for p, w in zip(live.parameters(), weights, strict=True):
                p.copy_(w)
        return round(evaluate(live.eval(), tokenizer, val, precision="fp32")["loss"], 4)

    losses = {"trained": score(trained)} | {name: score(weights) for name, weights in averages.kept.items()}
    print(f"{'trained':>10}: {losses['trained']:.4f}")
    for name, loss in list(losses.items())[1:]:
        print(f"{name:>10}: {loss:.4f} ({loss - losses['trained']:+.4f} against the weights as trained)")
    run = {"steps": a.steps, "weight_decay": a.weight_decay, "seed": a.seed, "wall_s": round(time.perf_counter() - t0)}
    print(json.dumps(run | losses))


if __name__ == "__main__":
    main()
