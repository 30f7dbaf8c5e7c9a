"""Ray job entry point for the tune stage.

    ray job submit --address $RAY_ADDRESS --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/tune.py --config jobs/configs/realistic.yaml storage.root=s3://bucket/lensmill

Thin: the same command as `lensmill tune`; ends with one JSON line on stdout.
"""

import sys

from lensmill.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
