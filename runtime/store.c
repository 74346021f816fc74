/* store.c — the TCP key-value rendezvous store (store.h): a threaded server and a client that
 * implements the st_store vtable of comm.h.
 *
 * Wire format: every message is a frame, u32 length (little endian) then that many bytes. A request
 * starts with an op byte, a reply with a status byte. Strings and byte values are u32 length +
 * bytes; integers are 8 (i64) or 4 (i32) little-endian bytes. Frames are bounded by
 * ST_STORE_KEY_MAX + ST_STORE_VALUE_MAX + a small header; a larger frame closes the connection. */
#include "store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { OP_HELLO = 1, OP_SET = 2, OP_GET = 3, OP_ADD = 4, OP_BARRIER = 5, OP_BYE = 6 };
enum { RS_OK = 0, RS_TIMEOUT = 1, RS_ERROR = 2, RS_REFUSED = 3, RS_NOT_FOUND = 4 };

#define STORE_MAGIC "strata-store-1"
#define FRAME_MAX ((size_t)ST_STORE_VALUE_MAX + ST_STORE_KEY_MAX + 64)
#define HANDSHAKE_TIMEOUT_MS 10000
#define REPLY_SLACK_MS 15000 /* how much longer than its own timeout a client waits for an answer */
#define DEFAULT_WAIT_MS 300000
#define STORE_TOTAL_MAX ((size_t)1 << 30) /* all values together */

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- buffers and framing */

typedef struct buf {
  uint8_t *data;
  size_t len, cap, pos; /* pos: read cursor */
  bool bad;             /* a read ran past the end or an allocation failed */
} buf;

static void buf_free(buf *b) {
  free(b->data);
  memset(b, 0, sizeof *b);
}

static void buf_put(buf *b, const void *p, size_t n) {
  if (b->bad) return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap *= 2;
    uint8_t *d = realloc(b->data, cap);
    if (!d) {
      b->bad = true;
      return;
    }
    b->data = d;
    b->cap = cap;
  }
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
}

static void put_u8(buf *b, uint8_t v) { buf_put(b, &v, 1); }
static void put_u32(buf *b, uint32_t v) {
  uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
  buf_put(b, x, 4);
}
static void put_i64(buf *b, int64_t v) {
  uint64_t u = (uint64_t)v;
  uint8_t x[8];
  for (int i = 0; i < 8; i++) x[i] = (uint8_t)(u >> (8 * i));
  buf_put(b, x, 8);
}
static void put_bytes(buf *b, const void *p, size_t n) {
  put_u32(b, (uint32_t)n);
  buf_put(b, p, n);
}
static void put_str(buf *b, const char *s) { put_bytes(b, s, strlen(s)); }

static const uint8_t *take(buf *b, size_t n) {
  if (b->bad || b->pos + n > b->len) {
    b->bad = true;
    return NULL;
  }
  const uint8_t *p = b->data + b->pos;
  b->pos += n;
  return p;
}
static uint8_t get_u8(buf *b) {
  const uint8_t *p = take(b, 1);
  return p ? p[0] : 0;
}
static uint32_t get_u32(buf *b) {
  const uint8_t *p = take(b, 4);
  return p ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24 : 0;
}
static int64_t get_i64(buf *b) {
  const uint8_t *p = take(b, 8);
  uint64_t u = 0;
  if (p)
    for (int i = 0; i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
  return (int64_t)u;
}
/* a pointer into the buffer and its length */
static const uint8_t *get_bytes(buf *b, size_t *n, size_t max) {
  uint32_t len = get_u32(b);
  if (b->bad || len > max) {
    b->bad = true;
    return NULL;
  }
  *n = len;
  return take(b, len);
}
/* a copied NUL-terminated string into out[cap]; false when too long or malformed */
static bool get_str(buf *b, char *out, size_t cap) {
  size_t n = 0;
  const uint8_t *p = get_bytes(b, &n, cap - 1);
  if (!p && n) return false;
  if (b->bad) return false;
  if (n) memcpy(out, p, n);
  out[n] = '\0';
  return memchr(out, '\0', n) == NULL;
}

/* 0: ok; -1: error or EOF (errno set, 0 for EOF); -2: deadline passed. deadline < 0: none */
static int io_wait(int fd, short events, int64_t deadline) {
  for (;;) {
    int wait = -1;
    if (deadline >= 0) {
      int64_t left = deadline - now_ms();
      if (left <= 0) return -2;
      wait = left > 1000000 ? 1000000 : (int)left;
    }
    struct pollfd p = {.fd = fd, .events = events};
    int r = poll(&p, 1, wait);
    if (r > 0) return 0;
    if (r < 0 && errno != EINTR) return -1;
  }
}

static int send_all(int fd, const void *p, size_t n, int64_t deadline) {
  const uint8_t *c = p;
  while (n) {
    int w = io_wait(fd, POLLOUT, deadline);
    if (w) return w;
    ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -1;
    }
    c += k;
    n -= (size_t)k;
  }
  return 0;
}

