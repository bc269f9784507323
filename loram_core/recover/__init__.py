"""Consumer side of LoRAM: recover a LoRA adapter trained on a pruned base for the original model.

`recover` reads the base's config and masks (never its weights) and the adapter, and writes a
standard peft adapter for the original (structured bases; sparse `dense`) or the original model
with the masked delta merged in (sparse `mask` / `complement`). `merge` adds an adapter to the
original's weights (a 4-bit original is dequantized first) and saves a 16-bit checkpoint. Where
the original is comes from the version's manifest (`loram_core.original`).
"""

from __future__ import annotations

from loram_core.recover.adapter import Adapter, read_adapter, write_adapter
from loram_core.recover.api import Recovered, merge, recover

__all__ = ["Adapter", "Recovered", "merge", "read_adapter", "recover", "write_adapter"]
