/*
 * vx_core.h - the C core of vhostx: split virtqueue device side, net data path, L2 switch.
 *
 * This header and vx_drv.h (the driver side, included at the end) are the single source of
 * truth for the cffi cdef: tools/build_core.py strips their preprocessor lines and feeds the
 * rest to ffibuilder.cdef(). Keep them plain C declarations that cffi can parse (no macros, no
 * inline functions, no attributes).
 *
 * Return codes: >= 0 success (a count), -1 the queue (or the TX queue of a pair) is broken; the
 * message is in vx_vq_error(). A broken queue never touches guest memory again.
 * Threads: a vx_vq belongs to one worker thread, except RX queues fed by a vx_switch, vx_net_fwd
 * or two ops (vx_vq_set_shared), which are written under the queue's internal lock.
 *
 * The implementation is split by concern into virtio/_core/vx_*.c; vx_internal.h (never fed to
 * cdef) lists the files and holds what they share.
 */
#ifndef VX_CORE_H
#define VX_CORE_H

#include <stdint.h>
#include <stddef.h>

/* one region of guest memory as mapped in this process */
struct vx_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint64_t host;
};

struct vx_mem {
    uint32_t nregions;
    struct vx_region *regions;
};

/* per-queue counters, read directly from Python (no call) */
struct vx_stats {
    uint64_t packets;               /* frames handled (TX consumed, RX delivered) */
    uint64_t bytes;                 /* frame bytes, net header excluded */
    uint64_t chains;                /* descriptor chains used */
    uint64_t batches;               /* publications of used entries (used->idx stores) */
    /* the outcomes of vx_vq_notify_decide, one counter each */
    uint64_t interrupts;            /* call eventfd writes (VX_NOTIFY_SENT) */
    uint64_t interrupts_suppressed; /* publications the driver did not want signalled */
    uint64_t ring_empty;            /* calls that found no avail entry */
    uint64_t ring_full;             /* RX frames dropped: no (or not enough) RX buffers */
    uint64_t errors;                /* guest errors (0 or 1: the queue breaks) */
    uint64_t notify_off;            /* set_notify(0) calls */
    uint64_t notify_on;             /* set_notify(1) calls */
    uint64_t dropped;               /* TX frames dropped (malformed, no destination, ...) */
    uint64_t too_big;               /* frames dropped for not fitting (scratch or RX chain) */
    uint64_t eagain;                /* fd calls stopped by EAGAIN */
    uint64_t io_errors;             /* fd calls failed otherwise */
    uint64_t lock_contended;        /* RX lock acquisitions that had to spin */
    uint64_t spins;                 /* busy-poll windows entered (ring empty, spin_ns > 0) */
    uint64_t spin_found;            /* busy-poll windows that ended with new avail entries */
    uint64_t spin_ns;               /* time spent busy-polling, ns */
    uint64_t interrupts_no_fd;      /* publications the driver wanted signalled, no call fd */
    /* the interrupt policy's outcomes (struct vx_irq_config, vx_vq_set_posted) */
    uint64_t interrupts_deferred;   /* held back by moderation (VX_NOTIFY_DEFERRED) */
    uint64_t interrupts_posted;     /* posted bit set, no notification (VX_NOTIFY_POSTED) */
    uint64_t pi_notifications;      /* posted bit set and the wake eventfd written (..._WAKE) */
    uint64_t irq_deadline_flushes;  /* deferred interrupts sent by their deadline or a flush */
    uint64_t irq_adaptive_on;       /* adaptive moderation switched on */
    uint64_t irq_adaptive_off;      /* ... and off */
    uint64_t irq_deadline_fired;    /* held interrupts sent because their deadline had passed */
    uint64_t irq_late_ns;           /* ... the sum of their lateness (send time - deadline), ns */
    uint64_t irq_late_max_ns;       /* ... and the largest one, ns */
};

enum {
    VX_F_EVENT_IDX = 1,
    VX_F_MRG_RXBUF = 2,
    VX_MAX_BUF_LEN = 16777216,      /* cap on one descriptor's len */
    VX_SCRATCH_LEN = 131072,        /* TX copy-out / RX bounce buffer per queue */
    VX_SWITCH_MAX_PORTS = 64,
    VX_SWITCH_MAX_RXQ = 16,
    VX_SWITCH_FDB_SIZE = 8192,
    VX_SINK_SLOTS = 64,             /* tx_sink copies into a rotating set of buffers per thread */
    VX_SINK_SLOT_LEN = 2048         /* ... of this many bytes each (128 KiB); longer: scratch */
};

