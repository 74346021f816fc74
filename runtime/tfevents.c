/* tfevents.c — TensorBoard event files, written without TensorFlow: TFRecord framing around
 * hand-encoded Event / Summary protobufs (only the scalar fields). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "metrics.h"

struct st_tfevents {
  FILE *f;
  char path[4352];
};

/* CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, bit at a time: event records are a
 * few hundred bytes per step, so a table buys nothing measurable. */
uint32_t st_crc32c(const void *data, size_t len) {
  const unsigned char *p = data;
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < len; i++) {
    crc ^= p[i];
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

static uint32_t masked_crc(const void *data, size_t len) {
  uint32_t c = st_crc32c(data, len);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

/* ---- a tiny protobuf encoder into a fixed buffer ---- */
typedef struct pb {
  unsigned char *p;
  size_t n, cap;
  bool overflow;
} pb;

static void pb_byte(pb *b, unsigned char c) {
  if (b->n < b->cap) b->p[b->n++] = c;
  else b->overflow = true;
}
static void pb_varint(pb *b, uint64_t v) {
  do {
    unsigned char c = v & 0x7F;
    v >>= 7;
    pb_byte(b, c | (v ? 0x80 : 0));
  } while (v);
}
static void pb_fixed(pb *b, const void *v, int bytes) { /* little-endian hosts only (x86-64, aarch64) */
  for (int i = 0; i < bytes; i++) pb_byte(b, ((const unsigned char *)v)[i]);
}
static void pb_bytes(pb *b, int field, const void *data, size_t len) {
  pb_varint(b, (uint64_t)field << 3 | 2);
  pb_varint(b, len);
  for (size_t i = 0; i < len; i++) pb_byte(b, ((const unsigned char *)data)[i]);
}

static st_result write_record(st_tfevents *t, const pb *ev, st_error *err) {
  unsigned char hdr[12];
  uint64_t len = ev->n;
  memcpy(hdr, &len, 8);
  uint32_t lc = masked_crc(hdr, 8), dc = masked_crc(ev->p, ev->n);
  memcpy(hdr + 8, &lc, 4);
  if (fwrite(hdr, 1, 12, t->f) != 12 || fwrite(ev->p, 1, ev->n, t->f) != ev->n || fwrite(&dc, 1, 4, t->f) != 4)
    return st_error_set(err, ST_ERR_IO, t->path, "cannot write the TensorBoard event file: %s (disk full?)",
                        strerror(errno));
  return ST_OK;
}

/* Event { wall_time = 1 (double), step = 2 (int64), then file_version = 3 or summary = 5 } */
static void event_head(pb *b, double wall_time, int64_t step) {
  pb_varint(b, 1 << 3 | 1);
  pb_fixed(b, &wall_time, 8);
  pb_varint(b, 2 << 3 | 0);
  pb_varint(b, (uint64_t)step);
}

st_result st_tfevents_open(const char *dir, st_tfevents **out, st_error *err) {
  *out = NULL;
  ST_CHECK(st_mkdir_p(dir, err));
  st_tfevents *t = calloc(1, sizeof *t);
  if (!t) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "tensorboard", "out of memory");
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  /* pid in the name: two runs (or a resumed run) in the same second must not share a file */
  snprintf(t->path, sizeof t->path, "%s/events.out.tfevents.%lld.%s.%d", dir, (long long)ts.tv_sec, host, (int)getpid());
  t->f = fopen(t->path, "wb");
  if (!t->f) {
    st_result r = st_error_set(err, ST_ERR_IO, "tensorboard", "cannot create %s: %s", t->path, strerror(errno));
    free(t);
    return r;
  }
  unsigned char buf[128];
  pb ev = {buf, 0, sizeof buf, false};
  event_head(&ev, (double)ts.tv_sec + ts.tv_nsec * 1e-9, 0);
  pb_bytes(&ev, 3, "brain.Event:2", 13);
  st_result r = write_record(t, &ev, err);
  if (r == ST_OK) r = st_tfevents_flush(t, err);
  if (r != ST_OK) {
    st_tfevents_close(t);
    return r;
  }
  *out = t;
  return ST_OK;
}

st_result st_tfevents_scalar(st_tfevents *t, int64_t step, double wall_time, const char *tag, float value,
                             st_error *err) {
  size_t tlen = strlen(tag);
  if (tlen > 1024) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "tensorboard", "tag longer than 1024 bytes");
  unsigned char vbuf[1100], sbuf[1120], ebuf[1160];
  pb val = {vbuf, 0, sizeof vbuf, false}, sum = {sbuf, 0, sizeof sbuf, false}, ev = {ebuf, 0, sizeof ebuf, false};
  pb_bytes(&val, 1, tag, tlen); /* Summary.Value.tag = 1 */
  pb_varint(&val, 2 << 3 | 5);  /* Summary.Value.simple_value = 2 (float) */
  pb_fixed(&val, &value, 4);
  pb_bytes(&sum, 1, val.p, val.n); /* Summary.value = 1 (repeated) */
  event_head(&ev, wall_time, step);
  pb_bytes(&ev, 5, sum.p, sum.n);
  if (val.overflow || sum.overflow || ev.overflow)
    return st_error_set(err, ST_ERR_INTERNAL, "tensorboard", "event buffer overflow for tag %s", tag);
  return write_record(t, &ev, err);
}

st_result st_tfevents_image(st_tfevents *t, int64_t step, double wall_time, const char *tag, const void *png,
                            size_t png_len, int32_t width, int32_t height, st_error *err) {
  size_t tlen = strlen(tag), cap = png_len + tlen + 128;
  unsigned char *buf = malloc(4 * cap);
  if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "tensorboard", "out of memory for image %s", tag);
  pb img = {buf, 0, cap, false}, val = {buf + cap, 0, cap, false}, sum = {buf + 2 * cap, 0, cap, false},
     ev = {buf + 3 * cap, 0, cap, false};
  pb_varint(&img, 1 << 3 | 0); /* Summary.Image.height = 1 */
  pb_varint(&img, (uint64_t)height);
  pb_varint(&img, 2 << 3 | 0); /* width = 2 */
  pb_varint(&img, (uint64_t)width);
  pb_varint(&img, 3 << 3 | 0); /* colorspace = 3: 4 = RGBA, the PNG says what it really is */
  pb_varint(&img, 4);
  pb_bytes(&img, 4, png, png_len); /* encoded_image_string = 4 */
  pb_bytes(&val, 1, tag, tlen);    /* Summary.Value.tag = 1 */
  pb_bytes(&val, 4, img.p, img.n); /* Summary.Value.image = 4 */
  pb_bytes(&sum, 1, val.p, val.n);
  event_head(&ev, wall_time, step);
  pb_bytes(&ev, 5, sum.p, sum.n);
  st_result r = img.overflow || val.overflow || sum.overflow || ev.overflow
                    ? st_error_set(err, ST_ERR_INTERNAL, "tensorboard", "event buffer overflow for image %s", tag)
                    : write_record(t, &ev, err);
  free(buf);
  return r;
}

st_result st_tfevents_flush(st_tfevents *t, st_error *err) {
  if (fflush(t->f) != 0)
    return st_error_set(err, ST_ERR_IO, t->path, "cannot write the TensorBoard event file: %s", strerror(errno));
  return ST_OK;
}

void st_tfevents_close(st_tfevents *t) {
  if (!t) return;
  if (t->f) fclose(t->f);
  free(t);
}

const char *st_tfevents_path(const st_tfevents *t) { return t->path; }
