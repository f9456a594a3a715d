/*
 * kdiff executor: runs batch descriptions on the kernel's io_uring through liburing,
 * independently of aiofused, and prints each batch's CQEs.
 *
 * Build: gcc -O1 -o kdiff-exec executor.c -luring
 * Usage: kdiff-exec DIR < batches      (DIR: where the batches' regular files go)
 *
 * Input, one record per line (integers in decimal; see tests/kdiff/harness.py):
 *   B <setup_flags> <entries> <deadline_ms> <hard_ms>   start a batch
 *   R <kind> <a> <b>          a resource, numbered from 0 in order:
 *                             file <size> 0 | pipe <prefill> 0 | bpipe <prefill> 0 |
 *                             eventfd <count> 0 |
 *                             stream <prefill> 0 | seqpacket <records> <size>
 *   S <ud> <op> <flags> <ioprio> <fd> <off> <len> <rw_flags> <addr> <buf_index>
 *                             <fd>: "r<i>.<end>" (resource i, end 0 or 1) or an integer;
 *                             <addr>: "b<n>" a buffer of n bytes (byte 0 is 1, the rest 0),
 *                             "t<ns>" a __kernel_timespec, "i<v>" the integer v
 *   E                         run the batch
 * Output per batch:
 *   B <io_uring_submit's return>
 *   C <user_data> <res> <flags>     each CQE in the order the CQ gave it
 *   H                               CQEs were still missing at the hard deadline
 *   E
 * CQEs are collected until as many as SQEs were consumed arrived (no CQE_SKIP_SUCCESS
 * in the batch), else until <deadline_ms> after the submit; never beyond <hard_ms>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_RES 16
#define MAX_SQE 256
#define SKIP_FLAG (1u << 6)

struct res { int fd[2]; };
struct ent {
	unsigned long long ud, off, addrval;
	int op, flags, ioprio, fd, len, rw, buf_index;
	char addrkind;
	void *mem;
	struct __kernel_timespec ts;
};

static struct res res[MAX_RES];
static int nres;
static struct ent ents[MAX_SQE];
static int nents;
static int batchno;

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what)
{
	fprintf(stderr, "kdiff-exec: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void fill(int fd, size_t n, size_t chunk)
{
	char buf[4096];
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (char)('a' + i % 26);
	while (n) {
		size_t k = n < chunk ? n : chunk;
		if (k > sizeof buf)
			k = sizeof buf;
		ssize_t w = write(fd, buf, k);
		if (w < 0)
			die("prefill");
		n -= (size_t)w;
	}
}

static void add_resource(const char *dir, const char *kind, long a, long b)
{
	struct res *r = &res[nres];
	r->fd[0] = r->fd[1] = -1;
	if (!strcmp(kind, "file")) {
		char path[4096];
		snprintf(path, sizeof path, "%s/kdiff-%d-%d.bin", dir, batchno, nres);
		r->fd[0] = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
		if (r->fd[0] < 0)
			die("open");
		fill(r->fd[0], (size_t)a, 4096);
		unlink(path);
	} else if (!strcmp(kind, "pipe")) {
		if (pipe2(r->fd, O_NONBLOCK))
			die("pipe2");
		fill(r->fd[1], (size_t)a, 4096);
	} else if (!strcmp(kind, "bpipe")) { /* a blocking pipe */
		if (pipe2(r->fd, 0))
			die("pipe2");
		fill(r->fd[1], (size_t)a, 4096);
	} else if (!strcmp(kind, "eventfd")) {
		r->fd[0] = eventfd((unsigned)a, EFD_NONBLOCK);
		if (r->fd[0] < 0)
			die("eventfd");
	} else if (!strcmp(kind, "stream") || !strcmp(kind, "seqpacket")) {
		int type = kind[0] == 's' && kind[1] == 't' ? SOCK_STREAM : SOCK_SEQPACKET;
		if (socketpair(AF_UNIX, type | SOCK_NONBLOCK, 0, r->fd))
			die("socketpair");
		if (type == SOCK_STREAM)
			fill(r->fd[1], (size_t)a, 4096);
		else
			for (long i = 0; i < a; i++)
				fill(r->fd[1], (size_t)b, (size_t)b);
	} else {
		fprintf(stderr, "kdiff-exec: unknown resource %s\n", kind);
		exit(2);
	}
	nres++;
}

static int parse_fd(const char *s)
{
	if (s[0] == 'r') {
		int i = 0, end = 0;
		if (sscanf(s, "r%d.%d", &i, &end) != 2 || i < 0 || i >= nres || end < 0 || end > 1)
			return -1;
		return res[i].fd[end];
	}
	return atoi(s);
}