struct vx_vq;
struct vx_switch;

struct vx_switch_stats {
    uint64_t unicast;       /* frames sent to one learned port */
    uint64_t flooded;       /* frames flooded (broadcast, multicast, unknown) */
    uint64_t learned;       /* new FDB entries */
    uint64_t moved;         /* FDB entries that changed port */
    uint64_t fdb_full;      /* learning failed: no free slot */
    uint64_t hairpin;       /* frames whose destination is their source port (dropped) */
    uint64_t dest_down;     /* deliveries skipped: destination removed or broken */
};

/* ---- queue life cycle (control thread, queue stopped) ---- */
struct vx_vq *vx_vq_new(uint32_t size);
void vx_vq_free(struct vx_vq *vq);
int vx_vq_start(struct vx_vq *vq, const struct vx_mem *mem, void *desc, void *avail, void *used,
                uint16_t last_avail_idx, uint32_t flags, uint32_t hdr_len, int call_fd);
int vx_vq_remap(struct vx_vq *vq, const struct vx_mem *mem, void *desc, void *avail, void *used);
void vx_vq_set_call_fd(struct vx_vq *vq, int call_fd);

/* ---- owning worker thread ---- */
int vx_vq_pending(struct vx_vq *vq);
int vx_vq_set_notify(struct vx_vq *vq, int enable);

/* The interrupt decision, the one function every completion goes through: publish the used
 * entries (one release store of used->idx; with kicks on under EVENT_IDX, avail_event too),
 * then, when something was published since the last decision, ask the driver (EVENT_IDX
 * used_event, or VRING_AVAIL_F_NO_INTERRUPT; after a full fence: no lost interrupt), apply the
 * queue's interrupt policy, write the call eventfd, and count the outcome in struct vx_stats.
 * Returns the outcome: */
enum {
    VX_NOTIFY_BROKEN = -1,    /* the queue is broken: nothing published */
    VX_NOTIFY_NONE = 0,       /* nothing new since the last decision (not counted) */
    VX_NOTIFY_SENT = 1,       /* the call eventfd was written (stats.interrupts) */
    VX_NOTIFY_SUPPRESSED = 2, /* the driver wants none (stats.interrupts_suppressed) */
    VX_NOTIFY_NO_FD = 3,      /* wanted, but the queue has no call fd (stats.interrupts_no_fd) */
    VX_NOTIFY_DEFERRED = 4,   /* wanted, held back by moderation (stats.interrupts_deferred) */
    VX_NOTIFY_POSTED = 5,     /* request bit set, no notification (stats.interrupts_posted) */
    VX_NOTIFY_POSTED_WAKE = 6 /* ... and the wake eventfd written (stats.pi_notifications) */
};
int vx_vq_notify_decide(struct vx_vq *vq);
/* vx_vq_notify_decide as a bool: 1 if the call eventfd was written, 0 if not, -1 broken */
int vx_vq_signal(struct vx_vq *vq);

/* ---- the interrupt policy (vx_used.c; docs/interrupts.md) ----
 * struct vx_irq_config is a cell owned by the Python side (one per device), read by the queues
 * that point at it with relaxed loads on every decision: any thread may change a field at any
 * time (aligned stores), a decision sees it from its next run. NULL (a new queue's): immediate.
 * IMMEDIATE: write the call eventfd whenever the driver asks. MODERATE: hold the interrupt until
 * `frames` completions are pending or `delay_ns` has passed since the first held one, whichever
 * comes first (frames <= 1 or delay_ns == 0: immediate). ADAPTIVE: MODERATE while the queue's
 * completion rate, measured over windows of `window_ns`, is at least `on_pps`; back to
 * immediate once a window's rate falls below `off_pps` (hysteresis: off_pps <= on_pps).
 * A held interrupt is due at its deadline: vx_vq_irq_flush sends it (the worker's wait and the
 * poll rounds call it for their queues; a detach forces it). Queues written by other threads
 * (switch and fwd RX) are never moderated: nobody would honour their deadline. */
