"""A request nothing can serve fails at once, naming its flag, instead of waiting forever.

On an embedded local Ray (ar-ray started it: no `--address`, no RAY_ADDRESS) no autoscaler
can ever add a node, so a unit asking for more than this machine has is refused before
anything is queued. On a cluster ar-ray joined, only its autoscaler knows which node types
it may start: the command stops when the autoscaler reports one of its requests infeasible
(no node type can fulfil it). Demand an autoscaler can meet still waits for its nodes.
"""

from __future__ import annotations

import _thread
import ast
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ray
from ray._private.ray_logging import global_worker_stdstream_dispatcher

from ar_ray.errors import UserError
from ar_ray.resources import Resources

if TYPE_CHECKING:
    from ar_ray.inference import InferenceOptions
    from ar_ray.members import TrainOptions

INFEASIBLE = "No available node types can fulfill"
"""How Ray 2.60's autoscaler (v1 and v2) words an infeasible request in its events."""
EVENT_END = "Add suitable node types"
SHAPE = re.compile(r"\{(?:'[^']*': [-+.0-9e]+(?:, )?)*\}")  # {'CPU': 1.0, 'GPU': 1.0}
RAY_NAMES = {"cpus": "CPU", "gpus": "GPU"}


@dataclass(frozen=True)
class Demand:
    """One kind of unit a command places, and the flags that set its request."""

    unit: str  # "trial", "member worker", "inference actor"
    per: str  # the flags' suffix: --cpus-per-<per>, --gpus-per-<per>
    each: Resources  # one process's request
    together: int = 1  # processes placed as one gang (a member's DDP workers)
    together_flag: str = ""  # the flag that sets `together`

    def shape(self) -> dict[str, float]:
        """One process's request as Ray reports it: resources of 0 are left out."""
        amounts = {name: getattr(self.each, kind) for kind, name in RAY_NAMES.items()}
        return {name: amount for name, amount in amounts.items() if amount > 0}

    def flag(self, kind: str) -> str:
        """The flag behind one process's `kind` ("cpus" or "gpus"), with its value."""
        return f"--{kind}-per-{self.per} {getattr(self.each, kind):g}"

    def flags(self) -> str:
        """Both flags of one process: an infeasible request may be either's doing."""
        return f"{self.flag('cpus')} / {self.flag('gpus')}"

    def gang_flag(self, kind: str) -> str:
        """The flags behind `kind` for all the processes placed together."""
        prefix = f"{self.together_flag} {self.together} x " if self.together > 1 else ""
        return prefix + self.flag(kind)


def ensemble_demands(train: TrainOptions, inference: InferenceOptions) -> list[Demand]:
    """What `ensemble` places: each member's DDP workers (as one gang), then the actors."""
    worker = Demand(
        "member worker", "worker", train.worker, train.workers_per_member, "--workers-per-member"
    )
    return [worker, actor_demand(inference)]


def actor_demand(inference: InferenceOptions) -> Demand:
    """What `predict` (and `ensemble` after its members) places: the inference actors."""
    return Demand("inference actor", "actor", inference.actor)


def check_fits_machine(demands: Sequence[Demand], machine: dict[str, float]) -> None:
    """Refuse the first unit that needs more CPUs or GPUs at once than `machine` (what the
    embedded Ray was started with) has: nothing could ever run it."""
    for demand in demands:
        for kind in ("gpus", "cpus"):
            asked = getattr(demand.each, kind) * demand.together
            has = machine.get(RAY_NAMES[kind], 0.0)
            if asked > has:
                raise UserError(
                    f"{demand.gang_flag(kind)} asks for {_amount(asked, RAY_NAMES[kind])} but this "
                    f"machine has {has:g} (embedded local Ray; join a cluster with --address)"
                )


def _amount(value: float, name: str) -> str:
    return f"{value:g} {name}{'s' if value > 1 else ''}"


def infeasible_shapes(line: str) -> list[dict[str, Any]]:
    """The request shapes an autoscaler event reports as infeasible; none for other lines.

    v1: `Error: No available node types can fulfill resource request {'GPU': 1.0, 'CPU':
    1.0}. Add suitable node types ...`; v2: `... resource requests {'CPU': 1.0}*2, ...` or
    `... placement group requests (detail=...): {...}*1. Add ...`.
    """
    _, found, rest = line.partition(INFEASIBLE)
    if not found:
        return []
    reported = rest.split(EVENT_END, 1)[0]
    return [ast.literal_eval(shape) for shape in SHAPE.findall(reported)]


class InfeasibleWatch:
    """While open, the autoscaler's report that no node type can hold one of `demands`
    stops the command with a one-line UserError naming the unit's flags.

    Ray 2.60 reports infeasible requests only in the autoscaler events it streams to every
    driver (v2's `get_cluster_status` drops them, and v1 keeps them nowhere else), so the
    watch listens to that stream. It interrupts the main thread as Ctrl+C would, so Tune
    stops its trials cleanly, and raises the error on the way out: however the body ended
    (an interrupt, or Tune returning its stopped trials), the infeasible request is why.
    """

    HANDLER = "ar_ray_infeasible"

    def __init__(self, demands: Sequence[Demand]) -> None:
        self.demands = demands
        self.error: UserError | None = None

    def __enter__(self) -> InfeasibleWatch:
        global_worker_stdstream_dispatcher.add_handler(self.HANDLER, self._on_logs)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global_worker_stdstream_dispatcher.remove_handler(self.HANDLER)
        if self.error is not None:  # the cause, however the interrupted body ended
            raise self.error from None

    def _on_logs(self, data: dict[str, Any]) -> None:
        """Runs on Ray's log thread for every batch of forwarded lines."""
        if data.get("pid") != "autoscaler" or self.error is not None:
            return
        for line in data.get("lines", []):
            for shape in infeasible_shapes(line):
                demand = next((d for d in self.demands if d.shape() == shape), None)
                if demand is not None:
                    self.error = UserError(
                        f"{demand.flags()}: Ray reports that no node type of this cluster can "
                        f"hold a {demand.unit} of {demand.each.describe()} (infeasible)"
                    )
                    _thread.interrupt_main()
                    return


@contextmanager
def failing_fast(demands: Sequence[Demand], embedded: bool) -> Iterator[None]:
    """On an embedded Ray, refuse now what this machine cannot hold; on a joined cluster,
    stop when its autoscaler reports one of `demands` infeasible."""
    if embedded:
        check_fits_machine(demands, ray.cluster_resources())
        yield
        return
    with InfeasibleWatch(demands):
        yield
