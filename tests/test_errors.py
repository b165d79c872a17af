"""convsync's one error hierarchy: what its module documents, what the CLI makes of it."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from convsync import errors, locks, quotas, report, settings, sinks, store
from convsync.cli import app
from convsync.sources import crm, ga4, klaviyo

EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"
CONVSYNC = str(Path(sys.executable).with_name("convsync"))


def defined() -> dict[str, type[errors.ConvsyncError]]:
    return {name: cls for name, cls in vars(errors).items()
            if inspect.isclass(cls) and issubclass(cls, errors.ConvsyncError)}


def test_the_module_documents_every_error_with_its_exit_code() -> None:
    doc = errors.__doc__ or ""
    tree = re.findall(r"^ *(?:[│ ]*[├└]── )?([A-Z]\w+) +(?:exit (\d))?", doc, re.MULTILINE)
    documented = {name: code for name, code in tree if name in defined() or code}
    assert set(documented) == set(defined())
    for name, code in documented.items():
        if code:
            assert defined()[name].exit_code == int(code), name
    assert errors.StoreVersionError.exit_code == errors.StoreError.exit_code


def test_what_convsync_raises_on_purpose_belongs_to_it() -> None:
    raised = [settings.ConfigError, store.StoreError, store.StoreVersionError, sinks.SinkError,
              quotas.QuotaExhausted, locks.Busy, report.NoData, crm.CrmFileError,
              ga4.ReportChanged, klaviyo.KlaviyoResponseError]
    for cls in raised:
        assert issubclass(cls, errors.ConvsyncError), cls
    assert issubclass(crm.CrmFileError, errors.InputError)
    assert issubclass(ga4.ReportChanged, errors.PlatformError)
    assert errors.PlatformError("refused", reason="X", retryable=True).retryable


def config_with_empty_store(tmp_path: Path) -> Path:
    config = tmp_path / "client.toml"
    config.write_text(EXAMPLE.read_text().replace(
        'store_url = "sqlite:///../var/acme-outdoor.db"', 'store_url = "sqlite:///client.db"'))
    return config


def test_an_error_is_one_line_with_its_exit_code_and_v_keeps_the_traceback(
        tmp_path: Path) -> None:
    config = config_with_empty_store(tmp_path)
    result = CliRunner().invoke(app, ["report", "--config", str(config),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == errors.NoData.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: the store holds no daily stats: run convsync pull first"]
    verbose = subprocess.run([CONVSYNC, "-v", "report", "--config", str(config), "--out",
                              str(tmp_path / "r")], capture_output=True, text=True)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "NoData" in verbose.stderr
    quiet = subprocess.run([CONVSYNC, "report", "--config", str(config), "--out",
                            str(tmp_path / "r")], capture_output=True, text=True)
    assert "Traceback" not in quiet.stderr + quiet.stdout
