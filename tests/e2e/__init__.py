"""Acceptance tests: `syncworker run` as a child process against real Nacos, Polaris and gateways."""
