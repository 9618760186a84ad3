// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// flushbench: a static guest program that measures how many durable small writes
// per second a DAX-mounted filesystem on a virtio-pmem device sustains. Every
// operation ends in a flush request to the device, so this measures the device's
// flush path as the guest sees it.
//
//   flushbench --mode fsync --threads T --ops N --dir DIR [--warmup W] [--require-dax]
//              [--no-write]
//   flushbench --mode msync --threads T --ops N --dir DIR [--warmup W] [--require-dax]
//
//   fsync: each thread t opens DIR/f<t> (preallocated, fully written: the guest never
//          allocates) and loops: pwrite 4 KiB at the next offset (wrapping at the file
//          size), fsync. N operations in total, split evenly between the threads.
//          With --no-write only the fsync: nothing is dirty, so each one is a bare
//          flush request to the device (used to drive many flushes cheaply).
//   msync: each thread t maps DIR/f<t> MAP_SHARED (a DAX mapping: stores go straight
//          to the device's memory) and loops: store 4 KiB at the next offset,
//          msync(MS_SYNC) that page.
//
// Each thread first does W untimed warm-up operations (default: min(100, N/T/10)).
// The clock (CLOCK_MONOTONIC) runs from the moment all threads are ready to the
// moment the last one finished. Output, one line:
//   VDP-BENCH mode=fsync threads=1 ops=2000 secs=1.620 ops_per_sec=1234.5 warmup=100 dax=1
// (warmup: untimed operations done before, all threads together; dax: every file
// used was DAX, per statx).
// Exit status: 0 on success, 1 on an I/O error, 2 on bad usage or (with
// --require-dax) a file that is not DAX.
//
// Build: gcc -static -O2 -pthread -o flushbench flushbench.c

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef STATX_ATTR_DAX
#define STATX_ATTR_DAX 0x00200000
#endif

#define OP_SIZE 4096

enum mode { MODE_FSYNC, MODE_MSYNC };

struct worker {
	pthread_t tid;
	int index;
	enum mode mode;
	const char *dir;
	long ops;
	long warmup;
	pthread_barrier_t *ready;
	int no_write;
	int dax;
	int failed;
	char err[4400];
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int is_dax(int fd)
{
	struct statx stx;
	if (statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &stx) != 0)
		return 0;
	return (stx.stx_attributes_mask & STATX_ATTR_DAX) && (stx.stx_attributes & STATX_ATTR_DAX);
}

static void fail(struct worker *w, const char *what)
{
	snprintf(w->err, sizeof(w->err), "thread %d: %s: %s", w->index, what, strerror(errno));
	w->failed = 1;
}

/* One operation: write 4 KiB at `off` and make it durable. */
static int op_fsync(int fd, char *buf, off_t off, long i, int no_write)
{
	if (no_write)
		return fsync(fd);
	memset(buf, (int)(i & 0xff), 64);
	if (pwrite(fd, buf, OP_SIZE, off) != OP_SIZE)
		return -1;
	return fsync(fd);
}

static int op_msync(char *map, off_t off, long i)
{
	memset(map + off, (int)(i & 0xff), OP_SIZE);
	return msync(map + off, OP_SIZE, MS_SYNC);
}

