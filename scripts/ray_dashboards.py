"""Write Ray's own Grafana dashboards (Train, and the cluster's default one) into a folder, for
Grafana to provision beside fr_train's (ops/README.md, ops/grafana/provisioning/dashboards/ray.yml).

Why a script: Ray generates these dashboards from its installed version at every head start, into
``/tmp/ray/session_<date>/metrics/grafana/dashboards`` - a path that changes with each session and
lives on the head node only. Generated here, from the Ray that runs the jobs, they land where a
Grafana provider can point once. Regenerate after upgrading Ray. fr_train's dashboard links to the
Train one by its uid (``rayTrainDashboard``).

    python scripts/ray_dashboards.py /var/lib/grafana/dashboards/ray
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_ray_dashboards(out: Path) -> dict[str, Path]:
    """Ray's Train and default dashboards as ``out/ray_<name>.json``; returns {uid: path}."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, generate in (("train", factory.generate_train_grafana_dashboard),
                           ("default", factory.generate_default_grafana_dashboard)):
        content, uid = generate()
        json.loads(content)  # Ray's own JSON: refuse to provision something Grafana could not read
        path = out / f"ray_{name}.json"
        path.write_text(content)
        written[uid] = path
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for uid, path in write_ray_dashboards(Path(argv[0])).items():
        print(f"{path} (uid {uid})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
