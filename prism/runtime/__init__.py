"""Process runtime shared by every Prism service: gRPC server bootstrap (`server`), tracing
and logging (`telemetry`), config from CLI and environment (`config`), and a process
supervisor (`procs`).

Import from the submodules (``from prism.runtime.server import StageServer``); this package
imports nothing eagerly so that light users (e.g. `procs.write_port_file`) stay light.
"""
