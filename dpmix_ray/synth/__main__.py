"""Draw a synthetic set's PNG grid, generating the set first when given a config.

    python -m dpmix_ray.synth SET_DIR_OR_CONFIG.yaml OUT.png [--per-class N] [--set synth.key=value …]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpmix_ray.errors import DPMixError
from dpmix_ray.synth.grid import save_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmix_ray.synth", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a synthetic set directory, or a config file with a synth section")
    parser.add_argument("png", help="where to write the PNG grid")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, e.g. synth.images_per_class=16")
    args = parser.parse_args(argv)
    try:
        source = Path(args.source)
        if source.is_file():
            from dpmix_ray.config import load_data_config, load_synth_config
            from dpmix_ray.synth.sets import generate_for

            source = generate_for(load_synth_config(source, args.set), load_data_config(source, args.set))
        save_grid(source, args.png, per_class=args.per_class)
    except DPMixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