enum {
    VX_IRQ_IMMEDIATE = 0,
    VX_IRQ_MODERATE = 1,
    VX_IRQ_ADAPTIVE = 2
};
struct vx_irq_config {
    uint32_t mode;       /* VX_IRQ_* */
    uint32_t frames;     /* irq_coalesce_frames */
    uint64_t delay_ns;   /* irq_coalesce_us, in ns */
    uint64_t on_pps;     /* ADAPTIVE: moderation on at or above this completion rate */
    uint64_t off_pps;    /* ADAPTIVE: ... off below this one */
    uint64_t window_ns;  /* ADAPTIVE: rate sampling window */
};
/* control thread while stopped, or the owning worker */
void vx_vq_set_irq(struct vx_vq *vq, const struct vx_irq_config *cfg);
/* Send a held interrupt if it is due at `now` (CLOCK_MONOTONIC ns; UINT64_MAX: force it).
 * Returns the deadline still pending (0: none). Owning worker (takes the queue lock). */
uint64_t vx_vq_irq_flush(struct vx_vq *vq, uint64_t now);
uint64_t vx_vq_irq_deadline(const struct vx_vq *vq);
/* vx_vq_irq_flush for a worker that sleeps until the returned time: returns when to look
 * again, the deadline less the queue's learnt wake-up lateness (0: nothing held); looked at
 * within that advance, it spins to the deadline and sends. Owning worker (vx_wait). */
uint64_t vx_vq_irq_flush_timed(struct vx_vq *vq, uint64_t now);

/* ---- para-virtual posted interrupts (vx_used.c; docs/interrupts.md, "Ordering rules") ----
 * A 64-byte, 64-byte-aligned descriptor per interrupt domain (one driver thread), in memory
 * the frontend shares (VHOSTX_SET_POSTED_IRQ), modelled on the APICv posted-interrupt
 * descriptor. Backend (vx_vq_notify_decide): set the queue's PIR bit, full fence, read control,
 * wake only on ON's 0 -> 1 with SN clear. Driver: SN while it runs; before sleeping ON = 0 (the
 * exitless EOI), SN = 0, full fence, re-read PIR (vx_pi_prepare_sleep). */
struct vx_pi_desc {
    uint64_t pir[4];      /* bytes 0..31: request bitmap (bit i = the device's vring i) */
    uint32_t control;     /* bytes 32..35: VX_PI_ON (notification outstanding) | VX_PI_SN
                           * (suppress: the driver runs and will look) */
    uint32_t domain;      /* bytes 36..39: the domain's number (the NDST analogue) */
    uint64_t reserved[3]; /* bytes 40..63 */
};
enum {
    VX_PI_ON = 1,
    VX_PI_SN = 2,
    VX_PI_DESC_SIZE = 64,
    VX_PI_MAX_BITS = 256
};
/* Post this queue's interrupts to `desc` bit `bit`, waking `wake_fd`; desc NULL: back to the
 * call eventfd. -1 if bit >= VX_PI_MAX_BITS or desc is not 64-byte aligned. Queue stopped, or
 * its owning worker. */
int vx_vq_set_posted(struct vx_vq *vq, struct vx_pi_desc *desc, uint32_t bit, int wake_fd);
/* driver side (any one thread per descriptor) */
void vx_pi_running(struct vx_pi_desc *d);          /* SN = 1 */
int vx_pi_take(struct vx_pi_desc *d, uint64_t *out); /* exchange the PIR words with 0 into
                                                      * out[4]; returns the bits taken */
int vx_pi_prepare_sleep(struct vx_pi_desc *d);     /* ON = 0, SN = 0, full fence; 1 if PIR is
                                                    * not empty (do not sleep; SN is set again) */
/* TEST SUPPORT: a hook at the race windows: point 1 after the backend set its PIR bit, before
 * it reads control; point 2 after the driver cleared ON/SN, before its fence and PIR re-read */
void vx_pi_set_test_hook(void (*hook)(void *, uint32_t), void *arg);

/* vq is written by two ops on different threads (a `source` port's echo_tx: RX_FILL and ECHO
 * with shared_rx): its pending, set_notify, signal and busy-poll lock it too. Control thread. */
void vx_vq_set_shared(struct vx_vq *vq, int shared);
/* How vq's TX loops prefetch the frames of a stage (vx_tx.h) before copying them: NTA (the
 * default) keeps the driver's lines out of this core's L2, T0 keeps them, NONE does not
 * prefetch. Which is faster depends on where the driver's core sits against ours (its next
 * write to a line we hold waits for our copy to go); the worker measures it (iosched's
 * tx_prefetch auto). Returns -1 (nothing set) for another mode. The owning worker's thread. */
