"""Front doors: each translates one wire protocol to typed requests and outcomes, nothing else.

:mod:`.base` (the door interface, :class:`~.base.DoorContext`, the shared listen/token/size checks),
:mod:`.gr00t` (GR00T's ZeroMQ protocol), :mod:`.openpi` (openpi's websocket protocol; needs ``websockets``),
:mod:`.metrics` (Prometheus exporter; needs ``prometheus_client``).
"""
