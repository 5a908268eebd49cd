// Spike (issue #11): what one relay hop costs when the agent forwards it in
// user space, and when the kernel forwards it with sockmap. Not the agent's
// code: a measurement that decides what to build. run.sh makes the network
// namespaces and runs it; README.md beside it gives the results.
//
// One process, three roles, each thread in its own network namespace:
//   client (netns NS_C): 16-byte ping-pong, 20,000 round trips by default
//           measured, after a tenth as many for warm-up;
//   relay  (netns NS_C): accepts the client on 127.0.0.1, connects onward;
//   server (netns NS_S, 10.77.0.2): echoes.
// The client and the relay share NS_C, as an app and the in-pod agent do.
//
// Modes (how the relay hop is carried):
//   direct  no relay: the client connects to the server;
//   user    the relay polls, recv()s and send()s (what the agent does per
//           message), the app hop on loopback TCP;
//   sockmap the same relay, the app hop redirected both ways by sk_msg into
//           the other end's receive queue (the shape of phase one + two);
//   half    the client's sends go straight to the egress of the relay's
//           onward socket (sk_msg, no BPF_F_INGRESS); replies through the
//           relay on loopback TCP;
//   kernel  `half`, and the replies redirected by an sk_skb verdict program
//           on the onward socket into the client's socket (BPF_F_INGRESS):
//           the relay carries nothing.
// Checks (third argument, one connection each):
//   flood   the server sends 64 MiB while the client reads nothing for 3 s:
//           how much the path takes in before the sender blocks; then every
//           byte is read and checked in sequence;
//   up      the same the other way: the client sends, the server waits 4 s;
//   greet, greet-kick
//           (kernel mode) the server sends three 16-byte segments first,
//           which wait on the relay's onward socket before it joins the
//           sockmap: how many reach the client within 2 s, with no further
//           segment? Then the client sends a message, the server's echo
//           is the next segment, and all 64 bytes must arrive in order.
//           greet-kick sets SO_RCVLOWAT on the onward socket after the
//           insert (Linux runs the socket's data_ready then, which is the
//           verdict's). Exits 1 where greet gets any byte in the 2 s,
//           greet-kick fewer than 48, or the 64 bytes are not in order.
//   hold    (kernel mode) the verdict program answers SK_PASS instead of
//           redirecting, so what arrives stays in the onward socket's own
//           queue, which nobody reads: how much the server sends before it
//           blocks.
// The programs are six instructions each, written out below, so that the
// spike needs only a C compiler: no BPF toolchain, no libbpf.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SRV_PORT 7100
#define RELAY_PORT 7101
#define MSG 16
#define FLOOD (64u << 20)

static const char *ns_c, *ns_s;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void enter(const char *ns) {
    char path[128];
    snprintf(path, sizeof path, "/run/netns/%s", ns);
    int fd = open(path, O_RDONLY);
    if (fd < 0 || setns(fd, CLONE_NEWNET) < 0) die(path);
    close(fd);
}

static void nodelay(int s) {
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int tcp_listen(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (bind(s, (void *)&a, sizeof a) || listen(s, 16)) die("listen");
    return s;
}

static int tcp_connect(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (connect(s, (void *)&a, sizeof a)) die("connect");
    nodelay(s);
    return s;
}

static int readn(int fd, char *b, int n) {
    int got = 0;
    while (got < n) {
        int r = recv(fd, b + got, n - got, 0);
        if (r <= 0) return r;
        got += r;
    }
    return got;
}

// --- sockmap: two one-slot maps and a program per direction ---

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }

static int sockmap(void) {
    union bpf_attr a = {.map_type = BPF_MAP_TYPE_SOCKMAP, .key_size = 4, .value_size = 4, .max_entries = 1};
    int fd = bpf(BPF_MAP_CREATE, &a);
    if (fd < 0) die("sockmap create");
    return fd;
}

