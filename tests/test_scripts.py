"""The README's commands, run as a user would: `convsync sandbox serve` and `scripts/demo`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONVSYNC = Path(sys.executable).with_name("convsync")


def _call(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as reply:
        result: dict[str, object] = json.load(reply)
        return result


def test_sandbox_serve_prints_endpoints_writes_config_and_stops_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    process = subprocess.Popen(
        [str(CONVSYNC), "sandbox", "serve", "--json", "--config-out", str(config),
         "--state-dir", str(tmp_path / "state"), "--seed", "5", "--days", "20",
         "--campaigns", "4", "--end", "2026-10-31"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        summary = json.loads(process.stdout.readline())
        assert set(summary["endpoints"]) == {"google_ads", "ga4", "ga4_rest", "meta", "klaviyo",
                                             "datamanager", "datamanager_rest", "control"}
        assert config.exists() and Path(summary["secrets_file"]).exists()
        control = summary["endpoints"]["control"]
        world = _call(f"{control}/world")
        assert world["start"] == "2026-10-12" and world["end"] == "2026-10-31"
        assert world["campaigns"] == 4 and world["seed"] == 5
        moved = _call(f"{control}/clock", {"advance_days": 2})
        assert str(moved["as_of"]).startswith("2026-11-03")
        assert _call(f"{control}/faults", {"platform": "meta", "kind": "rate_limit"}) == {
            "queued": 1}
        checked = subprocess.run([str(CONVSYNC), "config", "check", str(config),
                                  "--with-secrets"], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_demo_runs_to_the_end() -> None:
    # the environment keeps GRPC_DEFAULT_SSL_ROOTS_FILE_PATH pointing elsewhere, as many
    # machines have it: the demo must still trust its own sandbox
    result = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Results:" in result.stdout
    assert (ROOT / "var" / "demo" / "sandbox.db").exists()
    assert "Purchase" in result.stdout and "unmapped" in result.stdout
