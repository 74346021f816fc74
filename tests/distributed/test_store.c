/* test_store.c — runtime/store.c: token refusal, get timeouts and waits, add and barrier across
 * forked processes, dead-peer detection by rank, bounds, and a stopped server.
 *
 * Expected values come from the arithmetic of the test itself (sum of rank+1 over the ranks), never
 * from the store's own output. Time bounds are generous (the machine is shared): a timeout must
 * take at least its nominal time and finish well before a hang would. */
#include "store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "st_test.h"
#include "store_process.h"

/* st_test.h tests its error argument for NULL; a function keeps gcc from calling that always true */
static st_error *ep(st_error *e) { return e; }

static const char *TOKEN = "job-token-for-tests";

static int64_t ms_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void test_wrong_token(int port) {
  st_error err;
  st_error_clear(&err);
  st_store *s = NULL;
  CHECK_RESULT(st_store_connect("127.0.0.1", port, "not-the-token", 0, 2000, &s, &err), ST_ERR_COMM, ep(&err));
  CHECK(s == NULL);
  CHECK_CONTAINS(err.message, "refused rank 0");
  CHECK_CONTAINS(err.message, "wrong job token");
  CHECK_CONTAINS(err.message, "STRATA_STORE_TOKEN");
  /* an empty token is not a wildcard */
  st_error_clear(&err);
  CHECK_RESULT(st_store_connect("127.0.0.1", port, "", 3, 2000, &s, &err), ST_ERR_COMM, ep(&err));
  CHECK_CONTAINS(err.message, "wrong job token");
}

