"""Muon's Newton-Schulz in bf16 and in fp32: the optimizer step's share of a training step, on this device.

    python tools/ns_precision.py [--profile t4] [-p batch_size 8] [--repeat 5]

For each precision: the median seconds of a whole training step (bench's step: forward, backward, clip,
AdamW + Muon) and of Muon's step alone on the same gradients, each timed in turns with the other precision so
a noisy machine slows both alike. Prints one JSON line per precision.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocketgpt.bench import step_timer  # noqa: E402
from pocketgpt.config import PretrainConfig, TokenizerConfig, make_config  # noqa: E402
from pocketgpt.device import choose_precision, device_name  # noqa: E402
from pocketgpt.model import LMLoss, build_model  # noqa: E402
from pocketgpt.optim import make_optimizers  # noqa: E402
from pocketgpt.pipeline import parse_value  # noqa: E402


def muon_step_timer(cfg, vocab_size: int):
    """Seconds of Muon's step alone, on gradients of one real backward pass."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(vocab_size, cfg).to(device)
    x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.n_positions + 1), device=device)
    LMLoss(model)(x[:, :-1], x[:, 1:]).backward()
    muon = make_optimizers(model, cfg, device)[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one() -> float:
        sync()
        started = time.perf_counter()
        muon.step()
        sync()
        return time.perf_counter() - started
    return one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="t4")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = p.parse_args(argv)
    params = {k: parse_value(v) for k, v in args.param}
    vocab = make_config(TokenizerConfig, args.profile, run_dir="unused").vocab_size
    timers = {}
    for ns in ["bf16", "fp32"]:
        cfg = make_config(PretrainConfig, args.profile, run_dir="unused", newton_schulz=ns, **params)
        precision = choose_precision(cfg.precision)
        model = build_model(vocab, cfg)
        timers[ns] = (step_timer(LMLoss(model), cfg, vocab, precision, False), muon_step_timer(cfg, vocab))
        timers[ns][0](), timers[ns][1]()  # warm-up
    seconds = {ns: ([], []) for ns in timers}
    for _ in range(args.repeat):
        for ns, (step, muon) in timers.items():
            seconds[ns][0].append(step())
            seconds[ns][1].append(muon())
    for ns, (steps, muons) in seconds.items():
        step_s, muon_s = float(np.median(steps)), float(np.median(muons))
        print(json.dumps({"newton_schulz": ns, "device": device_name(torch.device("cuda" if torch.cuda.is_available()
                                                                                    else "cpu")),
                          "profile": args.profile, "params": params, "step_s": round(step_s, 4),
                          "muon_step_s": round(muon_s, 4), "muon_share": round(muon_s / step_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
