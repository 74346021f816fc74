// gloo_shim.cc — the thin C++ layer over Gloo behind gloo_shim.h: a gloo::rendezvous::Store over
// strata's st_store, the TCP device, full-mesh contexts, and the collectives. Exceptions stop here
// and become (code, message).
#include "gloo_shim.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/config.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/types.h>

namespace {

// gloo::rendezvous::Store over st_store, every key under `prefix`. Gloo expects get() to wait
// for the key; both get and wait honour the group's timeout and throw gloo::IoException on failure.
class StStoreAdapter : public gloo::rendezvous::Store {
 public:
  StStoreAdapter(st_store* store, std::string prefix, int64_t timeout_ms)
      : store_(store), prefix_(std::move(prefix)), timeout_ms_(timeout_ms) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    st_error err;
    std::string k = prefix_ + key;
    if (store_->set(store_, k.c_str(), data.data(), data.size(), &err) != ST_OK) throw gloo::IoException(err.message);
  }

  std::vector<char> get(const std::string& key) override { return getWithin(key, timeout_ms_); }

  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(timeout_ms_)); }

  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (const auto& key : keys) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      getWithin(key, left.count() > 0 ? left.count() : 1);
    }
  }

 private:
  std::vector<char> getWithin(const std::string& key, int64_t timeout_ms) {
    st_error err;
    std::string k = prefix_ + key;
    std::vector<char> value(4096);
    size_t len = value.size();
    st_result r = store_->get(store_, k.c_str(), value.data(), &len, timeout_ms, &err);
    if (r == ST_ERR_INVALID_ARGUMENT && len > value.size()) { // too small: len holds the size
      value.resize(len);
      r = store_->get(store_, k.c_str(), value.data(), &len, timeout_ms, &err);
    }
    if (r != ST_OK) throw gloo::IoException(std::string("rendezvous: ") + err.message);
    value.resize(len);
    return value;
  }

  st_store* store_;
  std::string prefix_;
  int64_t timeout_ms_;
};

int fail(const std::exception& e, char* msg, size_t cap) {
  std::snprintf(msg, cap, "%s", e.what());
  const char* w = e.what();
  if (std::strstr(w, "Timed out") || std::strstr(w, "timed out") || std::strstr(w, "Timeout") ||
      std::strstr(w, "timeout"))
    return GS_TIMEOUT;
  return GS_ERROR;
}

std::chrono::milliseconds ms(int64_t timeout_ms) { return std::chrono::milliseconds(timeout_ms > 0 ? timeout_ms : 1); }

template <typename T>
gloo::AllreduceOptions::Func reducer(gs_op op) {
  using Fn = void (*)(void*, const void*, const void*, size_t);
  Fn mx = &gloo::max<T>, mn = &gloo::min<T>, sm = &gloo::sum<T>;
  return op == GS_MAX ? mx : op == GS_MIN ? mn : sm;
}

template <typename T>
void run_allreduce(std::shared_ptr<gloo::Context>& ctx, void* buf, size_t count, gs_op op, uint32_t tag,
                   int64_t timeout_ms) {
  gloo::AllreduceOptions opts(ctx);
  opts.setOutput(static_cast<T*>(buf), count);
  opts.setReduceFunction(reducer<T>(op));
  opts.setTag(tag);
  opts.setTimeout(ms(timeout_ms));
  gloo::allreduce(opts);
}

uint8_t dummy_byte[8];

} // namespace

struct gs_device {
  std::shared_ptr<gloo::transport::Device> dev;
};

struct gs_ctx {
  std::shared_ptr<gloo::Context> ctx;
};

struct gs_p2p {
  std::unique_ptr<gloo::transport::UnboundBuffer> buf;
  bool is_send;
  int peer;
};