enum {
    VX_TX_PREFETCH_NTA = 0,
    VX_TX_PREFETCH_T0 = 1,
    VX_TX_PREFETCH_NONE = 2,
};
int vx_vq_set_tx_prefetch(struct vx_vq *vq, uint32_t mode);
uint32_t vx_vq_tx_prefetch(const struct vx_vq *vq);
uint16_t vx_vq_last_avail_idx(const struct vx_vq *vq);
uint16_t vx_vq_used_idx(const struct vx_vq *vq);
const char *vx_vq_error(const struct vx_vq *vq);
struct vx_stats *vx_vq_stats(struct vx_vq *vq);

/* ---- net data path ----
 * spin_ns: bounded busy-poll. When the ring a call serves runs empty before its budget is used
 * up, and the call has already found work, the call first publishes its used entries and makes
 * its interrupt decisions (nothing the driver waits for stays unpublished), then re-reads
 * avail->idx for new entries. The time spent waiting on an empty ring is at most spin_ns per
 * call in total (so one call adds at most spin_ns of latency for other queues of its worker).
 * 0: return as soon as the ring is empty (no re-read of avail->idx within the call). A call that
 * finds the ring empty at its start never spins (idle queues cost nothing). */
int vx_net_tx_sink(struct vx_vq *tx, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns);
int vx_net_rx_fill(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
                   uint64_t spin_ns);
int vx_net_echo(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns);
int vx_net_fwd(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
               uint64_t spin_ns);
int vx_net_tx_to_fd(struct vx_vq *tx, int fd, uint32_t max_pkts, uint64_t max_bytes,
                    uint64_t spin_ns);
int vx_net_rx_from_fd(struct vx_vq *rx, int fd, uint32_t max_pkts, uint64_t spin_ns);

/* ---- L2 learning switch ---- */
struct vx_switch *vx_switch_new(void);
void vx_switch_free(struct vx_switch *sw);
int vx_switch_add_port(struct vx_switch *sw, struct vx_vq **rxqs, uint32_t nrxq);
int vx_switch_remove_port(struct vx_switch *sw, int port);
int vx_switch_tx(struct vx_switch *sw, int port, struct vx_vq *tx, uint32_t max_pkts,
                 uint64_t max_bytes, uint64_t spin_ns);
int vx_switch_lookup(struct vx_switch *sw, const uint8_t *mac);
struct vx_switch_stats *vx_switch_stats(struct vx_switch *sw);

/* ---- port operations as data, and poll rounds ----
 * A vx_op names one net operation and its rings (owned by the Python side, which keeps every
 * pointer in it alive while the op may run). vx_op_run runs it once (the vx_net_* call it names);
 * vx_round serves many ops of one worker thread in one call: round robin, one batch of each op
 * per pass (its own max_pkts / max_bytes, no busy-poll spin), passes repeated until max_passes
 * or until max_ns has elapsed since the call began (the clock is read every 4 passes; a pass is
 * never cut short, so a round may exceed max_ns by up to 4 passes; a pass that found no work on
 * any op is followed by one pause instruction). Per op it writes: batches run, batches that
 * found work (found), batches that used their whole packet budget (full), packets, and
 * last_work_ns (the last CLOCK_MONOTONIC reading before the last pass in which the op found
 * work, at most 4 passes earlier; 0: none).
 * Returns the passes completed (>= 1 when n > 0), or -(i + 1) when op i returned -1 (a ring
 * broke; its `result` is -1 and the round stopped right there: ops after i in that pass did not
 * run), or -(i + 1) with result -2 for an op of unknown kind (nothing run).
 * coalesce_ns > 0 (poll_coalescing): an op runs at most once per coalesce_ns (its next_ns, kept
 * across rounds; vx_round.c tells why). An op with batch_target > 0 spaces its own visits
 * (batch waiting, below: the larger of that spacing and coalesce_ns applies). With either, the
 * clock is read at every pass. Passes in which every op was skipped count as passes (batches
 * does not grow). */
enum {
    VX_OP_TX_SINK = 1,
    VX_OP_RX_FILL = 2,
    VX_OP_ECHO = 3,
    VX_OP_FWD = 4,
    VX_OP_TX_TO_FD = 5,
    VX_OP_RX_FROM_FD = 6,
    VX_OP_SWITCH_TX = 7
};