// return helper(ctx, map, 0, flags): redirect to slot 0 of `map`.
static int redirect_prog(int type, int map, int helper, int flags) {
    struct bpf_insn insn[] = {
        {.code = BPF_LD | BPF_DW | BPF_IMM, .dst_reg = 2, .src_reg = BPF_PSEUDO_MAP_FD, .imm = map},
        {0},
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 3, .imm = 0},
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 4, .imm = flags},
        {.code = BPF_JMP | BPF_CALL, .imm = helper},
        {.code = BPF_JMP | BPF_EXIT},
    };
    static char log[65536];
    union bpf_attr a = {.prog_type = type,
                        .insns = (uint64_t)insn,
                        .insn_cnt = sizeof insn / sizeof insn[0],
                        .license = (uint64_t) "GPL",
                        .log_buf = (uint64_t)log,
                        .log_size = sizeof log,
                        .log_level = 1};
    int fd = bpf(BPF_PROG_LOAD, &a);
    if (fd < 0) {
        fprintf(stderr, "%s\n", log);
        die("program load");
    }
    return fd;
}

// Sends of sockets in `from` go to slot 0 of `to`.
static void msg_redirect(int from, int to, int flags) {
    union bpf_attr a = {.target_fd = from,
                        .attach_bpf_fd = redirect_prog(BPF_PROG_TYPE_SK_MSG, to, BPF_FUNC_msg_redirect_map, flags),
                        .attach_type = BPF_SK_MSG_VERDICT};
    if (bpf(BPF_PROG_ATTACH, &a)) die("attach sk_msg");
}

// What sockets in `from` receive stays in their own receive queue (SK_PASS).
static void skb_pass(int from) {
    struct bpf_insn insn[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = SK_PASS},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr p = {.prog_type = BPF_PROG_TYPE_SK_SKB,
                        .insns = (uint64_t)insn,
                        .insn_cnt = 2,
                        .license = (uint64_t) "GPL"};
    int prog = bpf(BPF_PROG_LOAD, &p);
    if (prog < 0) die("program load");
    union bpf_attr a = {.target_fd = from, .attach_bpf_fd = prog, .attach_type = BPF_SK_SKB_VERDICT};
    if (bpf(BPF_PROG_ATTACH, &a)) die("attach sk_skb");
}

// What sockets in `from` receive goes into slot 0 of `to`'s receive queue.
static void skb_redirect(int from, int to) {
    union bpf_attr a = {.target_fd = from,
                        .attach_bpf_fd = redirect_prog(BPF_PROG_TYPE_SK_SKB, to, BPF_FUNC_sk_redirect_map, BPF_F_INGRESS),
                        .attach_type = BPF_SK_SKB_VERDICT};
    if (bpf(BPF_PROG_ATTACH, &a)) die("attach sk_skb");
}

static void put(int map, int sock) {
    uint32_t k = 0, v = sock;
    union bpf_attr a = {.map_fd = map, .key = (uint64_t)&k, .value = (uint64_t)&v, .flags = BPF_ANY};
    if (bpf(BPF_MAP_UPDATE_ELEM, &a)) die("sockmap update");
}

// --- modes ---

enum mode { DIRECT, USER, SOCKMAP, HALF, KERNEL };
static enum mode mode;
// SOCKMAP: app_map holds the client's socket, relay_map the relay's end of
// the app hop. HALF, KERNEL: app_map the client's socket, net_map the
// relay's onward socket.
static int app_map, relay_map, net_map;
static volatile int relay_listening, relay_set_up, client_in;
// 0: no greeting; 1: the server greets; 2: and the relay kicks the verdict.
static int greet;

// Waits for another thread's flag, 10 s at most.
static void wait_flag(volatile int *flag, const char *what) {
    for (int i = 0; !*flag; i++) {
        if (i == 100000) {
            fprintf(stderr, "%s: not within 10 s\n", what);
            exit(1);
        }
        usleep(100);
    }
}

// --- server ---

static volatile unsigned long server_sent, client_sent;

static void fill(uint32_t *buf, int n, uint32_t *k) {
    for (int i = 0; i < n; i++) buf[i] = (*k)++;
}

