"""loram_core: the LoRAM provider library (pruning, alignment, quantization, publishing).

Never imports an orchestrator: Prefect tasks in `tasks/` wrap these functions.
"""

__version__ = "0.1.0"