struct vx_op {
    uint32_t kind;           /* VX_OP_* */
    int32_t fd;              /* TX_TO_FD, RX_FROM_FD */
    struct vx_vq *vq;        /* the ring the op serves: TX, or RX for RX_FILL / RX_FROM_FD */
    struct vx_vq *peer;      /* ECHO, FWD: the RX ring */
    struct vx_switch *sw;    /* SWITCH_TX */
    int32_t port;            /* SWITCH_TX */
    uint32_t frame_len;      /* RX_FILL */
    const uint8_t *frame;    /* RX_FILL */
    uint32_t max_pkts;       /* budget of one batch in a round */
    uint64_t max_bytes;
    uint64_t idle_ns;        /* vx_round_until: an op that found no work for this long ends the
                              * round at its next check (the owner may stop polling it); 0:
                              * never (it is polled for good) */
    /* written by vx_round */
    int32_t result;          /* the last batch's return */
    uint32_t batches;
    uint32_t found;
    uint32_t full;
    uint64_t pkts;
    uint64_t last_work_ns;
    /* batch waiting (vx_round_until; 0: off): while the op's batches carry a stream (at least
     * VX_BATCH_WAIT_FLOOR packets), the round spaces its visits so that they grow towards
     * batch_target packets (at most half the ring, at most max_pkts), waiting at most
     * batch_wait_max_ns between two; a smaller batch visits it at every pass again */
    uint32_t batch_target;
    uint64_t batch_wait_max_ns;
    /* kept across rounds */
    uint64_t batch_wait_ns;  /* the op's current spacing (batch waiting) */
    uint64_t next_ns;        /* with coalesce_ns or batch waiting: not run again before this
                              * CLOCK_MONOTONIC */
    /* RX_FILL pacing (a `source` port's rate_pps): at most rate_pps frames per second since
     * rate_t0_ns, never more than 4 batches behind (a paced op that fell behind does not
     * burst to catch up); 0: unpaced */
    uint64_t rate_pps;
    uint64_t rate_t0_ns;
    uint64_t rate_sent;
    uint32_t shared_rx;      /* RX_FILL, ECHO: the RX ring has another writer (vx_vq_set_shared):
                              * each fill step, each batch holds its lock (never a spin) */
};

int vx_op_run(struct vx_op *op, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns);
int vx_round(struct vx_op **ops, uint32_t n, uint32_t max_passes, uint64_t max_ns,
             uint64_t coalesce_ns);
/* What the last round did with each of ops[0..n): out[5 i .. 5 i + 4] = batches, found, full,
 * pkts, last_work_ns of op i (one call instead of five field reads per op from Python). */
void vx_round_results(struct vx_op *const *ops, uint32_t n, uint64_t *out);
uint64_t vx_now_ns(void);

/* ==== kicked queues and the worker's wait (vx_kq.c, vx_wait.c) ============================ *
 * A vx_kq is one queue a worker serves on kicks: a vx_op (its batch), the kick eventfd the
 * driver writes, optionally a data fd whose readability also means work (a TAP fd), the batch
 * budget, and counters. It is owned by the Python side (ffi.new), which keeps its op alive.
 *
 * vx_kq_kick serves one kick in one call: drain the kick eventfd, kicks off, one batch (the op,
 * its budget), then, unless the batch used its whole packet budget: kicks back on (full
 * barrier), re-check the ring (a buffer that landed between the batch's last look and the
 * re-enable came with no kick: it is found here), kicks off again if it is not empty, signal.
 * Kicks stay off past one batch in three turns (vx_kq.c lists them and tells why).
 *
 * A vx_wait is one worker thread's waiting point: an epoll fd over its command eventfd, the
 * kick and data fds of its C-served queues (vx_wait_add) and the fds the Python side serves
 * itself (vx_wait_watch), plus VX_WAIT_SLOTS one-shot deadlines (CLOCK_MONOTONIC ns; the Python
 * side names the slots: scans, statistics, moderation deadlines ...).
 * vx_wait_run(w, 1) blocks (no CPU) and serves kicked queues in C, round robin, one batch per
 * turn (a queue whose batch used its budget goes to the tail of the run queue), until something
 * needs Python; it returns the VX_WAIT_* reasons and fills vx_wait_report():
 *   CMD    the command eventfd is readable (not read here)
 *   TIMER  deadline slots are due (`due`, bit i = slot i; a due slot is cleared)
 *   FDS    watched (Python-served) fds are readable (`fds`; not read here)
 *   SCHED  queues handed to Python (`ids`, their vx_kq.id; `why` and `last` say what happened;
 *          their state is VX_KQ_PY and their kicks are off): a batch served >= poll_start items
 *          (a polling decision), or used its whole budget while budget_to_python is set (the
 *          policy continues the turn), or the ring broke (last < 0)
 * Between two epoll looks it serves each queued kq once; a command waits at most one batch.
 * vx_wait_run(w, 0) never blocks and serves nothing: it collects the events (a kicked VX_KQ_IDLE
 * queue gets its kicks turned off and is handed over with why KICK) and hands every queue of
 * the run queue over (why KICK): the Python side is serving queues of its own (polling).
 * A kq the Python side holds (VX_KQ_PY) is only counted on kicks; the Python side gives it back
 * by storing state = VX_KQ_IDLE once it turned kicks on and re-checked the ring itself.
 * Returns the reasons (> 0), or -1 with errno when epoll failed.
 * Held interrupts (moderation, struct vx_irq_config) of every added kq's rings (op->vq and
 * op->peer) are part of the wait: it sleeps no longer than the earliest one and sends those
 * due without returning; vx_wait_remove sends a held one at once (detach, migration). The
 * waiting thread's timer slack is lowered to 1 us on its first vx_wait_run.
 * Threads: everything on one wait and its kqs from the worker thread that owns it. */