static void *run(void *arg)
{
	struct worker *w = arg;
	char path[4096];
	char *map = NULL;
	char *buf = aligned_alloc(OP_SIZE, OP_SIZE);
	struct stat st;
	int fd;
	int ok = buf != NULL;

	if (!ok)
		fail(w, "aligned_alloc");
	snprintf(path, sizeof(path), "%s/f%d", w->dir, w->index);
	fd = ok ? open(path, O_RDWR) : -1;
	if (ok && fd < 0) {
		fail(w, path);
		ok = 0;
	} else if (fstat(fd, &st) != 0 || (!w->no_write && st.st_size < OP_SIZE)) {
		errno = EINVAL;
		fail(w, "file smaller than 4 KiB");
		ok = 0;
	} else if (ok) {
		w->dax = is_dax(fd);
		memset(buf, 0x5a, OP_SIZE);
		if (w->mode == MODE_MSYNC) {
			map = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			if (map == MAP_FAILED) {
				fail(w, "mmap");
				map = NULL;
				ok = 0;
			}
		}
	}
	long slots = ok && st.st_size >= OP_SIZE ? st.st_size / OP_SIZE : 1;
	/* Warm-up (untimed), then wait for everybody, then the timed loop. The offsets
	 * of the timed loop continue where the warm-up stopped. */
	long i = 0;
	for (; ok && i < w->warmup; i++) {
		off_t off = (off_t)(i % slots) * OP_SIZE;
		if ((w->mode == MODE_FSYNC ? op_fsync(fd, buf, off, i, w->no_write) : op_msync(map, off, i)) != 0) {
			fail(w, "warm-up");
			ok = 0;
		}
	}
	pthread_barrier_wait(w->ready);
	for (long n = 0; ok && n < w->ops; n++, i++) {
		off_t off = (off_t)(i % slots) * OP_SIZE;
		if ((w->mode == MODE_FSYNC ? op_fsync(fd, buf, off, i, w->no_write) : op_msync(map, off, i)) != 0) {
			fail(w, w->mode == MODE_FSYNC ? "pwrite+fsync" : "store+msync");
			ok = 0;
		}
	}
	if (map)
		munmap(map, st.st_size);
	if (fd >= 0)
		close(fd);
	free(buf);
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: flushbench --mode fsync|msync [--threads T] --ops N --dir DIR "
			"[--warmup W] [--require-dax] [--no-write]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	enum mode mode = MODE_FSYNC;
	const char *mode_name = "fsync";
	const char *dir = NULL;
	long threads = 1, ops = 0, warmup = -1;
	int require_dax = 0, no_write = 0;

	for (int a = 1; a < argc; a++) {
		const char *o = argv[a];
		const char *v = a + 1 < argc ? argv[a + 1] : NULL;
		if (!strcmp(o, "--require-dax")) {
			require_dax = 1;
			continue;
		}
		if (!strcmp(o, "--no-write")) {
			no_write = 1;
			continue;
		}
		if (!v)
			usage();
		a++;
		if (!strcmp(o, "--mode")) {
			mode_name = v;
			if (!strcmp(v, "fsync"))
				mode = MODE_FSYNC;
			else if (!strcmp(v, "msync"))
				mode = MODE_MSYNC;
			else
				usage();
		} else if (!strcmp(o, "--threads")) {
			threads = atol(v);
		} else if (!strcmp(o, "--ops")) {
			ops = atol(v);
		} else if (!strcmp(o, "--dir")) {
			dir = v;
		} else if (!strcmp(o, "--warmup")) {
			warmup = atol(v);
		} else {
			usage();
		}
	}
	if (!dir || ops <= 0 || threads <= 0 || threads > 64)
		usage();
	if (no_write && mode != MODE_FSYNC)
		usage();
	if (no_write)
		mode_name = "flush";

	long per_thread = ops / threads;
	if (per_thread == 0)
		usage();
	if (warmup < 0)
		warmup = per_thread / 10 < 100 ? per_thread / 10 : 100;

	pthread_barrier_t ready;
	pthread_barrier_init(&ready, NULL, (unsigned)threads + 1);
	struct worker *w = calloc((size_t)threads, sizeof(*w));
	if (!w)
		return 1;
	for (long t = 0; t < threads; t++) {
		w[t] = (struct worker){ .index = (int)t, .mode = mode, .dir = dir,
					.ops = per_thread, .warmup = warmup, .ready = &ready,
					.no_write = no_write };
		if (pthread_create(&w[t].tid, NULL, run, &w[t]) != 0) {
			fprintf(stderr, "flushbench: pthread_create failed\n");
			return 1;
		}
	}
	pthread_barrier_wait(&ready);
	double t0 = now();
	for (long t = 0; t < threads; t++)
		pthread_join(w[t].tid, NULL);
	double secs = now() - t0;

	int failed = 0, dax = 1;
	for (long t = 0; t < threads; t++) {
		if (w[t].failed) {
			fprintf(stderr, "flushbench: %s\n", w[t].err);
			failed = 1;
		}
		dax &= w[t].dax;
	}
	if (failed) {
		printf("VDP-BENCH-FAILED mode=%s threads=%ld\n", mode_name, threads);
		return 1;
	}
	long total = per_thread * threads;
	printf("VDP-BENCH mode=%s threads=%ld ops=%ld secs=%.3f ops_per_sec=%.1f warmup=%ld dax=%d\n",
	       mode_name, threads, total, secs, secs > 0 ? (double)total / secs : 0.0,
	       warmup * threads, dax);
	fflush(stdout);
	if (require_dax && !dax) {
		fprintf(stderr, "flushbench: %s/f* is not DAX (mount -o dax on a 4 KiB-block fs?)\n",
			dir);
		return 2;
	}
	return 0;
}