static int recv_all(int fd, void *p, size_t n, int64_t deadline) {
  uint8_t *c = p;
  while (n) {
    int w = io_wait(fd, POLLIN, deadline);
    if (w) return w;
    ssize_t k = recv(fd, c, n, 0);
    if (k == 0) {
      errno = 0;
      return -1;
    }
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -1;
    }
    c += k;
    n -= (size_t)k;
  }
  return 0;
}

static int send_frame(int fd, const buf *b, int64_t deadline) {
  uint8_t hdr[4] = {(uint8_t)b->len, (uint8_t)(b->len >> 8), (uint8_t)(b->len >> 16), (uint8_t)(b->len >> 24)};
  int r = send_all(fd, hdr, 4, deadline);
  return r ? r : send_all(fd, b->data, b->len, deadline);
}

/* reads one frame into b (reset); -3: frame over the bound */
static int recv_frame(int fd, buf *b, int64_t deadline) {
  uint8_t hdr[4];
  int r = recv_all(fd, hdr, 4, deadline);
  if (r) return r;
  size_t n = (size_t)hdr[0] | (size_t)hdr[1] << 8 | (size_t)hdr[2] << 16 | (size_t)hdr[3] << 24;
  if (n > FRAME_MAX || n == 0) return -3;
  b->len = b->pos = 0;
  b->bad = false;
  if (n > b->cap) {
    uint8_t *d = realloc(b->data, n);
    if (!d) return -1;
    b->data = d;
    b->cap = n;
  }
  r = recv_all(fd, b->data, n, deadline);
  if (r) return r;
  b->len = n;
  return 0;
}

/* ---------------------------------------------------------------- server */

typedef struct kv_entry {
  char *key;
  uint8_t *value;
  size_t len;
} kv_entry;

typedef struct barrier_entry {
  char *name;
  int world;
  uint8_t *arrived;
  int count;
  uint64_t generation;
  struct barrier_entry *next;
} barrier_entry;

typedef struct conn {
  struct st_store_server *srv;
  int fd;
  int rank; /* after the handshake; ST_STORE_RANK_NONE for non-rank clients */
  bool authenticated, said_bye, done;
  pthread_t thread;
  struct conn *next;
} conn;

struct st_store_server {
  int listen_fd, port;
  int stop_pipe[2];
  char token[ST_STORE_TOKEN_MAX + 1];
  pthread_t accept_thread;
  pthread_mutex_t mu;
  pthread_cond_t cv; /* signalled on every set/add/barrier arrival/disconnect/stop */
  bool stopping;
  kv_entry *kv;
  size_t kv_count, kv_cap, total_bytes;
  barrier_entry *barriers;
  conn *conns;
  uint8_t *dead; /* by rank */
  int dead_cap;
};

static void cond_deadline(struct timespec *ts, int64_t ms_from_now) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms_from_now / 1000;
  ts->tv_nsec += (ms_from_now % 1000) * 1000000;
  if (ts->tv_nsec >= 1000000000) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000;
  }
}

/* waits on the server's condition until `deadline` (monotonic ms); false when it passed */
static bool server_wait(st_store_server *s, int64_t deadline) {
  int64_t left = deadline - now_ms();
  if (left <= 0) return false;
  struct timespec ts;
  cond_deadline(&ts, left > 1000 ? 1000 : left);
  pthread_cond_timedwait(&s->cv, &s->mu, &ts);
  return true;
}

static kv_entry *kv_find(st_store_server *s, const char *key) {
  for (size_t i = 0; i < s->kv_count; i++)
    if (!strcmp(s->kv[i].key, key)) return &s->kv[i];
  return NULL;
}

/* under s->mu; false on allocation failure or the global bound */
static bool kv_set(st_store_server *s, const char *key, const void *value, size_t len) {
  kv_entry *e = kv_find(s, key);
  size_t old = e ? e->len : 0;
  if (s->total_bytes - old + len > STORE_TOTAL_MAX) return false;
  uint8_t *copy = malloc(len ? len : 1);
  if (!copy) return false;
  if (len) memcpy(copy, value, len);
  if (!e) {
    if (s->kv_count == s->kv_cap) {
      size_t cap = s->kv_cap ? s->kv_cap * 2 : 64;
      kv_entry *n = realloc(s->kv, cap * sizeof *n);
      if (!n) {
        free(copy);
        return false;
      }
      s->kv = n;
      s->kv_cap = cap;
    }
    char *k = strdup(key);
    if (!k) {
      free(copy);
      return false;
    }
    e = &s->kv[s->kv_count++];
    e->key = k;
    e->value = NULL;
    e->len = 0;
  }
  free(e->value);
  e->value = copy;
  e->len = len;
  s->total_bytes = s->total_bytes - old + len;
  pthread_cond_broadcast(&s->cv);
  return true;
}

