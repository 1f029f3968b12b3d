"""A model or run folder's file names, in one place: what `chargpt train --out` writes, what readers look for, and
the names of the roll-back scheme (training/outdir.py says how the roll-back works).

    model.safetensors   the weights (storage/checkpoint.py)       config.json   the shape and vocabulary
    train_state.pt      the resumable state (storage/trainstate)  stable_state.pt   a WSD run's state where its
                                                                                    final decay began
    metrics.jsonl, loss.png, samples.txt   the run's record (training/report.py, training/samples.py)
    .chargpt-run        the marker that proves the run files are chargpt's
    .chargpt.lock       the lock a running `train` holds
    .chargpt-previous/  an overwritten run kept whole until the new one has saved (.partial while it is being
                        filled or emptied, .discard while it is being deleted)
"""

from __future__ import annotations

WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"
STABLE_STATE = "stable_state.pt"
METRICS, PLOT, SAMPLES = "metrics.jsonl", "loss.png", "samples.txt"
RUN_FILES = (WEIGHTS, CONFIG, TRAIN_STATE, STABLE_STATE, METRICS, PLOT, SAMPLES)  # what the marker vouches for
LOCK, MARKER = ".chargpt.lock", ".chargpt-run"
# BACKUP: complete, the old run, while the new one has saved nothing yet; MOVING: being filled (or emptied), its
# files and the top level are the old run; DISCARD: the new run has saved, the old one is being deleted
BACKUP = ".chargpt-previous"
MOVING = ".chargpt-previous.partial"
DISCARD = ".chargpt-previous.discard"
