"""The pipeline, the gate-status reads and the guards on Dagster's Postgres storage.

The test starts its own throw-away PostgreSQL cluster (initdb + pg_ctl from Debian's postgresql
package; as root the server runs as the ``postgres`` user), listening on 127.0.0.1 and a socket
in a temporary directory only, and uses docs/postgres.dagster.yaml verbatim as the instance's
dagster.yaml. It materialises ``dataset_index`` and ``splits`` through the real CLI, finds the run
and its materialisations in Postgres (read with psycopg2, not through Dagster), and checks that
the gate-status reads and both cross-run guards answer through that instance. It is skipped only
where the PostgreSQL server binaries are absent (.ci/run installs them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, REPO, Project, output

pytestmark = pytest.mark.slow

PG_USER = "dagster"
PG_DB = "dagster"


def postgres_bin() -> Path | None:
    """The directory of initdb/pg_ctl/postgres (Debian keeps them under /usr/lib/postgresql/<v>/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.insert(0, str(Path(found).resolve().parent))
    for directory in candidates:
        if all((Path(directory) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "createdb")):
            return Path(directory)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A PostgreSQL cluster in a temporary directory, owned by a non-root user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="stage1-pg-"))
        self.data, self.socket_dir, self.log = self.base / "data", self.base / "socket", self.base / "server.log"
        self.socket_dir.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            owner = pwd.getpwnam("postgres")
            for path in (self.base, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120, cwd=self.base
        )
        assert result.returncode == 0, f"{tool} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{self.server_log()}"
        return result

    def server_log(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", PG_USER, "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, PG_DB)

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": "unused-trust-auth",
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_DB": PG_DB,
            "DAGSTER_PG_PORT": str(self.port),
        }


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql (.ci/run does)")
    try:
        import dagster_postgres  # noqa: F401
    except ImportError:
        pytest.fail("dagster-postgres is not installed: .ci/run installs it (pip install --no-deps dagster-postgres)")
    server = Cluster(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class PostgresProject(Project):
    """A project whose DAGSTER_HOME uses docs/postgres.dagster.yaml against ``cluster``."""

    def __init__(self, base: Path, config: dict, cluster: Cluster) -> None:
        super().__init__(base, config)
        self.cluster = cluster
        shutil.copy(REPO / "docs" / "postgres.dagster.yaml", self.home / "dagster.yaml")

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.cluster.env}


def query(cluster: Cluster, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=cluster.port, user=PG_USER, dbname=PG_DB) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


def test_pipeline_gate_reads_and_guards_on_postgres(cluster, tmp_path, monkeypatch):
    import dagster as dg

    from stage1_assets.gate_status import latest_check_record
    from stage1_assets.guards import require_gate_for_export, require_previous_phase_gates

    config = {"data_source": "synthetic", "model_path": "builtin:tiny-dinov3", "synthetic_n_train": 40, "synthetic_n_val": 60}
    project = PostgresProject(tmp_path, config, cluster)

    result = project.run(str(BIN / "dagster"), "asset", "materialize", "-m", "stage1_assets.definitions",
                         "--select", "dataset_index,splits")
    assert result.returncode == 0, output(result)
    assert (project.artifacts / "splits").is_dir()

    # Written to Postgres (read with psycopg2, not through Dagster).
    assert query(cluster, "SELECT status FROM runs") == [("SUCCESS",)]
    materialized = query(
        cluster,
        "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY asset_key",
    )
    assert materialized == [('["dataset_index"]',), ('["splits"]',)], materialized
    assert not list(project.home.rglob("*.db")), "no SQLite database in DAGSTER_HOME: runs and events are in Postgres"

    # The gate-status reads and the guards, through an instance on that storage.
    for key, value in {**cluster.env, "DAGSTER_HOME": str(project.home)}.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert len(instance.get_runs()) == 1
        records = instance.fetch_materializations(dg.AssetKey("splits"), limit=1).records
        assert records, "splits materialisation not visible through the Postgres instance"
        record = latest_check_record(instance, "evaluation", "val_test_fnr_bound", "phase1")
        assert record.passed is None and record.current_id is None
        with pytest.raises(dg.Failure, match=r"bundle\[phase1\] refused: the phase1 gate has not passed"):
            require_gate_for_export(instance, "phase1")
        with pytest.raises(dg.Failure, match="phase2 refused: an earlier phase's gate has not passed"):
            require_previous_phase_gates(instance, "phase2")

    # The bundle guard through the real CLI: refused, and the refusal is recorded in Postgres.
    refused = project.run(str(BIN / "dagster"), "asset", "materialize", "-m", "stage1_assets.definitions",
                          "--select", "bundle", "--partition", "phase1")
    assert refused.returncode != 0, output(refused)
    assert "bundle[phase1] refused: the phase1 gate has not passed" in refused.stdout + refused.stderr, output(refused)
    statuses = sorted(row[0] for row in query(cluster, "SELECT status FROM runs"))
    assert statuses == ["FAILURE", "SUCCESS"], statuses
    assert query(cluster, "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                          "AND asset_key = '[\"bundle\"]'") == [(0,)]