enum {
    VX_KQ_IDLE = 0,           /* kicks on: the wait serves it on its next kick */
    VX_KQ_RUN = 1,            /* kicks off, in the wait's run queue */
    VX_KQ_PY = 2,             /* kicks off, the Python side serves it */
    VX_WHY_KICK = 1,
    VX_WHY_POLL = 2,
    VX_WHY_BUDGET = 3,
    VX_WHY_BROKEN = 4,
    VX_TURN_IDLE = 0,         /* vx_kq_kick: drained, kicks on, nothing pending */
    VX_TURN_AGAIN = 1,        /* runnable again: kicks off (budget used, or pending at re-check) */
    VX_TURN_HANDED = 2,       /* needs a decision: see vx_kq.why */
    VX_WAIT_CMD = 1,
    VX_WAIT_TIMER = 2,
    VX_WAIT_FDS = 4,
    VX_WAIT_SCHED = 8,
    VX_WAIT_SLOTS = 4,
    VX_WAIT_REPORT_MAX = 256,
    VX_HOOK_BATCHED = 1,      /* TEST SUPPORT: after the batch, before kicks come back on */
    VX_HOOK_ENABLED = 2       /* TEST SUPPORT: after kicks came back on, before the re-check */
};

struct vx_kq_stats {
    uint64_t kicks;            /* kick eventfd wake-ups seen (in any state) */
    uint64_t turns;            /* batches run in C */
    uint64_t empty_turns;      /* ... that found nothing */
    uint64_t budget_exhausted; /* ... that used the whole packet budget and were requeued */
    uint64_t notify_on;        /* kicks re-enabled in C */
    uint64_t notify_off;       /* kicks suppressed in C */
    uint64_t packets;          /* packets of the batches run in C */
    uint64_t stream_waits;     /* empty batches after a full one that waited for a refill */
    uint64_t stream_found;     /* ... whose wait found one (and ran the batch again) */
    uint64_t rearm_deferred;   /* busy-queue turns: requeued, re-armed only at an empty turn */
    uint64_t wakes;            /* wake-ups of a sleeping queue (VX_KQ_IDLE, kicks on) by a kick
                                * or its data fd: arrivals no busy-poll window caught */
    uint64_t caught;           /* arrivals found with kicks still off by a busy-poll window (a
                                * batch's spin, a stream wait, a lingering queue's next batch) */
    uint64_t lingers;          /* batches that lingered: the next turn's stream wait gives a
                                * fresh window */
    uint64_t widened;          /* early wake-ups that doubled the window (vx_kq.c kq_adapt) */
};

