"""Step load: 1, 2, 4 ... --step-max-users users, --step-time seconds at each count, then
stop. Added to the locustfile for SHAPE=step:

    locust -f loadtest/locustfile.py,loadtest/shape.py TorchServeUser ...

Each step's p99 and RPS, plotted against users, show the knee: the concurrency beyond
which throughput stops growing and only latency does. Locust's per-second percentiles
cover its last 10 s, so a step of 15 s or more leaves the end of each step unmixed with
the step before (loadtest/report.py reads them there).
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtest.workload import user_levels


class StepLoadShape(LoadTestShape):
    def tick(self):
        options = self.runner.environment.parsed_options
        levels = user_levels(options.step_max_users)
        step = int(self.get_run_time() // options.step_time)
        if step >= len(levels):
            return None  # the end of the test
        users = levels[step]
        return users, users  # spawn the step's new users within a second
