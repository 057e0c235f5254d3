/* rtpgen: the RTP load generator of scripts/bench_rtp.py, in C so that it does not take the
 * core the relay under test needs (the Python generator tops out at ~72k packets/s on this
 * machine, below the 100k of 1,000 G.711 calls).
 *
 * It plays 2N phones on 127.0.0.1. Phone i sends 50 packets/s of 172 bytes (RTP header + 160
 * bytes of G.711, 20 ms) from socket i % K to relay port i, and counts what comes back on its
 * K sockets. Sends are spread over SLOTS slots of each 20 ms period, like real phones, and go
 * out with sendmmsg (one call per socket and slot); receives use recvmmsg. Each packet carries
 * its send time (CLOCK_MONOTONIC, what Python's time.monotonic reads) as a big-endian double at
 * payload offset 0, exactly like the Python generator's packets, so a packet is late when it
 * arrives more than --late-ms after it was sent, and lost when it never arrives.
 * When it falls behind it sends late rather than skipping (like the Python generator) and
 * reports how far behind it got (max_lag): offered packets/s then comes out below nominal.
 *
 * Protocol (one JSON object per line on stdout, one line on stdin):
 *   out: {"ports": [...]}            the K local ports (phone i's source port is ports[i % K])
 *   in:  P0 P1 ... P(2N-1)           the relay port each phone sends to
 *   out: {"warm": n}                 after --warmup s of sending (n packets; at once without
 *                                    one): the measured window starts, and only packets sent
 *                                    from then on are counted (sent, lost, late)
 *   out: {"sent": n, "elapsed": s, "max_lag": s}      when the sending stops
 *   out: {"received": ..., ...}      after a drain: until every sent packet is back, nothing
 *                                    arrived for 1 s, or 10 s passed
 * Everything is bounded: at most 10,000 calls, 60 s of warm-up and 170 s of measured load, one
 * line of input, 127.0.0.1 only, and an alarm ends the process 60 s after the load should have
 * ended.
 *
 *   gcc -O2 -Wall -o rtpgen scripts/rtpgen.c
 *   rtpgen --calls 1000 --seconds 10 [--warmup 3] [--sockets 16] [--late-ms 100]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PPS 50
#define PAYLOAD 160
#define PACKET (12 + PAYLOAD)
#define SLOTS 10
#define BATCH 64
#define MAX_CALLS 10000
#define MAX_SECONDS 170.0
#define HIST_BUCKETS 10000 /* 0.1 ms each: delays up to 1 s, the rest in the last bucket */

struct phone {
    unsigned char packet[PACKET];
    struct sockaddr_in relay;
};

static struct phone *phones;
static int *fds;
static int nsock, streams;
static uint64_t hist[HIST_BUCKETS];
static uint64_t arrived, received, bad, late, send_errors;
static double max_delay, late_after = 0.1;
static double counted_from; /* packets sent before this (the warm-up) are not counted */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void put_double_be(unsigned char *p, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    for (int i = 7; i >= 0; i--, bits >>= 8)
        p[i] = bits & 0xff;
}

static double get_double_be(const unsigned char *p)
{
    uint64_t bits = 0;
    double v;
    for (int i = 0; i < 8; i++)
        bits = bits << 8 | p[i];
    memcpy(&v, &bits, 8);
    return v;
}

static int open_socket(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    int size = 4 << 20; /* capped by net.core.rmem_max */
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size) < 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("rtpgen: socket");
        exit(2);
    }
    return fd;
}

static int local_port(int fd)
{
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    return ntohs(addr.sin_port);
}

static void init_phone(int i, int relay_port)
{
    struct phone *ph = &phones[i];
    uint32_t ssrc = htonl(0x10000 + i);
    memset(ph->packet, 0xff, PACKET);
    ph->packet[0] = 0x80; /* RTP version 2, PCMU */
    ph->packet[1] = 0;
    memcpy(ph->packet + 8, &ssrc, 4);
    ph->relay.sin_family = AF_INET;
    ph->relay.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ph->relay.sin_port = htons(relay_port);
}

/* Count one arrival, as bench_rtp.py's Python generator does (bad size still counts),
 * unless it was sent during the warm-up. */
