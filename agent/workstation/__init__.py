"""Runs on the workstation (or any machine that operates the fleet): local pipelines of agent
processes for the demo, tests and benchmarks."""
