"""Ray job entry point for the representation probe (a frozen encoder's linear probe and regression heads).

    ray job submit --address $RAY_ADDRESS --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/probe.py models:/lens-encoder/1 --config jobs/configs/substructure.yaml storage.root=s3://bucket/lensmill

Thin: the same command as `lensmill probe`; ends with one JSON line on stdout.
"""

import sys

from lensmill.cli import app

if __name__ == "__main__":
    app(["probe", *sys.argv[1:]])