static void count(const unsigned char *buf, ssize_t len, double t)
{
    double stamp = len >= 20 ? get_double_be(buf + 12) : t;
    double delay = t - stamp;
    long bucket = (long)(delay * 10000.0);
    arrived++;
    if (stamp < counted_from)
        return;
    received++;
    bad += len != PACKET;
    if (delay > late_after)
        late++;
    if (delay > max_delay)
        max_delay = delay;
    hist[bucket < 0 ? 0 : bucket >= HIST_BUCKETS ? HIST_BUCKETS - 1 : bucket]++;
}

/* Read everything queued on one socket, BATCH datagrams per system call. */
static void drain_socket(int fd)
{
    static unsigned char bufs[BATCH][2048];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){bufs[i], sizeof bufs[i]};
        msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
    }
    for (;;) {
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            return;
        double t = now();
        for (int i = 0; i < n; i++)
            count(bufs[i], msgs[i].msg_len, t);
        if (n < BATCH)
            return;
    }
}

/* Receive until monotonic time `due`: at least one pass over the sockets even when late.
 * It never sleeps *on* the sockets (ppoll with a timeout): a sleeper on a socket's wait queue
 * must be woken by whoever delivers into it, and on loopback that is the relay's sendto, which
 * would then pay a cross-CPU wakeup per packet that a relay sending to a NIC never pays. So it
 * sleeps on a timer and looks at the sockets every POLL_STEP (packets wait up to that long in
 * the socket buffer: a bias of at most POLL_STEP on the measured delays). */
#define POLL_STEP 0.0005
static void drain_until(double due, struct pollfd *pfds)
{
    for (;;) {
        struct timespec zero = {0, 0};
        int n = ppoll(pfds, nsock, &zero, NULL);
        for (int k = 0; n > 0 && k < nsock; k++)
            if (pfds[k].revents & POLLIN)
                drain_socket(fds[k]);
        double left = due - now();
        if (left <= 0)
            return;
        if (left > POLL_STEP)
            left = POLL_STEP;
        struct timespec nap = {0, (long)(left * 1e9)};
        nanosleep(&nap, NULL);
    }
}

/* Send one slot: the phones first..stop-1, grouped by socket, one sendmmsg per socket. */
static uint64_t send_slot(int first, int stop, uint32_t seq)
{
    static struct mmsghdr msgs[MAX_CALLS * 2];
    static struct iovec iov[MAX_CALLS * 2];
    uint64_t sent = 0;
    uint16_t seq16 = htons(seq & 0xffff);
    uint32_t ts = htonl(seq * 160u);
    if (stop > streams)
        stop = streams;
    for (int k = 0; k < nsock; k++) {
        int n = 0;
        int start = first + ((k - first % nsock) % nsock + nsock) % nsock;
        double t = now();
        for (int i = start; i < stop; i += nsock) {
            struct phone *ph = &phones[i];
            memcpy(ph->packet + 2, &seq16, 2);
            memcpy(ph->packet + 4, &ts, 4);
            put_double_be(ph->packet + 12, t);
            iov[n] = (struct iovec){ph->packet, PACKET};
            msgs[n].msg_hdr = (struct msghdr){
                .msg_name = &ph->relay, .msg_namelen = sizeof ph->relay,
                .msg_iov = &iov[n], .msg_iovlen = 1};
            n++;
        }
        for (int done = 0; done < n;) {
            int r = sendmmsg(fds[k], msgs + done, n - done, 0);
            if (r <= 0) { /* a full buffer: skip the rest, as the Python generator does */
                send_errors += n - done;
                break;
            }
            done += r;
            sent += r;
        }
    }
    return sent;
}

static double percentile(double q)
{
    uint64_t target = (uint64_t)(q * received), seen = 0;
    for (int b = 0; b < HIST_BUCKETS; b++)
        if ((seen += hist[b]) > target)
            return (b + 1) / 10000.0;
    return HIST_BUCKETS / 10000.0;
}