static bool rank_is_dead(st_store_server *s, int rank) { return rank >= 0 && rank < s->dead_cap && s->dead[rank]; }

static void set_dead(st_store_server *s, int rank, bool dead) {
  if (rank < 0) return;
  if (rank >= s->dead_cap) {
    if (!dead) return;
    int cap = s->dead_cap ? s->dead_cap : 64;
    while (cap <= rank) cap *= 2;
    uint8_t *d = realloc(s->dead, (size_t)cap);
    if (!d) return;
    memset(d + s->dead_cap, 0, (size_t)(cap - s->dead_cap));
    s->dead = d;
    s->dead_cap = cap;
  }
  s->dead[rank] = dead;
}

/* "1,3" into out */
static void dead_list(st_store_server *s, char *out, size_t cap) {
  size_t used = 0;
  out[0] = '\0';
  for (int r = 0; r < s->dead_cap; r++)
    if (s->dead[r]) used += (size_t)snprintf(out + used, used < cap ? cap - used : 0, "%s%d", used ? "," : "", r);
}

static void reply_error(buf *out, uint8_t status, const char *fmt, ...) ST_PRINTF(3, 4);
static void reply_error(buf *out, uint8_t status, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  out->len = 0;
  put_u8(out, status);
  put_str(out, msg);
}

static void handle_get(st_store_server *s, buf *in, buf *out) {
  char key[ST_STORE_KEY_MAX + 1];
  if (!get_str(in, key, sizeof key)) {
    reply_error(out, RS_ERROR, "malformed get request");
    return;
  }
  int64_t timeout = get_i64(in);
  int64_t deadline = now_ms() + (timeout > 0 ? timeout : 0);
  pthread_mutex_lock(&s->mu);
  if (!strcmp(key, ST_STORE_DEAD_KEY)) {
    char list[4096];
    dead_list(s, list, sizeof list);
    put_u8(out, RS_OK);
    put_str(out, list);
    pthread_mutex_unlock(&s->mu);
    return;
  }
  kv_entry *e;
  while (!(e = kv_find(s, key)) && !s->stopping && timeout > 0 && server_wait(s, deadline)) {
  }
  if (e) {
    put_u8(out, RS_OK);
    put_bytes(out, e->value, e->len);
  } else if (s->stopping) {
    reply_error(out, RS_ERROR, "the store is shutting down");
  } else {
    char list[4096];
    dead_list(s, list, sizeof list);
    if (timeout > 0)
      reply_error(out, RS_TIMEOUT, "no rank set it within %lld ms (%s%s)", (long long)timeout,
                  list[0] ? "ranks whose store connection dropped: " : "no rank's store connection has dropped",
                  list);
    else
      reply_error(out, RS_NOT_FOUND, "not set");
  }
  pthread_mutex_unlock(&s->mu);
}

