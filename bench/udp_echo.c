/*
 * udp_echo: a UDP echo server for the ringlb UDP benchmark (bench/udp.sh).
 *
 *   udp_echo PORT [--bind ADDR] [--strip-proxy]
 *
 * Binds ADDR:PORT (default 127.0.0.1) and sends every datagram back to its
 * sender, unchanged, until killed. With --strip-proxy a datagram that starts
 * with a PROXY v2 header (ringlb's proxy_protocol = "v2" on UDP) is echoed
 * without it, as a server that reads the header would answer. One thread, blocking recvmmsg/sendmmsg in
 * batches of up to BATCH datagrams, so one system call moves many packets
 * when the load is high.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define MAXDGRAM 65536

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void big_buffers(int fd)
{
    int sz = 4 << 20;
    /* SO_*BUFFORCE ignores rmem_max/wmem_max when running as root. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
}

int main(int argc, char **argv)
{
    const char *addr = "127.0.0.1";
    int port = 0;
    int strip_proxy = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bind") && i + 1 < argc)
            addr = argv[++i];
        else if (!strcmp(argv[i], "--strip-proxy"))
            strip_proxy = 1;
        else if (argv[i][0] != '-' && port == 0)
            port = atoi(argv[i]);
        else {
            fprintf(stderr, "usage: udp_echo PORT [--bind ADDR] [--strip-proxy]\n");
            return 2;
        }
    }
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: udp_echo PORT [--bind ADDR] [--strip-proxy]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    big_buffers(fd);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", addr);
        return 2;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");

    static char bufs[BATCH][MAXDGRAM];
    static struct sockaddr_in from[BATCH];
    static struct iovec iov[BATCH];
    static struct mmsghdr in[BATCH], out[BATCH];

    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAXDGRAM;
            memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
            in[i].msg_hdr.msg_iov = &iov[i];
            in[i].msg_hdr.msg_iovlen = 1;
            in[i].msg_hdr.msg_name = &from[i];
            in[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        /* Block for the first datagram, then take whatever else is queued. */
        int n = recvmmsg(fd, in, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) {
            out[i].msg_hdr = in[i].msg_hdr;
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = in[i].msg_len; /* echo exactly what came in */
            static const char sig[12] = "\r\n\r\n\0\r\nQUIT\n";
            if (strip_proxy && in[i].msg_len >= 16 && !memcmp(bufs[i], sig, 12)) {
                size_t h = 16 + (((unsigned char)bufs[i][14] << 8) | (unsigned char)bufs[i][15]);
                if (h <= in[i].msg_len) {
                    iov[i].iov_base = bufs[i] + h;
                    iov[i].iov_len = in[i].msg_len - h;
                }
            }
            out[i].msg_hdr.msg_iov = &iov[i];
        }
        int done = 0;
        while (done < n) {
            int s = sendmmsg(fd, out + done, (unsigned)(n - done), 0);
            if (s > 0) {
                done += s;
            } else if (s < 0 && errno == EINTR) {
                continue;
            } else {
                done++; /* skip a datagram that cannot be sent (UDP: drop it) */
            }
        }
    }
}
