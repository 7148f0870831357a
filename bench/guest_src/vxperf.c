/*
 * vxperf: the measurement program of the QEMU benchmark client (bench/harness/qemu_client.py).
 *
 * Built on the host at image-build time (gcc -static, glibc), cached outside the repository and
 * put into the guest's initramfs; it runs inside a TCG guest on a virtio-net NIC whose backend is
 * the one under test. Raw Ethernet frames through AF_PACKET, so the guest's work per frame is the
 * driver and the packet socket, no IP stack.
 *
 *   vxperf pingpong IFACE SIZE WARMUP_S DURATION_S   one frame in flight; the backend reflects it
 *   vxperf tx       IFACE SIZE WARMUP_S DURATION_S   send as fast as the guest can (backend sinks)
 *   vxperf rx       IFACE WARMUP_S DURATION_S [PING_US]
 *                                                    count what arrives (backend sources),
 *                                                    the guest's virtio interrupts and CPU;
 *                                                    PING_US > 0: also a ping-pong frame sent
 *                                                    every PING_US, its RTT taken when the
 *                                                    backend reflects it into the same stream
 *                                                    (vhostx `source` with echo_tx)
 *
 * Console protocol (one line each, flushed at once):
 *   VX-WINDOW begin / VX-WINDOW end   the measurement window (after the warm-up), guest clock
 *   VX-RESULT <name> <value>          the window's figures (see the modes below)
 *   VX-RTT <ns> <ns> ...              ping-pong round-trip times of the window, in order
 * Exit status 0 when the window completed, 2 for bad arguments, 3 for a socket error.
 *
 * Ping-pong frame (the layout of bench/harness/pingpong.py, so both clients send the same bytes):
 *   dst 52:54:00:bb:00:00 | src (the NIC's MAC) | ethertype 0x88B5 |
 *   "VXPP" | flow u16 | seq u64 | send timestamp u64 (CLOCK_MONOTONIC ns), little endian | zeros
 * The round-trip time is the receive instant minus the timestamp carried back in the frame; a
 * reply with another sequence number counts as bad, no reply within 1 s as lost.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETHERTYPE_VXPP 0x88B5
#define HDR 14
#define BODY 22 /* magic 4 + flow 2 + seq 8 + ts 8 */
#define MAX_FRAME 9000
#define BATCH 32
#define LOSS_NS 1000000000ULL

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
}

static void result_u64(const char *name, uint64_t v) { say("VX-RESULT %s %llu\n", name, (unsigned long long)v); }

/* Interrupts the guest took from virtio devices: every /proc/interrupts line naming "virtio"
 * (with vectors=0 the NIC's queues share one INTx line), summed over the CPUs. */
static uint64_t virtio_irqs(void)
{
	FILE *f = fopen("/proc/interrupts", "r");
	if (!f)
		return 0;
	char line[1024];
	uint64_t total = 0;
	while (fgets(line, sizeof line, f)) {
		if (!strstr(line, "virtio"))
			continue;
		char *p = strchr(line, ':');
		if (!p)
			continue;
		p++;
		for (;;) {
			char *end;
			unsigned long long v = strtoull(p, &end, 10);
			if (end == p)
				break;
			total += v;
			p = end;
		}
	}
	fclose(f);
	return total;
}

/* The guest's CPU time from the first /proc/stat line, in USER_HZ ticks: busy and total. */
static void cpu_ticks(uint64_t *busy, uint64_t *total)
{
	unsigned long long v[8] = {0};
	*busy = *total = 0;
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		return;
	if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
		   &v[4], &v[5], &v[6], &v[7]) == 8) {
		*busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; /* all but idle and iowait */
		*total = *busy + v[3] + v[4];
	}
	fclose(f);
}

/* A counter of /sys/class/net/IFACE/statistics (0 when unreadable). */
static uint64_t if_stat(const char *ifname, const char *name)
{
	char path[256];
	unsigned long long v = 0;
	snprintf(path, sizeof path, "/sys/class/net/%s/statistics/%s", ifname, name);
	FILE *f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%llu", &v) != 1)
			v = 0;
		fclose(f);
	}
	return v;
}