// Sends FLOOD bytes of consecutive u32 counters on `c`, counting into `*sent`.
static int send_sequence(int c, volatile unsigned long *sent) {
    static __thread uint32_t buf[16384];
    uint32_t k = 0;
    while (*sent < FLOOD) {
        fill(buf, 16384, &k);
        for (int off = 0; off < (int)sizeof buf;) {
            int r = send(c, (char *)buf + off, sizeof buf - off, 0);
            if (r <= 0) return -1;
            off += r;
            *sent += r;
        }
    }
    return 0;
}

// Reads until EOF or FLOOD bytes; the count read if all in sequence, else -1.
static long read_sequence(int c) {
    static __thread char rb[65536];
    uint32_t v, want = 0;
    unsigned long got = 0;
    int carry = 0;
    while (got < FLOOD) {
        int r = recv(c, rb + carry, sizeof rb - carry, 0);
        if (r <= 0) break;
        r += carry;
        int whole = r / 4 * 4;
        for (int i = 0; i < whole; i += 4, want++) {
            memcpy(&v, rb + i, 4);
            if (v != want) {
                fprintf(stderr, "out of sequence at byte %lu: %u, expected %u\n", got + i, v, want);
                return -1;
            }
        }
        got += whole;
        carry = r - whole;
        memmove(rb, rb + whole, carry);
    }
    return got;
}

// Echoes 16-byte messages; 'F' first: floods; 'U' first: waits 4 s, then
// reads and checks the client's flood.
static void *server(void *arg) {
    int l = *(int *)arg;
    for (;;) {
        int c = accept(l, NULL, NULL);
        nodelay(c);
        if (greet) {
            send(c, "greeting 1......", MSG, 0);
            send(c, "greeting 2......", MSG, 0);
            send(c, "greeting 3......", MSG, 0);
        }
        char b[MSG];
        while (readn(c, b, MSG) == MSG) {
            if (b[0] == 'F') {
                send_sequence(c, &server_sent);
                shutdown(c, SHUT_WR);
                break;
            }
            if (b[0] == 'U') {
                // Past the client's last report (at 3 s).
                sleep(4);
                long got = read_sequence(c);
                printf("server read %ld bytes in sequence (-1: out of sequence)\n", got);
                send(c, b, MSG, 0);
                break;
            }
            send(c, b, MSG, 0);
        }
        close(c);
    }
    return NULL;
}

// --- relay ---

static void *relay(void *arg) {
    (void)arg;
    int l = tcp_listen("127.0.0.1", RELAY_PORT);
    relay_listening = 1;
    int a = accept(l, NULL, NULL);
    nodelay(a);
    int u = tcp_connect("10.77.0.2", SRV_PORT);
    // The client reads this byte over TCP, then puts its socket in app_map.
    send(a, "G", 1, 0);
    if (mode == SOCKMAP) put(relay_map, a);
    if (greet) {
        // The greeting waits on u before u joins the sockmap, and the
        // client's socket is in app_map before the verdict can redirect.
        for (int i = 0, q = 0; q < 3 * MSG; i++) {
            if (i == 5000) die("greeting not queued within 5 s");
            if (ioctl(u, FIONREAD, &q)) die("FIONREAD");
            usleep(1000);
        }
        wait_flag(&client_in, "client in app_map");
    }
    if (mode == HALF || mode == KERNEL) put(net_map, u);
    if (greet == 2) {
        int one = 1;
        if (setsockopt(u, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one)) die("SO_RCVLOWAT");
    }
    relay_set_up = 1;
    // KERNEL: nothing to carry; wait for the client's EOF.
    struct pollfd p[2] = {{.fd = a, .events = POLLIN}, {.fd = u, .events = POLLIN}};
    int nfds = mode == KERNEL ? 1 : 2;
    static char b[65536];
    for (;;) {
        if (poll(p, nfds, -1) < 0) die("poll");
        for (int i = 0; i < nfds; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP))) continue;
            int r = recv(p[i].fd, b, sizeof b, MSG_DONTWAIT);
            if (r <= 0) goto done;
            for (int off = 0; off < r;) {
                int w = send(p[1 - i].fd, b + off, r - off, 0);
                if (w <= 0) goto done;
                off += w;
            }
        }
    }
