"""GPU feature discovery's labelling loop: one :class:`Daemon` per process.

A pass reads the NVML snapshot, the machine type and the clock, computes the labels
(:func:`gfd.labels.node_labels`, pure) and hands them to every output: the features file (or
stdout) and the Node object (:class:`gfd.nodepatch.NodePublisher`). Outputs are built in
:meth:`Daemon.__init__` and fed in :meth:`Daemon.publish`: a new output (a NodeFeature
object, say) is one more object there, with its options as rows of ``GfdOptions`` in
gpus/config/model.py. Signals come from :class:`gpus.runtime.Signals`: SIGHUP reloads the
configuration and relabels at once; SIGTERM/SIGINT stop (in loop mode the features file is
removed so node-feature-discovery drops the labels).

Health contract (the DaemonSet's probes): the health file (``--health-file``, env
``GFD_HEALTH_FILE``) is deleted at start and rewritten with the Unix time after every
successful pass: labels computed and every configured output (file, Node) written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TextIO

from gfd.labels import (
    TIMESTAMP_LABEL,
    UNKNOWN_MACHINE,
    label_problems,
    node_labels,
    timestamp_labels,
)
from gfd.metrics import CountingNodeApi, CountingNodeFeatureApi
from gfd.nodefeature import (
    KubeNodeFeatureApi,
    NodeFeatureApi,
    NodeFeaturePublisher,
    TokenBucket,
)
from gfd.nodepatch import KubeNodeApi, NodeApi, NodePublisher
from gfd.output import FeaturesFile, HealthFile, render_table
from gpus.backoff import Backoff
from gpus.config import Config, ConfigError, GfdOptions, OutputMode, reload
from gpus.errors import InitError, NvmlError
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.records import record
from gpus.runtime import EXIT_FAILURE, EXIT_OK, NvmlBackend, Signals

if TYPE_CHECKING:  # prometheus_client: imported only with --metrics-address
    from gpus.runtime.metrics import GfdMetrics

log = logging.getLogger("gfd")

ONESHOT_PATCH_ATTEMPTS = 5  # oneshot + node-api: tries (with backoff) before giving up

SnapshotReader = Callable[[Config], Snapshot]


@record
class Options:
    """The process's own options (rows of ``daemon`` in gpus/config/model.py), as the daemon
    uses them. Built with :meth:`from_config`; constructed directly (tests, the bench), the
    health file defaults to none, so programmatic use never writes under /run."""

    output_mode: str = OutputMode.FILE
    node_name: str = ""
    kubeconfig: str = ""
    dry_run: bool = False
    log_level: str = "info"
    health_file: str = ""  # "" disables

    @classmethod
    def from_config(cls, options: GfdOptions, log_level: str = "info",
                    use_node_feature_api: bool | None = None) -> Options:
        """The options of a resolved ``config.daemon.gfd``; ConfigError when a mode that
        writes to the API server has no Node name.

        Without ``--output-mode``, an explicit ``--use-node-feature-api`` (flag, env or file
        key: ``config.flags.use_node_feature_api``) chooses NodeFeature or the file; left unset,
        the features file (NVIDIA's GFD would default to the NodeFeature API; docs/gfd.md).
        """
        mode = options.output_mode or (
            OutputMode.NODE_FEATURE if use_node_feature_api else OutputMode.FILE)
        result = cls(output_mode=mode, node_name=options.node_name.strip(),
                     kubeconfig=options.kubeconfig.strip(), dry_run=options.dry_run,
                     log_level=str(log_level), health_file=options.health_file.strip())
        if (result.patches_node or result.publishes_node_feature) and not result.node_name \
                and not result.dry_run:
            raise ConfigError(f"--output-mode {mode} needs the Node's name: set "
                              "--node-name or NODE_NAME (from the downward API: spec.nodeName)")
        return result

    @property
    def writes_file(self) -> bool:
        """True when the features file (or stdout) is an output."""
        return self.output_mode in (OutputMode.FILE, OutputMode.BOTH)

    @property
    def patches_node(self) -> bool:
        """True when labels go onto the Node object."""
        return self.output_mode in (OutputMode.NODE_API, OutputMode.BOTH)

    @property
    def publishes_node_feature(self) -> bool:
        """True when labels go into an NFD NodeFeature object (gfd/nodefeature.py)."""
        return self.output_mode == OutputMode.NODE_FEATURE


# --------------------------------------------------------------------------- reading


def read_machine_type(path: str) -> str:
    """The machine type (DMI product name) from ``path``, or ``unknown`` when unreadable."""
    if not path:
        return UNKNOWN_MACHINE
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read().strip()
    except OSError as err:
        log.debug("cannot read machine type from %s: %s", path, err)
        return UNKNOWN_MACHINE
    return text or UNKNOWN_MACHINE


def read_nvml_snapshot(config: Config) -> Snapshot:
    """One NVML session: init, read everything, shut down (as NVIDIA's GFD does per pass)."""
    nvml = Nvml()
    nvml.init()
    try:
        return nvml.read_snapshot(config.flags.sysfs_root)
    finally:
        nvml.shutdown()


class Daemon:
    """One GFD process: labelling passes, outputs, retries, reloads."""

    def __init__(
        self,
        config: Config,
        options: Options,
        *,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
        reader: SnapshotReader = read_nvml_snapshot,
        node_api: NodeApi | None = None,
        node_feature_api: NodeFeatureApi | None = None,
        backoff: Backoff | None = None,
        backend: NvmlBackend | None = None,
        stdout: TextIO | None = None,
        wakeup: Signals | None = None,
        clock: Callable[[], float] = time.time,
        metrics: GfdMetrics | None = None,
    ) -> None:
        """``reader``, ``node_api``, ``backoff`` and ``clock`` (wall-clock seconds, for the
        timestamp label) are injectable for tests and the bench.

        Unless this is a dry run, a health file left by an earlier run is deleted here, first,
        so that even a failure to start leaves no stale proof of health behind.
        """
        self.config = config
        self.options = options
        self.metrics = metrics  # None: --metrics-address unset
        self.health = HealthFile("" if options.dry_run else options.health_file)
        self.health.reset()
        self._args = args
        self._environ = environ if environ is not None else os.environ
        self._reader = reader
        self._clock = clock
        self._backend = backend
        self._stdout = stdout or sys.stdout
        self.wakeup = wakeup or Signals()
        self.features = FeaturesFile(config.flags.gfd.output_file, stream=self._stdout)
        self.publisher: NodePublisher | NodeFeaturePublisher | None = None
        if options.publishes_node_feature and not options.dry_run:
            flags = config.flags
            feature_api: NodeFeatureApi = node_feature_api or KubeNodeFeatureApi.from_environment(
                options.kubeconfig or None, TokenBucket(flags.kube_api_qps, flags.kube_api_burst))
            if metrics is not None:
                feature_api = CountingNodeFeatureApi(feature_api, metrics)
            # As for the Node: a new timestamp alone does not rewrite the object.
            self.publisher = NodeFeaturePublisher(
                feature_api, options.node_name, flags.namespace, flags.pod_name, backoff,
                refresh_only={TIMESTAMP_LABEL})
        if options.patches_node and not options.dry_run:
            api = node_api or KubeNodeApi.from_environment(options.kubeconfig or None)
            if metrics is not None:
                api = CountingNodeApi(api, metrics)
            # A new timestamp alone does not patch the Node: in steady state that would be
            # one write per node per pass, for a label nothing selects on.
            self.publisher = NodePublisher(api, options.node_name, backoff,
                                           refresh_only={TIMESTAMP_LABEL})
        self._ever_read = False
        self._nvml_state = "ok"
        self._problems: tuple[str, ...] = ()
        self._machine = ""
        self._awaiting_patch = False  # this pass wrote its file; only the Node patch is due
        self.passes = 0

    # ----------------------------------------------------------------- one pass

    def compute_labels(self) -> dict[str, str] | None:
        """This pass's labels; None when NVML failed after an earlier success (keep outputs).

        Raises InitError when NVML never worked and --fail-on-init-error is set.
        """
        config = self.config
        now = int(self._clock())
        try:
            snapshot = self._reader(config)
        except NvmlError as err:
            return self._nvml_failed(err, now)
        if self._nvml_state != "ok":
            log.info("NVML answers again")
        self._nvml_state = "ok"
        self._ever_read = True
        machine = read_machine_type(config.flags.gfd.machine_type_file)
        if machine != self._machine:
            log.info("machine type %r (from %s)", machine, config.flags.gfd.machine_type_file)
            self._machine = machine
        labels = node_labels(snapshot, config, machine=machine, timestamp=now)
        problems = label_problems(snapshot, config)
        if problems != self._problems:
            for problem in problems:
                log.warning("%s", problem)
        self._problems = problems
        if len(labels) <= 1:
            log.warning("no GPU labels generated (no GPUs found)")
        return labels

    def _nvml_failed(self, err: Exception, now: int) -> dict[str, str] | None:
        if self.metrics is not None:
            self.metrics.nvml_errors.labels(getattr(err, "name", "") or type(err).__name__).inc()
        if not self._ever_read and self.config.flags.fail_on_init_error:
            raise InitError(str(err)) from err
        if str(err) != self._nvml_state:
            log.error("NVML failed: %s", err)
        self._nvml_state = str(err)
        if self._ever_read:
            return None  # keep the last published labels rather than flapping them away
        return timestamp_labels(self.config, now)

    def publish(self, labels: Mapping[str, str]) -> bool:
        """Hand the labels to every output; True when all of them took the labels.

        A failing API server never blocks the file. When only the Node patch failed, its
        retries (see :meth:`retry_patch`) may still complete this pass.
        """
        file_ok = True
        if self.options.writes_file:
            try:
                self.features.write(labels)
            except OSError as err:
                log.error("cannot write the features file %s: %s", self.features.path,
                          err.strerror or err)
                file_ok = False
        patched = self.publisher.publish(labels) if self.publisher is not None else True
        self._awaiting_patch = file_ok and not patched
        return file_ok and patched

    def run_pass(self) -> bool:
        """One labelling pass; True (and the health file refreshed) when it succeeded.

        Fails when NVML failed after an earlier success (the last labels are kept) or an
        output could not be written. Raises InitError like :meth:`compute_labels`.
        """
        self._awaiting_patch = False
        started = time.monotonic()
        labels = self.compute_labels()
        self.passes += 1
        ok = labels is not None and self.publish(labels)
        if self.metrics is not None:
            self.metrics.pass_seconds.observe(time.monotonic() - started)
            self.metrics.label_passes.labels("ok" if ok else "failed").inc()
            if ok and labels is not None:
                self.metrics.labels.set(len(labels))
        if not ok:
            return False
        self.health.mark()
        return True

    def retry_patch(self) -> bool:
        """Retry a failed Node patch; True when the Node now carries the latest labels.

        When that completes a pass whose file output succeeded, the pass counts as
        successful after all and the health file is refreshed.
        """
        if self.publisher is None or not self.publisher.retry():
            return False
        if self._awaiting_patch:
            self._awaiting_patch = False
            self.health.mark()
        return True

    # ----------------------------------------------------------------- modes

    def run(self) -> int:
        """Oneshot, dry-run or loop, per the configuration; returns the exit code."""
        try:
            if self.options.dry_run:
                return self._dry_run()
            if self.config.flags.gfd.oneshot:
                return self._oneshot()
            return self._loop()
        except InitError as err:
            log.error("cannot initialise NVML: %s (use --fail-on-init-error=false to keep "
                      "running without GPU labels)", err)
            return EXIT_FAILURE

    def _dry_run(self) -> int:
        labels = self.compute_labels() or {}
        self._stdout.write(render_table(labels))
        self._stdout.flush()
        return EXIT_OK

    def _oneshot(self) -> int:
        if self.run_pass():
            return EXIT_OK
        publisher = self.publisher
        if publisher is None or not self._awaiting_patch:
            return EXIT_FAILURE  # no labels, or the features file could not be written
        attempts = 1
        while not publisher.converged:
            if attempts >= ONESHOT_PATCH_ATTEMPTS or self.wakeup.stop:
                log.error("node %s: labels not applied after %d attempts", publisher.node_name,
                          attempts)
                return EXIT_FAILURE
            self.wakeup.sleep(publisher.retry_in() or 0.0)
            self.retry_patch()
            attempts += 1
        return EXIT_OK

    def _loop(self) -> int:
        try:
            while not self.wakeup.stop:
                self.run_pass()
                self._wait_for_next_pass(time.monotonic() + self.config.flags.gfd.sleep_interval)
        finally:
            if self.wakeup.stop and self.options.writes_file:
                self.features.remove()
        log.info("stopping")
        return EXIT_OK

    def _wait_for_next_pass(self, deadline: float) -> None:
        """Sleep until ``deadline``, retrying the Node patch when due; reload on SIGHUP."""
        while not self.wakeup.stop:
            if self.wakeup.take_reload():
                self._reload()
                return
            now = time.monotonic()
            if now >= deadline:
                return
            retry_in = self.publisher.retry_in() if self.publisher is not None else None
            if retry_in is not None and retry_in <= 0:
                self.retry_patch()
                continue
            timeout = deadline - now if retry_in is None else min(deadline - now, retry_in)
            self.wakeup.sleep(timeout)

    def _reload(self) -> None:
        if self._args is None:
            log.info("SIGHUP: no command line to reload from; relabelling")
            return
        log.info("SIGHUP: reloading the configuration")
        new, error = reload(self.config, self._args, self._environ)
        if error is not None:
            return  # gpus.config logged it; keep running with the old configuration
        if self._backend is not None:
            try:
                self._backend.select(new.flags.nvml, new.flags.sysfs_root)
            except InitError as err:  # BackendSpecError too
                log.error("%s; keeping the previous NVML backend", err)
                new = _with_nvml(new, self.config.flags.nvml)
            new = self._backend.effective(new)
        if new.flags.gfd.output_file != self.features.path and self.options.writes_file:
            self.features.remove()
            self.features = FeaturesFile(new.flags.gfd.output_file, stream=self._stdout)
        self.config = new


def _with_nvml(config: Config, nvml: str) -> Config:
    return dataclasses.replace(config, flags=dataclasses.replace(config.flags, nvml=nvml))