static void handle_barrier(st_store_server *s, buf *in, buf *out) {
  char name[ST_STORE_KEY_MAX + 1];
  if (!get_str(in, name, sizeof name)) {
    reply_error(out, RS_ERROR, "malformed barrier request");
    return;
  }
  int rank = (int32_t)get_u32(in), world = (int32_t)get_u32(in);
  int64_t timeout = get_i64(in);
  if (in->bad || world < 1 || world > (1 << 20) || rank < 0 || rank >= world) {
    reply_error(out, RS_ERROR, "barrier '%s': rank %d is not in a world of %d", name, rank, world);
    return;
  }
  int64_t deadline = now_ms() + (timeout > 0 ? timeout : DEFAULT_WAIT_MS);
  pthread_mutex_lock(&s->mu);
  barrier_entry *b = s->barriers;
  while (b && strcmp(b->name, name)) b = b->next;
  if (!b) {
    b = calloc(1, sizeof *b);
    if (b) b->name = strdup(name);
    if (b) b->arrived = calloc((size_t)world, 1);
    if (!b || !b->name || !b->arrived) {
      if (b) free(b->name), free(b->arrived);
      free(b);
      pthread_mutex_unlock(&s->mu);
      reply_error(out, RS_ERROR, "out of memory in the store");
      return;
    }
    b->world = world;
    b->next = s->barriers;
    s->barriers = b;
  }
  if (b->world != world) {
    int other = b->world;
    pthread_mutex_unlock(&s->mu);
    reply_error(out, RS_ERROR, "barrier '%s': rank %d says the world has %d ranks, another rank said %d", name, rank,
                world, other);
    return;
  }
  if (b->arrived[rank]) {
    pthread_mutex_unlock(&s->mu);
    reply_error(out, RS_ERROR, "barrier '%s': rank %d arrived twice (two processes with the same RANK?)", name, rank);
    return;
  }
  uint64_t gen = b->generation;
  b->arrived[rank] = 1;
  if (++b->count == world) {
    b->generation++;
    b->count = 0;
    memset(b->arrived, 0, (size_t)world);
    pthread_cond_broadcast(&s->cv);
  }
  for (;;) {
    if (b->generation != gen) {
      put_u8(out, RS_OK);
      break;
    }
    int dead = -1;
    for (int r = 0; r < world && dead < 0; r++)
      if (!b->arrived[r] && rank_is_dead(s, r)) dead = r;
    bool timed_out = !s->stopping && dead < 0 && !server_wait(s, deadline);
    if (s->stopping || dead >= 0 || timed_out) {
      char missing[1024];
      size_t used = 0;
      int n_missing = 0;
      missing[0] = '\0';
      for (int r = 0; r < world; r++)
        if (!b->arrived[r] && n_missing++ < 32)
          used += (size_t)snprintf(missing + used, used < sizeof missing ? sizeof missing - used : 0, "%s%d",
                                   used ? ", " : "", r);
      b->arrived[rank] = 0;
      b->count--;
      if (s->stopping)
        reply_error(out, RS_ERROR, "barrier '%s': the store is shutting down", name);
      else if (dead >= 0)
        reply_error(out, RS_ERROR,
                    "barrier '%s': rank %d died (its store connection closed without a goodbye; see its log); "
                    "not arrived: rank %s",
                    name, dead, missing);
      else
        reply_error(out, RS_TIMEOUT, "barrier '%s' timed out after %lld ms: %d of %d rank(s) did not arrive: %s%s",
                    name, (long long)(timeout > 0 ? timeout : DEFAULT_WAIT_MS), n_missing, world, missing,
                    n_missing > 32 ? ", ..." : "");
      break;
    }
  }
  pthread_mutex_unlock(&s->mu);
}

static bool token_equal(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  unsigned diff = (unsigned)(la ^ lb);
  for (size_t i = 0; i < la && i < lb; i++) diff |= (unsigned)(a[i] ^ b[i]);
  return diff == 0;
}

