"""Load generation and measurement: trace loading (`trace`), run statistics (`stats`), request
bodies fitted to a model (`workload`), open-loop replay against a deployment (`replay`), and
the `prism bench` run with its report and plots (`run`, `plots`).

`trace`, `stats` and `workload` are pure (no gRPC); `replay` is the adapter that calls Prism.
"""
