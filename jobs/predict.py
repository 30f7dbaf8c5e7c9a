"""Ray job entry point for the batch-scoring stage (predict).

    ray job submit --address $RAY_ADDRESS --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/predict.py --config jobs/configs/realistic.yaml --split test storage.root=s3://bucket/lensmill

Thin: the same command as `lensmill predict`; ends with one JSON line on stdout.
"""

import sys

from lensmill.cli import app

if __name__ == "__main__":
    app(["predict", *sys.argv[1:]])