static void *conn_main(void *arg) {
  conn *c = arg;
  st_store_server *s = c->srv;
  buf in = {0}, out = {0};
  /* handshake: magic, token, rank */
  if (recv_frame(c->fd, &in, now_ms() + HANDSHAKE_TIMEOUT_MS) == 0) {
    char magic[32], token[ST_STORE_TOKEN_MAX + 1];
    uint8_t op = get_u8(&in);
    bool ok_magic = op == OP_HELLO && get_str(&in, magic, sizeof magic) && !strcmp(magic, STORE_MAGIC);
    bool ok_token = ok_magic && get_str(&in, token, sizeof token) && token_equal(token, s->token);
    int rank = (int32_t)get_u32(&in);
    if (!ok_magic)
      reply_error(&out, RS_REFUSED, "not a strata store client (protocol %s expected)", STORE_MAGIC);
    else if (!ok_token || in.bad)
      reply_error(&out, RS_REFUSED,
                  "wrong job token: this store belongs to another job (STRATA_STORE_TOKEN must be the one the "
                  "launcher generated for this job)");
    else {
      c->authenticated = true;
      c->rank = rank < 0 ? ST_STORE_RANK_NONE : rank;
      pthread_mutex_lock(&s->mu);
      set_dead(s, c->rank, false);
      pthread_mutex_unlock(&s->mu);
      put_u8(&out, RS_OK);
    }
    send_frame(c->fd, &out, now_ms() + HANDSHAKE_TIMEOUT_MS);
  }
  while (c->authenticated && !c->said_bye) {
    int r = recv_frame(c->fd, &in, -1);
    if (r) break; /* EOF, error or an oversized frame: drop the connection */
    out.len = 0;
    out.bad = false;
    uint8_t op = get_u8(&in);
    char key[ST_STORE_KEY_MAX + 1];
    switch (op) {
    case OP_SET: {
      size_t n = 0;
      const uint8_t *v = NULL;
      bool ok = get_str(&in, key, sizeof key) && ((v = get_bytes(&in, &n, ST_STORE_VALUE_MAX)) != NULL || n == 0) && !in.bad;
      if (!ok) {
        reply_error(&out, RS_ERROR, "malformed set request (key over %d bytes or value over %u bytes?)",
                    ST_STORE_KEY_MAX, ST_STORE_VALUE_MAX);
        break;
      }
      pthread_mutex_lock(&s->mu);
      bool stored = kv_set(s, key, v, n);
      pthread_mutex_unlock(&s->mu);
      if (stored) put_u8(&out, RS_OK);
      else reply_error(&out, RS_ERROR, "the store is full (over %zu bytes of values) or out of memory", STORE_TOTAL_MAX);
      break;
    }
    case OP_GET: handle_get(s, &in, &out); break;
    case OP_ADD: {
      if (!get_str(&in, key, sizeof key)) {
        reply_error(&out, RS_ERROR, "malformed add request");
        break;
      }
      int64_t delta = get_i64(&in);
      pthread_mutex_lock(&s->mu);
      kv_entry *e = kv_find(s, key);
      int64_t cur = 0;
      char num[32];
      bool ok = true;
      if (e) {
        size_t n = e->len < sizeof num - 1 ? e->len : sizeof num - 1;
        memcpy(num, e->value, n);
        num[n] = '\0';
        char *end;
        cur = strtoll(num, &end, 10);
        ok = e->len > 0 && e->len < sizeof num && *end == '\0';
      }
      if (ok) {
        cur += delta;
        int len = snprintf(num, sizeof num, "%lld", (long long)cur);
        ok = kv_set(s, key, num, (size_t)len);
        pthread_mutex_unlock(&s->mu);
        if (ok) {
          put_u8(&out, RS_OK);
          put_i64(&out, cur);
        } else {
          reply_error(&out, RS_ERROR, "out of memory in the store");
        }
      } else {
        pthread_mutex_unlock(&s->mu);
        reply_error(&out, RS_ERROR, "add: the value of '%s' is not an integer", key);
      }
      break;
    }
    case OP_BARRIER: handle_barrier(s, &in, &out); break;
    case OP_BYE:
      c->said_bye = true;
      put_u8(&out, RS_OK);
      break;
    default: reply_error(&out, RS_ERROR, "unknown store request %u", (unsigned)op); break;
    }
    if (out.bad || send_frame(c->fd, &out, now_ms() + REPLY_SLACK_MS)) break;
  }
  pthread_mutex_lock(&s->mu);
  if (c->authenticated && !c->said_bye && !s->stopping) set_dead(s, c->rank, true);
  c->done = true;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  buf_free(&in);
  buf_free(&out);
  return NULL;
}

/* under s->mu: join and free connections whose thread has finished */
static void reap_conns(st_store_server *s, bool all) {
  conn **pp = &s->conns;
  while (*pp) {
    conn *c = *pp;
    if (c->done || all) {
      *pp = c->next;
      pthread_mutex_unlock(&s->mu);
      pthread_join(c->thread, NULL);
      close(c->fd);
      free(c);
      pthread_mutex_lock(&s->mu);
      pp = &s->conns; /* the list may have changed while unlocked */
    } else {
      pp = &c->next;
    }
  }
}

static void *accept_main(void *arg) {
  st_store_server *s = arg;
  for (;;) {
    struct pollfd p[2] = {{.fd = s->listen_fd, .events = POLLIN}, {.fd = s->stop_pipe[0], .events = POLLIN}};
    int r = poll(p, 2, 1000);
    if (r < 0 && errno != EINTR) break;
    if (p[1].revents) break;
    pthread_mutex_lock(&s->mu);
    reap_conns(s, false);
    pthread_mutex_unlock(&s->mu);
    if (r <= 0 || !(p[0].revents & POLLIN)) continue;
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conn *c = calloc(1, sizeof *c);
    if (!c) {
      close(fd);
      continue;
    }
    c->srv = s;
    c->fd = fd;
    c->rank = ST_STORE_RANK_NONE;
    pthread_mutex_lock(&s->mu);
    if (pthread_create(&c->thread, NULL, conn_main, c) != 0) {
      pthread_mutex_unlock(&s->mu);
      close(fd);
      free(c);
      continue;
    }
    c->next = s->conns;
    s->conns = c;
    pthread_mutex_unlock(&s->mu);
  }
  return NULL;
}

