"""The `interrupts` scenario: per-queue eventfds vs moderation vs posted interrupts, measured
with the guest model (bench.irq.client) against a vhostx daemon (bench.irq.scenario)."""