struct vx_kq {
    struct vx_op *op;          /* the batch; op->vq is the ring kicked and re-checked */
    int32_t kick_fd;           /* eventfd the driver writes, -1: none */
    int32_t data_fd;           /* -1, or an fd whose readability is work (never read here) */
    uint32_t id;               /* the Python side's name for it (reported in ids) */
    uint32_t state;            /* VX_KQ_* */
    uint32_t max_pkts;         /* budget of one batch */
    uint64_t max_bytes;
    const uint64_t *spin_ns;   /* NULL, or {window, cap}: the busy-poll window of a batch run
                                * alone and the cap of its adaptive growth (0: fixed) */
    uint32_t why;              /* VX_WHY_* of the last hand-over */
    int32_t last;              /* the last batch's return (< 0: broken) */
    uint32_t lingering;        /* the last batch lingered (see lingers): the next one may wait */
    uint64_t last_work_ns;     /* CLOCK_MONOTONIC after the last batch that found work */
    uint64_t win_ns;           /* the adaptive window now (0: the base one); see kq_suppress */
    uint64_t rearm_ns;         /* CLOCK_MONOTONIC when kicks were last turned back on */
    struct vx_kq_stats stats;
    /* the wait's own */
    struct vx_kq *next;
    struct vx_wait *owner;
    void *src[2];
};

struct vx_wait_report {
    uint32_t reasons;
    uint32_t due;
    uint32_t nfds;
    uint32_t nids;
    int32_t fds[256];
    uint32_t ids[256];
};

struct vx_wait_stats {
    uint64_t loops;            /* batches run plus wake-ups */
    uint64_t sleeps;           /* blocking epoll waits */
    uint64_t busy_ns;          /* batches that moved packets */
    uint64_t idle_ns;          /* asleep, or batches that found nothing */
    uint64_t batches;
    uint64_t calls;            /* vx_wait_run calls (returns to Python) */
};

struct vx_wait;
int vx_kq_kick(struct vx_kq *kq, uint32_t poll_start, uint32_t budget_to_python);
struct vx_wait *vx_wait_new(int cmd_fd);
void vx_wait_free(struct vx_wait *w);
int vx_wait_add(struct vx_wait *w, struct vx_kq *kq);
int vx_wait_remove(struct vx_wait *w, struct vx_kq *kq);
int vx_wait_watch(struct vx_wait *w, int fd);
int vx_wait_unwatch(struct vx_wait *w, int fd);
void vx_wait_configure(struct vx_wait *w, uint32_t poll_start, uint32_t budget_to_python);
void vx_wait_set_deadline(struct vx_wait *w, uint32_t slot, uint64_t at_ns);
int vx_wait_run(struct vx_wait *w, int serve);
/* Would vx_wait_run(w, 0) at `now` find anything (a ready fd, a kicked queue, a due deadline slot
 * or a due held interrupt of its queues)? 1 yes, 0 no. Reads only: one poll() of the epoll fd. */
int vx_wait_ready(struct vx_wait *w, uint64_t now);
/* A poll round that yields to the wait (shared mode with every polled queue busy): vx_round's
 * passes, with the clock read and the held interrupts sent as there, but the round ends at
 * max_ns only if nothing needs the owner sooner. From check_ns on, and every check_ns after
 * that, it looks: the round ends when an op with idle_ns > 0 found no work for idle_ns (from its
 * last work in this call, or from the call's start, up to the clock read before the passes just
 * run: an op that found work since the previous clock read is not idle), or when w (NULL: none)
 * is ready (vx_wait_ready). vx_round(ops, n, p, t, c) is vx_round_until(ops, n, p, t, t, c, NULL).
 * Results, returns and last_work_ns as vx_round's, for the whole call. */
int vx_round_until(struct vx_op **ops, uint32_t n, uint32_t max_passes, uint64_t check_ns,
                   uint64_t max_ns, uint64_t coalesce_ns, struct vx_wait *w);
struct vx_wait_report *vx_wait_report(struct vx_wait *w);
struct vx_wait_stats *vx_wait_stats(struct vx_wait *w);
/* TEST SUPPORT: hook(arg, VX_HOOK_*, kq id) at the two points of a C turn's re-arm */
void vx_wait_set_hook(struct vx_wait *w, void (*hook)(void *, uint32_t, uint32_t), void *arg);