st_result st_store_server_start(const char *bind_addr, int port, const char *token, st_store_server **out,
                                st_error *err) {
  *out = NULL;
  if (!token) token = "";
  if (strlen(token) > ST_STORE_TOKEN_MAX)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "STRATA_STORE_TOKEN", "the store token is over %d characters",
                        ST_STORE_TOKEN_MAX);
  if (port < 0 || port > 65535)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "MASTER_PORT", "store port %d is not in 0..65535", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", port);
  if (bind_addr && !*bind_addr) bind_addr = NULL;
  int gai = getaddrinfo(bind_addr, portstr, &hints, &ai);
  if (gai) return st_error_set(err, ST_ERR_COMM, bind_addr, "cannot resolve the store's bind address: %s", gai_strerror(gai));
  int fd = -1, last_errno = 0;
  /* prefer IPv4 when both are offered (MASTER_ADDR is usually an IPv4 address) */
  for (int pass = 0; pass < 2 && fd < 0; pass++)
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
      if ((pass == 0) != (a->ai_family == AF_INET)) continue;
      fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      int one = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
        last_errno = errno;
        close(fd);
        fd = -1;
      }
    }
  freeaddrinfo(ai);
  if (fd < 0)
    return st_error_set(err, ST_ERR_COMM, "MASTER_PORT",
                        "cannot listen on %s:%d for the rendezvous store: %s (another job on this port? pick another "
                        "MASTER_PORT / --main_process_port)",
                        bind_addr ? bind_addr : "*", port, strerror(last_errno));
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &sl);
  int bound = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  st_store_server *s = calloc(1, sizeof *s);
  if (!s) {
    close(fd);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, NULL, "out of memory starting the store");
  }
  s->listen_fd = fd;
  s->port = bound;
  snprintf(s->token, sizeof s->token, "%s", token);
  pthread_mutex_init(&s->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&s->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (pipe2(s->stop_pipe, O_CLOEXEC) != 0 || pthread_create(&s->accept_thread, NULL, accept_main, s) != 0) {
    close(fd);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    return st_error_set(err, ST_ERR_INTERNAL, NULL, "cannot start the store's thread: %s", strerror(errno));
  }
  *out = s;
  return ST_OK;
}

int st_store_server_port(const st_store_server *s) { return s ? s->port : -1; }

void st_store_server_stop(st_store_server *s) {
  if (!s) return;
  if (write(s->stop_pipe[1], "x", 1) < 0) { /* the accept loop also polls once a second */
  }
  pthread_join(s->accept_thread, NULL);
  pthread_mutex_lock(&s->mu);
  s->stopping = true;
  for (conn *c = s->conns; c; c = c->next) shutdown(c->fd, SHUT_RDWR);
  pthread_cond_broadcast(&s->cv);
  reap_conns(s, true);
  pthread_mutex_unlock(&s->mu);
  close(s->listen_fd);
  close(s->stop_pipe[0]);
  close(s->stop_pipe[1]);
  for (size_t i = 0; i < s->kv_count; i++) {
    free(s->kv[i].key);
    free(s->kv[i].value);
  }
  free(s->kv);
  while (s->barriers) {
    barrier_entry *b = s->barriers;
    s->barriers = b->next;
    free(b->name);
    free(b->arrived);
    free(b);
  }
  free(s->dead);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s);
}

/* ---------------------------------------------------------------- client */

typedef struct store_client {
  st_store vt; /* first: st_store_close gets back here through vt.self */
  int fd;
  int rank;
  bool broken; /* a reply was lost: the stream is out of step, every later call fails */
  char host[256];
  int port;
  pthread_mutex_t mu;
  buf in, out;
} store_client;

static st_result client_lost(store_client *c, const char *what, int io, st_error *err) {
  c->broken = true;
  if (io == -2)
    return st_error_set(err, ST_ERR_TIMEOUT, what,
                        "the store at %s:%d did not answer in time (is the process hosting it — the launcher or rank 0 "
                        "— stuck?)",
                        c->host, c->port);
  return st_error_set(err, ST_ERR_COMM, what,
                      "lost the connection to the store at %s:%d (%s): the process hosting it — the launcher or "
                      "rank 0 — probably exited; see its log",
                      c->host, c->port, errno ? strerror(errno) : "closed by the server");
}

/* sends c->out, receives into c->in; on success returns the status byte (>= 0) */
static int client_roundtrip(store_client *c, const char *what, int64_t reply_wait_ms, st_error *err) {
  if (c->broken) {
    st_error_set(err, ST_ERR_COMM, what,
                 "the connection to the store at %s:%d broke earlier (see the first error); reconnect", c->host, c->port);
    return -1;
  }
  if (c->out.bad) {
    st_error_set(err, ST_ERR_OUT_OF_MEMORY, what, "out of memory building a store request");
    return -1;
  }
  int64_t deadline = now_ms() + reply_wait_ms;
  int io = send_frame(c->fd, &c->out, deadline);
  if (!io) io = recv_frame(c->fd, &c->in, deadline);
  if (io) {
    client_lost(c, what, io, err);
    return -1;
  }
  return get_u8(&c->in);
}

