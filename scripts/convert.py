"""Convert another tool's dataset into an icrt episode store (+ a ready dataset JSON).

    python scripts/convert.py --format robomimic --input low_dim.hdf5 --out data/can.zarr
    python scripts/convert.py --format robomimic --input demo.hdf5 --out data/lift_img.zarr \
        --render-cameras agentview robot0_eye_in_hand --image-size 84
    python scripts/convert.py --format icrt --input config/dataset_config.json --out data/mt.zarr \
        --image-size 128
    python scripts/convert.py --format lerobot --input ~/lerobot/pusht --out data/pusht.zarr \
        --image-size 96                           # LeRobot v3.0 / v2.x dataset directory
    python scripts/convert.py ... --resume        # continue after the last committed episode

Run with -h for every option.
"""

import json
import logging

from icrt.cli import run
from icrt.config import ConvertConfig, parse_config
from icrt.data.convert import convert


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(cls=ConvertConfig, description=__doc__)
    print(json.dumps(convert(cfg), indent=1))


if __name__ == "__main__":
    run(main)
