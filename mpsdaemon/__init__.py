"""NVIDIA's MPS control daemon (``mps-control-daemon``), in Python.

One CUDA MPS control daemon per MPS-shared resource of the node (see docs/sharing.md#mps):

* :mod:`mpsdaemon.daemon`: one resource's daemon: compute mode EXCLUSIVE_PROCESS through NVML,
  pipe and log directories under the MPS root, ``nvidia-cuda-mps-control -d``, the default
  pinned-memory limit and active-thread percentage per client, the ``.started`` marker; and
  the reverse on stop. A start that fails half-way is undone.
* :mod:`mpsdaemon.manager`: all of them: starts them, writes ``<root>/.ready`` while every one
  runs, checks they still answer, restarts a dead one with backoff (reporting it), and stops
  them all (compute mode back to DEFAULT).
* :mod:`mpsdaemon.logfollow`: follows each daemon's ``control.log`` into our log.
* :mod:`mpsdaemon.shm`: the ``mount-shm`` init step (a tmpfs at ``<root>/shm``).

A package of its own, beside ``deviceplugin`` and ``gfd``, because it is a daemon of its own
(its own DaemonSet and console script); what the plugin shares with it (the root layout, the
control client, the limits) lives in :mod:`gpus.mps`.
"""
