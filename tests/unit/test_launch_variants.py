"""The launcher's part of adaptation (`prism.launch.Deployment.scale_variants`), with a fake
supervisor: it starts workers up to the loop's replica targets and stops only the workers the
scheduler drained, never a running worker of a variant the loop just left out (its traffic may
still be on it while the new variant's workers start: the live benchmark's failures)."""
from __future__ import annotations

from types import SimpleNamespace

from prism.launch import Deployment, DeploymentOptions


class FakeSupervisor:
    def __init__(self) -> None:
        self.stopped: list[str] = []
        self.children: dict[str, SimpleNamespace] = {}

    def start(self, name: str) -> None:
        self.children[name] = SimpleNamespace(alive=lambda: name not in self.stopped)

    def stop(self, name: str) -> None:
        self.stopped.append(name)


def deployment(tmp_path) -> Deployment:
    d = Deployment(DeploymentOptions(model_dir=tmp_path, layout="colocated", log_dir=tmp_path,
                                     variants=(f"a={tmp_path}:0.6", f"b={tmp_path}:0.8")))
    d.supervisor = FakeSupervisor()

    def start_worker(stages, variant=""):
        name = f"{variant}.{'+'.join(stages)}-1"
        d.started[name] = (tuple(stages), variant)
        d.supervisor.start(name)
        return name

    d.start_worker = start_worker
    start_worker(("encode", "prefill", "decode"), "a")
    return d


def status(rows, draining=()):
    return SimpleNamespace(workers=[SimpleNamespace(name=n, draining=True) for n in draining],
                           adaptation=SimpleNamespace(workers=[SimpleNamespace(stage="pipeline", variant=v, replicas=r)
                                                               for v, r in rows]))


def test_a_variant_left_out_keeps_its_worker_until_the_scheduler_drains_it(tmp_path):
    d = deployment(tmp_path)
    changes = d.scale_variants(status([("b", 1)]))  # b chosen, a left out (not drained yet)
    assert changes == {"b/encode+prefill+decode": (0, 1)}
    assert d.supervisor.stopped == []  # before: a's worker was SIGTERMed here, with the traffic on it
    assert sorted(d.workers()) == ["a.encode+prefill+decode-1", "b.encode+prefill+decode-1"]
    assert d.scale_variants(status([("b", 1)], draining=["a.encode+prefill+decode-1"])) == {}
    assert d.supervisor.stopped == ["a.encode+prefill+decode-1"]  # drained by the scheduler: now it exits