static int open_socket(const char *ifname, int proto, int ifindex_out[1], unsigned char mac[6])
{
	int fd = socket(AF_PACKET, SOCK_RAW, htons(proto));
	if (fd < 0) {
		perror("VX-ERROR socket");
		return -1;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) {
		perror("VX-ERROR SIOCGIFINDEX");
		return -1;
	}
	ifindex_out[0] = ifr.ifr_ifindex;
	if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) {
		perror("VX-ERROR SIOCGIFHWADDR");
		return -1;
	}
	memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
	struct sockaddr_ll sll;
	memset(&sll, 0, sizeof sll);
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(proto);
	sll.sll_ifindex = ifindex_out[0];
	if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
		perror("VX-ERROR bind");
		return -1;
	}
	int one = 1;
	/* straight to the driver: no qdisc between the program and the TX ring */
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
	return fd;
}

static void put_u16(unsigned char *p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }
static void put_u64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (v >> (8 * i)) & 0xff;
}
static uint64_t get_u64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

static void make_frame(unsigned char *f, int size, const unsigned char src[6], uint64_t seq, uint64_t ts)
{
	static const unsigned char dst[6] = {0x52, 0x54, 0x00, 0xbb, 0x00, 0x00};
	memset(f, 0, (size_t)size);
	memcpy(f, dst, 6);
	memcpy(f + 6, src, 6);
	f[12] = ETHERTYPE_VXPP >> 8;
	f[13] = ETHERTYPE_VXPP & 0xff;
	memcpy(f + HDR, "VXPP", 4);
	put_u16(f + HDR + 4, 0);
	put_u64(f + HDR + 6, seq);
	put_u64(f + HDR + 14, ts);
}

/* The warm-up, then the measurement window, on the guest's clock. */
struct window {
	uint64_t begin, end;     /* planned */
	uint64_t t_begin, t_end; /* as printed */
	int open;
};
enum { W_WARMUP, W_BEGIN, W_OPEN, W_END };

static struct window window_plan(double warmup, double duration)
{
	struct window w = {0};
	w.begin = now_ns() + (uint64_t)(warmup * 1e9);
	w.end = w.begin + (uint64_t)(duration * 1e9);
	return w;
}

/* W_BEGIN once when the window is due (the caller zeroes its counters, then calls
 * window_begin), W_OPEN inside it, W_END once when it is over (the caller calls window_end). */
static int window_tick(struct window *w)
{
	uint64_t t = now_ns();
	if (!w->open) {
		if (t < w->begin)
			return W_WARMUP;
		w->open = 1;
		return W_BEGIN;
	}
	return t < w->end ? W_OPEN : W_END;
}

static void window_begin(struct window *w)
{
	w->t_begin = now_ns();
	say("VX-WINDOW begin\n");
}

static void window_end(struct window *w)
{
	w->t_end = now_ns();
	say("VX-WINDOW end\n");
	result_u64("elapsed_ns", w->t_end - w->t_begin);
}