/* ==== device IOTLB (vx_iotlb.c): VIRTIO_F_ACCESS_PLATFORM ================================= *
 * With ACCESS_PLATFORM the ring's descriptor addresses are IOVAs of the guest's vIOMMU. A
 * struct vx_iotlb (one per device, shared by its queues) maps IOVA ranges to host pointers (the
 * frontend's uaddr already translated through the memory table by the control thread), each
 * with its permission. A queue given one (vx_vq_set_iotlb) translates every descriptor and
 * indirect table through it; with none it translates guest physical addresses as before.
 *
 * Handoff: the table is changed only by the control thread and read by workers under a
 * seqlock (a reader that raced a change retries). Inserting needs nothing more. Removing a
 * mapping (invalidate, rehost, clear) is done only while the device's works are detached, so no
 * batch can hold a pointer from the removed entry (docs/internal-api.md, "device IOTLB").
 * A walk that finds no entry for an IOVA records a miss (once per IOVA until an update covers
 * it), writes the table's miss eventfd, and leaves the chain in the ring. */
enum {
    VX_IOTLB_PERM_RO = 1,
    VX_IOTLB_PERM_WO = 2,
    VX_IOTLB_PERM_RW = 3,
    VX_IOTLB_MISS_SLOTS = 64,      /* misses recorded and not yet answered (when full, the ones
                                    * already handed out are forgotten, to be sent again) */
    VX_IOTLB_OK = 0,
    VX_IOTLB_REPEAT = 1,           /* update: exactly this mapping is already there */
    VX_IOTLB_OVERLAP = -2,         /* update: overlaps another mapping (invalidate it first) */
    VX_IOTLB_FULL = -3,            /* update: the table holds its capacity already */
    VX_IOTLB_BAD = -4,             /* update: size 0, range wraps, or perm not 1..3 */
    VX_IOTLB_MISS = 1,             /* translate: no mapping at iova */
    VX_IOTLB_DENIED = -1           /* translate: mapped without the permission asked for */
};

struct vx_iotlb_stats {
    uint64_t updates;       /* mappings inserted */
    uint64_t repeats;       /* updates identical to a mapping in the table */
    uint64_t invalidations; /* invalidate calls that removed or trimmed something */
    uint64_t removed;       /* entries removed or trimmed by invalidations */
    uint64_t misses;        /* misses recorded by walks (each IOVA once until answered) */
    uint64_t miss_dropped;  /* walks' misses not recorded: VX_IOTLB_MISS_SLOTS unsent already */
    uint64_t denied;        /* translations refused for permission (the queue breaks) */
    uint64_t retries;       /* lookups that raced a change and ran again */
};

struct vx_iotlb;
struct vx_iotlb *vx_iotlb_new(uint32_t capacity, int miss_fd);
void vx_iotlb_free(struct vx_iotlb *t);
/* control thread: the eventfd misses are signalled on (-1: none, e.g. before closing it) */
void vx_iotlb_set_miss_fd(struct vx_iotlb *t, int miss_fd);
/* control thread */
int vx_iotlb_update(struct vx_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr,
                    uint64_t host, uint32_t perm);
/* the next three only while every queue using t is detached from its worker */
uint32_t vx_iotlb_invalidate(struct vx_iotlb *t, uint64_t iova, uint64_t size);
uint32_t vx_iotlb_rehost(struct vx_iotlb *t, const struct vx_mem *mem);
void vx_iotlb_clear(struct vx_iotlb *t);
uint32_t vx_iotlb_count(const struct vx_iotlb *t);
/* 1 if some mapping meets [iova, iova+size), control thread */
int vx_iotlb_meets(const struct vx_iotlb *t, uint64_t iova, uint64_t size);
/* misses not yet handed out (each once): up to max of them, with the permission wanted */
uint32_t vx_iotlb_take_misses(struct vx_iotlb *t, uint64_t *iovas, uint32_t *perms, uint32_t max);
/* any thread: host pointer and uaddr of iova, and how many bytes from there (<= len) are
 * contiguous in both; VX_IOTLB_OK, VX_IOTLB_MISS (recorded if record) or VX_IOTLB_DENIED */
int vx_iotlb_translate(struct vx_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                       int record, uint64_t *host, uint64_t *uaddr, uint64_t *contig);
struct vx_iotlb_stats *vx_iotlb_stats(struct vx_iotlb *t);
/* control thread, queue stopped: translate this queue's descriptors through t (NULL: GPAs) */
int vx_vq_set_iotlb(struct vx_vq *vq, struct vx_iotlb *t);
/* the IOVA of the last miss that stopped this queue's walk, 0 if none since start */
uint64_t vx_vq_iotlb_last_miss(const struct vx_vq *vq);

#include "vx_drv.h" /* the driver side: public API too */

#endif
