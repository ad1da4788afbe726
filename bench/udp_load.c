/*
 * udp_load: closed-loop UDP request/response load for bench/udp.sh.
 *
 *   udp_load HOST PORT [--flows N] [--window W] [--duration S] [--size B]
 *            [--warmup S] [--timeout-ms T] [--pids PID,PID,...]
 *
 * N client sockets (each its own source port: N distinct flows), each keeps
 * W datagrams of B bytes in flight toward HOST:PORT (an IPv4 address) and
 * sends a new one for every reply. One thread, epoll, recvmmsg/sendmmsg.
 *
 * Each datagram carries (slot, sequence, send time). A reply whose slot still
 * waits for that sequence counts, gives an RTT sample and is replaced by the
 * next request in that slot. A slot with no reply after T ms (default 200)
 * counts as lost and is re-sent; a reply that comes after that counts as late
 * and is ignored. So losses never shrink the window.
 *
 * The first --warmup seconds (default 0.5) are not counted (flows/sessions
 * get created there); then replies are counted for --duration seconds and the
 * program exits. With --pids, the CPU time (utime+stime from /proc/PID/stat)
 * those processes used during the counted window is printed too.
 *
 * Output: one line of key=value pairs:
 *   pps replies sent lost late errors p50_us p99_us secs target_cpu_s load_cpu_s
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXPIDS 64
/* RTT histogram: 1 us buckets below FINE_US, 100 us buckets up to COARSE_US. */
#define FINE_US 20000
#define COARSE_STEP 100
#define COARSE_US 2000000
#define NCOARSE ((COARSE_US - FINE_US) / COARSE_STEP + 1)

struct hdr {
    uint64_t sent_ns;
    uint32_t slot;
    uint32_t seq;
};

struct flow {
    int fd;
    uint32_t *want;   /* per slot: the sequence it waits for */
    uint64_t *sentat; /* per slot: send time of that sequence */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t fine[FINE_US];
static uint32_t coarse[NCOARSE];
static uint64_t samples;

static void record_rtt(uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us < FINE_US)
        fine[us]++;
    else {
        uint64_t b = (us - FINE_US) / COARSE_STEP;
        if (b >= NCOARSE)
            b = NCOARSE - 1;
        coarse[b]++;
    }
    samples++;
}

static double percentile(double p)
{
    if (samples == 0)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)samples);
    if (rank >= samples)
        rank = samples - 1;
    uint64_t seen = 0;
    for (int i = 0; i < FINE_US; i++) {
        seen += fine[i];
        if (seen > rank)
            return i + 0.5;
    }
    for (int i = 0; i < NCOARSE; i++) {
        seen += coarse[i];
        if (seen > rank)
            return FINE_US + (double)i * COARSE_STEP + COARSE_STEP / 2.0;
    }
    return COARSE_US;
}

static int npids;
static int pids[MAXPIDS];

/* utime+stime in clock ticks of the given processes (all threads). */
static long long pids_ticks(void)
{
    long long total = 0;
    for (int i = 0; i < npids; i++) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%d/stat", pids[i]);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')'); /* comm may contain spaces */
        if (!p)
            continue;
        /* after ") ": state(3) ppid pgrp session tty tpgid flags minflt cminflt
         * majflt cmajflt utime(14) stime(15) */
        unsigned long long ut = 0, st = 0;
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
            total += (long long)(ut + st);
    }
    return total;
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void usage(void)
{
    fprintf(stderr, "usage: udp_load HOST PORT [--flows N] [--window W] [--duration S] [--size B]\n"
                    "                [--warmup S] [--timeout-ms T] [--pids PID,PID,...]\n");
    exit(2);
}

/* counters */
static uint64_t sent, replies, lost, late, errors;
static int counting;
static size_t size = 64;
static int window = 8;
static char *txbuf; /* BATCH * size bytes */

