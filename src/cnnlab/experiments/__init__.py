"""A run is a plan, then training: prepare(config) -> Plan, train(plan) -> results; suites of runs."""