extern "C" {

int gs_device_create(const char* iface, const char* hostname, gs_device** out, char* msg, size_t cap) {
  *out = nullptr;
  try {
    gloo::transport::tcp::attr attr;
    if (iface && *iface) attr.iface = iface;
    else if (hostname && *hostname) attr.hostname = hostname;
    auto d = std::unique_ptr<gs_device>(new gs_device);
    d->dev = gloo::transport::tcp::CreateDevice(attr);
    *out = d.release();
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

void gs_device_free(gs_device* dev) { delete dev; }

int gs_connect(gs_device* dev, st_store* store, const char* prefix, int rank, int size, int64_t timeout_ms,
               gs_ctx** out, char* msg, size_t cap) {
  *out = nullptr;
  try {
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->setTimeout(ms(timeout_ms));
    StStoreAdapter adapter(store, prefix, timeout_ms);
    ctx->connectFullMesh(adapter, dev->dev);
    auto c = std::unique_ptr<gs_ctx>(new gs_ctx);
    c->ctx = ctx;
    *out = c.release();
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

void gs_free(gs_ctx* ctx) {
  if (!ctx) return;
  try {
    ctx->ctx->closeConnections();
  } catch (...) {
  }
  try {
    delete ctx;
  } catch (...) {
  }
}

int gs_allreduce(gs_ctx* c, void* buf, size_t count, gs_type type, gs_op op, uint32_t tag, int64_t timeout_ms,
                 char* msg, size_t cap) {
  if (count == 0) return GS_OK;
  try {
    switch (type) {
    case GS_F32: run_allreduce<float>(c->ctx, buf, count, op, tag, timeout_ms); break;
    case GS_F64: run_allreduce<double>(c->ctx, buf, count, op, tag, timeout_ms); break;
    case GS_I32: run_allreduce<int32_t>(c->ctx, buf, count, op, tag, timeout_ms); break;
    case GS_I64: run_allreduce<int64_t>(c->ctx, buf, count, op, tag, timeout_ms); break;
    case GS_U8: run_allreduce<uint8_t>(c->ctx, buf, count, op, tag, timeout_ms); break;
    }
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_allgatherv(gs_ctx* c, const void* in, void* out, const size_t* bytes_per_rank, uint32_t tag,
                  int64_t timeout_ms, char* msg, size_t cap) {
  try {
    std::vector<size_t> counts(bytes_per_rank, bytes_per_rank + c->ctx->size);
    size_t total = 0;
    for (size_t n : counts) total += n;
    if (total == 0) return GS_OK;
    gloo::AllgathervOptions opts(c->ctx);
    if (in && counts[c->ctx->rank] > 0)
      opts.setInput(static_cast<uint8_t*>(const_cast<void*>(in)), counts[c->ctx->rank]);
    opts.setOutput(static_cast<uint8_t*>(out), counts);
    opts.setTag(tag);
    opts.setTimeout(ms(timeout_ms));
    gloo::allgatherv(opts);
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_alltoallv(gs_ctx* c, const void* in, const int64_t* in_bytes, void* out, const int64_t* out_bytes,
                 uint32_t tag, int64_t timeout_ms, char* msg, size_t cap) {
  try {
    int n = c->ctx->size;
    std::vector<int64_t> ic(in_bytes, in_bytes + n), oc(out_bytes, out_bytes + n);
    int64_t ti = 0, to = 0;
    for (int i = 0; i < n; i++) ti += ic[i], to += oc[i];
    gloo::AlltoallvOptions opts(c->ctx);
    // Gloo wants real buffers even when this rank sends or receives nothing
    opts.setInput(ti ? static_cast<uint8_t*>(const_cast<void*>(in)) : dummy_byte, ic);
    opts.setOutput(to ? static_cast<uint8_t*>(out) : dummy_byte + 4, oc);
    opts.setTag(tag);
    opts.setTimeout(ms(timeout_ms));
    gloo::alltoallv(opts);
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_broadcast(gs_ctx* c, void* buf, size_t bytes, int root, uint32_t tag, int64_t timeout_ms, char* msg,
                 size_t cap) {
  if (bytes == 0) return GS_OK;
  try {
    gloo::BroadcastOptions opts(c->ctx);
    opts.setOutput(static_cast<uint8_t*>(buf), bytes);
    opts.setRoot(root);
    opts.setTag(tag);
    opts.setTimeout(ms(timeout_ms));
    gloo::broadcast(opts);
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_barrier(gs_ctx* c, uint32_t tag, int64_t timeout_ms, char* msg, size_t cap) {
  try {
    gloo::BarrierOptions opts(c->ctx);
    opts.setTag(tag);
    opts.setTimeout(ms(timeout_ms));
    gloo::barrier(opts);
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

// point-to-point slots live under their own prefix, apart from the collectives' (0x01..0x0f)
static uint64_t p2p_slot(uint32_t tag) { return gloo::Slot::build(0x7f, tag); }

int gs_send_post(gs_ctx* c, const void* buf, size_t bytes, int peer, uint32_t tag, gs_p2p** out, char* msg,
                 size_t cap) {
  *out = nullptr;
  try {
    auto p = std::unique_ptr<gs_p2p>(new gs_p2p);
    p->buf = c->ctx->createUnboundBuffer(bytes ? const_cast<void*>(buf) : dummy_byte, bytes);
    p->is_send = true;
    p->peer = peer;
    p->buf->send(peer, p2p_slot(tag));
    *out = p.release();
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_recv_post(gs_ctx* c, void* buf, size_t bytes, int peer, uint32_t tag, gs_p2p** out, char* msg, size_t cap) {
  *out = nullptr;
  try {
    auto p = std::unique_ptr<gs_p2p>(new gs_p2p);
    p->buf = c->ctx->createUnboundBuffer(bytes ? buf : dummy_byte, bytes);
    p->is_send = false;
    p->peer = peer;
    p->buf->recv(peer, p2p_slot(tag));
    *out = p.release();
    return GS_OK;
  } catch (const std::exception& e) {
    return fail(e, msg, cap);
  }
}

int gs_p2p_wait(gs_p2p* p, int64_t timeout_ms, char* msg, size_t cap) {
  int r = GS_OK;
  try {
    bool ok = p->is_send ? p->buf->waitSend(ms(timeout_ms)) : p->buf->waitRecv(ms(timeout_ms));
    if (!ok) {
      std::snprintf(msg, cap, "%s with rank %d was aborted", p->is_send ? "send" : "recv", p->peer);
      r = GS_ERROR;
    }
  } catch (const std::exception& e) {
    r = fail(e, msg, cap);
  }
  try {
    delete p;
  } catch (...) {
  }
  return r;
}

#define GS_STR_(x) #x
#define GS_STR(x) GS_STR_(x)
const char* gs_version(void) {
  return GS_STR(GLOO_VERSION_MAJOR) "." GS_STR(GLOO_VERSION_MINOR) "." GS_STR(GLOO_VERSION_PATCH);
}

} // extern "C"
