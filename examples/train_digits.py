"""Train the bundled example network and write a native hessdiag checkpoint.

    python examples/train_digits.py [OUTPUT]

Default output: hessdiag/data/digits_mlp_rct1_alpha14.pt (shipped as package data). A 64-48-48-10 MLP with
RCT-AF (n = 1, α = 14, ψ_max = 7) trained with Adam on the digits training split; seeded,
a few seconds on 2 CPU cores.
"""

import sys
from pathlib import Path

from hessdiag.demo import DEMO_CHECKPOINT, DEMO_FACTORY, DEMO_KWARGS, train_demo_model
from hessdiag.io import save_checkpoint


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "hessdiag" / "data" / DEMO_CHECKPOINT
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    model, meta = train_demo_model()
    save_checkpoint(out, model, DEMO_FACTORY, DEMO_KWARGS, meta)
    print(f"wrote {out}: train accuracy {meta['train_accuracy']:.3f}, "
          f"test accuracy {meta['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