/* Sends the next request of each listed slot of flow f; count = how many. */
static void send_slots(struct flow *f, const uint32_t *slots, int count)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int done = 0;
    while (done < count) {
        int k = count - done > BATCH ? BATCH : count - done;
        uint64_t t = now_ns();
        for (int i = 0; i < k; i++) {
            uint32_t s = slots[done + i];
            struct hdr *h = (struct hdr *)(txbuf + (size_t)i * size);
            f->want[s]++;
            f->sentat[s] = t;
            h->sent_ns = t;
            h->slot = s;
            h->seq = f->want[s];
            iov[i].iov_base = h;
            iov[i].iov_len = size;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int off = 0;
        while (off < k) {
            int r = sendmmsg(f->fd, msgs + off, (unsigned)(k - off), MSG_DONTWAIT);
            if (r > 0) {
                off += r;
                if (counting)
                    sent += (uint64_t)r;
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else {
                /* EAGAIN (full buffer), ECONNREFUSED (ICMP), ...: this one is
                 * gone; the slot timeout re-sends it. */
                if (counting)
                    errors++;
                off++;
            }
        }
        done += k;
    }
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *host = argv[1];
    int port = atoi(argv[2]);
    int nflows = 64;
    double duration = 5, warmup = 0.5;
    int timeout_ms = 200;
    for (int i = 3; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--flows"))
            nflows = atoi(v);
        else if (!strcmp(k, "--window"))
            window = atoi(v);
        else if (!strcmp(k, "--duration"))
            duration = atof(v);
        else if (!strcmp(k, "--size"))
            size = (size_t)atol(v);
        else if (!strcmp(k, "--warmup"))
            warmup = atof(v);
        else if (!strcmp(k, "--timeout-ms"))
            timeout_ms = atoi(v);
        else if (!strcmp(k, "--pids")) {
            char *copy = strdup(v), *save = NULL;
            for (char *t = strtok_r(copy, ",", &save); t && npids < MAXPIDS; t = strtok_r(NULL, ",", &save))
                pids[npids++] = atoi(t);
            free(copy);
        } else
            usage();
    }
    if (port <= 0 || port > 65535 || nflows < 1 || window < 1 || duration <= 0 || warmup < 0 || timeout_ms < 1)
        usage();
    if (size < sizeof(struct hdr))
        size = sizeof(struct hdr);
    if (size > 65507) {
        fprintf(stderr, "size must be <= 65507\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    txbuf = calloc(BATCH, size);

    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "HOST must be an IPv4 address: %s\n", host);
        return 2;
    }
    int ep = epoll_create1(0);
    struct flow *flows = calloc((size_t)nflows, sizeof *flows);
    for (int i = 0; i < nflows; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        int sz = 1 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
        struct sockaddr_in src = {.sin_family = AF_INET}; /* ephemeral port */
        src.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0 || connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
            perror("bind/connect");
            return 1;
        }
        flows[i].fd = fd;
        flows[i].want = calloc((size_t)window, sizeof(uint32_t));
        flows[i].sentat = calloc((size_t)window, sizeof(uint64_t));
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }

    uint32_t *slots = malloc((size_t)(window > BATCH ? window : BATCH) * sizeof(uint32_t));
    for (int i = 0; i < window; i++)
        slots[i] = (uint32_t)i;
    for (int i = 0; i < nflows; i++)
        send_slots(&flows[i], slots, window);

    uint64_t t0 = now_ns();
    uint64_t start = t0 + (uint64_t)(warmup * 1e9);
    uint64_t end = start + (uint64_t)(duration * 1e9);
    uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000ull;
    uint64_t next_scan = t0 + timeout_ns / 4;
    long long ticks0 = 0;
    double self0 = 0;
    if (warmup == 0) {
        counting = 1;
        ticks0 = pids_ticks();
        self0 = self_cpu_s();
    }

    static char rxbufs[BATCH][2048];
    struct mmsghdr rx[BATCH];
    struct iovec rxiov[BATCH];
    struct epoll_event evs[256];
    uint64_t now = t0;

    while (now < end) {
        int n = epoll_wait(ep, evs, 256, 5);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int e = 0; e < n; e++) {
            struct flow *f = &flows[evs[e].data.u32];
            for (;;) {
                for (int i = 0; i < BATCH; i++) {
                    rxiov[i].iov_base = rxbufs[i];
                    rxiov[i].iov_len = sizeof rxbufs[i];
                    memset(&rx[i].msg_hdr, 0, sizeof rx[i].msg_hdr);
                    rx[i].msg_hdr.msg_iov = &rxiov[i];
                    rx[i].msg_hdr.msg_iovlen = 1;
                }
                int r = recvmmsg(f->fd, rx, BATCH, MSG_DONTWAIT, NULL);
                if (r < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    if (errno == EINTR)
                        continue;
                    if (counting)
                        errors++; /* ECONNREFUSED etc.; keep going */
                    break;
                }
                uint64_t t = now_ns();
                int nslots = 0;
                for (int i = 0; i < r; i++) {
                    if (rx[i].msg_len < sizeof(struct hdr)) {
                        if (counting)
                            errors++;
                        continue;
                    }
                    struct hdr h;
                    memcpy(&h, rxbufs[i], sizeof h);
                    if (h.slot >= (uint32_t)window || f->want[h.slot] != h.seq) {
                        if (counting)
                            late++;
                        continue;
                    }
                    if (counting) {
                        replies++;
                        record_rtt(t - h.sent_ns);
                    }
                    slots[nslots++] = h.slot;
                }
                if (nslots)
                    send_slots(f, slots, nslots);
                if (r < BATCH)
                    break;
            }
        }
        now = now_ns();
        if (!counting && now >= start) {
            counting = 1;
            ticks0 = pids_ticks();
            self0 = self_cpu_s();
            start = now;
            end = start + (uint64_t)(duration * 1e9);
        }
        if (now >= next_scan) {
            next_scan = now + timeout_ns / 4;
            for (int i = 0; i < nflows; i++) {
                int k = 0;
                for (int s = 0; s < window; s++)
                    if (now - flows[i].sentat[s] > timeout_ns)
                        slots[k++] = (uint32_t)s;
                if (k) {
                    if (counting)
                        lost += (uint64_t)k;
                    send_slots(&flows[i], slots, k);
                }
            }
        }
    }
    uint64_t stop = now_ns();
    long long ticks1 = pids_ticks();
    double self1 = self_cpu_s();
    double secs = (double)(stop - start) / 1e9;
    double hz = (double)sysconf(_SC_CLK_TCK);
    printf("pps=%.0f replies=%llu sent=%llu lost=%llu late=%llu errors=%llu p50_us=%.1f p99_us=%.1f secs=%.3f "
           "target_cpu_s=%.2f load_cpu_s=%.2f\n",
           (double)replies / secs, (unsigned long long)replies, (unsigned long long)sent, (unsigned long long)lost,
           (unsigned long long)late, (unsigned long long)errors, percentile(0.50), percentile(0.99), secs,
           npids ? (double)(ticks1 - ticks0) / hz : 0.0, self1 - self0);
    return 0;
}
