"""The oracle as if its device's memory were known (a GPU's), run on the CPU: it then keeps a
float32 run's weights on the device for the worker's next runs (`OracleReference._reuse`)."""

from __future__ import annotations

from llmdiff.references.oracle import OracleReference


class OracleWithKnownMemory(OracleReference):
    def _device_memory(self):
        import jax

        return [1 << 40] * len(jax.devices())
