"""sched: worker threads and the scheduling of queue works onto them.

Knows queues and fds, not the vhost-user protocol. Thread rules are in each module's docstring.
"""

__all__: list[str] = []
