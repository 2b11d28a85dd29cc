"""``gpu-feature-discovery``: label the node's GPUs, once or every ``--sleep-interval``.

The shell around :func:`gfd.labels.node_labels`: read the NVML snapshot, the machine type and
the clock, then hand the labels to the outputs (features file, stdout, the Node object).
Signals: SIGHUP reloads the configuration and relabels at once; SIGTERM/SIGINT exit 0 (in loop
mode the features file is removed so node-feature-discovery drops the labels). Waiting is an
interruptible ``threading.Event`` wait, never a busy loop.

Health contract (the DaemonSet's probes): the health file (``--health-file``, env
``GFD_HEALTH_FILE``) is deleted at start and rewritten with the Unix time after every
successful pass: labels computed and every configured output (file, Node) written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from gfd.labels import (
    TIMESTAMP_LABEL,
    UNKNOWN_MACHINE,
    label_problems,
    node_labels,
    timestamp_labels,
)
from gfd.nodefeature import (
    KubeNodeFeatureApi,
    NodeFeatureApi,
    NodeFeaturePublisher,
    TokenBucket,
)
from gfd.nodepatch import KubeConfigError, KubeNodeApi, NodeApi, NodePublisher
from gfd.output import FeaturesFile, HealthFile, render_table
from gpus.backoff import Backoff
from gpus.config import Config, ConfigError, add_flags, reload, resolve
from gpus.model import Snapshot

log = logging.getLogger("gfd")

PROG = "gpu-feature-discovery"
OUTPUT_MODES = ("file", "node-api", "both", "node-feature")
ONESHOT_PATCH_ATTEMPTS = 5  # oneshot + node-api: tries (with backoff) before giving up
DEFAULT_HEALTH_FILE = "/run/gfd/last-pass-ok"  # where daemonset/base's probes look
# Environment variables of the shell's own options (gpus.config reads NVIDIA's settings).
OUTPUT_MODE_ENV = "GFD_OUTPUT_MODE"
NODE_NAME_ENV = "NODE_NAME"
KUBECONFIG_ENV = "GFD_KUBECONFIG"
LOG_LEVEL_ENV = "GFD_LOG_LEVEL"
HEALTH_FILE_ENV = "GFD_HEALTH_FILE"
OPTION_ENV_VARS = (OUTPUT_MODE_ENV, NODE_NAME_ENV, KUBECONFIG_ENV, LOG_LEVEL_ENV, HEALTH_FILE_ENV)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

SnapshotReader = Callable[[Config], Snapshot]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """Shell-only options (not part of NVIDIA's v1 config)."""

    output_mode: str = "file"
    node_name: str = ""
    kubeconfig: str = ""
    dry_run: bool = False
    log_level: str = "INFO"
    # "" disables. The command line defaults to DEFAULT_HEALTH_FILE (resolve_options); this
    # dataclass does not, so programmatic and test use never writes under /run.
    health_file: str = ""

    @property
    def writes_file(self) -> bool:
        """True when the features file (or stdout) is an output."""
        return self.output_mode in ("file", "both")

    @property
    def patches_node(self) -> bool:
        """True when labels go onto the Node object."""
        return self.output_mode in ("node-api", "both")

    @property
    def publishes_node_feature(self) -> bool:
        """True when labels go into an NFD NodeFeature object (gfd/nodefeature.py)."""
        return self.output_mode == "node-feature"


def build_parser() -> argparse.ArgumentParser:
    """The command line: NVIDIA's GFD flags (gpus.config) plus our output options."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Generate nvidia.com/ node labels describing the node's GPUs.")
    add_flags(parser, "gfd")
    ours = parser.add_argument_group("outputs")
    ours.add_argument("--output-mode", choices=OUTPUT_MODES, default=None,
                      help="file: the NFD features file (or stdout with --output-file -); "
                      "node-api: patch the Node's labels; both; node-feature: an NFD "
                      "NodeFeature object. Default: node-feature when --use-node-feature-api "
                      "is set true (flag, env or file), else file [env GFD_OUTPUT_MODE]")
    ours.add_argument("--node-name", default=None,
                      help="the Node to label in node-api mode [env NODE_NAME]")
    ours.add_argument("--kubeconfig", default=None,
                      help="kubeconfig for node-api mode (default: in-cluster config, then "
                      "$KUBECONFIG or ~/.kube/config) [env GFD_KUBECONFIG]")
    ours.add_argument("--dry-run", action="store_true",
                      help="print the labels as a table and exit; write nothing")
    ours.add_argument("--health-file", default=None,
                      help="file rewritten with the Unix time after every successful pass, "
                      f"for liveness probes; empty disables (default {DEFAULT_HEALTH_FILE}) "
                      "[env GFD_HEALTH_FILE]")
    ours.add_argument("--log-level", default=None,
                      choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                      help="log verbosity (default INFO) [env GFD_LOG_LEVEL]")
    return parser


def _node_feature_default(args: argparse.Namespace, environ: Mapping[str, str],
                          config: Config | None) -> str:
    """The mode when --output-mode is not given: what an explicit --use-node-feature-api says.

    Only an explicit setting (flag, variable or file key) chooses: left unset we keep writing
    the features file, so a bare ``gpu-feature-discovery -o FILE`` needs no cluster (NVIDIA's
    GFD would default to the NodeFeature API; docs/gfd.md).
    """
    if config is None:
        return "file"
    given = getattr(args, "use_node_feature_api", None) is not None or any(
        name in environ for name in ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"))
    if not given and config.config_file:
        from gpus.config import load_config_file

        flags = load_config_file(config.config_file).get("flags")
        given = isinstance(flags, Mapping) and "useNodeFeatureAPI" in flags
    return "node-feature" if given and config.flags.use_node_feature_api else "file"


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str],
                    config: Config | None = None) -> Options:
    """Our options: flag > env var > default. Raises ConfigError on a bad value.

    ``config`` (the resolved configuration) lets ``--use-node-feature-api`` choose the output
    mode when ``--output-mode`` is not given.
    """
    mode = (args.output_mode or environ.get(OUTPUT_MODE_ENV, "").strip()
            or _node_feature_default(args, environ, config))
    if mode not in OUTPUT_MODES:
        raise ConfigError(f"invalid {OUTPUT_MODE_ENV} {mode!r}: must be one of "
                          f"{', '.join(OUTPUT_MODES)}")
    level = (args.log_level or environ.get(LOG_LEVEL_ENV, "") or "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"invalid {LOG_LEVEL_ENV} {level!r}: must be DEBUG, INFO, WARNING "
                          "or ERROR")
    options = Options(
        output_mode=mode,
        node_name=(args.node_name or environ.get(NODE_NAME_ENV, "")).strip(),
        kubeconfig=(args.kubeconfig or environ.get(KUBECONFIG_ENV, "")).strip(),
        dry_run=bool(args.dry_run),
        log_level=level,
        health_file=_health_file(args, environ),
    )
    if (options.patches_node or options.publishes_node_feature) and not options.node_name \
            and not options.dry_run:
        raise ConfigError(f"--output-mode {mode} needs the Node's name: set --node-name or "
                          "NODE_NAME (from the downward API: spec.nodeName)")
    return options


def _health_file(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """Flag > env var > default; unlike other settings an empty value (set) disables it."""
    if args.health_file is not None:
        return str(args.health_file).strip()
    if HEALTH_FILE_ENV in environ:
        return environ[HEALTH_FILE_ENV].strip()
    return DEFAULT_HEALTH_FILE


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
    from gpus.nvml import Nvml

    nvml = Nvml()
    nvml.init()
    try:
        return nvml.read_snapshot(config.flags.sysfs_root)
    finally:
        nvml.shutdown()


class NvmlBackend:
    """Installs the NVML backend named by ``--nvml`` and swaps it when a reload changes it."""

    def __init__(self) -> None:
        """No backend until :meth:`select` is called."""
        self._spec: str | None = None
        self._fake: Any = None

    def select(self, spec: str, sysfs_root: str = "/") -> None:
        """Install ``spec`` ("real" or "fake:<profile>"); raises ConfigError on a bad spec.

        A fake writes its profile's sysfs files under ``sysfs_root`` unless that is "/".
        """
        if spec == self._spec:
            return
        from gpus.backend import BackendError, select_backend

        self.close()
        try:
            self._fake = select_backend(spec, sysfs_root=sysfs_root)
        except BackendError as err:  # its message names the spec already
            raise ConfigError(f"invalid --nvml: {err}") from err
        except (ValueError, OSError) as err:
            raise ConfigError(f"invalid --nvml {spec!r}: {err}") from err
        self._spec = spec

    def effective(self, config: Config) -> Config:
        """``config`` reading sysfs where a fake backend wrote its profile's files."""
        from gpus.backend import effective_config

        return effective_config(config, self._fake)

    def close(self) -> None:
        """Uninstall a fake backend, if one is installed."""
        if self._fake is not None:
            self._fake.uninstall()
        self._fake = None
        self._spec = None


# --------------------------------------------------------------------------- signals


class Wakeup:
    """Flags set by signal handlers plus the Event the daemon sleeps on."""

    def __init__(self) -> None:
        """Nothing requested yet."""
        self.event = threading.Event()
        self.stop = False
        self.reload = False

    def request_stop(self, *_: object) -> None:
        """SIGTERM/SIGINT."""
        self.stop = True
        self.event.set()

    def request_reload(self, *_: object) -> None:
        """SIGHUP."""
        self.reload = True
        self.event.set()

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when a signal arrives."""
        self.event.wait(max(0.0, seconds))
        self.event.clear()


Handler = Callable[[int, FrameType | None], Any] | int | None


def install_signal_handlers(wakeup: Wakeup) -> dict[int, Handler]:
    """Route SIGHUP/SIGTERM/SIGINT to ``wakeup``; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    routes = {signal.SIGHUP: wakeup.request_reload, signal.SIGTERM: wakeup.request_stop,
              signal.SIGINT: wakeup.request_stop}
    return {sig: signal.signal(sig, handler) for sig, handler in routes.items()}


def restore_signal_handlers(previous: Mapping[int, Handler]) -> None:
    """Put back what :func:`install_signal_handlers` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- the daemon


class InitError(Exception):
    """NVML could not be initialised and --fail-on-init-error is true."""


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
        wakeup: Wakeup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``reader``, ``node_api``, ``backoff`` and ``clock`` (wall-clock seconds, for the
        timestamp label) are injectable for tests and the bench.

        Unless this is a dry run, a health file left by an earlier run is deleted here, first,
        so that even a failure to start leaves no stale proof of health behind.
        """
        self.config = config
        self.options = options
        self.health = HealthFile("" if options.dry_run else options.health_file)
        self.health.reset()
        self._args = args
        self._environ = environ if environ is not None else os.environ
        self._reader = reader
        self._clock = clock
        self._backend = backend
        self._stdout = stdout or sys.stdout
        self.wakeup = wakeup or Wakeup()
        self.features = FeaturesFile(config.flags.gfd.output_file, stream=self._stdout)
        self.publisher: NodePublisher | NodeFeaturePublisher | None = None
        if options.publishes_node_feature and not options.dry_run:
            flags = config.flags
            feature_api = node_feature_api or KubeNodeFeatureApi.from_environment(
                options.kubeconfig or None, TokenBucket(flags.kube_api_qps, flags.kube_api_burst))
            # As for the Node: a new timestamp alone does not rewrite the object.
            self.publisher = NodeFeaturePublisher(
                feature_api, options.node_name, flags.namespace, flags.pod_name, backoff,
                refresh_only={TIMESTAMP_LABEL})
        if options.patches_node and not options.dry_run:
            api = node_api or KubeNodeApi.from_environment(options.kubeconfig or None)
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
        from gpus.nvml import NvmlError

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
        labels = self.compute_labels()
        self.passes += 1
        if labels is None or not self.publish(labels):
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
            if self.wakeup.reload:
                self.wakeup.reload = False
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
            except ConfigError as err:
                log.error("%s; keeping the previous NVML backend", err)
                new = _with_nvml(new, self.config.flags.nvml)
            new = self._backend.effective(new)
        if new.flags.gfd.output_file != self.features.path and self.options.writes_file:
            self.features.remove()
            self.features = FeaturesFile(new.flags.gfd.output_file, stream=self._stdout)
        self.config = new


def _with_nvml(config: Config, nvml: str) -> Config:
    import dataclasses

    return dataclasses.replace(config, flags=dataclasses.replace(config.flags, nvml=nvml))


# --------------------------------------------------------------------------- entry point


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gfd").setLevel(level)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run GFD; returns the process exit code (0 ok, 1 failure, 2 bad configuration)."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args, env)
        options = resolve_options(args, env, config)
    except ConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(options.log_level)
    backend = NvmlBackend()
    wakeup = Wakeup()
    previous = install_signal_handlers(wakeup)
    try:
        backend.select(config.flags.nvml, config.flags.sysfs_root)
        config = backend.effective(config)
        daemon = Daemon(config, options, args=args, environ=env, backend=backend,
                        wakeup=wakeup)
        return daemon.run()
    except ConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KubeConfigError as err:
        print(f"{PROG}: cannot configure the Kubernetes client: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        restore_signal_handlers(previous)
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