done:
    close(a);
    close(u);
    close(l);
    return NULL;
}

// --- client ---

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

// Busy clock ticks of the whole host (user, nice, system, irq, softirq,
// steal). A tick is 10 ms: over 20,000 round trips, 0.5 us per round trip.
static long long busy_ticks(void) {
    FILE *f = fopen("/proc/stat", "r");
    long long v[8] = {0};
    if (!f || fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                     &v[7]) != 8)
        die("/proc/stat");
    fclose(f);
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
}

static const char *mode_name[] = {"direct", "user", "sockmap", "half", "kernel"};

static int ping_pong(int c, int n) {
    char b[MSG];
    memset(b, 'x', MSG);
    double *rtt = malloc(sizeof(double) * n);
    int warm = n / 10;
    long long t0 = 0;
    for (int i = 0; i < n + warm; i++) {
        if (i == warm) t0 = busy_ticks();
        double s = now_us();
        if (send(c, b, MSG, 0) != MSG) die("send");
        if (readn(c, b, MSG) != MSG) die("recv");
        if (i >= warm) rtt[i - warm] = now_us() - s;
    }
    long long ticks = busy_ticks() - t0;
    qsort(rtt, n, sizeof(double), cmp);
    printf("%-7s p50 %6.1f us  p99 %6.1f us  host CPU %5.1f us per round trip\n", mode_name[mode], rtt[n / 2],
           rtt[n * 99 / 100], ticks * (1e6 / sysconf(_SC_CLK_TCK)) / n);
    return 0;
}

static int hold_check(int c) {
    char b[MSG] = {'F'};
    send(c, b, MSG, 0);
    for (int s = 1; s <= 3; s++) {
        sleep(1);
        printf("%-7s hold t=%ds: server sent %lu of %u bytes\n", mode_name[mode], s, server_sent, FLOOD);
    }
    fflush(stdout);
    // Nobody reads the onward socket: leave without waiting for the flood.
    _exit(0);
}

// Reads until `want` bytes are in `buf` or `ms` pass; the count held.
static int read_for(int c, char *buf, int have, int want, int ms) {
    double end = now_us() + ms * 1000.0;
    while (have < want && now_us() < end) {
        struct pollfd p = {.fd = c, .events = POLLIN};
        if (poll(&p, 1, (int)((end - now_us()) / 1000) + 1) != 1) continue;
        int r = recv(c, buf + have, want - have, MSG_DONTWAIT);
        if (r > 0) have += r;
        if (r == 0) break;
    }
    return have;
}

static int greet_check(int c, const char *name) {
    char got[4 * MSG], msg[MSG];
    int first = read_for(c, got, 0, 3 * MSG, 2000);
    memcpy(msg, "after...........", MSG);
    if (send(c, msg, MSG, 0) != MSG) die("send");
    int all = read_for(c, got, first, 4 * MSG, 2000);
    int in_order = all == 4 * MSG && !memcmp(got, "greeting 1......greeting 2......greeting 3......after...........", 4 * MSG);
    printf("%-7s %s: the client got %d of the greeting's 48 bytes within 2 s; after its own message %d of 64, %s\n",
           mode_name[mode], name, first, all, in_order ? "in order" : "NOT in order");
    int expected = greet == 1 ? first == 0 : first == 3 * MSG;
    fflush(stdout);
    // The relay still polls its end: leave without the usual teardown.
    _exit(in_order && expected ? 0 : 1);
}

