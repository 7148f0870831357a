"""iosched: worker threads (I/O cores), parameters, and the scheduling of queue works onto them.

Named iosched, not sched: an installed top-level `sched` package is shadowed by the standard
library module of that name.

Knows queues and fds, not the vhost-user protocol. Thread rules are in each module's docstring.
"""

__all__: list[str] = []