/* BATCH messages of one buffer each: iov[i] */
static void msgs_init(struct mmsghdr *msgs, struct iovec *iov)
{
	memset(msgs, 0, BATCH * sizeof *msgs);
	for (int i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
}

/* ------------------------------------------------------------------------------------------ */

static int pingpong(const char *ifname, int size, double warmup, double duration)
{
	int ifindex;
	unsigned char mac[6], frame[MAX_FRAME], buf[MAX_FRAME + 64];
	int fd = open_socket(ifname, ETHERTYPE_VXPP, &ifindex, mac);
	if (fd < 0)
		return 3;
	size_t cap = 1 << 16, n = 0;
	uint64_t *rtt = malloc(cap * sizeof *rtt);
	uint64_t sent = 0, received = 0, lost = 0, bad = 0, send_errors = 0, seq = 0;
	struct window w = window_plan(warmup, duration);
	for (;;) {
		int state = window_tick(&w);
		if (state == W_BEGIN) {
			sent = received = lost = bad = send_errors = 0;
			window_begin(&w);
		} else if (state == W_END) {
			window_end(&w);
			break;
		}
		seq++;
		uint64_t ts = now_ns();
		make_frame(frame, size, mac, seq, ts);
		if (send(fd, frame, (size_t)size, 0) != size) {
			send_errors++;
			continue;
		}
		sent++;
		for (;;) {
			uint64_t waited = now_ns() - ts;
			if (waited >= LOSS_NS) {
				lost++;
				break;
			}
			struct pollfd p = {.fd = fd, .events = POLLIN};
			int r = poll(&p, 1, (int)((LOSS_NS - waited) / 1000000ULL) + 1);
			if (r <= 0)
				continue;
			struct sockaddr_ll from;
			socklen_t fl = sizeof from;
			ssize_t got = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
			uint64_t t_rx = now_ns();
			if (got < 0 || from.sll_pkttype == PACKET_OUTGOING)
				continue;
			if (got < HDR + BODY || memcmp(buf + HDR, "VXPP", 4) != 0 ||
			    get_u64(buf + HDR + 6) != seq) {
				bad++;
				continue;
			}
			received++;
			if (w.open) {
				if (n == cap) {
					cap *= 2;
					rtt = realloc(rtt, cap * sizeof *rtt);
				}
				rtt[n++] = t_rx - get_u64(buf + HDR + 14);
			}
			break;
		}
	}
	result_u64("sent", sent);
	result_u64("received", received);
	result_u64("lost", lost);
	result_u64("bad", bad);
	result_u64("send_errors", send_errors);
	for (size_t i = 0; i < n; i += 32) {
		char line[32 * 21 + 16];
		int len = snprintf(line, sizeof line, "VX-RTT");
		for (size_t k = i; k < n && k < i + 32; k++)
			len += snprintf(line + len, sizeof line - (size_t)len, " %llu", (unsigned long long)rtt[k]);
		say("%s\n", line);
	}
	result_u64("rtt_samples", n);
	return 0;
}

static int tx(const char *ifname, int size, double warmup, double duration)
{
	int ifindex;
	unsigned char mac[6], frame[MAX_FRAME];
	int fd = open_socket(ifname, 0, &ifindex, mac); /* protocol 0: send only, receive nothing */
	if (fd < 0)
		return 3;
	make_frame(frame, size, mac, 0, 0);
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	for (int i = 0; i < BATCH; i++)
		iov[i] = (struct iovec){.iov_base = frame, .iov_len = (size_t)size};
	msgs_init(msgs, iov);
	uint64_t sent = 0, errors = 0, if0 = 0, b0 = 0;
	struct window w = window_plan(warmup, duration);
	for (;;) {
		int state = window_tick(&w);
		if (state == W_BEGIN) {
			sent = errors = 0;
			if0 = if_stat(ifname, "tx_packets");
			b0 = if_stat(ifname, "tx_bytes");
			window_begin(&w);
		} else if (state == W_END) {
			break;
		}
		int r = sendmmsg(fd, msgs, BATCH, 0);
		if (r > 0) {
			sent += (uint64_t)r;
			if (r < BATCH)
				errors++;
		} else {
			errors++; /* ENOBUFS: the TX ring was full (qdisc bypassed) */
		}
	}
	uint64_t if1 = if_stat(ifname, "tx_packets"), b1 = if_stat(ifname, "tx_bytes");
	window_end(&w);
	result_u64("sent", sent);
	result_u64("send_errors", errors);
	result_u64("if_packets", if1 - if0);
	result_u64("if_bytes", b1 - b0);
	return 0;
}

/* rx's pinger: a thread sending a VXPP frame on its own timer (every_ns on average, each gap
 * drawn uniformly from [every_ns / 2, 3 every_ns / 2] so the pings keep no phase with the
 * stream's interrupts), on its own socket (ETHERTYPE_VXPP); rx's loop takes the replies, matched
 * by their magic, the RTT from the timestamp they carry back. A ping sent from the receive loop
 * would leave right after an interrupt woke it, and so always wait out a whole hold. */
struct pinger {
	int fd;
	uint64_t every_ns, seq;
	unsigned char mac[6];
	int size;
	volatile int stop;
	uint64_t sent; /* written by the thread; read after it is joined or as a snapshot */
	uint64_t received, bad;
	size_t n, cap;
	uint64_t *rtt;
};

static void *pinger_main(void *arg)
{
	struct pinger *p = arg;
	unsigned char frame[HDR + BODY + 64];
	uint64_t next = now_ns(), rnd = next | 1;
	while (!p->stop) {
		rnd ^= rnd << 13; /* xorshift64: the gaps' jitter */
		rnd ^= rnd >> 7;
		rnd ^= rnd << 17;
		next += p->every_ns / 2 + rnd % (p->every_ns + 1);
		struct timespec ts = {.tv_sec = (time_t)(next / 1000000000ULL),
				      .tv_nsec = (long)(next % 1000000000ULL)};
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
			;
		uint64_t t = now_ns();
		make_frame(frame, p->size, p->mac, ++p->seq, t);
		if (send(p->fd, frame, (size_t)p->size, MSG_DONTWAIT) == p->size)
			__atomic_fetch_add(&p->sent, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void pinger_recv(struct pinger *p, int window_open)
{
	unsigned char buf[MAX_FRAME + 64];
	for (;;) {
		struct sockaddr_ll from;
		socklen_t fl = sizeof from;
		ssize_t got = recvfrom(p->fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		uint64_t t_rx = now_ns();
		if (got < 0)
			return;
		if (from.sll_pkttype == PACKET_OUTGOING)
			continue;
		if (got < HDR + BODY || memcmp(buf + HDR, "VXPP", 4) != 0) {
			p->bad++;
			continue;
		}
		p->received++;
		if (!window_open)
			continue;
		if (p->n == p->cap) {
			p->cap = p->cap ? 2 * p->cap : 4096;
			p->rtt = realloc(p->rtt, p->cap * sizeof *p->rtt);
		}
		p->rtt[p->n++] = t_rx - get_u64(buf + HDR + 14);
	}
}

static int rx(const char *ifname, double warmup, double duration, double ping_us)
{
	int ifindex;
	unsigned char mac[6];
	int fd = open_socket(ifname, ETH_P_ALL, &ifindex, mac);
	if (fd < 0)
		return 3;
	struct pinger pg = {.fd = -1, .size = HDR + BODY + 24};
	if (ping_us > 0) {
		pg.fd = open_socket(ifname, ETHERTYPE_VXPP, &ifindex, pg.mac);
		if (pg.fd < 0)
			return 3;
		pg.every_ns = (uint64_t)(ping_us * 1e3);
	}
	pthread_t pinger_thread;
	if (pg.fd >= 0 && pthread_create(&pinger_thread, NULL, pinger_main, &pg) != 0) {
		perror("VX-ERROR pthread_create");
		return 3;
	}
	uint64_t pings0 = 0;
	int big = 8 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
	struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	static unsigned char bufs[BATCH][2048];
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	for (int i = 0; i < BATCH; i++)
		iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof bufs[i]};
	msgs_init(msgs, iov);
	uint64_t frames = 0, bytes = 0, if0 = 0, b0 = 0, irq0 = 0, cb0 = 0, ct0 = 0;
	struct tpacket_stats st;
	socklen_t sl = sizeof st;
	struct window w = window_plan(warmup, duration);
	for (;;) {
		int state = window_tick(&w);
		if (state == W_BEGIN) {
			frames = bytes = 0;
			pings0 = __atomic_load_n(&pg.sent, __ATOMIC_RELAXED);
			pg.received = pg.bad = 0;
			pg.n = 0;
			getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &sl); /* reads and resets */
			if0 = if_stat(ifname, "rx_packets");
			b0 = if_stat(ifname, "rx_bytes");
			irq0 = virtio_irqs();
			cpu_ticks(&cb0, &ct0);
			window_begin(&w);
		} else if (state == W_END) {
			break;
		}
		int flags = 0; /* without pings: block in recvmmsg (SO_RCVTIMEO ends it) */
		if (pg.fd >= 0) {
			struct pollfd pf[2] = {{.fd = fd, .events = POLLIN}, {.fd = pg.fd, .events = POLLIN}};
			poll(pf, 2, 100); /* 100 ms at most: the window's end is checked */
			pinger_recv(&pg, w.open);
			flags = MSG_DONTWAIT;
		}
		int r = recvmmsg(fd, msgs, BATCH, flags, NULL);
		for (int i = 0; i < r; i++)
			bytes += msgs[i].msg_len;
		if (r > 0)
			frames += (uint64_t)r;
	}
	uint64_t if1 = if_stat(ifname, "rx_packets"), b1 = if_stat(ifname, "rx_bytes");
	uint64_t irq1 = virtio_irqs(), cb1, ct1;
	cpu_ticks(&cb1, &ct1);
	window_end(&w);
	sl = sizeof st;
	memset(&st, 0, sizeof st);
	getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &sl);
	/* socket counts may include frames queued before the window began: if_* are the figures */
	result_u64("received", frames);
	result_u64("bytes", bytes);
	result_u64("socket_drops", st.tp_drops);
	result_u64("if_packets", if1 - if0);
	result_u64("if_bytes", b1 - b0);
	result_u64("virtio_irqs", irq1 - irq0);           /* guest interrupts in the window */
	result_u64("cpu_busy_ticks", cb1 - cb0);          /* guest CPU (USER_HZ ticks) */
	result_u64("cpu_total_ticks", ct1 - ct0);
	if (pg.fd >= 0) {
		pg.stop = 1;
		pthread_join(pinger_thread, NULL);
		result_u64("pings_sent", pg.sent - pings0); /* a few more than the window's replies */
		result_u64("pings_received", pg.received);
		result_u64("pings_bad", pg.bad);
		for (size_t i = 0; i < pg.n; i += 32) {
			char line[32 * 21 + 16];
			int len = snprintf(line, sizeof line, "VX-RTT");
			for (size_t k = i; k < pg.n && k < i + 32; k++)
				len += snprintf(line + len, sizeof line - (size_t)len, " %llu",
						(unsigned long long)pg.rtt[k]);
			say("%s\n", line);
		}
		result_u64("rtt_samples", pg.n);
	}
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	if (argc == 6 && strcmp(argv[1], "rx") != 0 && (atoi(argv[3]) < HDR + BODY || atoi(argv[3]) > MAX_FRAME)) {
		fprintf(stderr, "VX-ERROR frame size %s: allowed %d..%d\n", argv[3], HDR + BODY, MAX_FRAME);
		return 2;
	}
	if (argc == 6 && strcmp(argv[1], "pingpong") == 0)
		return pingpong(argv[2], atoi(argv[3]), atof(argv[4]), atof(argv[5]));
	if (argc == 6 && strcmp(argv[1], "tx") == 0)
		return tx(argv[2], atoi(argv[3]), atof(argv[4]), atof(argv[5]));
	if ((argc == 5 || argc == 6) && strcmp(argv[1], "rx") == 0)
		return rx(argv[2], atof(argv[3]), atof(argv[4]), argc == 6 ? atof(argv[5]) : 0.0);
	fprintf(stderr, "VX-ERROR usage: vxperf pingpong|tx IFACE SIZE WARMUP DURATION | rx IFACE WARMUP DURATION [PING_US]\n");
	return 2;
}