static void run(unsigned setup_flags, unsigned entries, double deadline_ms, double hard_ms)
{
	struct io_uring ring;
	struct io_uring_params p;
	int has_skip = 0;

	memset(&p, 0, sizeof p);
	p.flags = setup_flags;
	int ret = io_uring_queue_init_params(entries, &ring, &p);
	if (ret < 0) {
		printf("B %d\nE\n", ret);
		return;
	}
	for (int i = 0; i < nents; i++) {
		struct ent *e = &ents[i];
		struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
		if (!sqe) {
			fprintf(stderr, "kdiff-exec: SQ full\n");
			exit(2);
		}
		memset(sqe, 0, sizeof *sqe);
		sqe->opcode = (__u8)e->op;
		sqe->flags = (__u8)e->flags;
		sqe->ioprio = (__u16)e->ioprio;
		sqe->fd = e->fd;
		sqe->off = e->off;
		sqe->len = (__u32)e->len;
		sqe->rw_flags = e->rw;
		sqe->user_data = e->ud;
		sqe->buf_index = (__u16)e->buf_index;
		if (e->addrkind == 'b') {
			e->mem = calloc(1, e->addrval ? e->addrval : 1);
			((char *)e->mem)[0] = 1;
			sqe->addr = (unsigned long long)(uintptr_t)e->mem;
		} else if (e->addrkind == 't') {
			e->ts.tv_sec = (long long)(e->addrval / 1000000000ull);
			e->ts.tv_nsec = (long long)(e->addrval % 1000000000ull);
			sqe->addr = (unsigned long long)(uintptr_t)&e->ts;
		} else {
			sqe->addr = e->addrval;
		}
		if (e->flags & SKIP_FLAG)
			has_skip = 1;
	}
	double t0 = now_ms();
	ret = io_uring_submit(&ring);
	printf("B %d\n", ret);
	int got = 0, want = ret > 0 ? ret : 0;
	for (;;) {
		double t = now_ms();
		if (!has_skip && got >= want)
			break;
		if (has_skip && t - t0 >= deadline_ms)
			break;
		if (t - t0 >= hard_ms) {
			printf("H\n");
			break;
		}
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {0, 1000000};
		if (io_uring_wait_cqe_timeout(&ring, &cqe, &ts) == 0) {
			printf("C %llu %d %u\n", (unsigned long long)cqe->user_data, cqe->res,
			       cqe->flags);
			io_uring_cqe_seen(&ring, cqe);
			got++;
		}
	}
	printf("E\n");
	fflush(stdout);
	io_uring_queue_exit(&ring);
}

int main(int argc, char **argv)
{
	char line[1024];
	unsigned setup_flags = 0, entries = 16;
	double deadline_ms = 0, hard_ms = 0;
	if (argc != 2) {
		fprintf(stderr, "usage: kdiff-exec DIR < batches\n");
		return 2;
	}
	while (fgets(line, sizeof line, stdin)) {
		char kind[32], fd[32], addr[48];
		long a, b;
		struct ent *e;
		switch (line[0]) {
		case 'B':
			nres = nents = 0;
			if (sscanf(line, "B %u %u %lf %lf", &setup_flags, &entries, &deadline_ms,
				   &hard_ms) != 4)
				goto bad;
			break;
		case 'R':
			if (nres >= MAX_RES || sscanf(line, "R %31s %ld %ld", kind, &a, &b) != 3)
				goto bad;
			add_resource(argv[1], kind, a, b);
			break;
		case 'S':
			if (nents >= MAX_SQE)
				goto bad;
			e = &ents[nents];
			memset(e, 0, sizeof *e);
			if (sscanf(line, "S %llu %d %d %d %31s %llu %d %d %47s %d", &e->ud, &e->op,
				   &e->flags, &e->ioprio, fd, &e->off, &e->len, &e->rw, addr,
				   &e->buf_index) != 10)
				goto bad;
			e->fd = parse_fd(fd);
			e->addrkind = addr[0];
			e->addrval = strtoull(addr + 1, NULL, 10);
			nents++;
			break;
		case 'E':
			run(setup_flags, entries, deadline_ms, hard_ms);
			/*
			 * The buffers are not freed: the ring's teardown is asynchronous, and a
			 * request still in flight when the batch was given up (a hang) may write
			 * into its buffer later.  A run is a few thousand small batches.
			 */
			for (int i = 0; i < nres; i++) {
				if (res[i].fd[0] >= 0)
					close(res[i].fd[0]);
				if (res[i].fd[1] >= 0)
					close(res[i].fd[1]);
			}
			batchno++;
			break;
		default:
			goto bad;
		}
		continue;
bad:
		fprintf(stderr, "kdiff-exec: bad line: %s", line);
		return 2;
	}
	return 0;
}
