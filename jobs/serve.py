"""Ray job entry point for the serve stage.

    ray job submit --address $RAY_ADDRESS --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/serve.py --config jobs/configs/realistic.yaml storage.root=s3://bucket/lensmill

Thin: the same command as `lensmill serve`; ends with one JSON line on stdout.
"""

import sys

from lensmill.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]])
