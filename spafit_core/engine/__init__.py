"""One frozen backbone, many adapters. One file per part:

- `base.Backbone`: one frozen base model per base-model name per process, its layer stack wrapped once,
  and its head templates.
- `packed`: an adapter as the engine holds it (`LoadedAdapter`, verified and built by `build_adapter`);
  outside the slot pools (in the pinned CPU tier, or held by a request after its eviction) it is one packed
  buffer in a `PackedLayout` shared by all adapters of the same shapes.
- `bank.AdapterBank`: adapters loaded, replaced and evicted at run time, LRU-bounded by bytes, with a
  device tier and a CPU tier where there is a GPU. Thread-safe; load and evict are idempotent. A resident
  adapter lives in the bank's slot pools (`slots.SlotPools`). Resident bytes stay close to tensor bytes.
- `forward.Engine`: backbones and banks per base model, tokenisation, and the forward passes:
  - `Engine.forward`: one pass over rows that belong to different adapters. The rows are ordered so that
    rows of one LoRA rank sit together; their slots make one index; each adapted module gathers its per-row
    bias rows in one indexed op and its LoRA rows per run of rows of one rank (no padding to the batch's
    largest rank), and applies them with batched matmuls (a row's rows are zero wherever its adapter does
    not adapt that module, so adapters with different n1/n2/rank mix; modules no row adapts are skipped).
    Deltas accumulate in place into each module's fresh output. Every row's head runs in one call of one
    head module padded to the most labels resident, with one copy of the logits to the host. Inside
    `pass_control(yield_to=event)` a pass steps aside at the next layer boundary once the event is set
    (`PassSuspended`), and `pass_control(resume=state)` goes on from there.
  - `Engine.fan_out_many` (`fan_out` for one input): inputs asked of many tasks in one pass that branches
    where the tasks diverge: one trunk row per input runs the frozen layers, and at each task's first
    trained layer branches into a row for that task. Concurrent fan-outs on one backbone share the pass.
- `slot_lease`: the slots a batch's adapters hold in the pools (or borrow for one forward), the route
  over them, and host tensors onto the device without waiting.

Switching the task of a request never reloads or copies the backbone: adapters only ever contribute
deltas through the route of one forward pass.
"""

from .bank import AdapterBank
from .base import Backbone, position_limit
from .forward import Engine, Input, PassSuspended, Row, Suspended, pass_control, split_inputs
from .packed import LoadedAdapter, PackedLayout, Slot, build_adapter
from .slot_lease import batch_slots as _slots  # noqa: F401 (tests)
from .slot_lease import to_device as _to_device  # noqa: F401 (tests)

__all__ = ["AdapterBank", "Backbone", "Engine", "Input", "LoadedAdapter", "PackedLayout", "PassSuspended", "Row",
           "Slot", "Suspended", "build_adapter", "pass_control", "position_limit", "split_inputs"]