static void read_relay_ports(void)
{
    char *line = NULL;
    size_t cap = 0;
    if (getline(&line, &cap, stdin) < 0) {
        fprintf(stderr, "rtpgen: no relay ports on stdin\n");
        exit(2);
    }
    char *p = line;
    for (int i = 0; i < streams; i++) {
        char *end;
        long port = strtol(p, &end, 10);
        if (end == p || port <= 0 || port > 65535) {
            fprintf(stderr, "rtpgen: need %d relay ports, got %d\n", streams, i);
            exit(2);
        }
        init_phone(i, (int)port);
        p = end;
        while (*p == ' ' || *p == ',')
            p++;
    }
    free(line);
}

int main(int argc, char **argv)
{
    int calls = 100;
    double seconds = 10.0, warmup = 0.0;
    nsock = 16;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--calls"))
            calls = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--sockets"))
            nsock = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--late-ms"))
            late_after = atof(argv[i + 1]) / 1000.0;
        else if (!strcmp(argv[i], "--warmup"))
            warmup = atof(argv[i + 1]);
        else {
            fprintf(stderr, "rtpgen: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (calls < 1 || calls > MAX_CALLS || !(seconds > 0 && seconds <= MAX_SECONDS) || nsock < 1 ||
        !(warmup >= 0 && warmup <= 60)) {
        fprintf(stderr, "rtpgen: need 1..%d calls, 0..%g s, 0..60 s of warm-up, >= 1 socket\n",
                MAX_CALLS, MAX_SECONDS);
        return 2;
    }
    alarm((unsigned)(warmup + seconds) + 60); /* input, load, drain: never more than this */
    streams = 2 * calls;
    if (nsock > streams)
        nsock = streams;
    phones = calloc(streams, sizeof *phones);
    fds = calloc(nsock, sizeof *fds);
    struct pollfd *pfds = calloc(nsock, sizeof *pfds);
    printf("{\"ports\": [");
    for (int k = 0; k < nsock; k++) {
        fds[k] = open_socket();
        pfds[k] = (struct pollfd){.fd = fds[k], .events = POLLIN};
        printf("%s%d", k ? ", " : "", local_port(fds[k]));
    }
    printf("]}\n");
    fflush(stdout);
    read_relay_ports();

    int per_slot = (streams + SLOTS - 1) / SLOTS;
    double period = 1.0 / PPS, start = now(), max_lag = 0.0, tick;
    double stop = start + warmup + seconds, window = start + warmup;
    uint64_t sent = 0;
    int warm = warmup == 0;
    counted_from = warm ? start : 1e300; /* nothing counts before the window starts */
    if (warm)
        printf("{\"warm\": 0}\n"), fflush(stdout);
    for (uint32_t seq = 0; (tick = start + seq * period) < stop; seq++) {
        for (int slot = 0; slot < SLOTS; slot++) {
            double due = tick + slot * period / SLOTS;
            drain_until(due, pfds);
            if (!warm && due >= window) { /* the measured window starts here */
                printf("{\"warm\": %llu}\n", (unsigned long long)sent);
                fflush(stdout);
                /* Packets are stamped when they leave: those stamped before now were sent
                 * during the warm-up, however late the generator was. */
                warm = 1, sent = 0, max_lag = 0.0, window = counted_from = now();
            }
            double lag = now() - due;
            if (lag > max_lag)
                max_lag = lag;
            sent += send_slot(slot * per_slot, (slot + 1) * per_slot, seq);
        }
    }
    double elapsed = now() - window;
    printf("{\"sent\": %llu, \"elapsed\": %.6f, \"max_lag\": %.6f}\n", (unsigned long long)sent,
           elapsed, max_lag);
    fflush(stdout);

    double end = now() + 10.0, last_rx = now();
    uint64_t before = arrived;
    while (received < sent && now() < end && now() - last_rx < 1.0) {
        drain_until(now() + 0.05, pfds);
        if (arrived != before)
            last_rx = now(), before = arrived;
    }
    printf("{\"received\": %llu, \"bad\": %llu, \"late\": %llu, \"send_errors\": %llu, "
           "\"max_delay\": %.6f, \"p50\": %.4f, \"p99\": %.4f, \"p999\": %.4f}\n",
           (unsigned long long)received, (unsigned long long)bad, (unsigned long long)late,
           (unsigned long long)send_errors, max_delay, percentile(0.5), percentile(0.99),
           percentile(0.999));
    fflush(stdout);
    return 0;
}
