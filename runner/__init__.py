"""The worker: procrastinate tasks that claim due deliveries, send them through providers, record outcomes."""
