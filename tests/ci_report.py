"""What the run did and where its time went, printed at the end of `make test`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    matrix: object = None  # tests.matrix.Matrix
    edge_answers: int = 0
    lanes: object = None  # tests.suites.Lanes
    steps: list = field(default_factory=list)  # (name, seconds)
    counts: dict = field(default_factory=dict)  # name -> text
    durations: list = field(default_factory=list)  # (seconds, phase, test id)
    started: float = 0.0

    def add_step(self, name: str, seconds: float) -> None:
        self.steps.append((name, seconds))

    def lines(self, wall: float) -> list[str]:
        out = ["", "=" * 30 + " CI summary " + "=" * 30]
        if self.matrix is not None:
            projects = len(self.matrix.projects)
            out.append(
                f"combinations rendered: {projects - self.edge_answers} accepted + {self.edge_answers} edge answers, "
                f"{len(self.matrix.refused)} refused by the pre-generation hook"
            )
            out.append(
                f"distinct files checked: {len(self.matrix.holders)} (path, content) pairs "
                f"of {sum(len(p.files) for p in self.matrix.projects)} files in all"
            )
        for name, text in self.counts.items():
            out.append(f"{name}: {text}")
        for name, seconds in self.steps:
            out.append(f"{seconds:7.1f} s  {name}")
        if self.lanes is not None:
            outcomes = self.lanes.outcomes()
            out.append(f"generated suites: {len(outcomes)} run, {self.lanes.pool._max_workers} at a time")
            out.append(f"  {'render':>6} {'venv':>6} {'suite':>6} {'cpu':>6} {'tests':>5}  python  project")
            for outcome in outcomes:
                seconds = outcome.seconds
                state = f"{outcome.passed:5d}" if outcome.error is None and outcome.unavailable is None else " FAIL"
                out.append(
                    f"  {seconds.get('render', 0):6.1f} {seconds.get('venv', 0):6.1f} {seconds.get('suite', 0):6.1f} "
                    f"{outcome.cpu:6.1f} {state}  {outcome.python or '?':6}  {outcome.suite.name}"
                )
            totals: dict[str, list[float]] = {}
            for outcome in outcomes:
                for seconds, name in outcome.slowest:
                    totals.setdefault(name, []).append(seconds)
            slow = sorted(totals.items(), key=lambda item: sum(item[1]), reverse=True)[:10]
            if slow:
                out.append("  slowest generated tests, summed over the suites that have them (wall seconds):")
                out += [
                    f"    {sum(times):6.1f} s  in {len(times):2d} suites, at most {max(times):5.1f} s  {name}"
                    for name, times in slow
                ]
        out.append("slowest template tests:")
        for seconds, phase, name in sorted(self.durations, reverse=True)[:8]:
            out.append(f"  {seconds:6.1f} s  {phase:8} {name}")
        out.append(f"wall time of the test run: {wall:.0f} s")
        return out


REPORT = Report()