static int flood_check(int c) {
    char b[MSG] = {'F'};
    send(c, b, MSG, 0);
    for (int s = 1; s <= 3; s++) {
        sleep(1);
        int inq = 0;
        if (ioctl(c, FIONREAD, &inq)) die("FIONREAD");
        // What a read could take now (up to 64 KiB), without taking it.
        static char peek[65536];
        int can = recv(c, peek, sizeof peek, MSG_PEEK | MSG_DONTWAIT);
        FILE *f = fopen("/proc/net/sockstat", "r");
        char line[256], tcp[256] = "";
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "TCP:", 4)) strcpy(tcp, line);
        if (f) fclose(f);
        printf("%-7s flood t=%ds: server sent %lu of %u bytes; client's FIONREAD %d, MSG_PEEK %d; %s", mode_name[mode],
               s, server_sent, FLOOD, inq, can, tcp);
    }
    long got = read_sequence(c);
    printf("%-7s flood: client read %ld bytes in sequence (-1: out of sequence)\n", mode_name[mode], got);
    return got == FLOOD ? 0 : 1;
}

static void *client_flood(void *arg) {
    send_sequence(*(int *)arg, &client_sent);
    return NULL;
}

static int up_check(int c) {
    char b[MSG] = {'U'};
    send(c, b, MSG, 0);
    pthread_t t;
    pthread_create(&t, NULL, client_flood, &c);
    for (int s = 1; s <= 3; s++) {
        sleep(1);
        printf("%-7s up t=%ds: client sent %lu of %u bytes\n", mode_name[mode], s, client_sent, FLOOD);
    }
    pthread_join(t, NULL);
    return readn(c, b, MSG) == MSG ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: relay NS_C NS_S direct|user|sockmap|half|kernel N [flood|up|hold|greet|greet-kick]\n");
        return 2;
    }
    // Line by line, so that a run stopped by timeout(1) keeps what it printed.
    setvbuf(stdout, NULL, _IOLBF, 0);
    ns_c = argv[1];
    ns_s = argv[2];
    int m = 0;
    while (m < 5 && strcmp(argv[3], mode_name[m])) m++;
    if (m == 5) {
        fprintf(stderr, "unknown mode %s\n", argv[3]);
        return 2;
    }
    mode = m;
    int n = atoi(argv[4]);
    int hold = argc > 5 && !strcmp(argv[5], "hold");
    greet = argc > 5 && !strcmp(argv[5], "greet") ? 1 : argc > 5 && !strcmp(argv[5], "greet-kick") ? 2 : 0;
    if ((hold || greet) && mode != KERNEL) {
        fprintf(stderr, "%s is a check of the kernel mode\n", argv[5]);
        return 2;
    }

    enter(ns_s);
    int sl = tcp_listen("10.77.0.2", SRV_PORT);
    pthread_t ts, tr;
    pthread_create(&ts, NULL, server, &sl);
    enter(ns_c);
    if (mode == SOCKMAP) {
        app_map = sockmap();
        relay_map = sockmap();
        msg_redirect(app_map, relay_map, BPF_F_INGRESS);
        msg_redirect(relay_map, app_map, BPF_F_INGRESS);
    }
    if (mode == HALF || mode == KERNEL) {
        app_map = sockmap();
        net_map = sockmap();
        msg_redirect(app_map, net_map, 0);
        if (mode == KERNEL && hold) skb_pass(net_map);
        if (mode == KERNEL && !hold) skb_redirect(net_map, app_map);
    }
    int c;
    if (mode == DIRECT) {
        c = tcp_connect("10.77.0.2", SRV_PORT);
    } else {
        pthread_create(&tr, NULL, relay, NULL);
        wait_flag(&relay_listening, "relay listening");
        c = tcp_connect("127.0.0.1", RELAY_PORT);
        char g;
        if (recv(c, &g, 1, 0) != 1) die("relay's go");
        if (greet) {
            put(app_map, c);
            client_in = 1;
        }
        wait_flag(&relay_set_up, "relay set up");
        if (mode != USER && !greet) put(app_map, c);
    }
    if (hold) return hold_check(c);
    if (greet) return greet_check(c, argv[5]);
    if (argc > 5 && !strcmp(argv[5], "flood")) return flood_check(c);
    if (argc > 5 && !strcmp(argv[5], "up")) return up_check(c);
    return ping_pong(c, n);
}
