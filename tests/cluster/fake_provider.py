"""Ray's ``fake_multinode`` node provider with one change: each worker node it launches keeps its
runtime environments (the job's working_dir, py_modules) in a folder of its own.

Why: the fake nodes share one disk, and every node's runtime-env agent unpacks the job's working_dir
with ``overwrite=True`` (Ray >= 2.41 replaces a cached copy entirely) into the same
``{session}/runtime_resources`` folder. A node joining mid-job deleted the folder that the processes
of the other nodes were running in, and the next ``os.getcwd()`` (numba compiling lenstronomy's
profiles, for one) failed with a bare ``[Errno 2] No such file or directory``. On AWS every node
has its own disk; this gives the fake nodes that much of one. Loaded by the autoscaler as
``provider: {type: external, module: fake_provider.SeparateDisksProvider}``.
"""

from __future__ import annotations

import functools

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateDisksProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # re-entrant: the parent takes it too; no other launch can see the patch
            params = ray._private.parameter.RayParams
            folder = f"runtime_resources_node{self._next_node_id + 1}"
            ray._private.parameter.RayParams = functools.partial(params, runtime_env_dir_name=folder)
            try:
                return super()._create_node_with_resources_and_labels(
                    node_config, tags, count, resources, labels
                )
            finally:
                ray._private.parameter.RayParams = params