/* copies the error text of a non-OK reply into err */
static st_result reply_to_error(store_client *c, int status, const char *op, const char *key, st_error *err) {
  char msg[1024];
  if (!get_str(&c->in, msg, sizeof msg)) snprintf(msg, sizeof msg, "(malformed reply)");
  st_result code = status == RS_TIMEOUT ? ST_ERR_TIMEOUT : status == RS_NOT_FOUND ? ST_ERR_NOT_FOUND : ST_ERR_COMM;
  return st_error_set(err, code, key, "store %s '%s' at %s:%d: %s", op, key, c->host, c->port, msg);
}

static st_result check_key(const char *key, st_error *err) {
  if (!key || !*key || strlen(key) > ST_STORE_KEY_MAX)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, key, "store keys are 1..%d bytes", ST_STORE_KEY_MAX);
  return ST_OK;
}

static st_result client_set(st_store *s, const char *key, const void *value, size_t len, st_error *err) {
  store_client *c = s->self;
  ST_CHECK(check_key(key, err));
  if (len > ST_STORE_VALUE_MAX)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, key, "store value of %zu bytes is over the %u-byte bound", len,
                        ST_STORE_VALUE_MAX);
  pthread_mutex_lock(&c->mu);
  c->out.len = 0;
  put_u8(&c->out, OP_SET);
  put_str(&c->out, key);
  put_bytes(&c->out, value, len);
  int st = client_roundtrip(c, key, REPLY_SLACK_MS, err);
  st_result r = st < 0 ? err->code : st == RS_OK ? ST_OK : reply_to_error(c, st, "set", key, err);
  pthread_mutex_unlock(&c->mu);
  return r;
}

static st_result client_get(st_store *s, const char *key, void *value, size_t *len, int64_t timeout_ms, st_error *err) {
  store_client *c = s->self;
  ST_CHECK(check_key(key, err));
  if (timeout_ms < 0) timeout_ms = DEFAULT_WAIT_MS;
  pthread_mutex_lock(&c->mu);
  c->out.len = 0;
  put_u8(&c->out, OP_GET);
  put_str(&c->out, key);
  put_i64(&c->out, timeout_ms);
  int st = client_roundtrip(c, key, timeout_ms + REPLY_SLACK_MS, err);
  st_result r;
  if (st < 0) {
    r = err->code;
  } else if (st != RS_OK) {
    r = reply_to_error(c, st, "get", key, err);
  } else {
    size_t n = 0;
    const uint8_t *v = get_bytes(&c->in, &n, ST_STORE_VALUE_MAX);
    if (c->in.bad) {
      r = st_error_set(err, ST_ERR_COMM, key, "malformed reply from the store at %s:%d", c->host, c->port);
    } else if (n > *len) {
      r = st_error_set(err, ST_ERR_INVALID_ARGUMENT, key,
                       "store value of '%s' has %zu bytes, more than the %zu-byte buffer given", key, n, *len);
      *len = n;
    } else {
      if (n) memcpy(value, v, n);
      *len = n;
      r = ST_OK;
    }
  }
  pthread_mutex_unlock(&c->mu);
  return r;
}

static st_result client_add(st_store *s, const char *key, int64_t delta, int64_t *result, st_error *err) {
  store_client *c = s->self;
  ST_CHECK(check_key(key, err));
  pthread_mutex_lock(&c->mu);
  c->out.len = 0;
  put_u8(&c->out, OP_ADD);
  put_str(&c->out, key);
  put_i64(&c->out, delta);
  int st = client_roundtrip(c, key, REPLY_SLACK_MS, err);
  st_result r = st < 0 ? err->code : st == RS_OK ? ST_OK : reply_to_error(c, st, "add", key, err);
  if (r == ST_OK) {
    int64_t v = get_i64(&c->in);
    if (result) *result = v;
  }
  pthread_mutex_unlock(&c->mu);
  return r;
}

static st_result client_barrier(st_store *s, const char *name, int rank, int world, int64_t timeout_ms, st_error *err) {
  store_client *c = s->self;
  ST_CHECK(check_key(name, err));
  if (world < 1 || rank < 0 || rank >= world)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "barrier: rank %d is not in a world of %d", rank, world);
  if (timeout_ms <= 0) timeout_ms = DEFAULT_WAIT_MS;
  pthread_mutex_lock(&c->mu);
  c->out.len = 0;
  put_u8(&c->out, OP_BARRIER);
  put_str(&c->out, name);
  put_u32(&c->out, (uint32_t)rank);
  put_u32(&c->out, (uint32_t)world);
  put_i64(&c->out, timeout_ms);
  int st = client_roundtrip(c, name, timeout_ms + REPLY_SLACK_MS, err);
  st_result r = st < 0 ? err->code : st == RS_OK ? ST_OK : reply_to_error(c, st, "barrier", name, err);
  pthread_mutex_unlock(&c->mu);
  return r;
}

