"""gfd.nodepatch guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import pytest
import yaml
from kubernetes.config import ConfigException

from gfd.nodepatch import _kubeconfig_problem

DEFAULT = "the kubeconfig ($KUBECONFIG or ~/.kube/config)"


def yaml_error(text: str) -> yaml.YAMLError:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        return err
    raise AssertionError("valid YAML")


@pytest.mark.parametrize(("err", "path", "line"), [
    # The client's own words, on one line, with the file named once.
    (ConfigException("Invalid kube-config file.\n  No configuration found."), "/etc/kc",
     "/etc/kc: Invalid kube-config file. No configuration found."),
    (ConfigException("/etc/kc: no current context"), "/etc/kc", "/etc/kc: no current context"),
    (ConfigException("Service host/port is not set."), None, "Service host/port is not set."),
    (FileNotFoundError(2, "No such file or directory"), "/etc/kc",
     "/etc/kc: [Errno 2] No such file or directory"),
    # YAML errors: the position only, never the text (it may hold a token).
    (yaml_error("token: s3cret\n::: [x\n"), "/etc/kc", "/etc/kc: not valid YAML at line 3, "
     "column 1"),
    (yaml_error("::: [x\n"), None, f"{DEFAULT}: not valid YAML at line 2, column 1"),
    (yaml.YAMLError("s3cret"), "/etc/kc", "/etc/kc: not valid YAML"),
    # Anything else: the exception's type only.
    (TypeError("s3cret"), "/etc/kc", "/etc/kc: not a usable kubeconfig (TypeError)"),
    (KeyError("s3cret"), None, f"{DEFAULT}: not a usable kubeconfig (KeyError)"),
    # A client error without words still says which file and what went wrong.
    (ConfigException(""), None, f"{DEFAULT}: ConfigException"),
], ids=["config-multiline", "config-names-path", "config-no-path", "oserror", "yaml-mark",
        "yaml-default-path", "yaml-no-mark", "other", "other-default-path", "config-empty"])
def test_kubeconfig_problem_is_one_line_without_secrets(
        err: Exception, path: str | None, line: str) -> None:
    assert _kubeconfig_problem(err, path) == line
