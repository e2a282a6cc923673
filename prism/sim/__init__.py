"""`prism simulate`: a discrete-event simulation of a Prism deployment that makes every
scheduling decision with the live scheduler's core (`services.scheduler.core`) on a simulated
clock, with stage latencies from a profile (`prism.sim.profile`).

* `events` -- the clock (a heap of timed callbacks);
* `profile` -- the latency profile schema and its interpolation;
* `workers` -- simulated encode, prefill and decode workers batching as the live ones do;
* `simulator` -- the scheduler side (admission, placement, load book, profiling, autoscaling);
* `run` -- cluster shapes, trace requests, summaries (`prism.bench.stats`);
* `roofline` -- how the shipped A100 profiles' numbers were derived.

Pure: no gRPC, Redis or torch imports.
"""