static int connect_once(const char *host, int port, int *err_no) {
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", port);
  if (getaddrinfo(host, portstr, &hints, &ai)) {
    *err_no = EHOSTUNREACH;
    return -1;
  }
  int fd = -1;
  for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      *err_no = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(ai);
  if (fd >= 0) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

st_result st_store_connect(const char *host, int port, const char *token, int rank, int64_t connect_timeout_ms,
                           st_store **out, st_error *err) {
  *out = NULL;
  if (!host || !*host) host = "127.0.0.1";
  if (!token) token = "";
  if (strlen(token) > ST_STORE_TOKEN_MAX)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "STRATA_STORE_TOKEN", "the store token is over %d characters",
                        ST_STORE_TOKEN_MAX);
  int64_t deadline = now_ms() + (connect_timeout_ms > 0 ? connect_timeout_ms : 0);
  int fd = -1, err_no = 0;
  for (;;) {
    fd = connect_once(host, port, &err_no);
    if (fd >= 0 || now_ms() >= deadline) break;
    usleep(50 * 1000);
  }
  if (fd < 0)
    return st_error_set(err, ST_ERR_TIMEOUT, "MASTER_ADDR",
                        "cannot reach the rendezvous store at %s:%d within %lld ms (%s): is rank 0 / the launcher "
                        "running, and are MASTER_ADDR and MASTER_PORT the same on every rank?",
                        host, port, (long long)connect_timeout_ms, strerror(err_no));
  store_client *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, NULL, "out of memory connecting to the store");
  }
  c->fd = fd;
  c->rank = rank;
  c->port = port;
  snprintf(c->host, sizeof c->host, "%s", host);
  pthread_mutex_init(&c->mu, NULL);
  c->vt = (st_store){.self = c, .set = client_set, .get = client_get, .add = client_add, .barrier = client_barrier};
  put_u8(&c->out, OP_HELLO);
  put_str(&c->out, STORE_MAGIC);
  put_str(&c->out, token);
  put_u32(&c->out, (uint32_t)rank);
  int st = client_roundtrip(c, "store handshake", HANDSHAKE_TIMEOUT_MS, err);
  if (st != RS_OK) {
    if (st >= 0) {
      char msg[1024];
      if (!get_str(&c->in, msg, sizeof msg)) snprintf(msg, sizeof msg, "(malformed reply)");
      st_error_set(err, ST_ERR_COMM, "STRATA_STORE_TOKEN", "the store at %s:%d refused rank %d: %s", host, port, rank,
                   msg);
    }
    st_store_abandon(&c->vt);
    return err->code;
  }
  *out = &c->vt;
  return ST_OK;
}

void st_store_abandon(st_store *s) {
  if (!s) return;
  store_client *c = s->self;
  close(c->fd);
  buf_free(&c->in);
  buf_free(&c->out);
  pthread_mutex_destroy(&c->mu);
  free(c);
}

void st_store_close(st_store *s) {
  if (!s) return;
  store_client *c = s->self;
  if (!c->broken) {
    st_error e;
    pthread_mutex_lock(&c->mu);
    c->out.len = 0;
    put_u8(&c->out, OP_BYE);
    client_roundtrip(c, "store goodbye", 2000, &e);
    pthread_mutex_unlock(&c->mu);
  }
  st_store_abandon(s);
}

st_result st_store_token_generate(char *out, size_t cap, st_error *err) {
  if (cap < 33) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, NULL, "token buffer under 33 bytes");
  uint8_t raw[16];
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  ssize_t n = fd >= 0 ? read(fd, raw, sizeof raw) : -1;
  if (fd >= 0) close(fd);
  if (n != (ssize_t)sizeof raw)
    return st_error_set(err, ST_ERR_IO, "/dev/urandom", "cannot read 16 random bytes for the job token");
  for (int i = 0; i < 16; i++) snprintf(out + 2 * i, 3, "%02x", raw[i]);
  return ST_OK;
}

st_result st_store_set_str(st_store *s, const char *key, const char *value, st_error *err) {
  return s->set(s, key, value, strlen(value), err);
}

st_result st_store_get_str(st_store *s, const char *key, char *out, size_t cap, int64_t timeout_ms, st_error *err) {
  if (cap == 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, key, "zero-size buffer");
  size_t len = cap - 1;
  st_result r = s->get(s, key, out, &len, timeout_ms, err);
  out[r == ST_OK ? len : 0] = '\0';
  return r;
}
