/* gloo_shim.h — the C face of the thin C++ layer over Gloo (gloo_shim.cc). Everything the plugin
 * needs from Gloo goes through here; no C++ exception crosses it. Every call returns GS_OK, or
 * GS_ERROR / GS_TIMEOUT with Gloo's message copied into msg[cap]. Buffers are host memory. */
#ifndef STRATA_COMM_GLOO_SHIM_H
#define STRATA_COMM_GLOO_SHIM_H

#include <stddef.h>
#include <stdint.h>

#include <strata/comm.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { GS_OK = 0, GS_ERROR = 1, GS_TIMEOUT = 2 };
typedef enum gs_type { GS_F32 = 0, GS_F64 = 1, GS_I32 = 2, GS_I64 = 3, GS_U8 = 4 } gs_type;
typedef enum gs_op { GS_SUM = 0, GS_MAX = 1, GS_MIN = 2 } gs_op;

typedef struct gs_device gs_device;
typedef struct gs_ctx gs_ctx;

/* a TCP device on `iface` (a network interface name) or, when iface is NULL/empty, on the address
 * `hostname` resolves to */
int gs_device_create(const char *iface, const char *hostname, gs_device **out, char *msg, size_t cap);
void gs_device_free(gs_device *dev);

/* full-mesh rendezvous through `store` under key prefix `prefix` */
int gs_connect(gs_device *dev, st_store *store, const char *prefix, int rank, int size, int64_t timeout_ms,
               gs_ctx **out, char *msg, size_t cap);
/* closes every connection of the context (peers blocked on it get an error at once) */
void gs_free(gs_ctx *ctx);

/* in place on buf */
int gs_allreduce(gs_ctx *ctx, void *buf, size_t count, gs_type type, gs_op op, uint32_t tag, int64_t timeout_ms,
                 char *msg, size_t cap);
/* out holds every rank's bytes back to back; in == NULL: this rank's part is already in place */
int gs_allgatherv(gs_ctx *ctx, const void *in, void *out, const size_t *bytes_per_rank, uint32_t tag,
                  int64_t timeout_ms, char *msg, size_t cap);
/* packed: in holds in_bytes[r] for rank r back to back, out likewise */
int gs_alltoallv(gs_ctx *ctx, const void *in, const int64_t *in_bytes, void *out, const int64_t *out_bytes,
                 uint32_t tag, int64_t timeout_ms, char *msg, size_t cap);
int gs_broadcast(gs_ctx *ctx, void *buf, size_t bytes, int root, uint32_t tag, int64_t timeout_ms, char *msg,
                 size_t cap);
int gs_barrier(gs_ctx *ctx, uint32_t tag, int64_t timeout_ms, char *msg, size_t cap);

/* point to point: post, then wait (the buffer object lives in the handle) */
typedef struct gs_p2p gs_p2p;
int gs_send_post(gs_ctx *ctx, const void *buf, size_t bytes, int peer, uint32_t tag, gs_p2p **out, char *msg,
                 size_t cap);
int gs_recv_post(gs_ctx *ctx, void *buf, size_t bytes, int peer, uint32_t tag, gs_p2p **out, char *msg, size_t cap);
/* waits up to timeout_ms; frees the handle */
int gs_p2p_wait(gs_p2p *p, int64_t timeout_ms, char *msg, size_t cap);

/* "0.5.0" */
const char *gs_version(void);

#ifdef __cplusplus
}
#endif

#endif