static void test_get_timeout_and_values(int port) {
  st_error err;
  st_error_clear(&err);
  st_store *s = NULL;
  CHECK_OK(st_store_connect("127.0.0.1", port, TOKEN, 0, 2000, &s, &err), ep(&err));
  if (!s) return;
  char buf[64];
  size_t len = sizeof buf;
  int64_t t0 = ms_now();
  CHECK_RESULT(s->get(s, "missing/key", buf, &len, 300, &err), ST_ERR_TIMEOUT, ep(&err));
  int64_t took = ms_now() - t0;
  CHECK_MSG(took >= 290 && took < 5000, "get timeout of 300 ms took %lld ms", (long long)took);
  CHECK_CONTAINS(err.message, "missing/key");
  CHECK_CONTAINS(err.message, "no rank set it within 300 ms");
  CHECK_CONTAINS(err.where, "missing/key");

  /* timeout 0: a poll that says not found */
  len = sizeof buf;
  CHECK_RESULT(s->get(s, "missing/key", buf, &len, 0, &err), ST_ERR_NOT_FOUND, ep(&err));

  /* binary values with zero bytes round-trip exactly */
  const uint8_t value[6] = {1, 0, 2, 0, 255, 7};
  CHECK_OK(s->set(s, "bin", value, sizeof value, &err), ep(&err));
  len = sizeof buf;
  CHECK_OK(s->get(s, "bin", buf, &len, 1000, &err), ep(&err));
  CHECK(len == sizeof value && memcmp(buf, value, sizeof value) == 0);
  /* too small a buffer: an error with the needed size in *len */
  len = 3;
  CHECK_RESULT(s->get(s, "bin", buf, &len, 1000, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK(len == sizeof value);
  CHECK_CONTAINS(err.message, "6 bytes");
  /* overwriting, empty values */
  CHECK_OK(s->set(s, "bin", "", 0, &err), ep(&err));
  len = sizeof buf;
  CHECK_OK(s->get(s, "bin", buf, &len, 1000, &err), ep(&err));
  CHECK(len == 0);
  /* bounds */
  char longkey[ST_STORE_KEY_MAX + 2];
  memset(longkey, 'k', sizeof longkey - 1);
  longkey[sizeof longkey - 1] = '\0';
  CHECK_RESULT(s->set(s, longkey, "x", 1, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_RESULT(s->set(s, "big", buf, (size_t)ST_STORE_VALUE_MAX + 1, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_CONTAINS(err.message, "bound");
  /* add on a non-integer value */
  CHECK_OK(st_store_set_str(s, "text", "hello", &err), ep(&err));
  int64_t v = 0;
  CHECK_RESULT(s->add(s, "text", 1, &v, &err), ST_ERR_COMM, ep(&err));
  CHECK_CONTAINS(err.message, "not an integer");
  /* the connection is still usable after server-side errors */
  CHECK_OK(s->add(s, "fresh", -5, &v, &err), ep(&err));
  CHECK(v == -5);
  char str[32];
  CHECK_OK(st_store_get_str(s, "fresh", str, sizeof str, 100, &err), ep(&err));
  CHECK(strcmp(str, "-5") == 0);
  st_store_close(s);
}

/* child body: returns the exit code (0 = all good); prints what failed */
static int child_rank(int port, int rank, int world) {
  st_error err;
  st_error_clear(&err);
  st_store *s = NULL;
  if (st_store_connect("127.0.0.1", port, TOKEN, rank, 5000, &s, &err) != ST_OK) {
    fprintf(stderr, "rank %d connect: %s\n", rank, err.message);
    return 2;
  }
  int rc = 0;
  int64_t v = 0;
  /* the last rank sets its key late: the others' gets must wait for it */
  if (rank == world - 1) usleep(300 * 1000);
  char key[64], want[32], got[32], counter[32], sync[32], end[32];
  snprintf(counter, sizeof counter, "w%d/counter", world);
  snprintf(sync, sizeof sync, "w%d/sync", world);
  snprintf(end, sizeof end, "w%d/end", world);
  snprintf(key, sizeof key, "w%d/addr/%d", world, rank);
  snprintf(want, sizeof want, "host-of-%d", rank);
  if (st_store_set_str(s, key, want, &err) != ST_OK) rc = 3;
  if (s->add(s, counter, rank + 1, &v, &err) != ST_OK) rc = 4;
  for (int round = 0; round < 3 && !rc; round++)
    if (s->barrier(s, sync, rank, world, 10000, &err) != ST_OK) rc = 5;
  /* after the barrier every rank's add is in */
  if (!rc && st_store_get_str(s, counter, got, sizeof got, 1000, &err) != ST_OK) rc = 6;
  if (!rc && atoll(got) != (int64_t)world * (world + 1) / 2) {
    fprintf(stderr, "rank %d: counter %s, expected %d\n", rank, got, world * (world + 1) / 2);
    rc = 7;
  }
  int peer = (rank + 1) % world;
  snprintf(key, sizeof key, "w%d/addr/%d", world, peer);
  snprintf(want, sizeof want, "host-of-%d", peer);
  if (!rc && (st_store_get_str(s, key, got, sizeof got, 10000, &err) != ST_OK || strcmp(got, want))) rc = 8;
  if (!rc && s->barrier(s, end, rank, world, 10000, &err) != ST_OK) rc = 9;
  if (rc) fprintf(stderr, "rank %d failed at step %d: %s\n", rank, rc, err.message);
  st_store_close(s);
  return rc;
}

static void test_forked_ranks(int port, int world) {
  pid_t pids[8];
  for (int r = 0; r < world; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(child_rank(port, r, world));
  }
  for (int r = 0; r < world; r++) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "world %d rank %d exited with status %d", world, r,
              status);
  }
}

/* rank 1 dies (SIGKILL) while rank 0 waits in a barrier: rank 0 hears about it by rank, fast */
static void test_dead_peer(int port) {
  st_error err;
  st_error_clear(&err);
  int ready[2];
  if (pipe(ready) != 0) return;
  pid_t pid = fork();
  if (pid == 0) {
    st_store *s = NULL;
    if (st_store_connect("127.0.0.1", port, TOKEN, 1, 5000, &s, &err) != ST_OK) _exit(2);
    if (write(ready[1], "r", 1) != 1) _exit(3);
    pause(); /* killed here */
    _exit(0);
  }
  char c;
  CHECK(read(ready[0], &c, 1) == 1);
  close(ready[0]);
  close(ready[1]);
  st_store *s = NULL;
  CHECK_OK(st_store_connect("127.0.0.1", port, TOKEN, 0, 2000, &s, &err), ep(&err));
  if (!s) return;
  char list[64];
  CHECK_OK(st_store_get_str(s, ST_STORE_DEAD_KEY, list, sizeof list, 0, &err), ep(&err));
  CHECK(strcmp(list, "") == 0);
  /* kill rank 1 a little after rank 0 entered the barrier */
  pid_t killer = fork();
  if (killer == 0) {
    usleep(200 * 1000);
    kill(pid, SIGKILL);
    _exit(0);
  }
  int64_t t0 = ms_now();
  CHECK_RESULT(s->barrier(s, "with-dead", 0, 2, 60000, &err), ST_ERR_COMM, ep(&err));
  int64_t took = ms_now() - t0;
  CHECK_MSG(took < 10000, "a dead rank was noticed only after %lld ms", (long long)took);
  CHECK_CONTAINS(err.message, "rank 1 died");
  CHECK_CONTAINS(err.message, "with-dead");
  waitpid(killer, NULL, 0);
  waitpid(pid, NULL, 0);
  CHECK_OK(st_store_get_str(s, ST_STORE_DEAD_KEY, list, sizeof list, 0, &err), ep(&err));
  CHECK(strcmp(list, "1") == 0);
  /* a get timeout names the dead ranks too */
  char buf[8];
  size_t len = sizeof buf;
  CHECK_RESULT(s->get(s, "never", buf, &len, 100, &err), ST_ERR_TIMEOUT, ep(&err));
  CHECK_CONTAINS(err.message, "ranks whose store connection dropped: 1");
  /* a barrier where rank 1 is alive but late times out naming it; reconnecting clears "dead" */
  st_store *late = NULL;
  CHECK_OK(st_store_connect("127.0.0.1", port, TOKEN, 1, 2000, &late, &err), ep(&err));
  CHECK_OK(st_store_get_str(s, ST_STORE_DEAD_KEY, list, sizeof list, 0, &err), ep(&err));
  CHECK(strcmp(list, "") == 0);
  t0 = ms_now();
  CHECK_RESULT(s->barrier(s, "late", 0, 2, 300, &err), ST_ERR_TIMEOUT, ep(&err));
  took = ms_now() - t0;
  CHECK_MSG(took >= 290 && took < 5000, "barrier timeout of 300 ms took %lld ms", (long long)took);
  CHECK_CONTAINS(err.message, "did not arrive: 1");
  /* the same barrier completes later, once both arrive (the timed-out arrival was withdrawn) */
  pid_t p2 = fork();
  if (p2 == 0) {
    st_error e2;
    _exit(late->barrier(late, "late", 1, 2, 5000, &e2) == ST_OK ? 0 : 1);
  }
  CHECK_OK(s->barrier(s, "late", 0, 2, 5000, &err), ep(&err));
  int status = 0;
  waitpid(p2, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* a barrier with a rank outside the world */
  CHECK_RESULT(s->barrier(s, "bad", 2, 2, 100, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  st_store_close(late);
  st_store_close(s);
}

/* the server goes away: a client's next request fails with a message about the store's host */
static void test_server_gone(void) {
  st_error err;
  st_error_clear(&err);
  st_store_server *srv = NULL;
  CHECK_OK(st_store_server_start("127.0.0.1", 0, TOKEN, &srv, &err), ep(&err));
  if (!srv) return;
  st_store *s = NULL;
  CHECK_OK(st_store_connect("127.0.0.1", st_store_server_port(srv), TOKEN, 0, 2000, &s, &err), ep(&err));
  st_store_server_stop(srv);
  if (!s) return;
  CHECK_RESULT(s->set(s, "k", "v", 1, &err), ST_ERR_COMM, ep(&err));
  CHECK_CONTAINS(err.message, "lost the connection to the store");
  st_store_close(s);
  /* nobody listening: connect gives up after its timeout with advice */
  int64_t t0 = ms_now();
  CHECK_RESULT(st_store_connect("127.0.0.1", 1, TOKEN, 0, 200, &s, &err), ST_ERR_TIMEOUT, ep(&err));
  CHECK(ms_now() - t0 < 5000);
  CHECK_CONTAINS(err.message, "MASTER_ADDR and MASTER_PORT");
}

/* a peer that announces a frame over the bound is cut off before anything is allocated or read */
static void test_oversized_frame(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
  const uint8_t huge[4] = {0xff, 0xff, 0xff, 0x7f}; /* ~2 GiB */
  CHECK(write(fd, huge, sizeof huge) == (ssize_t)sizeof huge);
  struct pollfd p = {.fd = fd, .events = POLLIN};
  CHECK(poll(&p, 1, 5000) == 1);
  char c;
  CHECK(read(fd, &c, 1) == 0); /* closed, no reply */
  close(fd);
}

static void test_token_generate(void) {
  st_error err;
  char a[33], b[33];
  CHECK_OK(st_store_token_generate(a, sizeof a, &err), ep(&err));
  CHECK_OK(st_store_token_generate(b, sizeof b, &err), ep(&err));
  CHECK(strlen(a) == 32 && strspn(a, "0123456789abcdef") == 32);
  CHECK(strcmp(a, b) != 0);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  alarm(120); /* a hang is a failure, not a stuck CI job */
  /* the server lives in its own process while this one forks ranks (see store_process.h); the
   * in-process server is exercised by test_server_gone */
  int port = 0;
  pid_t store_pid = store_process_start(TOKEN, &port);
  CHECK(store_pid > 0 && port > 0);
  if (store_pid <= 0) return st_test_finish("test_store");
  test_wrong_token(port);
  test_get_timeout_and_values(port);
  test_forked_ranks(port, 2);
  test_forked_ranks(port, 4);
  test_dead_peer(port);
  test_oversized_frame(port);
  store_process_stop(store_pid);
  test_server_gone();
  test_token_generate();
  return st_test_finish("test_store");
}
